"""Process-group setup for every way of launching: plain ``megallama train`` (one process),
``deepspeed``, ``torchrun``, ``srun`` and ``mpirun``.

NCCL on GPUs, gloo on CPU, picked automatically.  A single process with no
launcher gets a loopback rendezvous on a free port, so DeepSpeed (which always
wants a process group) runs unchanged.
"""

from __future__ import annotations

import os
import re
import sys
import socket
from datetime import timedelta
from typing import MutableMapping

import torch


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env_count(var: str) -> int:
    value = os.environ[var]
    if not value.strip().isdigit() or int(value) < 1:
        from megallama.errors import ConfigError

        raise ConfigError(f"environment variable {var}={value!r} is not a positive process count; "
                          "fix (or unset) it in the launch script")
    return int(value)


def world_size_from_env() -> int:
    """The world size a launcher announced (before any process group exists)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var):
            return _env_count(var)
    if _in_srun_step(os.environ):
        return _env_count("SLURM_NTASKS")
    return 1


def _in_srun_step(env) -> bool:
    """True inside a task started by ``srun`` (the batch script itself also has SLURM_PROCID=0
    and SLURM_NTASKS, but no SLURM_STEP_ID; a plain ``megallama train`` there is one process).

    ``mpirun`` inside an allocation starts its daemons (Open MPI's orted, MPICH's hydra proxies)
    as an srun step, one per node, and the ranks inherit that step's variables: SLURM_PROCID and
    SLURM_NTASKS then number the daemons, not the ranks.  So Open MPI's own launcher variables,
    or an MPI world size other than SLURM_NTASKS, mean mpirun started us (the same answer on
    every rank of the job)."""
    if not (env.get("SLURM_PROCID") and env.get("SLURM_NTASKS") and env.get("SLURM_STEP_ID")):
        return False
    if env.get("OMPI_COMM_WORLD_RANK"):  # set by Open MPI's mpirun/prterun only, never by srun
        return False
    return not (env.get("PMI_SIZE") and env["PMI_SIZE"] != env["SLURM_NTASKS"])


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist (``node[01-03,7],gpu-a``) like ``scontrol show hostnames`` does."""
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def slurm_port(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike (no communication needed)."""
    return 20000 + int(job_id) % 20000


def discover_srun(env: MutableMapping[str, str]) -> bool:
    """Fill the torch.distributed variables from ``srun``'s: rank, world, local rank, address, port.

    The first node of the step is the rendezvous host; the port comes from MASTER_PORT if the
    batch script exported one, else from the job id, so no two jobs on a node collide.
    """
    if "RANK" in env or not _in_srun_step(env):
        return False
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost"))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               MASTER_ADDR=env.get("MASTER_ADDR") or nodes[0],
               MASTER_PORT=env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
    return True


def discover_mpi(env: MutableMapping[str, str]) -> bool:
    """Fill the torch.distributed variables under ``mpirun`` through mpi4py (Open MPI, MPICH, ...).

    Rank 0 picks a free port and its host name and broadcasts them, so concurrent jobs never
    collide on a fixed port.  Local rank comes from a shared-memory split of COMM_WORLD.
    """
    if "RANK" in env or not any(v in env for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        return False
    try:
        from mpi4py import MPI
    except ImportError:
        from megallama.errors import UserError
        raise UserError("launched by mpirun but mpi4py is not installed; pip install mpi4py "
                        "(it builds against your MPI) or launch with torchrun/deepspeed/srun") from None
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    addr, port = comm.bcast((env.get("MASTER_ADDR") or socket.gethostname(),
                             env.get("MASTER_PORT") or str(free_port("0.0.0.0"))) if rank == 0 else None, root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    env.update(RANK=str(rank), WORLD_SIZE=str(comm.Get_size()), LOCAL_RANK=str(local.Get_rank()),
               LOCAL_SIZE=str(local.Get_size()), MASTER_ADDR=addr, MASTER_PORT=port)
    local.Free()
    return True


def disable_cpu_shm_comm() -> None:
    """Keep DeepSpeed from loading its CPU shared-memory all-reduce op.

    The op serves only DeepSpeed's inference all-reduce (training goes through
    torch.distributed), costs a ~40 s JIT build, and leaves a ~66 MB buffer per rank in
    /dev/shm that is never removed, even on a clean exit: runs add up until the machine
    is out of memory.  Declaring it incompatible makes DeepSpeed skip it.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: float = 600.0, log=None) -> None:
    """Initialise torch.distributed through DeepSpeed (idempotent; wraps an existing group).

    ``timeout_s`` bounds every collective, so a rank that stops answering fails the job
    instead of hanging it (``train.collective_timeout_s``).  Each rank then logs one line, its
    rank and CPU threads (``threads_line``), to ``log`` (default stdout; commands whose stdout is
    data pass stderr).
    """
    discover_srun(os.environ) or discover_mpi(os.environ)
    if world_size_from_env() == 1 and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    disable_cpu_shm_comm()

    global _USED_PROCESS_GROUP
    first, _USED_PROCESS_GROUP = not _USED_PROCESS_GROUP, True
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if first:
        print(threads_line(), file=log or sys.stdout, flush=True)


def threads_line() -> str:
    """This rank's start-up line: who it is and how many CPU threads it runs (OMP_NUM_THREADS is
    meant to be the cores per rank; slurm/env.sh sets it so)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    return (f"rank {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')} "
            f"(local rank {os.environ.get('LOCAL_RANK', '0')}) on {socket.gethostname()}: "
            f"{torch.get_num_threads()} CPU threads (OMP_NUM_THREADS={omp if omp is not None else 'unset'})")


_USED_PROCESS_GROUP = False  # set once this process has joined a process group


def used_process_group() -> bool:
    return _USED_PROCESS_GROUP


def shutdown(barrier: bool = True, timeout_s: float = 60.0) -> None:
    """Leave the process group together: a barrier (bounded, so a dead peer cannot hang us), then
    ``destroy_process_group``. Without the barrier a fast rank tears down gloo while a slow one
    still finishes its last writes; gloo may then abort at exit. ``barrier=False`` after a
    failure, when a peer may be dead."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if barrier:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        except Exception:  # a peer already gone: still release our side
            pass
    dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that used torch.distributed without the interpreter's teardown.

    After ``shutdown`` everything megallama writes is closed and flushed, but gloo's C++ worker
    threads may still hold tensors that refer back to Python objects; destroying them while the
    interpreter finalises can abort the process (``terminate called without an active exception``,
    exit -6) after a run that succeeded. ``os._exit`` keeps the exit status the run earned.
    MPI, when mpi4py brought it up (``mpirun`` launches), is finalised first: mpirun counts
    a process that exits without ``MPI_Finalize`` as an abnormal termination."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class launched_group:
    """``with launched_group():`` joins the launcher's process group when there is one (world > 1),
    so inference commands run tensor-parallel under ``torchrun``/``deepspeed``; a no-op otherwise."""

    def __enter__(self):
        if world_size_from_env() > 1:
            init_distributed(log=sys.stderr)
        return self

    def __exit__(self, *exc):
        shutdown()
        return False
