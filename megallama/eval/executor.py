"""Run untrusted generated code and report pass/fail, containing hostile programs.

Each program runs in a fresh ``python -I`` process:

* a throw-away working directory, deleted afterwards;
* resource limits: CPU seconds, address space, file size, open files, and (as a dedicated uid)
  the number of processes, so a fork bomb hits a wall;
* a wall-clock timeout, after which its process group is killed;
* when running as root: a private network namespace (no interfaces but a down loopback), a private
  mount namespace with empty tmpfs over the world-writable directories (/tmp, /var/tmp, /dev/shm,
  /run/lock), and a drop to a fresh unprivileged uid that owns nothing but the working directory,
  so writing anywhere else fails; after the run every process of that uid is killed, which also
  catches children that escaped the process group with setsid();
* always: a Python-level guard that makes socket creation raise, for hosts where namespaces are
  not permitted.

A program passes when it exits 0 within the limits; anything else is a failure.
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

GUARD = '''\
def _megallama_sandbox_guard():
    import socket
    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the megallama sandbox")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse)
_megallama_sandbox_guard()
del _megallama_sandbox_guard
'''


# Read through the working directory the process already stands in: its path is hidden by the tmpfs
# mounted over /tmp, so ``python program.py`` (which resolves an absolute path) cannot be used.
LOADER = ("import sys; sys.argv = ['program.py']; "
          "exec(compile(open('program.py', encoding='utf-8').read(), 'program.py', 'exec'), {'__name__': '__main__'})")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    max_procs: int = 16  # processes of the sandbox uid (enforced only when started as root)
    max_files: int = 64


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout (wall clock; the CPU limit shows as failed, killed by SIGXCPU)
    detail: str  # last line of stderr, or why it was stopped
    seconds: float


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child must not dlopen (locks)


def _isolate_as_root() -> None:
    """Namespaces and mounts; runs in the child between fork and exec, before dropping root."""
    libc = _LIBC
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        return  # not permitted (e.g. inside some containers): the guard and uid drop still apply
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    for path in WORLD_WRITABLE:
        if os.path.isdir(path):  # empty, private, tiny: the real one is out of reach
            libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"size=1m,mode=0755")


def _child_setup(uid: Optional[int], limits: Limits):
    def setup():
        os.setsid()
        if uid is not None:
            _isolate_as_root()
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_files, limits.max_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_procs, limits.max_procs))
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return setup


def _world_runnable(path: str) -> bool:
    """Whether a process of an unrelated uid can execute ``path`` (and so read its stdlib nearby)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o005 == 0o005)


def interpreter_for_sandbox() -> str:
    """This interpreter when the sandbox uid can run it, else the system ``python3``.

    Programs need only the standard library; an interpreter under a private home (e.g. pyenv in
    /root) cannot be executed once root is dropped.
    """
    if os.geteuid() != 0 or _world_runnable(sys.executable):
        return sys.executable
    for candidate in (shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "",):
        if candidate and _world_runnable(candidate):
            return candidate
    return ""


def _fresh_uid() -> int:
    """An unused uid for one run: it owns only the working directory and its own processes."""
    return random.SystemRandom().randrange(3_000_000, 4_000_000)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by ``uid`` (repeat: a fork bomb may be mid-fork)."""
    for _ in range(20):
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            except (OSError, StopIteration):
                continue
            if str(uid) in uids:
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.02)


def run_program(source: str, limits: Limits = Limits()) -> ExecResult:
    """Run ``source`` as a Python program in the sandbox; passed means exit status 0 in time."""
    workdir = tempfile.mkdtemp(prefix="megallama-exec-")
    python = interpreter_for_sandbox()
    uid = _fresh_uid() if os.geteuid() == 0 and python else None
    python = python or sys.executable  # root with no runnable interpreter: limits and guard only
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(GUARD + "\n" + source)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "program.py"), uid, uid)
        os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [python, "-I", "-B", "-c", LOADER], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_child_setup(uid, limits),
            close_fds=True,
        )
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
            lines = err.decode("utf-8", "replace").strip().splitlines()
            if proc.returncode < 0:  # e.g. SIGXCPU from the CPU limit, SIGKILL from the kernel
                detail = f"killed by {signal.Signals(-proc.returncode).name}"
            else:
                detail = lines[-1] if lines else f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            status, detail = "timeout", f"killed after {limits.timeout_s:g}s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            if uid is not None:
                _kill_uid(uid)
            proc.wait()
        return ExecResult(status == "passed", status, detail[-500:], time.monotonic() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int = 2) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs: prompt + completion, the task's tests, ``check(entry_point)``."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(code: str, tests: Sequence[str], setup: str = "") -> str:
    """The program MBPP runs: the candidate code, the task's setup code and its asserts."""
    return f"{code}\n\n{setup}\n\n" + "\n".join(tests) + "\n"
