"""Fused GPU kernels for element-wise layers: NVIDIA apex's where it is importable, else torch's.

Only CUDA tensors take these paths; on CPU the callers keep their own eager forms (measured
faster there: torch's CPU ``_fused_rms_norm`` forward takes 3.6 ms where the eager form takes
0.17 ms at ``[512, 4, 768]``, and it has no CPU backward).

NVIDIA apex is used only if it is already importable *with its CUDA extensions* (it is built
from source on GPU machines).  The PyPI package named ``apex`` is a different project: it has
no ``apex.normalization`` and is never used (never ``pip install apex``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch


@functools.lru_cache(maxsize=None)
def apex_rms_norm() -> Optional[Callable]:
    """apex's ``fused_rms_norm_affine(input, weight, normalized_shape, eps)``, or None when NVIDIA
    apex or its compiled ``fused_layer_norm_cuda`` extension is not importable."""
    try:
        fn = importlib.import_module("apex.normalization.fused_layer_norm").fused_rms_norm_affine
        importlib.import_module("fused_layer_norm_cuda")
    except Exception:  # noqa: BLE001 - absent, another project's `apex`, or built without --cuda_ext
        return None
    return fn


class _TorchFusedRMSNorm(torch.autograd.Function):
    """torch's fused RMSNorm kernels (``aten::_fused_rms_norm`` and its backward, CUDA): one
    kernel each way, keeping the input and the per-token rstd, as the eager node does."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        grad_x, grad_w = torch.ops.aten._fused_rms_norm_backward(
            grad.contiguous(), x, [x.shape[-1]], rstd, weight, [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
        return grad_x, grad_w, None


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


@functools.lru_cache(maxsize=None)
def _torch_has_fused_rms_norm() -> bool:
    """``aten::_fused_rms_norm`` and its backward exist from torch 2.8 on (megallama allows 2.4)."""
    return hasattr(torch.ops.aten, "_fused_rms_norm") and hasattr(torch.ops.aten, "_fused_rms_norm_backward")


def rms_kernel(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which kernel :func:`fused_rms_norm` runs for these tensors: ``apex``, ``torch`` or ``eager``
    (not a CUDA tensor, the weight's dtype differs from the input's, or neither apex nor a torch
    with the fused kernel: the caller's own form)."""
    if not _on_gpu(x) or weight.dtype != x.dtype:
        return "eager"
    return _gpu_rms_kernel()


def _gpu_rms_kernel() -> str:
    """The RMSNorm kernel of CUDA tensors of one dtype: apex's, else torch's, else the eager node."""
    if apex_rms_norm() is not None:
        return "apex"
    return "torch" if _torch_has_fused_rms_norm() else "eager"


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """``x / rms(x) * weight`` over the last dimension by a fused kernel, or None where
    :func:`rms_kernel` says ``eager`` (the caller computes it)."""
    kind = rms_kernel(x, weight)
    if kind == "apex":
        return apex_rms_norm()(x.contiguous(), weight, (x.shape[-1],), eps)
    if kind == "torch":
        return _TorchFusedRMSNorm.apply(x.contiguous(), weight, eps)
    return None


def check_rms_norm(device="cuda") -> str:
    """:func:`fused_rms_norm` on ``device`` against the eager node (the CPU form), forward and both
    gradients, in fp32 and bf16; raises ``AssertionError`` naming what differs.  Returns the kernel's
    name (``apex``, ``torch`` or ``eager``).  Run before GPU timings and by ``tests/test_gpu.py``."""
    from megallama.model import _RMSNormFunction

    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x0 = torch.randn(512, 2, 1024, generator=gen).to(device, dtype)
        w0 = (1 + 0.1 * torch.randn(1024, generator=gen)).to(device, dtype)
        g = torch.randn(x0.shape, generator=gen).to(device, dtype)
        kind = rms_kernel(x0, w0)
        results = []
        for fused in (True, False):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = fused_rms_norm(x, w, 1e-5) if fused else None
            if y is None:
                y = _RMSNormFunction.apply(x, w, 1e-5)
            y.backward(g)
            results.append((y.float(), x.grad.float(), w.grad.float()))
        for name, a, b in zip(("output", "input gradient", "weight gradient"), *results):
            err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
            if not err <= tol:
                raise AssertionError(f"fused RMSNorm ({kind}) {name} differs from the eager node by "
                                     f"{err:.2e} (relative) in {dtype}")
    return kind


def describe(device: torch.device) -> Optional[str]:
    """One line naming the kernels a run on ``device`` uses: on CPU its fp32 GEMM
    (:mod:`parallel.gemm`), on CUDA the fused ones (None elsewhere)."""
    if torch.device(device).type == "cpu":
        from parallel import gemm

        return {"onednn": "kernels: fp32 matmuls on oneDNN (train.cpu_gemm=blas for torch's BLAS)",
                "blas": "kernels: fp32 matmuls on torch's BLAS"}[gemm.cpu_backend()]
    if torch.device(device).type != "cuda":
        return None
    rms = {"apex": "NVIDIA apex fused_rms_norm_affine", "torch": "torch _fused_rms_norm",
           "eager": "eager (torch < 2.8, no apex)"}[_gpu_rms_kernel()]
    return f"fused kernels: RMSNorm {rms}; AdamW torch fused=True"
