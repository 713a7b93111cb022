"""Training throughput and MFU, one process each: megallama against Hugging Face's LlamaForCausalLM.

    python benchmarks/train_throughput.py [--presets demo llama-100m] [--threads 2]

Both models get the same shapes and weights (converted with :mod:`megallama.convert`),
the same AdamW (betas, eps, weight decay, the same decay/no-decay groups), the same
batches and the same plain PyTorch loop (forward, loss, backward, optimizer step,
zero_grad) in fp32, so the comparison measures the model implementations, not an
engine.  The contenders alternate step blocks and the table reports medians over
repeats of tokens/s and of the per-repeat ratio.

Each contender runs in a process of its own, as a training run would, the two taking
turns (one steps while the other waits).  Until 2026-12-02 both shared one process
(``--shared``): one heap, so each one's page faults depended on what the other left in it;
that coupling spared megallama its own faults and cost the peer more (100M preset,
megallama ~0 MiB a step shared against 20-320 alone; the peer ~150-1,200 MiB in either), and
read 1.05-1.13 where separate processes read 0.99-1.06.  ``faults MiB/step`` is each contender's
minor page faults per step in its process.

MFU is model FLOP/s (``ModelConfig.flops_per_token``: 6N + 12·L·d·s) over the
measured peak of a large fp32 matmul with the same threads, taken in the same run: the best
of torch's CPU GEMMs (``blas``: MKL's sgemm, which runs AVX2 code on AMD CPUs; ``onednn``:
AVX-512; both printed).  Until 2026-12-02 the peak was MKL's alone (178-203 GFLOP/s on the
2-core AMD EPYC here, where oneDNN reaches ~410): every MFU before then is against half the
machine.  megallama runs its fp32 matmuls on :mod:`parallel.gemm` (``--cpu-gemm``, default
``auto``: oneDNN where torch has it); the peer on torch's ``F.linear`` (MKL).
The ``engine`` row runs ``megallama train``'s own step (DeepSpeed, ZeRO-1, fp32) on
synthetic batches, for what the full training loop costs on top of the model.

The ``kernel floor`` column is what a contender's step would cost if everything but its
matmuls and attention kernels were free: every such kernel of one step is recorded
(operator, shapes, strides, a copy of its inputs) and replayed alone, warm, and the
medians are summed.  The floors are replayed in every repeat, each right after its
contender's steps, so each is measured within seconds of the steps it bounds.  ``ceiling``
is the median over repeats of the peer's measured step over megallama's floor: the largest
speed-up over the peer any implementation built on the same torch kernels can reach on
this machine.
"""

from __future__ import annotations

import argparse
import os
import resource
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
from megallama.engine import build_optimizer, compile_blocks  # noqa: E402
from megallama.metrics import cpu_matmul_flops  # noqa: E402
from megallama.model import build_model  # noqa: E402
from parallel import gemm  # noqa: E402
from parallel.gemm import MATMUL_OPS  # noqa: E402


def peak_matmul_flops() -> dict:
    """Best FLOP/s of a 2048×2048 fp32 matmul with this process's threads, per CPU GEMM (the
    best of them is the hardware limit)."""
    return cpu_matmul_flops(n=2048, repeats=5)


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
    """A matmul (torch's or oneDNN's, :mod:`parallel.gemm`) or an attention kernel (any SDPA backend,
    forward or backward)."""
    return func.overloadpacket in _MATMULS or func in MATMUL_OPS or "scaled_dot_product" in func.__name__


class _RecordKernels(TorchDispatchMode):
    """Records each distinct matmul/attention call (operator, shapes, strides, dtypes) of the
    code run under it, with a copy of its inputs and how often it ran."""

    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_kernel(func):
            sig = lambda a: ((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor)  # noqa: E731
                             else tuple(a) if isinstance(a, list) else a)
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


class Contender:
    """One contender's training step on the preset's shapes (the peer holds our weights,
    converted), with the kernel calls of one step recorded for its floor."""

    def __init__(self, who: str, name: str, batch: int, seq_len: int, compile_block: bool, cpu_gemm: str = "auto"):
        gemm.set_cpu_backend(cpu_gemm)  # the peer's F.linear never takes parallel.gemm's products
        cfg = preset_config(name)
        cfg.train.seq_len = seq_len
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq_len)
        torch.manual_seed(0)
        model = build_model(cfg.model, seed=1234, checkpointing="none").train()
        if who == "hf":
            model = hf_model(cfg, model)  # ours, built from the same seed, is dropped
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1), generator=gen) for _ in range(4)]
        # the training run's AdamW (groups, torch's fused kernel), built the same way for both
        self.step = step_fn(model, build_optimizer(model, cfg), ours_loss if who == "megallama" else hf_loss,
                            batches)
        self.calls = record_kernels(self.step)  # eager: compiling keeps the same kernels
        if compile_block and who == "megallama":
            compile_blocks(model)  # what train.compile=true does
        time_call(self.step, 2)

    def steps(self, iters: int) -> tuple[float, float]:
        """Seconds per step over ``iters`` steps, and MiB of page faults per step (this process's)."""
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = time_call(self.step, iters)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return seconds, faults * resource.getpagesize() / 2**20 / iters

    def floor(self) -> float:
        return kernel_floor(self.calls)


def _serve(conn, threads: int, *args):
    """A contender in a process of its own, answering the parent's ``"steps"``/``"floor"`` commands."""
    torch.set_num_threads(threads)
    contender = Contender(*args)
    conn.send("ready")
    while (cmd := conn.recv()) is not None:
        conn.send(contender.steps(cmd[1]) if cmd[0] == "steps" else contender.floor())


class ContenderProcess:
    """A :class:`Contender` in a process of its own (one model per heap, as in a training run)."""

    def __init__(self, threads: int, *args):
        import multiprocessing

        mp = multiprocessing.get_context("spawn")
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_serve, args=(child, threads, *args))
        self.proc.start()
        assert self.conn.recv() == "ready"

    def steps(self, iters: int) -> tuple[float, float]:
        self.conn.send(("steps", iters))
        return self.conn.recv()

    def floor(self) -> float:
        self.conn.send(("floor",))
        return self.conn.recv()

    def close(self):
        try:
            self.conn.send(None)
        except OSError:  # the process is gone already (it died): its error was the one raised
            pass
        self.proc.join()


def alternate(contenders: dict, repeats: int, iters: int) -> dict:
    """Each contender's steps, then its floor, in turn, ``repeats`` times: per contender the seconds
    per step, the floors (each measured seconds from the steps it bounds) and the page faults."""
    out = {who: {"step": [], "floor": [], "faults": []} for who in contenders}
    for _ in range(repeats):
        for who, c in contenders.items():
            seconds, faults = c.steps(iters)
            out[who]["step"].append(seconds)
            out[who]["faults"].append(faults)
            out[who]["floor"].append(c.floor())
    return out


def benchmark_shared(name: str, batch: int, seq_len: int, repeats: int, iters: int, compile_block: bool,
                     cpu_gemm: str) -> dict:
    """Both contenders in this process (``--shared``; run it in a fresh one): one heap, so each
    one's page faults depend on what the other left in it (see the module docstring)."""
    contenders = {who: Contender(who, name, batch, seq_len, compile_block, cpu_gemm) for who in ("megallama", "hf")}
    return alternate(contenders, repeats, iters)


def benchmark_separate(threads: int, name: str, batch: int, seq_len: int, repeats: int, iters: int,
                       compile_block: bool, cpu_gemm: str) -> dict:
    """Each contender in a process of its own, the two taking turns: one steps while the other
    waits for its next command (and they are built one after the other)."""
    contenders = {}
    try:
        for who in ("megallama", "hf"):
            contenders[who] = ContenderProcess(threads, who, name, batch, seq_len, compile_block, cpu_gemm)
        return alternate(contenders, repeats, iters)
    finally:
        for c in contenders.values():
            c.close()


def engine_tokens_per_sec(steps: int, cpu_gemm: str = "auto") -> float:
    """Steady tokens/s of ``megallama train``'s loop (DeepSpeed engine, ZeRO-1, fp32) on the demo
    preset with in-memory synthetic batches (no data files; the first step is excluded as warm-up)."""
    import tempfile

    from megallama.config import load_config, validate
    from megallama.train import train
    from tests.synthetic import bundle

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"train.steps={steps}", "train.tensorboard=false", "train.eval_interval=0",
                     "train.precision=fp32", f"train.run_dir={run_dir}/run", f"train.cpu_gemm={cpu_gemm}"]
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
    ap.add_argument("--shared", action="store_true",
                    help="both contenders in one process (one heap; before 2026-12-02 the only way)")
    ap.add_argument("--engine-steps", type=int, default=12, help="steps of the engine row (0 = skip it)")
    ap.add_argument("--cpu-gemm", choices=gemm.BACKENDS, default="auto",
                    help="megallama's fp32 matmuls (train.cpu_gemm; the peer always runs torch's F.linear)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    peaks = peak_matmul_flops()
    rows = []
    for name in args.presets:
        seq = 256 if name == "demo" else 512
        batch = args.batch or preset_config(name).train.micro_batch_size
        iters = args.iters or (4 if name == "demo" else 1)
        run = (name, batch, seq, args.repeats, iters, args.compile, args.cpu_gemm)
        res = (in_fresh_process(args.threads, benchmark_shared, *run) if args.shared
               else benchmark_separate(args.threads, *run))
        peaks = {k: max(v, peaks[k]) for k, v in peak_matmul_flops().items()}
        peak = max(peaks.values())
        cfg = preset_config(name)
        fpt = cfg.model.flops_per_token(seq)
        load = loadavg()
        hf_steps = res["hf"]["step"]
        for who in ("megallama", "hf"):
            r = res[who]
            tps = batch * seq / statistics.median(r["step"])
            ceiling = f"{median_ratio(res['megallama']['floor'], hf_steps):.2f}" if who == "megallama" else ""
            rows.append([name, f"{cfg.model.num_parameters() / 1e6:.1f}M", f"{batch}x{seq}", who,
                         f"{tps:,.0f}", f"{100 * tps * fpt / peak:.1f}%",
                         f"{median_ratio(r['step'], hf_steps):.3f}", f"{1000 * statistics.median(r['floor']):,.0f} ms",
                         ceiling, f"{statistics.median(r['faults']):,.0f}", load])
    if "demo" in args.presets and args.engine_steps:
        fpt = preset_config("demo").model.flops_per_token(256)
        tps = in_fresh_process(args.threads, engine_tokens_per_sec, args.engine_steps, args.cpu_gemm)
        rows.append(["demo", "", "16x256", "megallama train (DeepSpeed)", f"{tps:,.0f}",
                     f"{100 * tps * fpt / peak:.1f}%", "", "", "", "", loadavg()])
    gemm.set_cpu_backend(args.cpu_gemm)
    each = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
    print(f"threads {args.threads} | peak fp32 matmul {peak / 1e9:.1f} GFLOP/s ({each}) | "
          f"megallama's fp32 matmuls: {gemm.cpu_backend()} | torch {torch.__version__}")
    print_table(["preset", "params", "batch", "model", "tokens/s", "MFU", "vs hf", "kernel floor", "ceiling",
                 "faults MiB/step", "load"],
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
