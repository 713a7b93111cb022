"""The model's hand-written autograd nodes equal autograd through their plain formulas, and the
whole model's gradients equal Hugging Face's.

RMSNorm, SwiGLU and the rotary/head split have backward passes written by hand (they keep less
for backward and allocate only what they return); these tests pin them to the reference
arithmetic in fp32, bf16 and fp64 inputs, with the strided gradients the model hands them.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megallama.config import preset_config
from megallama.convert import hf_config, ours_to_hf
from megallama.kernels import _RMSNormFunction, _SwiGLUFunction, apply_rotary, rotary_qkv
from megallama.model import build_model, rotary_tables

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _grads(fn, inputs, grad_out):
    """Outputs of ``fn(*inputs)`` and the gradients of ``inputs`` for ``grad_out``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out if isinstance(grad_out, (list, tuple)) else [grad_out])
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _close(a, b, dtype):
    tol = {torch.bfloat16: 1e-2, torch.float32: 2e-6, torch.float64: 2e-6}[dtype]  # fp64 inputs run in fp32
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert (x.double() - y.double()).abs().max().item() <= tol * max(1.0, y.double().abs().max().item())


def _strided(shape, dtype, gen):
    """A gradient laid out as the model hands it over (here: batch-major memory, sequence-first view)."""
    return torch.randn(shape[1], shape[0], *shape[2:], generator=gen).to(dtype).transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_equals_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 40, generator=gen).to(dtype) * 3
    w = (torch.rand(40, generator=gen) + 0.5).to(dtype)
    g = _strided((12, 3, 40), dtype, gen)

    def reference(x, w):  # normalise in fp32, round to the input's dtype, then scale (the paper's code)
        return F.rms_norm(x.float(), (40,), eps=1e-5).type_as(x) * w

    ours = _grads(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, w), g)
    ref = _grads(reference, (x, w), g)
    _close(ours[0] + ours[1], ref[0] + ref[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_equals_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    gate_up = torch.randn(10, 3, 2 * 24, generator=gen).to(dtype)
    g = _strided((10, 3, 24), dtype, gen)

    def reference(gu):
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up

    ours, ref = _grads(_SwiGLUFunction.apply, (gate_up,), g), _grads(reference, (gate_up,), g)
    _close(ours[0] + ours[1], ref[0] + ref[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["positions", "packed-positions"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_rotary_head_split_equals_reference(dtype, packed, kv_heads):
    s, b, h, hd = 14, 3, 4, 8
    gen = torch.Generator().manual_seed(2)
    cos, sin = (t[:s] for t in rotary_tables(hd, 32, 10000.0))
    if packed:  # per-sample positions [s, b], as packed documents have
        pos = torch.randint(0, s, (s, b), generator=gen)
        cos, sin = cos[pos], sin[pos]
    qkv = torch.randn(s, b, (h + 2 * kv_heads) * hd, generator=gen).to(dtype)
    grads = [_strided((s, b, n, hd), dtype, gen) for n in (h, kv_heads, kv_heads)]

    def reference(qkv):
        qk, v = qkv.split([(h + kv_heads) * hd, kv_heads * hd], dim=-1)
        q, k = apply_rotary(qk.view(s, b, h + kv_heads, hd), cos, sin).split([h, kv_heads], dim=2)
        return q, k, v.view(s, b, kv_heads, hd)

    ours = _grads(lambda t: rotary_qkv(t, cos, sin, h, kv_heads, hd), (qkv,), grads)
    ref = _grads(reference, (qkv,), grads)
    _close(ours[0] + ours[1], ref[0] + ref[1], dtype)


def test_rotary_head_split_with_unused_outputs():
    """A head group that gets no gradient (e.g. only q used) contributes zeros, not garbage."""
    s, b, h, hd = 6, 2, 2, 4
    cos, sin = (t[:s] for t in rotary_tables(hd, 8, 10000.0))
    qkv = torch.randn(s, b, 3 * h * hd, requires_grad=True)
    q, k, v = rotary_qkv(qkv, cos, sin, h, h, hd)
    q.sum().backward()
    assert torch.all(qkv.grad[..., h * hd:] == 0)
    assert qkv.grad[..., : h * hd].abs().sum() > 0


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_parameter_gradients_equal_hf(kv_heads):
    """Every parameter's gradient of the training loss equals LlamaForCausalLM's (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = replace(preset_config("tiny").model, n_kv_heads=kv_heads)
    ours = build_model(cfg, seed=3)
    kw = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**kw))
    hf.load_state_dict(ours_to_hf(ours.state_dict(), cfg), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (3, 25), generator=torch.Generator().manual_seed(3))
    ours(tokens[:, :-1], tokens[:, 1:]).backward()
    hf(tokens, labels=tokens).loss.backward()
    ours_grads = ours_to_hf({n: p.grad for n, p in ours.named_parameters()}, cfg)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert ours_grads.keys() == hf_grads.keys()
    # relative to each parameter's own gradient: q/k/norm gradients are ~3e-4 at most, so an
    # absolute 1e-5 let a 3% error through (fp32 agrees to < 1e-6 of the largest entry)
    for name, g in hf_grads.items():
        err = (ours_grads[name] - g).abs().max().item()
        assert g.abs().max().item() > 0 and err <= 1e-5 * g.abs().max().item(), \
            f"{name}: max difference {err:.3g} (largest gradient {g.abs().max().item():.3g})"


def test_backward_buffers_are_reused_only_when_free():
    from megallama.kernels import _Reusable

    cache = _Reusable(max_entries=2)
    a = cache.empty((64, 32), torch.float32, torch.device("cpu"))
    ptr = a.data_ptr()
    half = a[:, :16]  # a view still holds the storage
    del a
    b = cache.empty((64, 32), torch.float32, torch.device("cpu"))
    assert b.data_ptr() != ptr and half.data_ptr() == ptr  # in use: a new buffer, the old one untouched
    ptr_b = b.data_ptr()
    del b, half
    assert cache.empty((64, 32), torch.float32, torch.device("cpu")).data_ptr() == ptr_b  # free: reused
    for n in (1, 2, 3):
        cache.empty((n,), torch.float32, torch.device("cpu"))
    assert len(cache._storages) == 2  # bounded: the least recently used go
    assert cache.empty((64, 32), torch.float32, torch.device("meta")).device.type == "meta"  # only CPU is cached


@pytest.mark.parametrize("node", ["swiglu", "rotary"])
def test_kept_input_gradient_survives_the_next_backward(node):
    """A gradient somebody keeps (here a hook) is never overwritten by a later backward that reuses
    the node's buffers, and a freed one is reused without changing results."""
    gen = torch.Generator().manual_seed(0)
    s, b, h, hd = 8, 2, 2, 8
    if node == "swiglu":
        x = torch.randn(s, b, 2 * 24, generator=gen)

        def fn(t):
            return _SwiGLUFunction.apply(t)
    else:
        x = torch.randn(s, b, 3 * h * hd, generator=gen)
        cos, sin = rotary_tables(hd, s, 10000.0)

        def fn(t):
            return torch.cat([o.flatten(2) for o in rotary_qkv(t, cos, sin, h, h, hd)], dim=-1)

    out_shape = fn(x).shape
    gs = [torch.randn(out_shape, generator=gen) for _ in range(3)]
    expected = [_grads(fn, [x], g)[1][0].clone() for g in gs]
    kept, ptrs = None, []
    for step, g in enumerate(gs):
        leaf = x.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf), leaf, g)
        torch.testing.assert_close(grad, expected[step], rtol=0, atol=0)
        ptrs.append(grad.data_ptr())
        if step == 0:  # step 0's gradient is kept; later steps' are dropped after use
            kept, first = grad, grad.clone()
        del grad
    assert torch.equal(kept, first)  # not overwritten by steps 1 and 2
    assert ptrs[1] != ptrs[0] and ptrs[2] == ptrs[1]  # the kept buffer was left alone, the freed one reused


def kernel_runs(model, tokens):
    """How often a forward + backward of ``model`` on ``tokens`` runs attention forward kernels
    (any SDPA backend) and matmuls (``mm``/``addmm``/``bmm``, forward and backward together)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from megallama.model import _ATTENTION_KERNELS

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.runs = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.runs[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    counter = Count()
    with counter:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    attention = sum(counter.runs[name] for name in _ATTENTION_KERNELS)
    # torch's products and oneDNN's (parallel.gemm runs fp32 CPU linears there)
    return attention, sum(counter.runs[name] for name in ("mm", "addmm", "bmm", "onednn_matmul"))


def test_selective_recompute_reruns_no_matmul_and_no_attention():
    """The paper's selective recompute keeps the linear and attention outputs: a step runs exactly
    the kernels of no recomputation; full recomputation re-runs each block's attention and its
    forward matmuls.  (tests/test_gpu.py runs the same count on whichever SDPA backend a GPU picks.)"""
    cfg = preset_config("tiny").model
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    runs = {mode: kernel_runs(build_model(cfg, seed=1, checkpointing=mode), tokens)
            for mode in ("none", "selective", "full")}
    assert runs["none"][0] == cfg.n_layers and runs["none"][1] >= 3 * 4 * cfg.n_layers  # 4 linears a block
    assert runs["selective"] == runs["none"]
    assert runs["full"][0] == 2 * cfg.n_layers and runs["full"][1] > runs["none"][1]
