"""Throughput, MFU and the console progress line.

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

import sys
import time
from typing import Optional

import torch

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
