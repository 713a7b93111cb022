"""A throwaway single-node SLURM cluster on localhost for the launch tests.

Debian's ``slurm-wlm`` and ``munge`` come up in seconds without systemd: munged
as the munge user, ``slurmctld -D`` and ``slurmd -D`` in the background, with
``proctrack/linuxproc`` and ``task/none`` so no cgroups are needed.  Everything
(config, state, spool, logs) lives in one temporary directory; the daemons are
stopped by pid.  :class:`Unavailable` carries the reason when a piece is missing,
so a test can skip saying *why* instead of passing silently.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from megallama.distributed import free_port


class Unavailable(RuntimeError):
    """SLURM cannot be started here; the message says which piece is missing."""


def _munge_works(env: dict) -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, env=env)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=10, env=env).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class LocalSlurm:
    """slurmctld + slurmd + munged on localhost; ``env`` points the client commands at it."""

    CPUS = 2  # advertised (config_overrides): a small node; the scripts size themselves from it

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    # -------------------------------------------------------------- start / stop
    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        for exe in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"):
            if shutil.which(exe) is None and not Path("/usr/sbin", exe).exists():
                raise Unavailable(f"'{exe}' not found; run .ci/install-system-deps.sh (Debian slurm-wlm and munge)")
        if os.geteuid() != 0:
            raise Unavailable("slurmd must run as root to launch jobs; run the SLURM tests as root (as CI does)")
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        (self.root / "slurm.conf").write_text(self._config())
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.root / "slurm.conf")], "slurmctld")
        self._spawn(["slurmd", "-D", "-N", self.host, "-f", str(self.root / "slurm.conf")], "slurmd")
        self._wait_idle(timeout)
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _start_munge(self) -> None:
        if _munge_works(self.env):
            return  # a munged already serves the default socket
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            raise Unavailable("/etc/munge/munge.key is missing; reinstall munge (its postinst creates the key)")
        r = subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], capture_output=True, text=True)
        deadline = time.monotonic() + 10
        while not _munge_works(self.env):
            if time.monotonic() > deadline:
                raise Unavailable(f"munged did not start: {r.stderr.strip() or r.stdout.strip()}")
            time.sleep(0.2)

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _config(self) -> str:
        r = self.root
        return f"""\
ClusterName=megallama-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# a requeued job becomes eligible after cred_expire; nothing wakes the schedulers then, so it
# starts at their next periodic pass (defaults: backfill 30 s, main loop 60 s)
SchedulerParameters=bf_interval=1,sched_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
# cred_expire (above) is also how long a requeued job waits before it may start again
# (default 120 s; the preemption test requeues once)
KillWait=5
MinJobAge=300
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.CPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise Unavailable(f"{p.args[0]} exited with {p.returncode}: {self.logs()[-800:]}")
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env)
            state = r.stdout.strip()
            if r.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.3)
        raise Unavailable(f"node not idle after {timeout:.0f}s (state '{state}'): {self.logs()[-800:]}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"== {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    # -------------------------------------------------------------- jobs
    def sbatch(self, script: str, options: list, args: list = (), env: Optional[dict] = None) -> str:
        """Submit ``script`` with sbatch ``options`` and script ``args``; the job id."""
        r = subprocess.run(["sbatch", "--parsable", *options, script, *args], capture_output=True, text=True,
                           env=dict(self.env, **(env or {})), timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"sbatch failed: {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def scontrol(self, *args: str) -> str:
        r = subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.env, timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"scontrol {' '.join(args)} failed: {r.stderr}")
        return r.stdout

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        fields = {}
        for token in self.scontrol("show", "job", "-o", job_id).split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                        "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], env=self.env, capture_output=True)
        raise AssertionError(f"job {job_id} not done after {timeout:.0f}s: {info}\n{self.logs()}")
