"""The matrix products of the parallel layers, on the faster of a CPU's two fp32 GEMMs.

torch's CPU ``mm``/``matmul`` of fp32 tensors call the BLAS it was built with (MKL in the
official wheels).  MKL picks its code path by CPU vendor: on AMD CPUs it runs AVX2 kernels even
where the CPU has AVX-512, while oneDNN (also inside every torch wheel, used by torch for bf16
and by the inductor compiler) JIT-compiles AVX-512 kernels for whatever CPU it finds.  On the
2-core AMD EPYC development machine an fp32 ``[2048, 768] x [768, 4096]`` product runs at
~190 GFLOP/s through MKL and ~330-450 through oneDNN, in every layout a linear layer needs
(forward, input gradient, weight gradient; ``benchmarks/train_throughput.py`` prints both peaks).

:func:`matmul` and :func:`linear` are ``torch.matmul`` and ``F.linear`` with that choice made:

* ``onednn``: fp32 CPU products through ``torch.ops.mkldnn._linear_pointwise`` (oneDNN's inner
  product, the op inductor emits for CPU linears), for operands of any strides, wrapped as the
  custom op ``parallel::onednn_matmul``;
* ``blas``: torch's own ``matmul`` (MKL or OpenBLAS).

Other devices, other dtypes (bf16 already goes to oneDNN inside torch), autocast regions and a
torch without the op always take torch's own kernels.  The choice is a
rule, not a timing, so every rank and every resumed process of a run computes the same bits:
:func:`set_cpu_backend` (``auto``: oneDNN wherever torch has it).  Both give fp32 products of the
same accuracy (different summation orders: ~1e-6 relative).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "onednn", "blas")
_choice = {"backend": "auto"}

_HAS_OP = hasattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise")


@torch.library.custom_op("parallel::onednn_matmul", mutates_args=())
def _onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``a`` ``[..., K]``, ``b`` ``[K, N]``, fp32 CPU) by oneDNN's inner product, which
    computes ``input @ weight^T`` for a weight ``[N, K]``: ``b^T``, a view.  A custom op, so the
    compiler (``train.compile``) calls it as it is instead of lowering oneDNN's op itself."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


@_onednn_matmul.register_fake
def _(a, b):
    return a.new_empty(tuple(a.shape[:-1]) + (b.shape[1],))


# the op :func:`matmul` runs besides torch's own: what a selective-recompute policy keeps
MATMUL_OPS = {torch.ops.parallel.onednn_matmul.default}


def _check_onednn() -> bool:
    """Whether this torch has oneDNN's inner product for dense fp32 CPU tensors, and it is right."""
    if not _HAS_OP or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a, w = torch.randn(33, 17, generator=gen), torch.randn(9, 17, generator=gen)
        return bool(torch.allclose(_onednn_matmul(a, w.t()), a @ w.t(), rtol=1e-5, atol=1e-5))
    except (RuntimeError, NotImplementedError):  # a build without the kernel
        return False


# decided once, at import: code being compiled reads the answer, it cannot trace the check
_ONEDNN = _check_onednn()


def onednn_available() -> bool:
    """Whether this torch has oneDNN's inner product for dense fp32 CPU tensors, and it is right."""
    return _ONEDNN


def set_cpu_backend(name: str) -> None:
    """``auto`` (oneDNN where available), ``onednn`` (an error where it is not) or ``blas``."""
    if name not in BACKENDS:
        raise ValueError(f"CPU GEMM backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "onednn" and not onednn_available():
        raise ValueError("this torch has no usable oneDNN inner product (torch.ops.mkldnn._linear_pointwise); "
                         "use the 'blas' or 'auto' CPU GEMM backend")
    _choice["backend"] = name


def cpu_backend() -> str:
    """The backend fp32 CPU products take: ``onednn`` or ``blas``."""
    name = _choice["backend"]
    if name == "auto":
        return "onednn" if onednn_available() else "blas"
    return name


def _onednn(a: torch.Tensor, b: torch.Tensor, backend: Optional[str] = None) -> bool:
    """Whether ``a @ b`` (``b`` 2-D) goes to oneDNN (``backend``: this one instead of the chosen one)."""
    return (a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu"
            and b.device.type == "cpu" and b.dim() == 2 and a.dim() >= 2 and a.numel() > 0 and b.numel() > 0
            and not torch.is_autocast_enabled("cpu") and (backend or cpu_backend()) == "onednn")


def matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None,
           backend: Optional[str] = None) -> torch.Tensor:
    """``a @ b`` for ``a`` ``[..., K]`` and ``b`` ``[K, N]``, no autograd (use it in backward
    functions and custom ops, or under ``no_grad``); ``out`` receives the product if given;
    ``backend`` (``onednn``/``blas``) overrides the chosen one for this call."""
    if not _onednn(a, b, backend):
        return torch.matmul(a, b, out=out) if out is not None else torch.matmul(a, b)
    y = _onednn_matmul(a, b)
    return out.copy_(y) if out is not None else y


class _Linear(torch.autograd.Function):
    """``x @ W^T`` with all three products (forward, input and weight gradient) on :func:`matmul`."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return matmul(x, weight.t())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = matmul(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = weight_grad(grad, x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dY^T @ X`` over all leading dimensions: the weight gradient ``[N, K]`` of a linear layer."""
    return matmul(grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1]))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias), its products on :func:`matmul` where oneDNN takes them."""
    if not _onednn(x, weight):
        return F.linear(x, weight)
    return _Linear.apply(x, weight)
