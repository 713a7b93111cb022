"""parallel/gemm.py: fp32 CPU products on oneDNN or torch's BLAS, equal to torch's own, in every
layout a linear layer uses; which kernel actually runs; the fallbacks; the config knob."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from parallel import gemm

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch has no oneDNN inner product")


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def backend():
    """Restores the process's choice after a test changes it."""
    before = gemm._choice["backend"]
    yield gemm.set_cpu_backend
    gemm._choice["backend"] = before


def _products(x, w, dy):
    """The three products of a linear layer: forward, input gradient, weight gradient."""
    return gemm.matmul(x, w.t()), gemm.matmul(dy, w), gemm.weight_grad(dy, x)


@needs_onednn
@pytest.mark.parametrize("shape", [(37, 19, 23), (6, 5, 64, 48)])  # [tokens, in, out], [s, b, in, out]
def test_onednn_products_equal_torchs_in_every_layout(backend, shape):
    gen = torch.Generator().manual_seed(0)
    *lead, k, n = shape
    x, w = torch.randn(*lead, k, generator=gen), torch.randn(n, k, generator=gen)
    dy = torch.randn(*lead, n, generator=gen)
    backend("blas")
    ref = _products(x, w, dy)
    torch.testing.assert_close(ref[0], F.linear(x, w), rtol=0, atol=0)  # blas is torch's own kernel
    backend("onednn")
    ops = Ops()
    with ops:
        got = _products(x, w, dy)
    assert ops.names.count("onednn_matmul") == 3 and "mm" not in ops.names  # oneDNN ran, not MKL
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    out = torch.empty(*lead, n)
    assert gemm.matmul(x, w.t(), out=out) is out and torch.equal(out, got[0])


@needs_onednn
def test_linear_gradients_equal_autograd_through_F_linear(backend):
    backend("onednn")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, generator=gen, requires_grad=True)
    w = torch.randn(48, 32, generator=gen, requires_grad=True)
    g = torch.randn(8, 3, 48, generator=gen)
    y = gemm.linear(x, w)
    assert y.grad_fn is not None and "Linear" in type(y.grad_fn).__name__
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = F.linear(x2, w2)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_other_dtypes_autocast_and_blas_take_torchs_kernels(backend):
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    for choice, tensors, autocast in [("auto", (x.bfloat16(), w.bfloat16()), False), ("auto", (x, w), True),
                                      ("blas", (x, w), False)]:
        backend(choice)
        ops = Ops()
        with ops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = gemm.linear(*tensors)
        assert "onednn_matmul" not in ops.names, choice
        assert y.dtype == (torch.bfloat16 if autocast or tensors[0].dtype == torch.bfloat16 else torch.float32)


def test_bad_backend_names_the_choices(backend):
    with pytest.raises(ValueError, match="must be one of auto, onednn, blas, got 'mkl'"):
        backend("mkl")
    from megallama.config import load_config, validate
    from megallama.errors import ConfigError

    with pytest.raises(ConfigError, match="train.cpu_gemm must be auto, onednn or blas, got 'mkl'"):
        validate(load_config(preset="tiny", overrides=["train.cpu_gemm=mkl"]), 1)
    assert gemm.cpu_backend() in ("onednn", "blas")


def test_a_torch_without_onednn_runs_blas_and_refuses_onednn(backend, monkeypatch):
    monkeypatch.setattr(gemm, "_ONEDNN", False)
    backend("auto")
    assert gemm.cpu_backend() == "blas"
    ops = Ops()
    with ops:
        gemm.linear(torch.randn(4, 8), torch.randn(5, 8))
    assert "onednn_matmul" not in ops.names and "mm" in ops.names
    with pytest.raises(ValueError, match="no usable oneDNN inner product.*use the 'blas' or 'auto'"):
        backend("onednn")
