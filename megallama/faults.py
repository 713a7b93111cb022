"""Failures during training: loud, fast and lossless.

* Non-finite steps.  A NaN/Inf loss or gradient must not reach the weights.  DeepSpeed's
  ZeRO-1/2/3 and bf16 optimizers already skip such a step (they mark ``overflow``);
  the plain torch optimizer used with ZeRO-0 in fp32 does not, so
  :func:`megallama.engine.guard_nonfinite_steps` gives it the same behaviour.  The loop then
  asks ``engine.was_step_applied()`` and :class:`StepMonitor` counts skipped steps;
  ``train.max_bad_steps`` in a row stop the run with :class:`TrainingHalted` (nothing is
  saved, so the last good checkpoint stays the latest).
* Dead or failing ranks.  Every rank keeps a heartbeat file ``<run_dir>/heartbeats/rank-NNNNN.json``
  (host, pid, last completed step).  When a step raises (a peer died and the collective broke,
  or a timeout fired) the rank prints one line naming itself, its last step and the peers that
  are gone, then exits non-zero; the launcher (torchrun, deepspeed, srun --kill-on-bad-exit,
  mpirun) takes the rest of the job down.  ``train.collective_timeout_s`` bounds hangs twice:
  as the process-group timeout, and as a step watchdog (a thread that ends the process when
  one step runs longer), which also catches hangs the group timeout cannot see (sub-groups
  created without a timeout, DeepSpeed's shared-memory collectives, a data read stuck on the
  file system).  It times training steps only: checkpoint saves and validation are bounded by
  the process-group timeout alone (a save stuck in a file-system write is not caught).
* Fault injection for tests, read here and nowhere else: ``MEGALLAMA_FAULT`` is a comma list
  of ``KIND@STEP`` or ``KIND@STEP:RANK`` with KIND ``nan`` (multiply the model output by NaN
  during that step), ``die`` (SIGKILL the rank when that step starts), ``hang`` (sleep forever
  there, as a rank stuck in I/O or a driver would) or ``diskfull`` (from that step on, files
  cannot grow past 64 KiB: checkpoint writes fail with EFBIG as on a full disk, while
  heartbeats and logs still fit), or ``kill-during-save`` (SIGKILL the process inside the
  checkpoint save of that step, after every file is written and before ``meta.json`` and the
  renames: the worst moment for atomicity; :func:`fault_point`), or ``latestfull`` (the write of
  ``checkpoints/latest`` at that step's save fails with ENOSPC, as a disk that fills up between a
  checkpoint and its pointer; :func:`write_fault`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megallama.atomic import write_text
from megallama.errors import UserError, say
from megallama.process import pid_alive

STARTED = time.time()  # this process's start (about): older heartbeats are an earlier session's
EXIT_HALTED = 3  # stopped on purpose (too many bad steps); distinct from crashes (1) and bad input (2)
FAULT_ENV = "MEGALLAMA_FAULT"
FAULT_KINDS = ("nan", "die", "hang", "diskfull", "kill-during-save", "latestfull")


class FaultSpecError(UserError, ValueError):
    """A malformed ``MEGALLAMA_FAULT`` (one line, exit status 2)."""


class TrainingHalted(RuntimeError):
    """Training stopped itself for a reason it can state in one line (exit status 3)."""


# ----------------------------------------------------------------------------- fault injection

@dataclass
class Faults:
    """Test-only faults for this rank: {step: kind}."""

    at: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, rank: int, spec: Optional[str] = None) -> "Faults":
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        at = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, where = item.partition("@")
            step, _, only = where.partition(":")
            if kind not in FAULT_KINDS or not step.isdigit() or (only and not only.isdigit()):
                raise FaultSpecError(f"{FAULT_ENV}: bad item '{item}'; expected {'|'.join(FAULT_KINDS)}@STEP[:RANK]")
            if not only or int(only) == rank:
                at[int(step)] = kind
        return cls(at)

    def attach(self, module: torch.nn.Module, monitor: "StepMonitor") -> None:
        if "nan" not in self.at.values():
            return

        def poison(_module, _inputs, output):
            if self.at.get(monitor.step) != "nan":
                return output
            if isinstance(output, torch.Tensor):
                return output * float("nan")
            return type(output)(o * float("nan") if torch.is_tensor(o) and o.is_floating_point() else o
                                for o in output)

        module.register_forward_hook(poison)

    def before(self, step: int) -> None:
        if self.at.get(step) == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        while self.at.get(step) == "hang":
            time.sleep(3600)
        if self.at.get(step) == "diskfull":
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process if ``MEGALLAMA_FAULT`` names ``name@step`` for its rank (a point inside
    code that holds no :class:`Faults`, e.g. a checkpoint save); inert unless the variable is set."""
    if not os.environ.get(FAULT_ENV):
        return
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if Faults.from_env(rank).at.get(step) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_fault(name: str, step: int) -> None:
    """Raise ENOSPC if ``MEGALLAMA_FAULT`` names ``latestfull@step`` (``name`` "latest") for this rank."""
    if not os.environ.get(FAULT_ENV):
        return
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if name == "latest" and Faults.from_env(rank).at.get(step) == "latestfull":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------- heartbeat and monitor

class Heartbeat:
    """``<run_dir>/heartbeats/rank-NNNNN.json``: who this rank is and its last completed step.

    Written atomically (temp name, then rename) after every step: a few hundred bytes, so
    a survivor can name the rank that died and where it was.
    """

    def __init__(self, run_dir: str, rank: int):
        self.dir = Path(run_dir) / "heartbeats"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.host, self.pid = rank, socket.gethostname(), os.getpid()
        self.path = self.dir / f"rank-{rank:05d}.json"

    def beat(self, step: int) -> None:
        write_text(self.path, json.dumps(dict(rank=self.rank, host=self.host, pid=self.pid, step=step,
                                              time=time.time())))

    def others(self) -> bool:
        """Whether any other rank has written a heartbeat."""
        return any(f != self.path for f in self.dir.glob("rank-*.json"))

    def peers(self) -> str:
        """One phrase per other rank that is gone (same host, dead pid) or silent for long."""
        out, now = [], time.time()
        for f in sorted(self.dir.glob("rank-*.json")):
            try:
                hb = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if hb["rank"] == self.rank or hb["time"] < STARTED:  # this rank, or left by an earlier session
                continue
            if hb["host"] == self.host and not pid_alive(hb["pid"]):
                out.append(f"rank {hb['rank']} (pid {hb['pid']} on {hb['host']}) is gone after step {hb['step']}")
            elif now - hb["time"] > 30:
                out.append(f"rank {hb['rank']} on {hb['host']} silent for {now - hb['time']:.0f}s "
                           f"after step {hb['step']}")
        return "; ".join(out)


class StepMonitor:
    """Per-step bookkeeping around the training loop: heartbeat, bad-step count, faults, failure report.

    In the loop: ``monitor.begin(step)`` ... ``monitor.end(step, engine.was_step_applied(), loss)``.
    """

    def __init__(self, run_dir: str, rank: int, max_bad_steps: int, step_timeout_s: float = 0.0,
                 faults: Optional[Faults] = None):
        self.rank, self.max_bad_steps, self.step_timeout_s = rank, max_bad_steps, step_timeout_s
        self.heartbeat = Heartbeat(run_dir, rank)
        self.faults = faults if faults is not None else Faults.from_env(rank)
        self.step: Optional[int] = None  # the step in progress (None between steps)
        self.last_step = 0  # last completed step
        self.bad_steps = 0  # total skipped steps
        self.bad_run: list[int] = []  # the current run of consecutive bad steps
        self.started = time.monotonic()
        self.heartbeat.beat(0)
        if step_timeout_s > 0:
            threading.Thread(target=self._watchdog, name="megallama-watchdog", daemon=True).start()

    def begin(self, step: int) -> None:
        if self.last_step != step - 1:  # resumed from a checkpoint: the heartbeat starts there
            self.last_step = step - 1
            self.heartbeat.beat(self.last_step)
        self.started = time.monotonic()
        self.step = step
        self.faults.before(step)

    def _watchdog(self) -> None:
        """End the process when one step outlives ``step_timeout_s`` (a hang anywhere in it)."""
        while True:
            time.sleep(min(5.0, self.step_timeout_s / 4))
            step, waited = self.step, time.monotonic() - self.started
            if step is not None and waited > self.step_timeout_s:
                peers = self.heartbeat.peers()
                say(f"megallama train: rank {self.rank} stuck in step {step} for {waited:.0f}s "
                    f"(last completed step {self.last_step}; limit train.collective_timeout_s="
                    f"{self.step_timeout_s:g}); this rank or a peer is hung, or the network is down"
                    + (f"; {peers}" if peers else "") + "; exiting")
                os._exit(1)

    def end(self, step: int, applied: bool, loss: float) -> None:
        """Record ``step``; raise :class:`TrainingHalted` after ``max_bad_steps`` bad steps in a row."""
        self.step, self.last_step = None, step
        self.heartbeat.beat(step)
        if applied and math.isfinite(loss):
            self.bad_run = []
            return
        self.bad_steps += 1
        self.bad_run.append(step)
        if self.rank == 0:
            say(f"megallama train: step {step} skipped: non-finite loss or gradient "
                f"({len(self.bad_run)} in a row, {self.bad_steps} in total; "
                f"stopping at train.max_bad_steps={self.max_bad_steps})")
        if len(self.bad_run) >= self.max_bad_steps:
            raise TrainingHalted(
                f"stopped after {len(self.bad_run)} consecutive non-finite steps ({self.bad_run[0]}-{step}); "
                f"no update was applied and nothing was saved, so the last good checkpoint is intact; "
                f"lower optim.lr, raise optim.warmup_steps or check the data around step {self.bad_run[0]}, "
                f"then resume")


PEER_SETTLE_S = 3.0  # how long a failing rank waits for a dying peer to be seen gone (launchers allow more)


def report_failure(run_dir: str, exc: BaseException) -> None:
    """Print one line naming this rank, the step it failed in, and the peers that are gone.

    Called by ``megallama train`` when training raises; the rank and its last step come from
    its own heartbeat, so the report works whatever the loop was doing.
    """
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    path = Path(run_dir) / "heartbeats" / f"rank-{rank:05d}.json"
    try:
        own = json.loads(path.read_text())
        last = own["step"]
        if own["pid"] != os.getpid():  # an earlier session's (a resume that failed while loading)
            raise KeyError("pid")
    except (OSError, ValueError, KeyError):
        say(f"megallama train: rank {rank} failed before its first step: {type(exc).__name__}: {exc}")
        return
    heartbeat = Heartbeat(run_dir, rank)
    peers = heartbeat.peers()
    # A peer's sockets close (failing our collective) before the kernel has finished its exit, so
    # right after the error a dead peer can still look alive: look again for a moment.
    settle = time.monotonic() + PEER_SETTLE_S
    while not peers and heartbeat.others() and time.monotonic() < settle:
        time.sleep(0.1)
        peers = heartbeat.peers()
    first = str(exc).splitlines()[0] if str(exc) else ""
    say(f"megallama train: rank {rank} failed after step {last} (its last completed step): "
        f"{type(exc).__name__}: {first}" + (f"; {peers}" if peers else ""))
