"""Checkpoints: resume really resumes (bit for bit), saves are atomic, bad checkpoints give
one-line errors (exit 2) and leave the run directory untouched.

Every run is ``megallama train --preset tiny`` (fp32, CPU, the cached default corpus) in a
subprocess, as a user would run it; losses come from ``metrics.jsonl``.  The reference is one
uninterrupted run with the same command.
"""

import json
import shutil
import signal
import subprocess
import sys

import pytest

from tests.ckpt_helpers import (ROOT, env, kill_group, last_per_step, megallama, megallama_cmd, metrics, snapshot, start,
                                train_args, wait_for_step)

STEPS = 8
RUN = [f"train.steps={STEPS}", "train.save_interval=2", "train.keep_last=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its run dir and {step: metrics row}."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    r = megallama(*train_args(run_dir, *RUN))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = metrics(run_dir)
    assert [x["step"] for x in rows] == list(range(1, STEPS + 1))
    return run_dir, last_per_step(rows)


def _assert_bitwise(run_dir, ref_rows):
    rows = metrics(run_dir)
    got = last_per_step(rows)
    assert sorted(got) == sorted(ref_rows)
    for step, row in ref_rows.items():  # exact float equality, not a tolerance
        assert (got[step]["loss"], got[step]["grad_norm"], got[step]["lr"]) == \
               (row["loss"], row["grad_norm"], row["lr"]), f"step {step}: {got[step]} != {row}"
    # a resume drops the lines of the steps it replays: each step is logged once
    assert [r["step"] for r in rows] == sorted(got)


def test_keep_last_and_latest(reference):
    run_dir, _ = reference
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000008"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006", "step_00000008"]
    meta = json.loads((root / "step_00000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["consumed_samples"] == 8 * 8  # tiny: 8 sequences per step
    assert meta["tokenizer_fingerprint"] and (root / "step_00000008" / "tokenizer.model").is_file()


@pytest.mark.slow
def test_sigkill_at_any_step_then_resume_is_bitwise(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(megallama_cmd(*train_args(run_dir, *RUN)))
    killed_after = wait_for_step(proc, run_dir, 5)
    kill_group(proc)
    assert killed_after < STEPS
    r = megallama(*train_args(run_dir, *RUN))
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = int(r.stdout.split("(step ")[1].split(",")[0])
    assert 2 <= resumed <= killed_after and f"{resumed * 8:,} samples consumed" in r.stdout
    _assert_bitwise(run_dir, reference[1])


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint(reference, tmp_path):
    from megallama.checkpoint import CheckpointReader, latest_checkpoint

    run_dir = tmp_path / "run"
    r = megallama(*train_args(run_dir, *RUN), MEGALLAMA_FAULT="kill-during-save@6")
    assert r.returncode == -signal.SIGKILL
    root = run_dir / "checkpoints"
    assert latest_checkpoint(run_dir).name == "step_00000004"
    assert (root / "step_00000006.tmp").is_dir() and not (root / "step_00000006").exists()
    reader = CheckpointReader(run_dir)  # verifies sizes and sha256 of every file
    assert reader.meta["step"] == 4 and reader.has_optimizer
    r = megallama(*train_args(run_dir, *RUN))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(step 4," in r.stdout
    assert not list(root.glob("*.tmp"))  # the stale partial save is cleaned up
    _assert_bitwise(run_dir, reference[1])


@pytest.mark.slow
def test_async_save_killed_in_its_background_write_leaves_previous_checkpoint(reference, tmp_path):
    """train.async_save: the save of step 6 is written by a background thread while training goes on;
    kill -9 inside that write (before meta.json) leaves step 4 as latest, and the resumed run -- itself
    saving asynchronously -- matches the synchronous reference bit for bit."""
    run_dir = tmp_path / "run"
    r = megallama(*train_args(run_dir, *RUN, "train.async_save=true"), MEGALLAMA_FAULT="kill-during-save@6")
    assert r.returncode == -signal.SIGKILL
    assert "saving checkpoint" in r.stdout and "in the background" in r.stdout, r.stdout[-2000:]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert (root / "step_00000006.tmp").is_dir() and not (root / "step_00000006").exists()
    r = megallama(*train_args(run_dir, *RUN, "train.async_save=true"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(step 4," in r.stdout and (root / "latest").read_text() == "step_00000008"
    _assert_bitwise(run_dir, reference[1])


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(megallama_cmd(*train_args(run_dir, *RUN)))
    wait_for_step(proc, run_dir, 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped = metrics(run_dir)[-1]["step"]
    assert f"checkpoints/step_{stopped:08d}" in out
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    r = megallama(*train_args(run_dir, *RUN))
    assert r.returncode == 0 and f"(step {stopped}," in r.stdout, r.stderr[-2000:]
    _assert_bitwise(run_dir, reference[1])


def test_preemption_during_startup_is_kept(tmp_path):
    """SIGUSR1 while the engine is still being built (a job preempted during a long start-up) is
    acted on at the first step boundary: a checkpoint and exit 75, not death by the signal's
    default action with nothing saved (the handlers used to be installed after start-up)."""
    run_dir = tmp_path / "run"
    code = ("import os, signal, sys; import megallama.train as T; build = T.build_engine\n"
            "def early(*a):\n    os.kill(os.getpid(), signal.SIGUSR1)\n    return build(*a)\n"
            "T.build_engine = early; from megallama import cli; sys.exit(cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *train_args(run_dir, "train.steps=4")], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 75, (r.returncode, r.stderr[-2000:])
    assert "stopping on signal 10 after step 1" in r.stdout, r.stdout[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000001"


# ----------------------------------------------------------------------------- bad checkpoints

def _damage_truncate(ckpt):
    f = ckpt / "model_tp00_pp00_dp000.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return "truncated or corrupt", f.name


def _damage_flip(ckpt):
    f = ckpt / "optim_tp00_pp00_dp000.safetensors"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0xFF
    f.write_bytes(bytes(data))
    return "truncated or corrupt", f.name


def _damage_missing(ckpt):
    (ckpt / "model_tp00_pp00_dp000.safetensors").unlink()
    return "is missing", "model_tp00_pp00_dp000.safetensors"


def _damage_meta(ckpt):
    (ckpt / "meta.json").write_text("{not json")
    return "corrupt", "meta.json"


def _edit_meta(ckpt, edit):
    meta = json.loads((ckpt / "meta.json").read_text())
    edit(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _damage_tokenizer(ckpt):
    """A swapped tokenizer silently changed eval perplexity (207 -> 260) and shipped with export-hf."""
    f = ckpt / "tokenizer.model"
    f.write_bytes(f.read_bytes()[:-1] + b"x")
    return "does not match the sha256", "tokenizer.model"


def _damage_no_optimizer(ckpt):
    """Removing the optimizer from meta.json used to turn the resume into a fresh start over step_8."""
    def edit(meta):
        for table in (meta["files"], meta["parts"]):
            for name in [n for n in table if n.startswith("optim_")]:
                del table[name]
    _edit_meta(ckpt, edit)
    return "not covered by meta.json", "optim_tp00_pp00_dp000.safetensors"


def _damage_step(ckpt):
    _edit_meta(ckpt, lambda meta: meta.update(step=7))
    return "says step 7 but its directory is", "step_00000008"


def _damage_consumed(ckpt):
    _edit_meta(ckpt, lambda meta: meta.update(consumed_samples=60))
    return "consumed_samples=60", "global batch 8"


def _damage_files_entry(ckpt):
    _edit_meta(ckpt, lambda meta: meta["files"].update({"tokenizer.model": "abc"}))
    return "malformed files entry", "tokenizer.model"


def _damage_latest_elsewhere(ckpt):
    (ckpt.parent / "latest").write_text("../../other/checkpoints/step_00000008")
    return "not a step_N directory of this run", "latest"


def _damage_latest_binary(ckpt):
    (ckpt.parent / "latest").write_bytes(b"\xff\xfe\x00step")
    return "binary data", "latest"


@pytest.mark.parametrize("damage", [pytest.param(_damage_truncate, marks=pytest.mark.slow),
                                    pytest.param(_damage_flip, marks=pytest.mark.slow), _damage_missing, _damage_meta,
                                    _damage_tokenizer, _damage_no_optimizer, _damage_step, _damage_consumed,
                                    _damage_files_entry, _damage_latest_elsewhere, _damage_latest_binary],
                         ids=["truncated", "bitflip", "missing-shard", "corrupt-meta", "swapped-tokenizer",
                              "optimizer-dropped-from-meta", "edited-step", "edited-consumed-samples",
                              "files-entry-not-a-record", "latest-outside-the-run", "binary-latest"])
def test_damaged_checkpoint_is_a_one_line_error(reference, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    expect, name = damage(run_dir / "checkpoints" / "step_00000008")
    before = snapshot(run_dir)
    r = megallama(*train_args(run_dir, *RUN[:1] + ["train.steps=10"]))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("megallama train: error:") and expect in line and name in line, r.stderr[-2000:]
    assert snapshot(run_dir) == before


def test_disk_full_at_the_latest_pointer_keeps_the_previous_and_resumes(tmp_path):
    """ENOSPC writing ``latest`` (the disk filled between a checkpoint and its pointer): one line,
    exit 2, ``latest`` still names the previous checkpoint, no temporary file; the same command then
    resumes from it."""
    run_dir = tmp_path / "run"
    r = megallama(*train_args(run_dir, "train.steps=4", "train.save_interval=2"), MEGALLAMA_FAULT="latestfull@4")
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "writing" in line and "latest" in line and "still names the previous one" in line, r.stderr[-2000:]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")], list(root.iterdir())
    r = megallama(*train_args(run_dir, "train.steps=4", "train.save_interval=2"))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert (root / "latest").read_text() == "step_00000004"


def test_disk_full_when_resuming_is_one_line(reference, tmp_path):
    """A full disk (here a 1000-byte file-size limit once the imports are done) while a resumed run
    writes its logs: one line and exit 2, no traceback (TensorBoard's writer thread included), the
    checkpoints untouched."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    before = {k: v for k, v in snapshot(run_dir / "checkpoints").items()}
    code = ("import resource, signal, sys, tempfile; import deepspeed; from megallama import cli\n"
            "tempfile.gettempdir(); signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *train_args(run_dir, "train.steps=10", "train.save_interval=2",
                                                                "train.tensorboard=true")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("megallama train: error:") and ("free space, then run the same command" in last or
                                                            "the previous checkpoint is kept" in last), last
    assert snapshot(run_dir / "checkpoints") == before


@pytest.mark.parametrize("override,expect", [
    ("model.dim=128", "model.dim=64 but the config says 128"),
    ("parallel.tp=2", "world size 1"),
], ids=["other-model-shape", "layout-does-not-fit"])
def test_mismatched_config_is_a_one_line_error(reference, tmp_path, override, expect):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    before = snapshot(run_dir)
    r = megallama(*train_args(run_dir, "train.steps=10", override))
    assert r.returncode == 2 and expect in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1
    assert snapshot(run_dir) == before


def test_resume_with_another_global_batch_keeps_the_data_position(tmp_path):
    """The data position is the checkpoint's consumed samples, not step x the *new* global batch:
    2 steps of 8 sequences, then 1 step of 4 consumed 20 samples (it used to replay samples 8-11
    and record 12, less than the checkpoint it resumed from).  A batch that does not divide the
    consumed samples is a one-line error that leaves the run directory as it was."""
    run_dir = tmp_path / "run"
    r = megallama(*train_args(run_dir, "train.steps=2"))
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(run_dir)
    r = megallama(*train_args(run_dir, "train.steps=3", "train.global_batch_size=12", "train.micro_batch_size=2"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "consumed 16 samples" in r.stderr and "train.global_batch_size=12" in r.stderr
    assert snapshot(run_dir) == before
    r = megallama(*train_args(run_dir, "train.steps=3", "train.global_batch_size=4"))
    assert r.returncode == 0 and "16 samples consumed" in r.stdout, r.stderr[-2000:]
    meta = json.loads((run_dir / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["consumed_samples"] == 2 * 8 + 4
    summary = json.loads((run_dir / "summary.json").read_text())  # the run's totals count the same samples
    seq = meta["config"]["train"]["seq_len"]
    assert summary["tokens"] == (2 * 8 + 4) * seq


# ----------------------------------------------------------------------------- ZeRO stages

@pytest.mark.slow
# ZeRO-2 resumes bit for bit in tests/test_checkpoint_io.py (dp=2, async saves); bf16 once, with ZeRO-3
# (bf16+ZeRO-0: DeepSpeed refuses to train; each bf16 case costs a minute of CPU matmuls)
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (3, "fp32"), (3, "bf16")])
def test_resume_bitwise_at_each_zero_stage(tmp_path, stage, precision):
    """Killed during the final save (so the step-2 checkpoint is the latest), then resumed:
    steps 3 and 4 replay bit for bit."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, "train.steps=4", "train.save_interval=2", f"parallel.zero_stage={stage}",
                      f"train.precision={precision}")
    r = megallama(*args, MEGALLAMA_FAULT="kill-during-save@4")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    first = last_per_step(metrics(run_dir))
    assert sorted(first) == [1, 2, 3, 4]
    r = megallama(*args)
    assert r.returncode == 0 and "(step 2," in r.stdout, r.stderr[-2000:]
    again = last_per_step(metrics(run_dir))
    # the rate too: step 4's loss predates step 4's update, and with 2 warmup steps lr(1) == lr(2),
    # so a scheduler restored one step behind changed no loss or norm of steps 3-4
    for s in (3, 4):
        assert (again[s]["loss"], again[s]["grad_norm"], again[s]["lr"]) == \
               (first[s]["loss"], first[s]["grad_norm"], first[s]["lr"]), f"step {s}: {again[s]} != {first[s]}"


# ----------------------------------------------------------------------------- two ranks

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_rank_sigkill_then_resume_is_bitwise(tmp_path):
    """torchrun, tp=2: SIGKILL the launcher and both ranks mid-run, rerun the same command."""
    from tests.distributed import free_port

    def cmd(run_dir):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "megallama",
                *train_args(run_dir, *RUN, "parallel.tp=2")]

    ref = subprocess.run(cmd(tmp_path / "ref"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_dir = tmp_path / "run"
    proc = start(cmd(run_dir))
    wait_for_step(proc, run_dir, 5)
    kill_group(proc)
    r = subprocess.run(cmd(run_dir), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    _assert_bitwise(run_dir, last_per_step(metrics(tmp_path / "ref")))
