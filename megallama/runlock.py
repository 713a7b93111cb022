"""One trainer per run directory: an exclusive lock held by rank 0 for the job's lifetime.

``RUN_DIR/run.lock`` is ``flock``ed (exclusive, non-blocking) by rank 0 before any process group
exists, and holds a JSON record of the holder: host, pid, the process's start time, SLURM job id,
when it started and a heartbeat (the file's mtime, touched every ``HEARTBEAT_S``).  A second
trainer on the same directory is refused with one line naming the holder (exit status 2) and
touches nothing; so is a SLURM job requeued while its old incarnation still runs.

The kernel drops an ``flock`` when its holder dies, however it dies (``kill -9`` included), so a
lock left by a dead job is simply taken over.  On shared filesystems where ``flock`` is only local
to a node (e.g. Lustre mounted with ``localflock``) or unsupported, the record decides: a holder on
this host is alive when its pid runs with the recorded start time; a holder on another host is
alive while its heartbeat is younger than ``STALE_S``.  A lock with no live holder is taken over
with a note on stdout.

Only the holder writes ``metrics.jsonl``, ``tensorboard/`` and checkpoints, so each metrics file has
one writer, appending.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from megallama.errors import ConfigError, UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0  # a holder on another host whose heartbeat is older is taken as dead


def launch_rank(env=os.environ) -> int:
    """This process's global rank from its launcher's variables, before any process group exists."""
    from megallama.distributed import _in_srun_step

    for var in ("RANK",) + (("SLURM_PROCID",) if _in_srun_step(env) else ()) + \
            ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    return 0


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), or None when it is not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _record() -> dict:
    pid = os.getpid()
    rec = {"host": socket.gethostname(), "pid": pid, "start_time": _start_time(pid), "started": time.time()}
    for key, var in (("slurm_job_id", "SLURM_JOB_ID"), ("slurm_restart_count", "SLURM_RESTART_COUNT")):
        if os.environ.get(var):
            rec[key] = os.environ[var]
    return rec


def describe(rec: dict) -> str:
    job = f", SLURM job {rec['slurm_job_id']}" if rec.get("slurm_job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["started"])) \
        if isinstance(rec.get("started"), (int, float)) else "an unknown time"
    return f"host {rec.get('host', '?')} pid {rec.get('pid', '?')}{job}, since {since}"


def _read_record(fd: int) -> Optional[dict]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        rec = json.loads(data.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _holder_alive(rec: Optional[dict], mtime: float) -> bool:
    """Whether the recorded holder still runs (for when flock itself could not tell)."""
    if not rec:
        return False
    if rec.get("host") == socket.gethostname():
        pid = rec.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        start = _start_time(pid)
        return start is not None and start == rec.get("start_time")
    return time.time() - mtime < STALE_S


def _refuse(run_dir: Path, rec: Optional[dict]) -> UserError:
    who = describe(rec) if rec else "another process (no record)"
    stop = f"scancel {rec['slurm_job_id']}" if rec and rec.get("slurm_job_id") else "stop it"
    return UserError(f"train.run_dir '{run_dir}' is in use by another trainer ({who}); wait for it to finish or "
                     f"{stop}, or choose another train.run_dir")


class RunLock:
    """The lock on one run directory; :meth:`acquire` then :meth:`release` (or use :func:`run_lock`)."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd = -1
        self.created_dir = False
        self.took_over: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> "RunLock":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"train.run_dir '{self.run_dir}' is a file, not a directory; choose another "
                              "train.run_dir (--set train.run_dir=...)")
        if not self.run_dir.is_dir():
            try:
                self.run_dir.mkdir(parents=True)
                self.created_dir = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise ConfigError(f"cannot create train.run_dir '{self.run_dir}': {exc.strerror}; choose a writable "
                                  "train.run_dir") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(f"cannot open the run lock '{self.path}': {exc.strerror}; choose a writable "
                                  "train.run_dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    rec = _read_record(fd)
                    os.close(fd)
                    raise _refuse(self.run_dir, rec) from None
                flocked = False  # ENOLCK/EOPNOTSUPP/ENOSYS: no flock on this filesystem; the record decides
            try:  # the file we locked must still be the one at the path (a holder may have removed it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        rec = _read_record(fd)
        if _holder_alive(rec, os.fstat(fd).st_mtime):  # flock only local to a node, or no flock at all
            os.close(fd)
            raise _refuse(self.run_dir, rec)
        if rec:
            self.took_over = rec
            print(f"taking over the run lock of a trainer that is gone ({describe(rec)})", flush=True)
        data = (json.dumps(_record()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self.fd = fd
        self._thread = threading.Thread(target=self._beat, name="megallama-run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except OSError:
                pass

    def release(self) -> None:
        if self.fd < 0:
            return
        self._stop.set()
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened it retries on the new file
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = -1
        if self.created_dir:
            try:
                self.run_dir.rmdir()  # only when the run left nothing in it
            except OSError:
                pass


@contextmanager
def run_lock(run_dir, rank: Optional[int] = None) -> Iterator[Optional[RunLock]]:
    """Hold the run directory's lock around a job on rank 0 (other ranks hold nothing)."""
    if (launch_rank() if rank is None else rank) != 0:
        yield None
        return
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
