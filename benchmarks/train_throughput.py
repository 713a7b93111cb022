"""Training throughput and MFU in one process: megallama against Hugging Face's LlamaForCausalLM.

    python benchmarks/train_throughput.py [--presets demo llama-100m] [--threads 2]

Both models get the same shapes and weights (converted with :mod:`megallama.convert`),
the same AdamW (betas, eps, weight decay, the same decay/no-decay groups), the same
batches and the same plain PyTorch loop (forward, loss, backward, optimizer step,
zero_grad) in fp32, so the comparison measures the model implementations, not an
engine.  The contenders alternate step blocks and the table reports medians over
repeats of tokens/s and of the per-repeat ratio.

MFU is model FLOP/s (``ModelConfig.flops_per_token``: 6N + 12·L·d·s) over the
measured peak of a large fp32 matmul with the same threads, taken in the same run.
The ``engine`` row runs ``megallama train``'s own step (DeepSpeed, ZeRO-1, fp32) on
synthetic batches, for what the full training loop costs on top of the model.

The ``kernel floor`` column is what a contender's step would cost if everything but its
matmuls and attention kernels were free: every such kernel of one step is recorded
(operator, shapes, strides, a copy of its inputs) and replayed alone, warm, and the
medians are summed.  The floors are replayed in every repeat, each right after its
contender's steps, so each is measured within seconds of the steps it bounds.  ``ceiling`` is the median over
repeats of the peer's measured step over megallama's floor: the largest speed-up over the
peer any implementation built on the same torch kernels can reach on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks._common import loadavg, median_ratio, print_table, time_call  # noqa: E402
from megallama.config import Config, preset_config  # noqa: E402
from megallama.convert import hf_config, ours_to_hf  # noqa: E402
from megallama.engine import build_optimizer  # noqa: E402
from megallama.metrics import measure_cpu_matmul_flops  # noqa: E402
from megallama.model import build_model  # noqa: E402
from megallama.train import compile_blocks  # noqa: E402


def peak_matmul_flops() -> float:
    """Best FLOP/s of a 2048×2048 fp32 matmul with this process's threads (the hardware limit)."""
    return measure_cpu_matmul_flops(n=2048, repeats=5)


def hf_model(cfg: Config, ours: torch.nn.Module) -> torch.nn.Module:
    """The peer: ``LlamaForCausalLM`` (SDPA attention) holding our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {k: v for k, v in hf_config(cfg.model).items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**kw, attn_implementation="sdpa"))
    model.load_state_dict(ours_to_hf(ours.state_dict(), cfg.model), strict=True)
    return model.train()


def step_fn(model, opt, loss_of, batches):
    """One training step on the next batch: forward, loss, backward, optimizer step, zero_grad."""
    state = {"i": 0}

    def step():
        tokens = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = loss_of(model, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def ours_loss(model, inputs, targets):
    return model(inputs, targets)


def hf_loss(model, inputs, targets):
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


_MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm,
            torch.ops.aten.baddbmm, torch.ops.aten.baddbmm_}


def _is_kernel(func) -> bool:
    """A matmul or an attention kernel (any SDPA backend, forward or backward)."""
    return func.overloadpacket in _MATMULS or "scaled_dot_product" in func.__name__


class _RecordKernels(TorchDispatchMode):
    """Records each distinct matmul/attention call (operator, shapes, strides, dtypes) of the
    code run under it, with a copy of its inputs and how often it ran."""

    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_kernel(func):
            sig = lambda a: (tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a  # noqa: E731
            key = (func, tuple(map(sig, args)), tuple((k, sig(v)) for k, v in sorted(kwargs.items())))
            if key not in self.calls:
                copy = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
                self.calls[key] = [func, [copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}, 0]
            self.calls[key][3] += 1
        return func(*args, **kwargs)


def record_kernels(step) -> list:
    """The distinct matmul and attention calls of one ``step()`` (after a warm-up step): for each,
    ``[func, args, kwargs, count]`` with copies of its inputs."""
    step()
    recorder = _RecordKernels()
    with recorder:
        step()
    return list(recorder.calls.values())


def kernel_floor(calls: list, repeats: int = 3) -> float:
    """Seconds of one step spent in its matmul and attention kernels alone: each recorded call
    replayed on copies of its inputs, median of ``repeats`` (after a warm-up) times its count."""
    total = 0.0
    for func, args, kwargs, count in calls:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            func(*args, **kwargs)
            times.append(time.perf_counter() - start)
        total += count * statistics.median(times[1:])
    return total


def benchmark_preset(name: str, batch: int, seq_len: int, repeats: int, iters: int, compile_block: bool):
    cfg = preset_config(name)
    cfg.train.seq_len = seq_len
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq_len)
    torch.manual_seed(0)
    ours = build_model(cfg.model, seed=1234, checkpointing="none").train()
    peer = hf_model(cfg, ours)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1), generator=gen) for _ in range(4)]
    # the training run's AdamW (groups, torch's fused kernel), built the same way for both
    steps = {"megallama": step_fn(ours, build_optimizer(ours, cfg), ours_loss, batches),
             "hf": step_fn(peer, build_optimizer(peer, cfg), hf_loss, batches)}
    calls = {who: record_kernels(step) for who, step in steps.items()}  # eager: compiling keeps the same kernels
    if compile_block:
        compile_blocks(ours)  # what train.compile=true does
    # the floors are replayed in every repeat, next to the steps they bound, so that a ceiling
    # compares a step and a floor measured within seconds of each other on this shared machine
    for step in steps.values():
        time_call(step, 2)
    times = {who: [] for who in [*steps, *(f"floor {who}" for who in calls)]}
    for _ in range(repeats):  # each contender's steps, then its floor: each step follows the other's replay
        for who, step in steps.items():
            times[who].append(time_call(step, iters))
            times[f"floor {who}"].append(kernel_floor(calls[who]))
    tokens = batch * seq_len
    return cfg, tokens, times


def engine_tokens_per_sec(steps: int) -> float:
    """Steady tokens/s of ``megallama train``'s loop (DeepSpeed engine, ZeRO-1, fp32) on the demo
    preset with in-memory synthetic batches (no data files; the first step is excluded as warm-up)."""
    import tempfile

    from megallama.config import load_config, validate
    from megallama.train import train
    from tests.synthetic import bundle

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"train.steps={steps}", "train.tensorboard=false", "train.eval_interval=0",
                     "train.precision=fp32", f"train.run_dir={run_dir}/run"]
        cfg = validate(load_config(None, overrides, preset="demo"), 1)
        return train(cfg, data=bundle(cfg)).tokens_per_sec


def _job(threads: int, fn, *args):
    torch.set_num_threads(threads)
    return fn(*args)


def in_fresh_process(threads: int, fn, *args):
    """``fn(*args)`` in a new interpreter with ``threads`` threads.  Each preset (and the engine
    row) starts from a fresh heap, so no row depends on what ran before it: after the 100M
    preset, glibc's heap state spared the peer most of its page faults on the demo (ratio
    1.00 instead of 1.11, measured 2026-12-01), which a fresh training process does not get."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_job, threads, fn, *args).result()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["demo", "llama-100m"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=0, help="steps per timed block (0 = 4 for demo, 1 otherwise)")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (0 = the preset's micro batch)")
    ap.add_argument("--compile", action="store_true", help="torch.compile megallama's transformer blocks (train.compile)")
    ap.add_argument("--engine-steps", type=int, default=12, help="steps of the engine row (0 = skip it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    peak = peak_matmul_flops()
    rows = []
    for name in args.presets:
        seq = 256 if name == "demo" else 512
        batch = args.batch or preset_config(name).train.micro_batch_size
        iters = args.iters or (4 if name == "demo" else 1)
        cfg, tokens, times = in_fresh_process(args.threads, benchmark_preset, name, batch, seq, args.repeats,
                                                      iters, args.compile)
        peak = max(peak, peak_matmul_flops())
        fpt = cfg.model.flops_per_token(seq)
        load = loadavg()
        for who in ("megallama", "hf"):
            tps = tokens / statistics.median(times[who])
            floor = statistics.median(times[f"floor {who}"])
            ceiling = f"{median_ratio(times['floor megallama'], times['hf']):.2f}" if who == "megallama" else ""
            rows.append([name, f"{cfg.model.num_parameters() / 1e6:.1f}M", f"{batch}x{seq}", who,
                         f"{tps:,.0f}", f"{100 * tps * fpt / peak:.1f}%",
                         f"{median_ratio(times[who], times['hf']):.3f}", f"{1000 * floor:.0f} ms",
                         ceiling, load])
    if "demo" in args.presets and args.engine_steps:
        fpt = preset_config("demo").model.flops_per_token(256)
        tps = in_fresh_process(args.threads, engine_tokens_per_sec, args.engine_steps)
        rows.append(["demo", "", "16x256", "megallama train (DeepSpeed)", f"{tps:,.0f}",
                     f"{100 * tps * fpt / peak:.1f}%", "", "", "", loadavg()])
    print(f"threads {args.threads} | peak fp32 matmul {peak / 1e9:.1f} GFLOP/s | torch {torch.__version__}")
    print_table(["preset", "params", "batch", "model", "tokens/s", "MFU", "vs hf", "kernel floor", "ceiling", "load"],
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
