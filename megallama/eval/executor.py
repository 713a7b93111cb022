"""Run untrusted generated code and report pass/fail, containing hostile programs.

Each program runs in a fresh ``python -I`` process with every resource bounded:

* **output**: stdout and stderr are read through pipes into buffers that keep only their last
  ``Limits.output_kb`` KiB each; the rest is read and dropped, and the result records how many bytes
  the program wrote and that its output was truncated;
* **time**: a wall-clock deadline (the parent polls, so it holds whatever the program prints),
  after which its process group (and, as root, every process of its uid) is killed; CPU seconds
  per process (RLIMIT_CPU);
* **disk**: as root, the program's working directory is a ``Limits.disk_mb`` tmpfs (also bounded in
  inodes) mounted over ``/tmp`` in a private mount namespace, with tiny read-only tmpfs over
  ``/var/tmp``, ``/dev/shm``, ``/run/lock`` and an empty one over ``/proc``; not as root (or where
  mount namespaces are refused), the fallback is a host temporary directory with RLIMIT_FSIZE and a
  size/entry-count check of that directory every 50 ms while it runs and once after: a program over
  ``disk_mb`` is killed and fails, having overshot by at most what it wrote in those 50 ms;
* **processes**: RLIMIT_NPROC (as root for a fresh uid that owns nothing else; otherwise the user's
  current task count plus ``max_procs``); every process of the sandbox uid is killed afterwards,
  which also catches children that escaped the process group with setsid();
* **memory**: RLIMIT_AS; **open files**: RLIMIT_NOFILE; no core dumps;
* **network**: as root a private network namespace (no interfaces but a down loopback); always an
  audit hook that refuses socket creation.

**A pass requires the tests to have run to completion.**  Exit status 0 means nothing (``exit()``,
``raise SystemExit``, ``os._exit(0)`` all give it).  Instead the parent writes a fresh random token
into a pipe whose read end the child inherits; before any of the program runs, a witness thread of
the loader reads the token, closes that pipe and keeps the token only in its own frame.  The loader
then executes the program (prompt + completion + tests + ``check(...)``) with ``exec``; only when
that ``exec`` returns normally, i.e. every statement including the final ``check`` ran, does the
loader reach the line that wakes the witness.  The witness (whose functions were bound before the
program ran) checks that the loader's own frame stands on that line, and only then writes the token
into a second inherited pipe; the parent compares what arrives there with its token.  An audit hook
installed before the program runs refuses what would reach another thread's frame or the process's
memory: ``sys._current_frames``, ``sys.settrace``/``setprofile``, ``gc.get_objects``/``referrers``/
``referents``, ctypes and the ``_test*`` C modules, new code objects, opening anything under
``/proc``, and starting programs.  See docs/eval.md for what this does and does not guarantee.
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
WORLD_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock")  # /tmp becomes the working directory
SANDBOX_HOME = "/tmp"

# The loader, run as ``python -I -B -c LOADER`` in the working directory.  Its first two lines are
# replaced by the inherited file descriptors; DONE_LINE below is found by its marker comment.
LOADER = '''\
TOKEN_FD = {token_fd}
DONE_FD = {done_fd}
def _megallama_main(token_fd, done_fd, done_line):
    import os, sys, _thread, traceback
    read, write, close = os.read, os.write, os.close
    go_r, go_w = os.pipe()
    ack_r, ack_w = os.pipe()
    here = sys._getframe()

    def witness(frame, line, token_fd, done_fd, go_r, ack_w, read, write, close):
        token = read(token_fd, 256)
        close(token_fd)
        write(ack_w, b"r")
        while read(go_r, 1):
            if frame.f_lineno == line:  # the loader has returned from exec: the tests ran to the end
                write(done_fd, token)
                break
        write(ack_w, b"d")

    _thread.start_new_thread(witness, (here, done_line, token_fd, done_fd, go_r, ack_w, read, write, close))
    read(ack_r, 1)  # the token is read and its pipe closed before any of the program runs

    refuse_prefixes = ("ctypes.", "socket.")
    refuse = {{"sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
              "gc.get_referents", "code.__new__", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
              "os.startfile", "subprocess.Popen", "pty.spawn", "os.forkpty"}}
    blocked_modules = {{"ctypes", "_ctypes", "_posixsubprocess", "_testcapi", "_testinternalcapi",
                       "_testbuffer", "_testmultiphase", "_xxsubinterpreters", "_xxinterpchannels"}}
    realpath, fspath = os.path.realpath, os.fspath

    def hook(event, args):
        if event.startswith(refuse_prefixes):
            if event.startswith("socket."):
                raise PermissionError("network access is disabled in the megallama sandbox")
            raise PermissionError(f"{{event}} is disabled in the megallama sandbox")
        if event in refuse:
            raise PermissionError(f"{{event}} is disabled in the megallama sandbox")
        if event == "import" and args[0].partition(".")[0] in blocked_modules:
            raise ImportError(f"module {{args[0]}} is disabled in the megallama sandbox")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            p = realpath(fspath(args[0]))
            if isinstance(p, bytes):
                p = p.decode("utf-8", "replace")
            if p == "/proc" or p.startswith("/proc/"):
                raise PermissionError("/proc is disabled in the megallama sandbox")

    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv = ["program.py"]
    sys.addaudithook(hook)
    try:
        exec(code, {{"__name__": "__main__", "__builtins__": __builtins__}})
    except SystemExit as e:
        sys.stderr.write(f"SystemExit({{e.code!r}}): the program exited before its tests finished\\n")
        done = False
    except BaseException:
        traceback.print_exc(limit=-8)
        done = False
    else:
        done = True
    if done:
        write(go_w, b"g"); read(ack_r, 1)  # megallama-done-line
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(0 if done else 1)
_megallama_main(TOKEN_FD, DONE_FD, {done_line})
'''
DONE_LINE = next(i for i, line in enumerate(LOADER.splitlines(), 1) if "megallama-done-line" in line)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10  # per process
    memory_mb: int = 1024  # address space per process
    file_mb: int = 16  # largest file it may write
    disk_mb: int = 64  # everything it may write together
    max_inodes: int = 4096  # files and directories it may create
    max_procs: int = 16  # processes and threads
    max_files: int = 64  # open file descriptors
    output_kb: int = 64  # stdout and stderr kept (each; the rest is read and dropped)


@dataclass(frozen=True)
class ExecResult:
    passed: bool  # the tests ran to completion (the witness's token arrived) within the limits
    status: str  # passed | failed | timeout (wall clock; the CPU limit shows as failed, killed by SIGXCPU)
    detail: str  # last line of stderr, or why it was stopped
    seconds: float
    output_bytes: int = 0  # what the program wrote to stdout and stderr together
    truncated: bool = False  # a stream wrote more than output_kb: only its tail was read into memory


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child must not dlopen (locks)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _isolate_as_root(uid: int, limits: Limits, source: bytes) -> None:
    """Namespaces and mounts; runs in the child between fork and exec, before dropping root.

    On success the child stands in a fresh ``disk_mb`` tmpfs at /tmp holding program.py; when
    namespaces are not permitted (e.g. inside some containers) it stays in the host working
    directory (whose size the parent watches) and the audit hook and uid drop still apply.
    """
    libc = _LIBC
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        return
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    flags = MS_NOSUID | MS_NODEV
    for path in WORLD_WRITABLE:  # empty, private, read-only: the real one is out of reach
        if os.path.isdir(path):
            libc.mount(b"tmpfs", path.encode(), b"tmpfs", flags | MS_RDONLY, b"size=16k,nr_inodes=16,mode=0755")
    # nothing under /proc for the program: its own memory (where the witness keeps the token) included
    libc.mount(b"tmpfs", b"/proc", b"tmpfs", flags | MS_RDONLY, b"size=4k,nr_inodes=4,mode=0555")
    opts = f"size={limits.disk_mb}m,nr_inodes={limits.max_inodes},mode=0700,uid={uid},gid={uid}".encode()
    if libc.mount(b"tmpfs", SANDBOX_HOME.encode(), b"tmpfs", flags, opts) != 0:
        return
    fd = os.open(os.path.join(SANDBOX_HOME, "program.py"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    _write_all(fd, source)
    os.fchown(fd, uid, uid)
    os.close(fd)
    os.chdir(SANDBOX_HOME)


def _user_tasks(uid: int) -> int:
    """Tasks (processes and threads) of ``uid`` now: RLIMIT_NPROC counts them all."""
    n = 0
    for _, fields in _processes(("Uid:", "Threads:")):
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            n += int(fields.get("Threads", "1"))
    return n


def _processes(keys: tuple) -> Iterator[tuple]:
    """(pid, {field: value}) of every process now, with the /proc/PID/status lines starting with ``keys``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                yield pid, dict(line.split(":", 1) for line in f if line.startswith(keys))
        except (OSError, ValueError):
            continue


def _child_setup(uid: Optional[int], limits: Limits, source: bytes, nproc: int):
    def setup():
        os.setsid()
        if uid is not None:
            _isolate_as_root(uid, limits, source)
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        fsize = min(limits.file_mb, limits.disk_mb) * mb
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_files, limits.max_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if uid is not None:
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
    """SIGKILL every live process owned by ``uid`` (repeat: a fork bomb may be mid-fork)."""
    for _ in range(20):
        found = False
        for pid, fields in _processes(("Uid:", "State:")):
            if str(uid) in fields.get("Uid", "").split() and not fields.get("State", "").strip().startswith("Z"):
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.02)


def _disk_use(path: str, max_entries: int) -> tuple[int, int]:
    """(bytes allocated, entries) under ``path``; stops counting past ``max_entries`` entries."""
    total, entries, stack = 0, 0, [path]
    while stack and entries <= max_entries:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    entries += 1
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return total, entries


class _Tail:
    """The last ``cap`` bytes written to a stream, and how many there were."""

    def __init__(self, cap: int):
        self.cap, self.total, self.buf = cap, 0, bytearray()

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.buf += data[-self.cap:]
        if len(self.buf) > self.cap:
            del self.buf[:len(self.buf) - self.cap]

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


CHUNK = 1 << 16


def run_program(source: str, limits: Limits = Limits(), *, isolate: Optional[bool] = None) -> ExecResult:
    """Run ``source`` as a Python program in the sandbox; passed means it ran to its last statement.

    ``isolate`` (default: when running as root) chooses the namespaces, tmpfs and fresh uid; False
    runs the unprivileged fallback (limits, directory watch, audit hook) even as root.
    """
    workdir = tempfile.mkdtemp(prefix="megallama-exec-")
    python = interpreter_for_sandbox()
    if isolate is None:
        isolate = os.geteuid() == 0
    uid = _fresh_uid() if isolate and os.geteuid() == 0 and python else None
    python = python or sys.executable  # root with no runnable interpreter: limits and hook only
    token = secrets.token_hex(32).encode()
    token_r = token_w = done_r = done_w = -1
    proc = None
    try:
        data = source.encode("utf-8")
        with open(os.path.join(workdir, "program.py"), "wb") as f:
            f.write(data)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "program.py"), uid, uid)
        os.chmod(workdir, 0o700)
        token_r, token_w = os.pipe()
        done_r, done_w = os.pipe()
        _write_all(token_w, token)  # 64 bytes: fits in the pipe before the child reads it
        os.close(token_w)
        token_w = -1
        nproc = limits.max_procs if uid is not None else _user_tasks(os.getuid()) + limits.max_procs
        loader = LOADER.format(token_fd=token_r, done_fd=done_w, done_line=DONE_LINE)
        env = {"PATH": "/usr/bin:/bin", "HOME": SANDBOX_HOME if uid is not None else workdir,
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [python, "-I", "-B", "-c", loader], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_child_setup(uid, limits, data, nproc),
            close_fds=True, pass_fds=(token_r, done_w),
        )
        os.close(token_r)
        os.close(done_w)
        token_r = done_w = -1
        status, detail, got, outs, over_disk = _watch(proc, done_r, workdir, limits, start, uid)
        if over_disk is None:  # the last word: what it left behind (fallback mode)
            use, entries = _disk_use(workdir, limits.max_inodes)
            if use > limits.disk_mb * 2 ** 20 or entries > limits.max_inodes:
                over_disk = f"{use / 2 ** 20:.1f} MB in {entries} entries"
        passed = status == "running" and got == token and over_disk is None
        if over_disk is not None:
            status, detail = "failed", f"killed: disk quota exceeded ({over_disk}; the limit is {limits.disk_mb} MB, {limits.max_inodes} files)"
        elif status == "running":
            status = "passed" if passed else "failed"
            if not passed:
                lines = outs[1].text().strip().splitlines()
                if proc.returncode is not None and proc.returncode < 0:  # SIGXCPU, SIGKILL from the kernel, ...
                    detail = f"killed by {signal.Signals(-proc.returncode).name}"
                elif lines:
                    detail = lines[-1]
                elif got and got != token:
                    detail = "wrote to the sandbox's completion pipe: not a pass"
                else:
                    detail = f"exit status {proc.returncode} before its tests finished"
        truncated = any(o.total > o.cap for o in outs)
        return ExecResult(passed, status, detail[-500:], time.monotonic() - start, sum(o.total for o in outs),
                          truncated)
    finally:
        for fd in (token_r, token_w, done_r, done_w):
            if fd >= 0:
                os.close(fd)
        if proc is not None and proc.returncode is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _watch(proc, done_r: int, workdir: str, limits: Limits, start: float, uid: Optional[int]):
    """Read the child's streams (bounded) and the completion pipe until it ends or a limit trips.

    Returns (status, detail, bytes from the completion pipe, [stdout tail, stderr tail], disk
    overrun or None); status is "running" when the program ended by itself.
    """
    cap = limits.output_kb * 1024
    outs = [_Tail(cap), _Tail(cap)]
    got = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, 0)
    sel.register(proc.stderr, selectors.EVENT_READ, 1)
    sel.register(done_r, selectors.EVENT_READ, 2)
    deadline = start + limits.timeout_s
    status, detail, over_disk = "running", "", None
    next_disk, exited_at = start, None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                status, detail = "timeout", f"killed after {limits.timeout_s:g}s"
                break
            if now >= next_disk:
                next_disk = now + 0.05
                use, entries = _disk_use(workdir, limits.max_inodes)
                if use > limits.disk_mb * 2 ** 20 or entries > limits.max_inodes:
                    over_disk = f"{use / 2 ** 20:.1f} MB in {entries} entries"
                    break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break  # exited, but something (an escaped child) still holds its pipes
            for key, _ in sel.select(timeout=min(0.05, max(0.0, deadline - now))):
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == 2:
                    got += chunk[:512 - len(got)]
                else:
                    outs[key.data].add(chunk)
    finally:
        sel.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if uid is not None:
            _kill_uid(uid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return status, detail, bytes(got), outs, over_disk


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
