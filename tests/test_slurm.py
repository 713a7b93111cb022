"""The sbatch scripts under a real scheduler: a single-node SLURM (slurmctld, slurmd, munge from
Debian's packages) started on localhost by the test itself, no systemd, no cgroups.

* ``slurm/train_srun.sbatch`` and ``slurm/train_deepspeed.sbatch`` train the tiny preset with
  2 ranks to completion and reproduce the single-process losses.
* ``slurm/sweep_array.sbatch`` runs one config per array task.
* A rank that dies under srun ends the job within 60 s, naming the rank and its last step.
* Preemption: ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@...`` does before the
  time limit) makes the ranks checkpoint and exit 75; the script requeues the job, and the
  rerun resumes from the checkpoint and completes.
* ``slurm/curate_array.sbatch`` runs `megallama curate` as a chain of array jobs (one per stage)
  and writes exactly the one-process output.

When SLURM cannot be started the tests skip with the reason (never a silent pass).
"""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from megallama.config import load_config
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


TWO_TASKS = ["--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1"]


def test_srun_script_trains_two_ranks_to_completion(slurm, tmp_path, tmp_path_factory):
    ref = reference_losses(tmp_path_factory.getbasetemp())
    logs = tmp_path / "logs"
    job = _submit(slurm, "train_srun.sbatch", TWO_TASKS, train_args(tmp_path / "run"), logs)
    info = slurm.wait(job, 180)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _logs(logs)
    assert_matches_reference(tmp_path / "run", ref)
    assert {p.name for p in logs.glob("rank-*.log")} == {"rank-0.log", "rank-1.log"}
    assert f"step {3}/3" in (logs / "rank-0.log").read_text()


def test_deepspeed_script_trains_two_ranks_to_completion(slurm, tmp_path, tmp_path_factory):
    ref = reference_losses(tmp_path_factory.getbasetemp())
    logs = tmp_path / "logs"
    job = _submit(slurm, "train_deepspeed.sbatch", ["--ntasks=1", "--cpus-per-task=2"],
                  train_args(tmp_path / "run"), logs, MEGALLAMA_GPUS_PER_NODE="2")
    info = slurm.wait(job, 180)
    assert info["JobState"] == "COMPLETED", _logs(logs)
    assert (logs / "hostfile").read_text().split() == [slurm.host, "slots=2"]
    assert_matches_reference(tmp_path / "run", ref)


def test_sweep_array_runs_one_config_per_task(slurm, tmp_path):
    configs = []
    for layers in (2, 4):
        path = tmp_path / f"tiny-l{layers}.yaml"
        path.write_text(f"preset: tiny\nmodel: {{n_layers: {layers}}}\ntrain: {{steps: 2, tensorboard: false}}\n")
        configs.append(path)
    listing = tmp_path / "sweep.txt"
    listing.write_text("".join(f"{c}\n" for c in configs))
    logs = tmp_path / "logs"
    job = _submit(slurm, "sweep_array.sbatch", ["--array=0-1", "--ntasks=1", "--cpus-per-task=1"], [], logs,
                  MEGALLAMA_SWEEP=str(listing), MEGALLAMA_SWEEP_DIR=str(tmp_path / "sweep"))
    deadline = time.monotonic() + 240
    for task in (0, 1):
        info = slurm.wait(f"{job}_{task}", max(5.0, deadline - time.monotonic()))
        assert info["JobState"] == "COMPLETED", _logs(logs)
    for c in configs:
        expected = load_config(str(c)).model.num_parameters()
        assert summary(tmp_path / "sweep" / c.stem)["params"] == expected


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
    ("train_deepspeed.sbatch", ["--ntasks=1", "--cpus-per-task=2"], {"MEGALLAMA_GPUS_PER_NODE": "2"}),
])
def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path, script, options, extra):
    if not (ROOT / "megallama" / "checkpoint.py").exists():
        pytest.skip("checkpoint save/resume (megallama/checkpoint.py) is not in this checkout yet")
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
