"""The model's element-wise kernels: hand-written autograd nodes, and fused GPU kernels.

:mod:`megallama.model` is the architecture; what each layer computes element-wise, and how
its backward saves memory, lives here (nothing here imports the model):

* RMSNorm: :class:`_RMSNormFunction` (keeps only the input and the per-token rstd), and on
  CUDA :func:`fused_rms_norm`: NVIDIA apex's kernel where it is importable, else torch's.
* Rotary embeddings: :func:`apply_rotary` (the reference form, what the compiler fuses) and
  :func:`rotary_qkv` (:class:`_RotaryQKV`: q and k rotated by one complex multiply).
* SwiGLU: :class:`_SwiGLUFunction` (keeps only the projection output).

Only CUDA tensors take the fused RMSNorm paths; on CPU the eager node runs (measured
faster there: torch's CPU ``_fused_rms_norm`` forward takes 3.6 ms where the eager form takes
0.17 ms at ``[512, 4, 768]``, and it has no CPU backward).

NVIDIA apex is used only if it is already importable *with its CUDA extensions* (it is built
from source on GPU machines).  The PyPI package named ``apex`` is a different project: it has
no ``apex.normalization`` and is never used (never ``pip install apex``).
"""

from __future__ import annotations

import functools
import importlib
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- RMSNorm

class _RMSNormFunction(torch.autograd.Function):
    """``rms_norm(x.float()).type_as(x) * weight`` with a hand-written backward.

    Only the input and the per-token ``rstd`` are kept for backward; autograd through
    ``F.rms_norm`` would keep the normalised tensor as well: one activation of s·b·h less
    per norm (two per block).  The per-token rstd comes from one reduction
    (``vector_norm``), with no squared copy of the input, and the output is scaled in
    place, so forward allocates only what it returns (benchmarks/train_throughput.py).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        # one reduction pass for the per-token rstd (no squared copy of x): 1/sqrt(mean(x²) + eps)
        rstd = (torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps)).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        out = (xf * rstd).type_as(x)
        return out.mul_(weight) if weight.dtype == out.dtype else out * weight

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.type_as(x)).flatten(0, -2).sum(0).to(weight.dtype)
        g = (grad * weight).float()
        # d/dx of x·rstd: rstd · (g − x̂ · mean(g · x̂)), computed in place in x̂'s buffer
        mean = (g * normed).mean(-1, keepdim=True)
        grad_x = normed.mul_(mean.neg_()).add_(g).mul_(rstd)
        return grad_x.type_as(x), grad_weight, None


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


# ----------------------------------------------------------------------------- backward buffers

class _Reusable(threading.local):
    """Buffers handed out again once nothing references them any more (CPU only; one cache
    per thread).

    glibc serves blocks of 32 MiB and more with a fresh ``mmap`` and returns them on free,
    so every such temporary costs its page faults anew (~0.37 ms per MiB here; SwiGLU's
    input gradient is 32 MiB per block on the 100M preset: 2% of its step).  A buffer whose
    storage only this cache still holds is free to reuse; one still in use (a hook kept the
    gradient, say) is left to its holders and a new one takes its place.  CUDA's caching
    allocator already reuses memory, so other devices allocate normally.
    """

    def __init__(self, max_entries: int = 4):
        self._storages: dict = {}
        self._max = max_entries

    def empty(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key = (tuple(shape), dtype)
        storage = self._storages.pop(key, None)
        # the cache holds only the storage; every tensor handed out (and each of its views, and
        # anything holding those, Python or C++) holds a reference to it: 1 means free
        if storage is None or torch._C._storage_Use_Count(storage._cdata) > 1:
            storage = torch.empty(shape, dtype=dtype).untyped_storage()
        self._storages[key] = storage  # most recently used last
        while len(self._storages) > self._max:
            self._storages.pop(next(iter(self._storages)))
        return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


# the input gradients of the hand-written nodes below: consumed by the projection's backward
# right after they are returned, so the next block's backward can write into the same memory
_BACKWARD_BUFFERS = _Reusable()


# ----------------------------------------------------------------------------- rotary

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of ``x`` ``[s, b, h, hd]`` (Meta's layout):
    ``(x0·cos − x1·sin, x0·sin + x1·cos)`` in fp32.  ``cos``/``sin`` are ``[s, hd/2]`` (one
    position per sequence index) or ``[s, b, hd/2]`` (per-sample positions of packed documents).
    The reference form: the compiler fuses it into one kernel; eager training runs
    :class:`_RotaryQKV`, the same arithmetic as one complex multiply."""
    cos, sin = (t[:, None, None, :] if t.dim() == 2 else t[:, :, None, :] for t in (cos, sin))
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., hd]`` (fp32) as ``[..., hd/2]`` complex pairs, a view wherever the strides allow."""
    pairs = x.unflatten(-1, (-1, 2))
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


class _RotaryQKV(torch.autograd.Function):
    """The fused projection output ``[s, b, (h + 2·kvh)·hd]`` -> rotated q ``[s, b, h, hd]``,
    rotated k and v ``[s, b, kvh, hd]``, as one autograd node.

    Each pair of q and k is one complex number multiplied by ``cos + i·sin`` (as in Meta's
    reference code): one kernel instead of the real form's four strided multiplies, two adds
    and a stack (rotary was ~20% of a demo step's profile).  q and k are adjacent in the
    projection, so they rotate in one call, written next to a copy of v: q, k and v are views
    of one tensor, so what attention keeps does not hold the projection output (and its
    pre-rotary q and k) alive.  Backward
    rotates the q and k gradients back (by the conjugate) straight into one buffer of the
    projection output's shape and copies v's gradient next to them: autograd through
    split, multiply and split would allocate that gradient three times and join it twice,
    and every fresh activation-sized tensor costs page faults on CPU.
    """

    @staticmethod
    def forward(ctx, qkv, rotation, n_heads, n_kv_heads, head_dim):
        s, b = qkv.shape[:2]
        n_rot = n_heads + n_kv_heads
        qk, v = qkv.split([n_rot * head_dim, n_kv_heads * head_dim], dim=-1)
        # q, k and v are views of one new tensor, not v of the projection output: what attention
        # keeps for backward then frees the projection output and its pre-rotary q and k
        out = torch.empty(s, b, n_rot + n_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        rotated = _as_complex(qk.float().view(s, b, n_rot, head_dim))
        if out.dtype == torch.float32:
            torch.mul(rotated, rotation, out=torch.view_as_complex(out[:, :, :n_rot].unflatten(-1, (-1, 2))))
        else:
            out[:, :, :n_rot].copy_(torch.view_as_real(rotated * rotation).flatten(-2))
        out[:, :, n_rot:].copy_(v.view(s, b, n_kv_heads, head_dim))
        ctx.save_for_backward(rotation)
        ctx.meta = (qkv.shape, qkv.dtype, n_heads, n_kv_heads, head_dim)
        return out.split([n_heads, n_kv_heads, n_kv_heads], dim=2)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        (rotation,) = ctx.saved_tensors
        shape, dtype, n_heads, n_kv_heads, hd = ctx.meta
        s, b = shape[:2]
        grad = _BACKWARD_BUFFERS.empty(shape, dtype, rotation.device)
        g_q, g_k, g_v = (t.view(s, b, -1, hd) for t in grad.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], -1))
        back = rotation.conj()
        for g, dst in ((grad_q, g_q), (grad_k, g_k)):
            if g is None:
                dst.zero_()
            elif dst.dtype == torch.float32:
                torch.mul(_as_complex(g.float()), back, out=torch.view_as_complex(dst.unflatten(-1, (-1, 2))))
            else:
                dst.copy_(torch.view_as_real(_as_complex(g.float()) * back).flatten(-2))
        if grad_v is None:
            g_v.zero_()
        else:
            g_v.copy_(grad_v)
        return grad, None, None, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) heads ``[s, b, heads, hd]`` of the fused projection output, q and k rotated."""
    if torch.compiler.is_compiling():  # inductor has no complex kernels; it fuses the real form into one
        s, b = qkv.shape[:2]
        qk, v = qkv.split([(n_heads + n_kv_heads) * head_dim, n_kv_heads * head_dim], dim=-1)
        q, k = apply_rotary(qk.view(s, b, n_heads + n_kv_heads, head_dim), cos, sin).split([n_heads, n_kv_heads], 2)
        return q, k, v.view(s, b, n_kv_heads, head_dim)
    rotation = torch.complex(cos, sin)
    rotation = rotation[:, None, None, :] if rotation.dim() == 2 else rotation[:, :, None, :]
    return _RotaryQKV.apply(qkv, rotation, n_heads, n_kv_heads, head_dim)


# ----------------------------------------------------------------------------- SwiGLU

class _SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` of the fused ``[..., 2f]`` projection output, as one autograd node.

    Keeps only the projection output for backward (autograd would also keep ``silu(gate)``,
    s·b·f more per block).  Forward and backward allocate only the tensor they return and
    work in place in it: every fresh activation-sized temporary costs page faults on CPU
    (glibc maps large blocks afresh) and a pass over memory on any device.  Backward writes
    both halves of the input gradient into one buffer, so no ``cat`` joins them.
    """

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # functional form: the compiler fuses it, and cannot trace out=
            return torch.cat([torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)], dim=-1)
        grad_in = _BACKWARD_BUFFERS.empty(gate_up.shape, gate_up.dtype, gate_up.device)
        grad_gate, grad_up = grad_in.chunk(2, dim=-1)
        torch.ops.aten.silu.out(gate, out=grad_up).mul_(grad)            # d/d up   = grad · silu(gate)
        torch.mul(grad, up, out=grad_gate)                                # d/d gate = grad · up · silu'(gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_in


# ----------------------------------------------------------------------------- what a run uses

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
