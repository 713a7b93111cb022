"""Tokens/s and MFU of the ~1B preset at sequence length 2048 in bf16 on one GPU.

    python benchmarks/gpu_throughput.py [--preset llama-1b] [--batch 4] [--steps 10] [--compile]

A plain training loop on one GPU (no DeepSpeed engine): fp32 parameters with bf16
autocast (the mixed precision of ``train.precision=bf16``), fused AdamW, no activation
checkpointing unless asked.  MFU = tokens/s × ``flops_per_token`` (6N + 12·L·d·s) over
the GPU's dense bf16 peak from :mod:`megallama.hardware`'s table; the measured peak of
a large bf16 matmul is printed next to it as the achievable ceiling.  Target: 50% MFU.
Without a GPU it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import print_table  # noqa: E402
from megallama.config import preset_config  # noqa: E402
from megallama.engine import param_groups  # noqa: E402
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--checkpointing", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
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
    model = build_model(cfg.model, checkpointing=args.checkpointing).cuda().train()
    if args.compile:
        from megallama.train import compile_blocks

        compile_blocks(model)  # what train.compile=true does
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), o.weight_decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
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
    tps = args.batch * args.seq / statistics.median(times)
    achieved = tps * cfg.model.flops_per_token(args.seq)
    spec = detect_gpu_spec()
    table_peak = spec.peak_flops("bf16") if spec is not None else float("nan")
    measured = matmul_peak()
    print(f"{torch.cuda.get_device_name()} | {args.preset} ({cfg.model.num_parameters() / 1e9:.2f}B) | "
          f"batch {args.batch}x{args.seq} bf16 | checkpointing {args.checkpointing} | compile {args.compile} | "
          f"RMSNorm kernel {rms} (checked against the eager node)")
    print_table(["tokens/s", "model TFLOP/s", "MFU (datasheet peak)", "MFU (measured matmul peak)",
                 "peak memory GiB"],
                [[f"{tps:,.0f}", f"{achieved / 1e12:.1f}", f"{100 * achieved / table_peak:.1f}%",
                  f"{100 * achieved / measured:.1f}%", f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
