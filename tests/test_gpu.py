"""The model on a CUDA GPU: its kernels (SDPA's GPU backends, fused RMSNorm, fused AdamW), bf16,
torch.compile and ``megallama train`` (DeepSpeed on NCCL) against the CPU and Hugging Face.

Skipped without a GPU: the CPU suite proves every layout and the peer equivalence in fp32;
these prove the same on CUDA.  On a lent GPU machine ``bash benchmarks/gpu_check.sh`` runs them
with the GPU benchmark in one command (docs/performance.md).  TF32 is switched off wherever fp32
results are compared, so the tolerances are fp32's (reduction order), not TF32's.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megallama import kernels
from megallama.config import preset_config
from megallama.model import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cfg(**kw):
    # the demo's shapes (head dim 32, GQA off) with a vocabulary that is not a multiple of 64
    return replace(preset_config("demo").model, vocab_size=4000, **kw)


def _tokens(cfg, batch=4, seq=256, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(model, tokens, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_fp32_on_the_gpu_equals_the_cpu(kv_heads, checkpointing):
    cfg = _cfg(n_kv_heads=kv_heads)
    tokens = _tokens(cfg)
    cpu_loss, cpu_grads = _loss_and_grads(build_model(cfg, seed=3).train(), tokens)
    gpu_model = build_model(cfg, seed=3, checkpointing=checkpointing).cuda().train()
    loss, grads = _loss_and_grads(gpu_model, tokens.cuda())
    assert abs(loss.item() - cpu_loss.item()) < 1e-5 * max(1.0, cpu_loss.item())
    worst = max(cpu_grads, key=lambda n: _rel(grads[n], cpu_grads[n]))
    assert _rel(grads[worst], cpu_grads[worst]) < 1e-4, worst


def test_the_gpu_runs_the_fused_rms_norm_and_it_equals_the_eager_node():
    kind = kernels.check_rms_norm("cuda")
    assert kind == ("apex" if kernels.apex_rms_norm() is not None else "torch")
    x = torch.randn(8, 2, 64, device="cuda")
    assert kernels.rms_kernel(x, torch.ones(64, device="cuda")) == kind


def test_bf16_autocast_tracks_fp32():
    cfg = _cfg()
    tokens = _tokens(cfg).cuda()
    model = build_model(cfg, seed=5).cuda().train()
    ref_loss, ref = _loss_and_grads(model, tokens)
    loss, grads = _loss_and_grads(model, tokens, autocast=True)
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * ref_loss.item()
    a = torch.cat([grads[n].flatten() for n in ref])
    b = torch.cat([ref[n].flatten() for n in ref])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.99


def test_logits_and_gradients_equal_hf_on_the_gpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    from megallama.convert import hf_config, ours_to_hf

    cfg = _cfg(n_kv_heads=2)
    ours = build_model(cfg, seed=7).cuda().train()
    kw = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**kw, attn_implementation="sdpa"))
    hf.load_state_dict(ours_to_hf(ours.state_dict(), cfg), strict=True)
    hf = hf.cuda().train()
    tokens = _tokens(cfg, seed=1).cuda()
    with torch.no_grad():
        assert _rel(ours.eval()(tokens[:, :-1])[..., : cfg.vocab_size], hf.eval()(tokens[:, :-1]).logits) < 1e-4
    ours.train(), hf.train()
    loss = ours(tokens[:, :-1], tokens[:, 1:])
    logits = hf(input_ids=tokens[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - hf_loss.item()) < 1e-5 * hf_loss.item()
    loss.backward()
    hf_loss.backward()
    ours_grad = ours.tok_embeddings.weight.grad[: cfg.vocab_size]
    assert _rel(ours_grad, hf.model.embed_tokens.weight.grad) < 1e-4
    assert _rel(ours.output.weight.grad[: cfg.vocab_size], hf.lm_head.weight.grad) < 1e-4


def test_compiled_blocks_equal_eager_on_the_gpu():
    from megallama.engine import compile_blocks

    cfg = _cfg()
    tokens = _tokens(cfg, seed=2).cuda()
    model = build_model(cfg, seed=9).cuda().train()
    eager_loss, eager = _loss_and_grads(model, tokens)
    compile_blocks(model)
    loss, grads = _loss_and_grads(model, tokens)
    assert abs(loss.item() - eager_loss.item()) < 1e-5 * eager_loss.item()
    assert max(_rel(grads[n], eager[n]) for n in eager) < 1e-3


_TRAIN = """
import json, sys
from megallama.config import load_config, validate
from megallama.train import train
from tests.synthetic import bundle
cfg = validate(load_config(None, sys.argv[2:], preset="demo"), 1)
s = train(cfg, data=bundle(cfg))
print("SUMMARY " + json.dumps(dict(losses=s.losses, tokens_per_sec=s.tokens_per_sec, mfu=s.mfu, bad=s.bad_steps)))
"""


@pytest.mark.slow
def test_megallama_train_on_one_gpu_in_bf16(tmp_path):
    """The product path: DeepSpeed (NCCL, ZeRO-1) in bf16 on the GPU, the loss falls, no step skipped."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", _TRAIN, "x", "train.steps=40", "train.precision=bf16",
                        "train.tensorboard=false", "train.eval_interval=0", f"train.run_dir={run_dir}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fused kernels: RMSNorm" in r.stdout + r.stderr  # the run names the GPU kernels it uses
    s = json.loads(r.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert s["bad"] == 0 and len(s["losses"]) == 40 and 0 < s["mfu"] < 1
    assert sum(s["losses"][-5:]) / 5 < 0.8 * sum(s["losses"][:5]) / 5, s["losses"]
    print(f"megallama train, demo, bf16, one GPU: {s['tokens_per_sec']:,.0f} tokens/s, MFU {100 * s['mfu']:.1f}%")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 41))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_in_gpu_sized_chunks_equals_cross_entropy(dtype):
    """LLaMA's 32k vocabulary at 8192 tokens: 4 chunks of the GPU default (2097 tokens)."""
    from parallel.cross_entropy import linear_cross_entropy

    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(8192, 256, generator=gen) / 4).to("cuda", dtype).requires_grad_()
    w = (torch.randn(32000, 256, generator=gen) / 16).to("cuda", dtype).requires_grad_()
    target = torch.randint(0, 32000, (8192,), generator=gen).cuda()
    loss = linear_cross_entropy(x, w, target)
    loss.backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xr @ wr.t(), target)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref.item()) < tol * ref.item()
    assert _rel(x.grad.double(), xr.grad) < tol and _rel(w.grad.double(), wr.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_recompute_reruns_no_attention_on_the_gpu(dtype):
    """Whichever SDPA backend the GPU picks (flash, memory-efficient, cuDNN), the selective policy
    keeps its output: the step runs the kernels of no recomputation."""
    from tests.test_model_ops import kernel_runs

    cfg = _cfg()
    tokens = _tokens(cfg, batch=2, seq=128).cuda()
    runs = {mode: kernel_runs(build_model(cfg, seed=1, checkpointing=mode).to("cuda", dtype), tokens)
            for mode in ("none", "selective")}
    assert runs["none"][0] == cfg.n_layers, runs  # an SDPA kernel _ATTENTION_KERNELS does not know
    assert runs["selective"] == runs["none"], runs
