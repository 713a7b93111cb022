"""Tokens/s and MFU of the ~1B preset at sequence length 2048 in bf16 on one GPU.

    python benchmarks/gpu_throughput.py [--preset llama-1b] [--batch 4] [--steps 10] [--compile]
                                        [--checkpointing none|selective|full] [--no-engine]

Two rows.  ``model``: a plain loop (no engine) with fp32 parameters under bf16 autocast and
torch's fused AdamW: what the model itself runs at.  ``megallama train``: the product's own
loop on synthetic batches (DeepSpeed ZeRO-1, ``train.precision=bf16``: bf16 parameters, fp32
master weights in the optimizer, gradient clipping, the schedule, no checkpoint written).
MFU = tokens/s × ``flops_per_token`` (6N + 12·L·d·s) over the GPU's dense bf16 peak from
:mod:`megallama.hardware`'s table; the measured peak of a large bf16 matmul is printed next
to it as the achievable ceiling.  Target: 50% MFU.  The fused RMSNorm is checked against the
eager node before anything is timed.  Without a GPU it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import print_table  # noqa: E402
from megallama.config import preset_config  # noqa: E402
from megallama.engine import build_optimizer  # noqa: E402
from megallama.model import build_model  # noqa: E402


def matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """Best FLOP/s of an ``n``×``n`` bf16 matmul on the current GPU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / min(times[2:])


def plain_loop(args, cfg) -> float:
    """Median tokens/s of the plain loop (fp32 parameters, bf16 autocast, fused AdamW)."""
    model = build_model(cfg.model, checkpointing=args.checkpointing).cuda().train()
    if args.compile:
        from megallama.engine import compile_blocks

        compile_blocks(model)  # what train.compile=true does
    opt = build_optimizer(model, cfg)  # the training run's AdamW: its groups, fused on CUDA
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return args.batch * args.seq / statistics.median(times)


def engine_loop(args) -> float:
    """Steady tokens/s of ``megallama train`` (its first step excluded) on synthetic batches."""
    import tempfile

    from megallama.config import load_config, validate
    from megallama.train import train
    from tests.synthetic import bundle

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"train.steps={args.steps + 1}", f"train.seq_len={args.seq}",
                     f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
                     "train.precision=bf16", f"train.activation_checkpointing={args.checkpointing}",
                     f"train.compile={str(args.compile).lower()}", "train.save_interval=-1",
                     "train.tensorboard=false", "train.eval_interval=0", f"train.run_dir={run_dir}/run"]
        base = preset_config(args.preset).model.max_seq_len
        cfg = validate(load_config(None, overrides + [f"model.max_seq_len={max(base, args.seq)}"],
                                   preset=args.preset), 1)
        return train(cfg, data=bundle(cfg)).tokens_per_sec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--checkpointing", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--no-engine", dest="engine", action="store_false", help="skip the megallama train row")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU is visible; run this on a machine with one", file=sys.stderr)
        return 2
    from megallama.hardware import detect_gpu_spec

    torch.backends.cuda.matmul.allow_tf32 = True
    from megallama.kernels import check_rms_norm

    rms = check_rms_norm("cuda")  # the fused RMSNorm against the eager node before any timing
    cfg = preset_config(args.preset)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, args.seq)
    fpt = cfg.model.flops_per_token(args.seq)
    rows = []
    runs = [("model (autocast)", lambda: plain_loop(args, cfg))]
    if args.engine:
        runs.append(("megallama train (DeepSpeed bf16)", lambda: engine_loop(args)))
    for name, run in runs:
        torch.cuda.reset_peak_memory_stats()
        tps = run()
        rows.append([name, tps, torch.cuda.max_memory_allocated() / 2**30])
        gc.collect()  # the previous row's model and optimizer, before the next one allocates its own
        torch.cuda.empty_cache()
    spec = detect_gpu_spec()
    table_peak = spec.peak_flops("bf16") if spec is not None else float("nan")
    measured = matmul_peak()
    print(f"{torch.cuda.get_device_name()} | {args.preset} ({cfg.model.num_parameters() / 1e9:.2f}B) | "
          f"batch {args.batch}x{args.seq} bf16 | checkpointing {args.checkpointing} | compile {args.compile} | "
          f"RMSNorm kernel {rms} (checked against the eager node) | bf16 matmul {measured / 1e12:.0f} TFLOP/s")
    print_table(["loop", "tokens/s", "model TFLOP/s", "MFU (datasheet peak)", "MFU (measured matmul peak)",
                 "peak memory GiB"],
                [[name, f"{tps:,.0f}", f"{tps * fpt / 1e12:.1f}", f"{100 * tps * fpt / table_peak:.1f}%",
                  f"{100 * tps * fpt / measured:.1f}%", f"{mem:.1f}"] for name, tps, mem in rows])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
