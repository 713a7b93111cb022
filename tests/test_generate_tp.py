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
