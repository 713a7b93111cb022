"""The sbatch scripts under a real scheduler: a single-node SLURM (slurmctld, slurmd, munge from
Debian's packages) started on localhost by the test itself, no systemd, no cgroups.

* docs/launching.md's small-CPU-node lines, submitted exactly as written on a 2-CPU node: the
  training scripts size themselves (2 ranks x 1 thread) and reproduce the single-process
  losses; ``slurm/sweep_array.sbatch`` over 2 tasks gathers the results.csv of a one-process
  ``megallama sweep`` of the same grid, bit for bit.
* A rank that dies under srun ends the job within 60 s, naming the rank and its last step.
* Preemption: ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@...`` does before the
  time limit) makes the ranks checkpoint and exit 75; the script requeues the job, and the
  rerun resumes from the checkpoint and completes.
* ``slurm/curate_array.sbatch`` runs `megallama curate` as a chain of array jobs (one per stage)
  and writes exactly the one-process output.

When SLURM cannot be started the tests skip with the reason (never a silent pass).
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import ROOT, assert_matches_reference, env, reference_losses, summary, train_args
from tests.localslurm import LocalSlurm, Unavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as exc:
        pytest.skip(f"cannot start a local SLURM: {exc}")
    yield cluster
    cluster.stop()


def _submit(slurm, script, options, args, logs: Path, **extra) -> str:
    logs.mkdir(parents=True, exist_ok=True)  # sbatch needs the --output directory to exist
    return slurm.sbatch(str(ROOT / "slurm" / script),
                        ["--chdir", str(ROOT), "--output", str(logs / "job.out"), *options], args,
                        env=env(MEGALLAMA_LOG_DIR=str(logs), **extra))


def _logs(logs: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(logs.glob("*"))
                     if p.is_file())


TWO_TASKS = ["--ntasks-per-node=2"]  # ranks per node; the job takes the whole (2-CPU) node


def _documented_small_node_lines() -> list[str]:
    """The command lines of docs/launching.md's small-CPU-node block (comments and blanks dropped)."""
    text = (ROOT / "docs" / "launching.md").read_text()
    block = text.split("On a small CPU node", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _records(slurm, job: str) -> list[dict]:
    """``scontrol show job`` of a job, one dict per record (an array job has one per task)."""
    out = []
    for line in slurm.scontrol("show", "job", "-o", job).splitlines():
        fields = {}
        for token in line.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        if fields:
            out.append(fields)
    return out


DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
THREADS = r"rank {r} of {w} \(local rank {r}\) on \S+: 1 CPU threads \(OMP_NUM_THREADS=1\)"


def test_documented_small_node_commands_run_to_completion(slurm, tmp_path, tmp_path_factory):
    """docs/launching.md's lines for a small CPU node, run as a user would from a checkout (no
    OMP_NUM_THREADS, no option but the documented ones) on the 2-CPU local SLURM: every job
    completes; the scripts size themselves (2 ranks x 1 thread, each rank says so); the 2-rank
    runs reproduce the one-process losses; the array sweep's gathered results.csv is the one a
    one-process `megallama sweep` of the same grid writes, bit for bit."""
    lines = _documented_small_node_lines()
    exports = [line for line in lines if line.startswith("export ")]
    submits = [line for line in lines if " sbatch " in f" {line} "]
    gathers = [line for line in lines if line not in exports and line not in submits]
    scripts = {re.search(r"slurm/(\S+\.sbatch)", line).group(1): line for line in submits}
    assert {"train_srun.sbatch", "train_deepspeed.sbatch", "sweep_array.sbatch"} <= set(scripts), lines
    grid = re.search(r"MEGALLAMA_GRID=(\S+)", scripts["sweep_array.sbatch"]).group(1)
    sweep_dir = re.search(r"MEGALLAMA_SWEEP_DIR=(\S+)", scripts["sweep_array.sbatch"]).group(1)
    assert gathers == [f"megallama sweep --grid {grid} --output {sweep_dir} --gather-only"], lines

    # a checkout as the docs assume one: slurm/, megallama/ and .venv/ here, megallama on the PATH
    co = tmp_path / "checkout"
    (co / "bin").mkdir(parents=True)
    for name in ("slurm", "megallama"):
        (co / name).symlink_to(ROOT / name)
    if sys.prefix != sys.base_prefix:
        (co / ".venv").symlink_to(sys.prefix)
    else:
        (co / ".venv" / "bin").mkdir(parents=True)
        (co / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (co / "bin" / "megallama").write_text('#!/bin/sh\nexec "$MEGALLAMA_PYTHON" -m megallama "$@"\n')
    (co / "bin" / "megallama").chmod(0o755)
    user = {k: v for k, v in env().items()
            if k not in ("OMP_NUM_THREADS", "MEGALLAMA_PYTHON", "MEGALLAMA_HOME", "MEGALLAMA_LOG_DIR")}
    user.update(SLURM_CONF=slurm.env["SLURM_CONF"], PATH=f"{co / 'bin'}:{user['PATH']}")

    def shell(line: str) -> str:
        r = subprocess.run(["bash", "-c", "\n".join([*exports, line])], cwd=co, env=user, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, f"{line}: {r.stdout}{r.stderr}"
        return r.stdout

    jobs = {script: re.search(r"Submitted batch job (\d+)", shell(line)).group(1) for script, line in scripts.items()}
    # the references meanwhile: the same grid swept by one process, and the one-process losses
    reference = subprocess.Popen([sys.executable, "-m", "megallama", "sweep", "--grid", str(ROOT / grid),
                                  "--output", str(tmp_path / "reference")], cwd=ROOT, env=env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ref = reference_losses(tmp_path_factory.getbasetemp())
        deadline = time.monotonic() + 300
        while not all(r["JobState"] in DONE for j in jobs.values() for r in _records(slurm, j)):
            assert time.monotonic() < deadline, f"{[_records(slurm, j) for j in jobs.values()]}\n{slurm.logs()}"
            time.sleep(0.5)
        out = reference.communicate(timeout=300)[0]
    finally:
        reference.kill()
    assert reference.returncode == 0, out[-3000:]
    every_log = "\n".join(_logs(d) for d in [co, *co.glob("logs/*")])
    for script, job in jobs.items():
        for r in _records(slurm, job):
            assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), f"{script}: {r}\n{every_log}"
    shell(gathers[0])

    for script, run in (("train_srun.sbatch", "runs/tiny-srun"), ("train_deepspeed.sbatch", "runs/tiny-ds")):
        assert f"train.run_dir={run}" in scripts[script]
        assert_matches_reference(co / run, ref)
        logs, = co.glob(f"logs/*-{jobs[script]}")
        for r in (0, 1):
            assert re.search(THREADS.format(r=r, w=2), (logs / f"rank-{r}.log").read_text()), _logs(logs)
    ds_logs, = co.glob(f"logs/*-{jobs['train_deepspeed.sbatch']}")
    assert sorted(p.name for p in ds_logs.iterdir()) == ["hostfile", "node-0.log", "rank-0.log", "rank-1.log"]
    assert (ds_logs / "hostfile").read_text().split() == [slurm.host, "slots=2"]

    results = (co / sweep_dir / "results.csv").read_text()
    assert len(results.splitlines()) == 1 + 4 and results == (tmp_path / "reference" / "results.csv").read_text()
    for log in (co / sweep_dir / "sweep").glob("*.log"):
        assert re.search(THREADS.format(r=0, w=1), log.read_text()), log.read_text()[-2000:]


def test_dead_rank_ends_the_srun_job_within_60s_naming_it(slurm, tmp_path):
    logs = tmp_path / "logs"
    start = time.monotonic()
    job = _submit(slurm, "train_srun.sbatch", TWO_TASKS + ["--no-requeue"],
                  train_args(tmp_path / "run", steps=50), logs, MEGALLAMA_FAULT="die@3:1")
    info = slurm.wait(job, 120)
    elapsed = time.monotonic() - start
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", _logs(logs)
    assert elapsed < 60, f"job took {elapsed:.0f}s to go down"
    rank0 = _rank0_log(logs)
    assert re.search(r"rank 1 \(pid \d+ on \S+\) is gone after step 2", rank0), _logs(logs)


def _rank0_log(logs: Path) -> str:
    """Rank 0's output so far: rank-0.log (srun) or the deepspeed launcher's *_rank0.log files."""
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*rank*0.log")))


@pytest.mark.parametrize("script,options,extra", [
    ("train_srun.sbatch", TWO_TASKS, {}),
    ("train_deepspeed.sbatch", TWO_TASKS, {}),
])
def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path, script, options, extra):
    logs = tmp_path / "logs"
    steps = 100
    job = _submit(slurm, script, options, train_args(tmp_path / "run", steps=steps), logs, **extra)
    deadline = time.monotonic() + 120
    while not re.search(rf"step +\d+/{steps}", _rank0_log(logs)):
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), _logs(logs)
        time.sleep(0.3)
    # what --signal=B:USR1@SECONDS delivers before the time limit, sent now
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, check=True, timeout=30)
    info = slurm.wait(job, 240)
    out = _logs(logs)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", out
    assert "requeueing job" in (logs / "job.out").read_text(), out
    saved = re.search(r"resumed from \S+ \(step (\d+)", _rank0_log(logs))
    assert saved and 0 < int(saved.group(1)) < steps, out
    assert summary(tmp_path / "run")["steps"] == steps
    # what docs/launching.md says a preemption prints, and its logs: one file per rank, continued
    assert re.search(r"srun: error: \S+: tasks? [0-9-]+: Exited with exit code 75", (logs / "job.out").read_text()), out
    if script == "train_deepspeed.sbatch":
        assert "Killing subprocess" in (logs / "node-0.log").read_text(), out
    assert sorted(p.name for p in logs.glob("*rank*")) == ["rank-0.log", "rank-1.log"], out
    rank0 = (logs / "rank-0.log").read_text()
    assert 0 <= rank0.index("run the same command to resume") < rank0.index("resumed from"), out


def test_curate_array_chain_keeps_what_one_process_keeps(slurm, tmp_path):
    """slurm/curate_array.sbatch submits one array job per stage (afterok chain); the output is the
    one-process output byte for byte."""
    from tests.test_data_shards import corpus, run as curate_here

    inputs, _ = corpus(tmp_path, files=3)
    expected, _ = curate_here(tmp_path, inputs, "web", 1)
    logs, out = tmp_path / "logs", tmp_path / "curated.jsonl"
    logs.mkdir()
    r = subprocess.run(["bash", str(ROOT / "slurm" / "curate_array.sbatch"), "--input", *inputs, "--output", str(out),
                        "--source", "web", "--shards", "2"], capture_output=True, text=True, timeout=60,
                       env=dict(slurm.env, **env(MEGALLAMA_SBATCH_OPTS=f"--chdir {ROOT} --output {logs}/%x-%A_%a.out",
                                                 MEGALLAMA_LOG_DIR=str(logs))))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("megallama: curate stage") == 8  # lines linedup docs minhash buckets clusters filter merge
    info = slurm.wait(f"{r.stdout.strip()}_0", 240)
    assert info["JobState"] == "COMPLETED", _logs(logs)
    assert out.read_bytes() == expected


def test_preprocess_array_shards_are_the_one_process_dataset(slurm, tmp_path):
    """slurm/preprocess_array.sbatch over a 3-task array: shard I per task; read back as one source,
    the shards are the one-process dataset, document for document."""
    import json

    from megallama.data.indexed import open_dataset
    from megallama.data.preprocess import preprocess
    from megallama.data.tokenizer import train_tokenizer
    from tests.test_preprocess_shards import STDLIB, assert_same_dataset

    texts = [p.read_text(encoding="utf-8") for p in sorted((STDLIB / "json").glob("*.py"))]
    tok = train_tokenizer(texts, 600, str(tmp_path / "tok"), sample_mb=1.0)
    files = []
    for i in range(3):
        files.append(tmp_path / f"part-{i}.jsonl")
        files[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i::3]))
    preprocess([str(f) for f in files], str(tok), str(tmp_path / "one"))
    logs = tmp_path / "logs"
    logs.mkdir()
    job = slurm.sbatch(str(ROOT / "slurm" / "preprocess_array.sbatch"),
                       ["--array=0-2", f"--chdir={ROOT}", f"--output={logs}/%x-%A_%a.out"],
                       ["--input", *map(str, files), "--tokenizer", str(tok), "--output-prefix", str(tmp_path / "web"),
                        "--shards", "3"], env=env(MEGALLAMA_PYTHON=sys.executable, MEGALLAMA_LOG_DIR=str(logs)))
    deadline = time.monotonic() + 180
    while not all(r["JobState"] in DONE for r in _records(slurm, job)) or len(_records(slurm, job)) < 3:
        assert time.monotonic() < deadline, f"{_records(slurm, job)}\n{_logs(logs)}"
        time.sleep(0.5)
    assert all(r["JobState"] == "COMPLETED" for r in _records(slurm, job)), _logs(logs)
    assert_same_dataset(open_dataset(str(tmp_path / "web-*-of-00003")), open_dataset(str(tmp_path / "one")))
