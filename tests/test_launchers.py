"""The same tiny job under torchrun and the deepspeed launcher (2 ranks, CPU) reproduces the
single-process ``megallama train`` losses; plain ``megallama train`` is the reference.
Rank discovery from srun's variables is checked against what SLURM documents."""

import os
import sys

import pytest

from megallama.distributed import discover_srun, expand_nodelist, slurm_port, world_size_from_env
from tests.launch import assert_matches_reference, free_port, megallama, reference_losses, run, train_args


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu07", ["gpu07"]),
    ("node[01-03,7],login", ["node01", "node02", "node03", "node7", "login"]),
    ("a[8-10]-ib,b[1-2]", ["a8-ib", "a9-ib", "a10-ib", "b1", "b2"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
])
def test_slurm_hostlists_expand_like_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


SRUN_TASK = dict(SLURM_JOB_ID="123456", SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="8",
                 SLURM_STEP_NODELIST="node[07-10]", SLURM_JOB_NODELIST="node[07-10]")


def test_srun_task_fills_rank_world_and_rendezvous():
    env = dict(SRUN_TASK)
    assert discover_srun(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "5", "8", "1", "node07", str(20000 + 123456 % 20000))
    assert slurm_port("123456") == 23456


def test_launcher_variables_win_over_srun_and_batch_script_is_one_process(monkeypatch):
    env = dict(SRUN_TASK, RANK="0", WORLD_SIZE="2")  # torchrun inside an allocation: its variables rule
    assert not discover_srun(env) and env["WORLD_SIZE"] == "2"
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}  # the sbatch script itself
    assert not discover_srun(dict(batch))
    for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in batch.items():
        monkeypatch.setenv(k, v)
    assert world_size_from_env() == 1
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert world_size_from_env() == 8


def test_mpirun_inside_an_allocation_is_not_taken_for_an_srun_step():
    # mpirun in an sbatch script starts one orted per node with srun: its ranks inherit that step's
    # SLURM_PROCID/SLURM_NTASKS (daemon 0 of 1 here), which are not the ranks' own
    orted = dict(SRUN_TASK, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0")
    for mpi in (dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2"),  # Open MPI
                dict(PMI_RANK="1", PMI_SIZE="2")):  # MPICH's hydra
        env = dict(orted, **mpi)
        assert not discover_srun(env) and "RANK" not in env, mpi
    # srun's own PMI (srun --mpi=pmi2/pmix) agrees with SLURM's numbering: still an srun step
    env = dict(SRUN_TASK, PMI_RANK="5", PMI_SIZE="8", PMIX_RANK="5")
    assert discover_srun(env) and (env["RANK"], env["WORLD_SIZE"]) == ("5", "8")


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(port), "-m"],
    # on CPU (DS_ACCELERATOR=cpu) the deepspeed launcher starts one process per --num_gpus slot
    "deepspeed": lambda port: [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                               "--master_port", str(port), "--module"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_match_one_process(launcher, tmp_path, tmp_path_factory):
    ref = reference_losses(tmp_path_factory.getbasetemp())
    r, _ = run([*LAUNCHERS[launcher](free_port()), "megallama", "train", *train_args(tmp_path / "run")], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_matches_reference(tmp_path / "run", ref)


_FAKE_LAUNCHER = """
import os, subprocess, sys
rank = subprocess.Popen([sys.executable, sys.argv[1]], env=dict(os.environ, LOCAL_RANK="0"))
sys.exit(rank.wait())
"""
_FAKE_RANK = """
import os, signal, subprocess, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
worker = subprocess.Popen(["sleep", "60"])  # a child of the rank (a compile worker, a sandbox)
open(os.path.join(os.environ["MEGALLAMA_LOG_DIR"], "ready"), "w").close()
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
worker.kill()
sys.exit(75 if got else 1)
"""


def test_task_sh_forwards_preemption_to_the_ranks_not_their_children(tmp_path):
    """slurm/task.sh --launcher signals the ranks (the launcher's topmost LOCAL_RANK processes): a
    rank with a child of its own still gets SIGUSR1 (it used to go to the leaf, the child), exits 75,
    and the task records the preemption."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "launcher.py").write_text(_FAKE_LAUNCHER)
    (tmp_path / "rank.py").write_text(_FAKE_RANK)
    env = dict(os.environ, MEGALLAMA_LOG_DIR=str(tmp_path))
    task = subprocess.Popen(["bash", str(root / "slurm" / "task.sh"), "--launcher", sys.executable,
                             str(tmp_path / "launcher.py"), str(tmp_path / "rank.py")], env=env)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and task.poll() is None, "the fake rank did not start"
            time.sleep(0.05)
        task.send_signal(signal.SIGUSR1)
        assert task.wait(timeout=30) == 75
    finally:
        task.kill()
    assert (tmp_path / "preempted").exists()


@pytest.mark.parametrize("value", ["two", "", "0", "-1", "2.5"])
def test_a_bad_world_size_variable_is_one_line_exit_2(tmp_path, value):
    """WORLD_SIZE that is not a positive integer: a one-line error naming it (was a ValueError traceback)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    env.update(WORLD_SIZE=value or " ", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "megallama", "train", "--preset", "tiny", "--set",
                        f"train.run_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "WORLD_SIZE=" in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,status,says", [
    ("sys.exit(75)", 75, "2 rank(s) checkpointed and stopped (status 75"),
    ("sys.exit(3 if os.environ['RANK'] == '1' else 0)", 3, "rank 1 failed first (exit status 3)"),
], ids=["preempted", "halted"])
def test_megallama_launch_exits_with_the_ranks_status(tmp_path, script, status, says):
    """torchrun turns a rank's status 75 ("checkpointed on a preemption signal: run again") into 1 and
    a traceback; ``python -m megallama.launch`` (torchrun's arguments) exits with it, in one line."""
    import subprocess

    (tmp_path / "rank.py").write_text(f"import os, sys\n{script}\n")
    r = subprocess.run([sys.executable, "-m", "megallama.launch", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(tmp_path / "rank.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == status, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("megallama.launch: ") and says in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
