"""Failures are loud, fast and lossless.

* A NaN/Inf loss or gradient skips the step (no update, counted) on every optimizer path:
  ZeRO-0 fp32 (megallama's guard), ZeRO-1 bf16, ZeRO-2/3 and pipeline (DeepSpeed's overflow
  check); ``train.max_bad_steps`` in a row stop the run with exit status 3.
* A rank that dies or hangs takes a 2-rank torchrun job down within 60 s with a message
  naming the rank and its last step.
* A save that hits a full disk fails loudly and leaves the previous checkpoint the latest.

Faults are injected through ``MEGALLAMA_FAULT`` (read in megallama/faults.py only).
"""

import json
import math
import re
import subprocess
import sys
import threading

import pytest
import torch

from megallama.faults import Faults
from tests.distributed import run_ranks
from tests.launch import free_port, megallama, run, train_args

BASE = ["train.steps=6", "train.tensorboard=false", "train.global_batch_size=8", "train.precision=fp32"]


def _train(rank, world, overrides, run_dir):
    from tests.synthetic import train_tiny

    s = train_tiny(world, BASE + overrides, run_dir)
    return s.losses, s.bad_steps


_CLEAN = {}


def _clean_losses(tmp_path_factory):
    if "ref" not in _CLEAN:
        _CLEAN["ref"] = run_ranks(_train, 1, [], str(tmp_path_factory.mktemp("clean")), timeout=180)[0][0]
    return _CLEAN["ref"]


@pytest.mark.parametrize("world,overrides", [
    (1, ["parallel.zero_stage=0"]),                                         # torch AdamW + megallama's guard
    (1, ["parallel.zero_stage=1", "train.precision=bf16"]),                 # DeepSpeed bf16 ZeRO-1
    pytest.param(2, ["parallel.zero_stage=2", "train.micro_batch_size=4"], marks=pytest.mark.slow),
    pytest.param(2, ["parallel.zero_stage=3", "train.micro_batch_size=4"], marks=pytest.mark.slow),
    pytest.param(2, ["parallel.pp=2", "parallel.zero_stage=0"], marks=pytest.mark.slow),  # guard across stages
], ids=lambda v: ",".join(v) if isinstance(v, list) else str(v))
def test_nonfinite_step_is_skipped_and_counted(world, overrides, tmp_path, tmp_path_factory, monkeypatch):
    clean = _clean_losses(tmp_path_factory)
    monkeypatch.setenv("MEGALLAMA_FAULT", "nan@3")
    losses, bad = run_ranks(_train, world, overrides + ["train.save_interval=1", "train.keep_last=6"], str(tmp_path),
                            timeout=240)[0]
    assert bad == 1 and math.isnan(losses[2]), losses
    # skipped means no update: step 3's checkpoint holds step 2's weights, Adam moments and schedule
    # bit for bit (finite later losses alone also pass a step applied with zeroed gradients)
    from megallama.checkpoint import MOMENTS, CheckpointReader

    two, three = (CheckpointReader(tmp_path / "checkpoints" / f"step_{s:08d}") for s in (2, 3))
    assert three.meta["lr_scheduler_last_epoch"] == two.meta["lr_scheduler_last_epoch"]
    for name in two.names():
        for key in (None, *MOMENTS):
            assert torch.equal(three.full(name, key), two.full(name, key)), f"{name} {key or ''} changed in step 3"
    # had the NaN update been applied every later loss would be NaN; it was not
    assert all(math.isfinite(x) for i, x in enumerate(losses) if i != 2), losses
    # the logs are strict JSON: the skipped step's loss is null, not NaN (which jq and others refuse)
    strict = dict(parse_constant=lambda c: pytest.fail(f"{c} in a JSON log"))
    rows = [json.loads(line, **strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in rows] == [i == 2 for i in range(len(losses))]
    assert json.loads((tmp_path / "summary.json").read_text(), **strict)["losses"][2] is None
    rel = 0.02 if "train.precision=bf16" in overrides else 1e-4  # bf16 tolerance as in test_training
    assert all(abs(a - b) <= rel * b for a, b in zip(losses[:2], clean[:2])), (losses, clean)


def test_fault_spec_is_parsed_per_rank():
    assert Faults.from_env(1, "nan@3,die@5:1,hang@7:0").at == {3: "nan", 5: "die"}
    with pytest.raises(ValueError, match="bad item 'boom@2'"):
        Faults.from_env(0, "boom@2")


def test_consecutive_bad_steps_stop_the_run_with_status_3(tmp_path):
    run_dir = tmp_path / "run"
    r, _ = run(megallama("train", *train_args(run_dir, "--set", "train.max_bad_steps=2",
                                              "--set", "train.save_interval=1", steps=6)),
               timeout=180, MEGALLAMA_FAULT="nan@2,nan@3")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 3, r.stderr[-3000:]
    assert last.startswith("megallama train: error: stopped after 2 consecutive non-finite steps (2-3)"), last
    assert "last good checkpoint is intact" in last and not (run_dir / "summary.json").exists()
    # skipped steps changed no weight; the halt comes before step 3's save
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (run_dir / "checkpoints" / "step_00000003").exists()
    # every step up to the halting one is in the metrics log, the skipped ones without a loss
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"] is None) for m in logged] == [(1, False), (2, True), (3, True)]


def _torchrun(run_dir, *extra, fault: str, timeout: float = 120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megallama", "train", *train_args(run_dir, *extra, steps=50)]
    return run(cmd, timeout=timeout, MEGALLAMA_FAULT=fault)


@pytest.mark.slow
def test_dead_rank_takes_the_job_down_naming_it(tmp_path):
    r, seconds = _torchrun(tmp_path / "run", fault="die@3:1")
    assert r.returncode != 0 and seconds < 60, (seconds, r.stderr[-3000:])
    assert re.search(r"megallama train: rank 0 failed after step 2 \(its last completed step\): .*"
                     r"rank 1 \(pid \d+ on \S+\) is gone after step 2", r.stderr), r.stderr[-3000:]


def test_failure_report_names_a_peer_still_exiting(tmp_path, capsys):
    """A dead peer's sockets close before its exit is complete, so the collective that fails can
    fail while the peer still looks alive (this read "rank 0 failed ..." without naming rank 1
    under srun on a loaded machine).  The report looks again for a moment."""
    from megallama.faults import Heartbeat, report_failure

    Heartbeat(str(tmp_path), 0).beat(2)
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    reaper = threading.Thread(target=peer.wait)  # reaped as soon as it exits: no zombie is left
    reaper.start()
    try:
        gone = Heartbeat(str(tmp_path), 1)
        gone.pid = peer.pid
        gone.beat(2)
        report_failure(str(tmp_path), RuntimeError("Connection reset by peer"))
    finally:
        peer.kill()
        reaper.join()
    line = capsys.readouterr().err
    assert re.search(rf"rank 0 failed after step 2 .*; rank 1 \(pid {peer.pid} on \S+\) is gone after step 2",
                     line), line


@pytest.mark.slow
def test_hung_rank_is_caught_by_the_step_watchdog(tmp_path):
    r, seconds = _torchrun(tmp_path / "run", "--set", "train.collective_timeout_s=5", fault="hang@3:1")
    assert r.returncode != 0 and seconds < 60, (seconds, r.stderr[-3000:])
    assert re.search(r"rank 1 stuck in step 3 for \d+s \(last completed step 2; "
                     r"limit train.collective_timeout_s=5\)", r.stderr), r.stderr[-3000:]


@pytest.mark.slow
def test_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, "--set", "train.save_interval=1", steps=4)
    r, _ = run(megallama("train", *args), timeout=180, MEGALLAMA_FAULT="diskfull@3")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]  # one actionable line, like bad input
    assert re.search(r"saving checkpoint \S+step_00000003 failed \(rank 0: .*File too large\); "
                     r"the previous checkpoint is kept", err[0]), err
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (run_dir / "checkpoints" / "step_00000003").exists()
    # the kept checkpoint is whole: the same command resumes from it and finishes
    r, _ = run(megallama("train", *args), timeout=180)
    assert r.returncode == 0 and "(step 2" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_failure_report_ignores_the_heartbeats_of_an_earlier_session(tmp_path, capsys):
    """A resumed run that fails while it loads (before its own first heartbeat) finds the last
    session's files: it failed before its first step, and the old session's dead pids are no peers
    of this one (it read "rank 0 failed after step 7 ...; rank 1 (pid ...) is gone after step 7")."""
    from megallama.faults import Heartbeat, report_failure

    old = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for rank in (0, 1):  # what the earlier session left: its ranks' pids, all gone now
        hb = Heartbeat(str(tmp_path), rank)
        hb.pid = int(old.stdout)
        hb.beat(7)
    report_failure(str(tmp_path), RuntimeError("Connection reset by peer"))
    line = capsys.readouterr().err.strip()
    assert line == ("megallama train: rank 0 failed before its first step: "
                    "RuntimeError: Connection reset by peer"), line


def test_a_peer_not_yet_started_is_not_named_from_an_earlier_sessions_heartbeat(tmp_path, capsys, monkeypatch):
    """A resumed job whose rank 1 is still loading has only the last session's heartbeat for it:
    its dead pid is not this job's rank 1 (it read "rank 1 (pid ...) is gone after step 7")."""
    import json
    import time

    from megallama import faults

    monkeypatch.setattr(faults, "PEER_SETTLE_S", 0.2)
    old = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    faults.Heartbeat(str(tmp_path), 0).beat(2)
    (tmp_path / "heartbeats" / "rank-00001.json").write_text(json.dumps(
        dict(rank=1, host=faults.socket.gethostname(), pid=int(old.stdout), step=7, time=time.time() - 3600)))
    faults.report_failure(str(tmp_path), RuntimeError("Connection reset by peer"))
    line = capsys.readouterr().err.strip()
    assert line == ("megallama train: rank 0 failed after step 2 (its last completed step): "
                    "RuntimeError: Connection reset by peer"), line
