"""Which RMSNorm kernel runs where (megallama/kernels.py): NVIDIA apex's on CUDA tensors when it
is importable with its CUDA extension, torch's fused one on CUDA otherwise, the eager node on CPU.

This machine has no GPU and no NVIDIA apex, so apex is stood in for by a module with its
signature, and "on a GPU" by patching the device check; what runs is the real dispatch and,
for torch's kernels, the real forward on CPU and the real backward's shapes on the meta device.
"""

import sys
import types

import pytest
import torch

from megallama import kernels
from megallama.kernels import _RMSNormFunction
from megallama.model import RMSNorm
from parallel.topology import ParallelContext


@pytest.fixture
def fresh_apex(monkeypatch):
    """No cached apex lookup before or after; returns a function installing fake modules."""
    kernels.apex_rms_norm.cache_clear()

    def install(**modules):
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)

    yield install
    kernels.apex_rms_norm.cache_clear()


def _nvidia_apex(calls):
    def fused_rms_norm_affine(input, weight, normalized_shape, eps=1e-6):
        calls.append((tuple(input.shape), tuple(normalized_shape), eps))
        return torch.nn.functional.rms_norm(input, normalized_shape, weight, eps)

    fused = types.ModuleType("apex.normalization.fused_layer_norm")
    fused.fused_rms_norm_affine = fused_rms_norm_affine
    return dict(apex=types.ModuleType("apex"), **{"apex.normalization": types.ModuleType("apex.normalization"),
                                                  "apex.normalization.fused_layer_norm": fused,
                                                  "fused_layer_norm_cuda": types.ModuleType("fused_layer_norm_cuda")})


def test_cpu_tensors_keep_the_eager_node(fresh_apex):
    fresh_apex(**_nvidia_apex([]))
    x, w = torch.randn(4, 2, 8), torch.randn(8)
    assert kernels.apex_rms_norm() is not None
    assert kernels.rms_kernel(x, w) == "eager" and kernels.fused_rms_norm(x, w, 1e-5) is None


def test_the_pypi_package_called_apex_is_not_used(fresh_apex, monkeypatch):
    fresh_apex(apex=types.ModuleType("apex"))  # importable, but no apex.normalization
    monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)
    assert kernels.apex_rms_norm() is None
    assert kernels.rms_kernel(torch.randn(2, 8), torch.randn(8)) == "torch"


def test_apex_without_its_cuda_extension_is_not_used(fresh_apex):
    modules = _nvidia_apex([])
    del modules["fused_layer_norm_cuda"]
    fresh_apex(**modules)
    sys.modules.pop("fused_layer_norm_cuda", None)
    assert kernels.apex_rms_norm() is None


def test_rmsnorm_calls_apex_on_a_gpu(fresh_apex, monkeypatch):
    calls = []
    fresh_apex(**_nvidia_apex(calls))
    monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)
    norm = RMSNorm(8, 1e-5, ParallelContext.single())
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 2, 8)
    assert torch.allclose(norm(x), _RMSNormFunction.apply(x, norm.weight, 1e-5), atol=1e-6)
    assert calls == [((4, 2, 8), (8,), 1e-5)]
    assert kernels.rms_kernel(x.bfloat16(), norm.weight) == "eager"  # mixed dtypes: the eager node


def test_torch_fused_kernels_match_the_eager_node(monkeypatch):
    """torch's fused forward (it has a CPU kernel) equals the eager node; its backward (CUDA and
    meta only) is wired with the right arguments: gradients of the input's and weight's shapes."""
    monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)
    monkeypatch.setattr(kernels, "apex_rms_norm", lambda: None)
    x, w = torch.randn(6, 3, 16), torch.randn(16)
    assert kernels.rms_kernel(x, w) == "torch"
    assert torch.allclose(kernels.fused_rms_norm(x, w, 1e-5), _RMSNormFunction.apply(x, w, 1e-5), atol=1e-6)
    xm = torch.empty(6, 3, 16, device="meta", requires_grad=True)
    wm = torch.empty(16, device="meta", requires_grad=True)
    kernels.fused_rms_norm(xm, wm, 1e-5).sum().backward()
    assert xm.grad.shape == xm.shape and wm.grad.shape == wm.shape
    frozen = torch.empty(16, device="meta")  # no weight gradient asked for: none computed
    xm.grad = None
    kernels.fused_rms_norm(xm, frozen, 1e-5).sum().backward()
    assert xm.grad.shape == xm.shape


def test_the_run_names_its_kernels(fresh_apex):
    from parallel import gemm  # on CPU: the GEMM of its fp32 matmuls (the element-wise layers are eager)

    assert kernels.describe(torch.device("cpu")) == {
        "onednn": "kernels: fp32 matmuls on oneDNN (train.cpu_gemm=blas for torch's BLAS)",
        "blas": "kernels: fp32 matmuls on torch's BLAS"}[gemm.cpu_backend()]
    assert kernels.describe(torch.device("meta")) is None
    assert kernels.describe(torch.device("cuda")) == "fused kernels: RMSNorm torch _fused_rms_norm; AdamW torch fused=True"
    kernels.apex_rms_norm.cache_clear()
    fresh_apex(**_nvidia_apex([]))
    assert "RMSNorm NVIDIA apex fused_rms_norm_affine" in kernels.describe(torch.device("cuda"))


def test_the_kernel_check_accepts_a_correct_kernel(fresh_apex, monkeypatch):
    """``check_rms_norm`` (run before GPU timings and by tests/test_gpu.py) compares the fused path
    with the eager node; here the fused path is a stand-in apex computing ``F.rms_norm``."""
    calls = []
    fresh_apex(**_nvidia_apex(calls))
    monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)
    assert kernels.check_rms_norm("cpu") == "apex"
    assert len(calls) == 2  # fp32 and bf16 both went through the kernel under test


@pytest.mark.parametrize("wrong", ["output", "input gradient"])
def test_the_kernel_check_catches_a_wrong_kernel(fresh_apex, monkeypatch, wrong):
    modules = _nvidia_apex([])

    class Off(torch.autograd.Function):  # right forward, input gradient 2% off (or the reverse)
        @staticmethod
        def forward(ctx, y):
            return y * 1.02 if wrong == "output" else y.clone()

        @staticmethod
        def backward(ctx, g):
            return g if wrong == "output" else g * 1.02

    good = modules["apex.normalization.fused_layer_norm"].fused_rms_norm_affine
    modules["apex.normalization.fused_layer_norm"].fused_rms_norm_affine = lambda *a, **k: Off.apply(good(*a, **k))
    fresh_apex(**modules)
    monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)
    with pytest.raises(AssertionError, match=f"fused RMSNorm \\(apex\\) {wrong} differs from the eager node"):
        kernels.check_rms_norm("cpu")


def test_a_torch_without_the_fused_kernel_keeps_the_eager_node(fresh_apex, monkeypatch):
    """torch 2.4-2.7 (allowed by setup.py) has no ``aten::_fused_rms_norm``: the GPU then runs the
    eager node instead of failing on the first norm."""
    assert kernels._torch_has_fused_rms_norm()  # the torch installed here has it
    monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)
    monkeypatch.setattr(kernels, "_torch_has_fused_rms_norm", lambda: False)
    x, w = torch.randn(4, 2, 8), torch.randn(8)
    assert kernels.rms_kernel(x, w) == "eager" and kernels.fused_rms_norm(x, w, 1e-5) is None
    assert "RMSNorm eager" in kernels.describe(torch.device("cuda"))
