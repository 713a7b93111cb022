"""``mpirun -np 2 megallama train`` (Open MPI): ranks and rendezvous come from mpi4py, and the
2-rank job reproduces the single-process losses."""

import shutil
import sys

import pytest

from tests.launch import assert_matches_reference, megallama, reference_losses, run, train_args

pytestmark = pytest.mark.slow


def _mpirun() -> str:
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("Open MPI's mpirun is not installed; run .ci/install-system-deps.sh (apt-get openmpi-bin)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed in this venv; run .ci/install-system-deps.sh (pip install mpi4py)")
    return exe


def test_mpirun_two_ranks_match_one_process(tmp_path, tmp_path_factory):
    mpirun = _mpirun()
    ref = reference_losses(tmp_path_factory.getbasetemp())
    # --allow-run-as-root: CI runs as root; --oversubscribe: 2 ranks even on a 1-core runner.
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
           "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH",
           *megallama("train", *train_args(tmp_path / "run"))]
    r, _ = run(cmd, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_matches_reference(tmp_path / "run", ref)


def test_mpirun_bad_input_is_one_line_from_every_rank(tmp_path):
    mpirun = _mpirun()
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PYTHONPATH",
           *megallama("train", *train_args(tmp_path / "run", "--set", "parallel.tp=4"))]
    r, _ = run(cmd, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("megallama train: error:")]
    assert r.returncode == 2 and len(errors) == 2, r.stderr[-2000:]
    assert "world size 2 is not divisible by tp*pp = 4" in errors[0]
    assert not (tmp_path / "run").exists()
