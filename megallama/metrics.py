"""Throughput, MFU, the console progress line (:class:`Progress`) and what a run logs (:class:`RunLog`).

MFU (model FLOPs utilisation, Chowdhery et al. 2022) = achieved model FLOP/s over
the devices' peak.  Model FLOPs per token for training are ``6N + 12·L·d·s``:
6 FLOPs per parameter for forward + backward of every matmul (N counts every
matmul weight, the output layer included, the embedding lookup excluded) plus the
attention scores and weighted sum (``QK^T`` and ``AV``: 2·2·s·d per layer forward,
times 3 with backward).  Recomputation is *not* counted: MFU measures useful work.

Peak FLOP/s per device: ``train.device_peak_flops`` if set; otherwise the GPU's
dense peak for the run's precision from :mod:`megallama.hardware`; on CPU (or an
unknown GPU) a measured large matmul of this process in the run's precision
(bf16 for a bf16 run, else fp32).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megallama.atomic import write_text
from megallama.config import Config


def cpu_matmul_flops(n: int = 1024, repeats: int = 8, dtype: torch.dtype = torch.float32) -> dict:
    """FLOP/s of a large ``dtype`` matmul with this process's threads (best of ``repeats``) on each
    CPU GEMM this torch has (:mod:`parallel.gemm`: ``blas``, and for fp32 ``onednn`` where available;
    torch's own bf16 products already run on oneDNN)."""
    from parallel import gemm

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = {}
    for backend in ("blas", "onednn") if gemm.onednn_available() and dtype == torch.float32 else ("blas",):
        gemm.matmul(a, b, backend=backend)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            gemm.matmul(a, b, backend=backend)
            best = min(best, time.perf_counter() - start)
        out[backend] = 2 * n**3 / best
    return out


def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 8, dtype: torch.dtype = torch.float32) -> float:
    """The hardware limit MFU is taken against: the best FLOP/s of a large ``dtype`` matmul with this
    process's threads over the CPU GEMMs torch has (MKL's sgemm runs AVX2 code on AMD CPUs, oneDNN
    AVX-512: the best is what the machine can do, whichever one a model runs on)."""
    return max(cpu_matmul_flops(n, repeats, dtype).values())


def peak_flops_per_device(cfg: Config) -> float:
    if cfg.train.device_peak_flops > 0:
        return cfg.train.device_peak_flops
    if torch.cuda.is_available():
        from megallama.hardware import detect_gpu_spec

        spec = detect_gpu_spec()
        if spec is not None:
            return spec.peak_flops(cfg.train.precision)
    # the training precision's matmul: a CPU with bf16 instructions runs bf16 faster than fp32,
    # and an fp32 peak would put a bf16 run's MFU above 100%
    dtype = {"bf16": torch.bfloat16}.get(cfg.train.precision, torch.float32)
    return measure_cpu_matmul_flops(dtype=dtype)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Computes per-step scalars and prints one progress line per ``log_interval`` on rank 0."""

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float, devices: int,
                 peak_per_device: float, enabled: bool = True, log_interval: int = 1, stream=None,
                 consumed_tokens: int = 0):
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token, self.devices, self.peak = flops_per_token, devices, peak_per_device
        self.enabled, self.log_interval = enabled, log_interval
        self.stream = stream or sys.stdout
        self.times: list[float] = []
        self.consumed = consumed_tokens  # the run's, from its checkpoint on a resume

    def update(self, step: int, loss: float, step_time: float, data_wait: float, lr: float,
               grad_norm: Optional[float], memory: int, loss_scale: Optional[float] = None) -> dict:
        self.times.append(step_time)
        self.consumed += self.tokens_per_step
        tps = self.tokens_per_step / step_time
        mfu = tps * self.flops_per_token / (self.peak * self.devices)
        stats = {
            "train/loss": loss, "train/lr": lr, "train/tokens_per_sec": tps,
            "train/tokens_per_sec_per_device": tps / self.devices, "train/mfu": mfu,
            "train/step_time": step_time, "train/data_wait_time": data_wait,
            "train/consumed_tokens": self.consumed, "memory/max_bytes": memory,
        }
        if grad_norm is not None:
            stats["train/grad_norm"] = grad_norm
        if loss_scale is not None:
            stats["train/loss_scale"] = loss_scale
        if self.enabled and (step % self.log_interval == 0 or step == self.total_steps):
            recent = self.times[-10:]
            eta = (self.total_steps - step) * sum(recent) / len(recent)
            gn = f" | grad {grad_norm:.3f}" if grad_norm is not None else ""
            print(f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e}{gn}"
                  f" | {tps:,.0f} tok/s | MFU {100 * mfu:.1f}% | ETA {_duration(eta)}", file=self.stream, flush=True)
        return stats

    def log_eval(self, step: int, loss: float) -> None:
        if self.enabled:
            ppl = float(torch.tensor(loss).exp())
            print(f"step {step} | validation loss {loss:.4f} | perplexity {ppl:.2f}", file=self.stream, flush=True)

    def _steady(self) -> list[float]:
        return self.times[1:] if len(self.times) > 1 else self.times  # the first step includes warm-up

    def mean_tokens_per_sec(self) -> float:
        times = self._steady()
        return self.tokens_per_step * len(times) / sum(times) if times else 0.0

    def mean_mfu(self) -> float:
        return self.mean_tokens_per_sec() * self.flops_per_token / (self.peak * self.devices)


# ----------------------------------------------------------------------------- the run's logs

@dataclass
class Summary:
    params: int
    tokens: int
    flops: float
    steps: int
    final_train_loss: float
    final_valid_loss: Optional[float]
    tokens_per_sec: float
    mfu: float
    data_wait_fraction: float
    losses: list
    grad_norms: list
    bad_steps: int = 0  # non-finite steps skipped (no update applied)


class RunLog:
    """What a run records of its steps: each step's loss and gradient norm (on every rank, for
    the :class:`Summary` that ``train()`` returns) and, where ``enabled`` (rank 0), the files in
    ``train.run_dir``: TensorBoard events (``train.tensorboard``), ``metrics.jsonl`` (one line per
    step) and at the end ``summary.json`` and ``config.yaml``.

    A resume replays the steps after its checkpoint: the earlier session's events and lines of
    those steps are dropped, so each step keeps one record."""

    def __init__(self, cfg: Config, start_step: int, enabled: bool):
        self.cfg, self.run_dir = cfg, Path(cfg.train.run_dir)
        self.losses: list[float] = []
        self.grad_norms: list[Optional[float]] = []
        self.valid_loss: Optional[float] = None
        self.data_wait, self.step_time = 0.0, 0.0
        self.writer = self.lines = None
        if enabled:
            if cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lines = _metrics_log(self.run_dir / "metrics.jsonl", start_step)

    def step(self, step: int, loss: float, grad_norm: Optional[float], lr: float, data_wait: float,
             step_time: float, scalars: dict) -> None:
        """Record one training step; ``scalars`` go to TensorBoard as they are."""
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.data_wait, self.step_time = self.data_wait + data_wait, self.step_time + step_time
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.lines is not None:
            self.lines.write(json.dumps(json_safe({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr}),
                                        allow_nan=False) + "\n")
            self.lines.flush()

    def valid(self, step: int, loss: float) -> None:
        self.valid_loss = loss
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.add_scalar("valid/perplexity", float(torch.tensor(loss).exp()), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def summary(self, tokens: int, steps: int, progress: Progress, bad_steps: int) -> Summary:
        return Summary(params=self.cfg.model.num_parameters(), tokens=tokens,
                       flops=float(tokens * progress.flops_per_token), steps=steps,
                       final_train_loss=self.losses[-1], final_valid_loss=self.valid_loss,
                       tokens_per_sec=progress.mean_tokens_per_sec(), mfu=progress.mean_mfu(),
                       data_wait_fraction=self.data_wait / max(self.step_time, 1e-9), losses=self.losses,
                       grad_norms=self.grad_norms, bad_steps=bad_steps)

    def finish(self, summary: Summary) -> None:
        """``summary.json`` (atomically) and ``config.yaml``; closes the logs."""
        if self.lines is None:
            return
        import yaml

        write_text(self.run_dir / "summary.json",
                   json.dumps(json_safe(dict(summary.__dict__)), indent=2, allow_nan=False) + "\n")
        write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.lines.close()
        if self.writer is not None:
            self.writer.close()


def _metrics_log(path: Path, start_step: int):
    """``metrics.jsonl`` opened for appending, without the lines of steps after ``start_step``: a
    resume replays them, and each step keeps one line (a torn last line of a killed run goes too)."""
    if path.is_file():  # junk (not UTF-8, not a step's JSON object) is dropped with the replayed steps
        text, kept = path.read_bytes().decode("utf-8", "replace"), []
        lines = text.splitlines()
        for line in lines:
            try:
                step = json.loads(line)["step"]
                if isinstance(step, int) and not isinstance(step, bool) and step <= start_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError, IndexError):
                continue
        if len(kept) == len(lines) and text.endswith("\n"):
            return open(path, "a")
        write_text(path, "".join(kept))
    return open(path, "a")


def json_safe(x):
    """``x`` with every non-finite float (the loss of a skipped step) as None: strict JSON (``null``),
    which jq and other parsers read, where ``NaN``/``Infinity`` are not JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
