"""Helpers for the checkpoint tests: run `megallama` in a subprocess, read metrics, snapshot dirs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

_LAUNCH = "import sys; from megallama import cli; sys.exit(cli.main(sys.argv[1:]))"


def env(**extra) -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    out.update(extra)
    return out


def megallama_cmd(*args: str) -> list[str]:
    return [PY, "-c", _LAUNCH, *args]


def megallama(*args: str, timeout: float = 240, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(megallama_cmd(*args), cwd=ROOT, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def train_args(run_dir, *overrides: str) -> list[str]:
    return ["train", "--preset", "tiny", "--set", f"train.run_dir={run_dir}", "--set", "train.tensorboard=false",
            *[x for o in overrides for x in ("--set", o)]]


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_per_step(rows: list[dict]) -> dict[int, dict]:
    """The last logged value of each step (a resume drops the lines of the steps it replays)."""
    return {r["step"]: r for r in rows}


def wait_for_step(proc: subprocess.Popen, run_dir, step: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = metrics(run_dir)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before step {step}:\n"
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def start(cmd: list[str], **extra_env) -> subprocess.Popen:
    """Start in a new session so the whole process group (launcher and ranks) can be killed."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.communicate(timeout=60)


def snapshot(path) -> dict[str, str]:
    """Every file under ``path`` -> sha256 (to prove a failed command touched nothing)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# `megallama ARGS` in a fresh interpreter that reports how far its peak RSS (VmHWM) rose during the
# command: the modules the tools import lazily are imported first, then the peak is reset to the
# current RSS (``5 > /proc/self/clear_refs``) and read again at the end.  Prints "peak_rss_growth N".
_PEAK_LAUNCH = """import sys
import deepspeed, safetensors.torch, sentencepiece, torch, megallama.model, tools.hf, tools.meta, tools.reshard
from megallama import cli
def kb(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')
start = kb('VmRSS:')
status = cli.main(sys.argv[1:])
print('peak_rss_growth', kb('VmHWM:') - start)
sys.exit(status)
"""


def peak_rss_growth(*args: str, timeout: float = 240) -> int:
    """Bytes the peak RSS of ``megallama ARGS`` rose above its RSS at the start of the command."""
    r = subprocess.run([PY, "-c", _PEAK_LAUNCH, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("peak_rss_growth")[-1].split()[0])
