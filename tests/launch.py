"""Shared pieces of the launcher tests: the tiny job, its environment, and the reference it must match.

Every launcher (plain ``megallama train``, torchrun, deepspeed, mpirun, srun, sbatch) runs the
same command line; a 2-rank data-parallel run must reproduce the single-process losses (the
global batch is fixed, so the mathematics is the same) and leave one heartbeat per rank, which
proves the ranks really formed one 2-process job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megallama.distributed import free_port  # noqa: F401  (re-exported for the launcher tests)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def env(**extra) -> dict:
    """Subprocess environment: CPU DeepSpeed, one thread per rank, this checkout first on the path."""
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
             MEGALLAMA_PYTHON=sys.executable, MEGALLAMA_HOME=str(ROOT))
    e.pop("MEGALLAMA_FAULT", None)
    e.update(extra)
    return e


def train_args(run_dir, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--preset", "tiny", "--set", f"train.steps={steps}", "--set", f"train.run_dir={run_dir}",
            "--set", "train.tensorboard=false", *extra]


def megallama(*args: str) -> list[str]:
    return [sys.executable, "-m", "megallama", *args]


def run(cmd: list[str], timeout: float, **env_extra) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` in the checkout root with a hard timeout; (result, seconds)."""
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - start


_REFERENCE: dict = {}


def reference_losses(tmp_root: Path, steps: int = STEPS) -> list[float]:
    """Losses of the single-process run (computed once per session; also builds the corpus cache)."""
    if steps not in _REFERENCE:
        run_dir = Path(tmp_root) / f"reference-{steps}"
        r, _ = run(megallama("train", *train_args(run_dir, steps=steps)), timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        _REFERENCE[steps] = summary(run_dir)["losses"]
    return _REFERENCE[steps]


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def assert_matches_reference(run_dir, reference: list[float], world: int = 2, rel: float = 1e-4) -> None:
    losses = summary(run_dir)["losses"]
    assert len(losses) == len(reference) and all(
        abs(a - b) <= rel * abs(b) for a, b in zip(losses, reference)), f"{losses} vs {reference}"
    ranks = sorted(p.name for p in (Path(run_dir) / "heartbeats").glob("rank-*.json"))
    assert ranks == [f"rank-{r:05d}.json" for r in range(world)], ranks
