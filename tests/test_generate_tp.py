"""`megallama generate` on a TP-sharded model under torchrun equals the one-process output."""

import os
import subprocess
import sys

import pytest

from tests.distributed import free_port

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _generate(ckpt, *launcher):
    cmd = [*launcher, "-m", "megallama", "generate", "--checkpoint", str(ckpt), "--prompt", "def main(",
           "--prompt", "import os", "--max-new-tokens", "12", "--temperature", "0", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_tensor_parallel_generation_matches_one_process(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megallama", "train", "--preset", "tiny", "--set", "train.steps=2",
                        "--set", f"train.run_dir={run}", "--set", "train.tensorboard=false"],
                       capture_output=True, text=True, env=ENV, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    single = _generate(run, sys.executable)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    sharded = _generate(run, *torchrun)
    assert len(single) == 2 and sharded == single


@pytest.mark.slow
def test_world_not_dividing_the_kv_heads_is_one_line_per_rank(tmp_path):
    # one key/value head cannot be split over 2 ranks (its rows can: the layer's own check passed,
    # and each rank got 0 local kv heads and a traceback in the first forward)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megallama", "train", "--preset", "tiny", "--set", "train.steps=1",
                        "--set", "model.n_kv_heads=1", "--set", f"train.run_dir={run}",
                        "--set", "train.tensorboard=false"], capture_output=True, text=True, env=ENV, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megallama", "generate", "--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("megallama generate: error:")]
    assert len(errors) == 2 and "model.n_kv_heads (1) not divisible by 2" in errors[0], r.stderr[-2000:]
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr
