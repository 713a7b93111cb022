"""Untrusted inputs: no code from a model directory ever runs (more: the run lock, malformed inputs
and checkpoint meta checks, each a one-line error with exit status 2)."""

import json
import os
import subprocess
import sys

import pytest

from megallama.cli import main
from tests.launch import ROOT, env, megallama


def _one_line(capsys, status, fragment, prefix="megallama"):
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(prefix) and fragment in err[0], err
    return err[0]


# ---- remote code ---------------------------------------------------------------------------------

def _custom_code_dir(d, marker):
    """A model directory whose config.json asks for its own Python code, which would leave ``marker``."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["EvilForCausalLM"], "model_type": "evil",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "tokenizer.model").write_bytes(b"")
    return d


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval", "--task", "humaneval"],
                                     ["import-hf"]])
def test_a_model_directory_with_custom_code_is_refused(command, tmp_path, capsys):
    d = _custom_code_dir(tmp_path / "hf", tmp_path / "marker")
    args = [command[0], "--checkpoint", str(d), *command[1:]] if command[0] != "import-hf" \
        else ["import-hf", str(d), "--output", str(tmp_path / "out")]
    _one_line(capsys, main(args), "has 'auto_map': this model directory ships its own Python code")
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()


def test_custom_code_is_refused_through_the_real_cli_even_answering_yes(tmp_path):
    d = _custom_code_dir(tmp_path / "hf", tmp_path / "marker")
    r = subprocess.run(megallama("generate", "--checkpoint", str(d), "--prompt", "x"), cwd=ROOT, env=env(),
                       input="y\ny\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "auto_map" in r.stderr, r.stderr
    assert not (tmp_path / "marker").exists()


def test_load_pretrained_turns_remote_code_off(tmp_path):
    from megallama.errors import CheckpointError
    from megallama.hf_safe import check_no_remote_code, load_pretrained

    calls = []

    class Auto:
        @staticmethod
        def from_pretrained(path, **kw):
            calls.append((path, kw))
            return "model"

    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_pretrained(Auto, tmp_path / "ok", dtype="x") == "model"
    assert calls == [(str(tmp_path / "ok"), {"dtype": "x", "trust_remote_code": False, "local_files_only": True})]
    with pytest.raises(ValueError):
        load_pretrained(Auto, tmp_path / "ok", trust_remote_code=True)
    (tmp_path / "ok" / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}))
    with pytest.raises(CheckpointError, match="tokenizer_config.json' has 'auto_map'"):
        load_pretrained(Auto, tmp_path / "ok")
    with pytest.raises(CheckpointError, match="is not a local directory"):
        check_no_remote_code("meta-llama/Llama-2-7b-hf")
    assert len(calls) == 1


# ---- one trainer per run directory ---------------------------------------------------------------

def _train(run_dir, steps):
    return ["train", "--preset", "tiny", "--set", f"train.run_dir={run_dir}", "--set", "train.tensorboard=false",
            "--set", f"train.steps={steps}", "--set", "train.save_interval=10"]


def test_two_trainers_on_one_run_directory(tmp_path):
    import time

    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(megallama(*_train(run_dir, 30)), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    time.sleep(0.2)
    procs.append(subprocess.Popen(megallama(*_train(run_dir, 30)), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [o[1][-2000:] for o in outs])
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)  # (the second, unless the first was slower to start)
    err = outs[loser][1].strip().splitlines()
    assert len(err) == 1 and "is in use by another trainer (host" in err[0] \
        and f"pid {procs[winner].pid}" in err[0], err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))  # the winner's, whole
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_00000010", "step_00000020", "step_00000030"]
    assert not (run_dir / "run.lock").exists()


HOLDER = ("import sys, time; from megallama.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
          "print('held', flush=True); time.sleep(60)")


def _holder(run_dir, **extra):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, env=env(**extra),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_live_lock_is_refused_and_a_dead_ones_taken_over(tmp_path, capsys):
    from megallama.errors import UserError
    from megallama.runlock import RunLock

    run_dir = tmp_path / "run"
    holder = _holder(run_dir, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(UserError, match=rf"in use by another trainer \(host \S+ pid {holder.pid}, SLURM job 4242, "
                                            r"since .*\); wait for it to finish or scancel 4242"):
            RunLock(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run_dir).acquire()  # kill -9 dropped its flock; the record is a dead pid's
    assert lock.took_over["pid"] == holder.pid and "taking over the run lock" in capsys.readouterr().out
    lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == []


def test_the_record_refuses_a_live_holder_where_flock_is_node_local(tmp_path):
    """(Lustre with localflock, or no flock at all): the record names a running process."""
    from megallama.errors import UserError
    from megallama.runlock import RunLock, _start_time

    sleeper = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "run.lock").write_text(json.dumps(
            {"host": __import__("socket").gethostname(), "pid": sleeper.pid, "start_time": _start_time(sleeper.pid),
             "started": 0}))
        with pytest.raises(UserError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path / "run").acquire()
        rec = json.loads((tmp_path / "run" / "run.lock").read_text())
        (tmp_path / "run" / "run.lock").write_text(json.dumps({**rec, "host": "elsewhere"}))  # fresh heartbeat
        with pytest.raises(UserError, match="host elsewhere"):
            RunLock(tmp_path / "run").acquire()
        old = __import__("time").time() - 600
        os.utime(tmp_path / "run" / "run.lock", (old, old))  # silent for 10 minutes: gone
        RunLock(tmp_path / "run").acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()
