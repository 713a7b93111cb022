"""Activation memory per transformer layer for none/selective/full checkpointing, measured.

    python benchmarks/activation_memory.py [--preset demo] [--batch 8] [--seq 256] [--tp 2 [--sp]]

For each mode a fresh process builds a stack of the preset's blocks (fp32; one
process, or ``--tp`` gloo ranks of one tensor-parallel group, ``--sp`` with sequence
parallelism, reporting the largest rank), runs a forward with gradients enabled and measures what stays
resident for backward: the growth of the process's resident memory between before
and after the forward, divided by the number of layers.  glibc is told to serve
every allocation above 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed
temporaries go back to the kernel and the growth is exactly the retained tensors.

Next to it: the planner's LLaMA formula (``tools.planner.activation_bytes_per_layer``
with ``flash_attention=True``, since PyTorch's CPU SDPA keeps only the log-sum-exp)
and Korthikanti et al. 2022's GPT figures (one rank: 34sbh + 5as²b for none, 34sbh for
selective, 2sbh for full; under TP their per-rank forms, 10sbh of it replicated unless SP
splits it; 16-bit coefficients, doubled here for fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import loadavg, print_table  # noqa: E402

MODES = ("none", "selective", "full")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(rank: int, world: int, preset: str, batch: int, seq: int, mode: str, sp: bool) -> float:
    """Bytes per layer kept for backward on this rank."""
    import torch

    from megallama.config import preset_config
    from megallama.model import TransformerBlock, init_parameters
    from parallel.topology import ParallelContext

    cfg = preset_config(preset).model
    cfg.max_seq_len = max(cfg.max_seq_len, seq)
    ctx = ParallelContext.single() if world == 1 else ParallelContext.from_distributed(tp=world)
    blocks = [TransformerBlock(i, cfg, ctx, sequence_parallel=sp, checkpointing=mode) for i in range(cfg.n_layers)]
    for i, block in enumerate(blocks):
        init_parameters(block.named_parameters(prefix=f"layers.{i}"), cfg, 0, ctx)
    x = torch.randn(seq // world if sp else seq, batch, cfg.dim, requires_grad=True)
    for block in blocks:  # warm up kernels, thread pools and lazily built tables outside the measurement
        block(x).sum().backward()
    x.grad = None
    for p in (p for block in blocks for p in block.parameters()):
        p.grad = None
    before = _rss_bytes()
    h = x
    for block in blocks:
        h = block(h)
    after = _rss_bytes()
    h.sum().backward()  # proves the graph was complete
    return (after - before) / cfg.n_layers


def measure(preset: str, batch: int, seq: int, mode: str, tp: int = 1, sp: bool = False) -> float:
    """Bytes per layer kept for backward (run inside the child process; ``tp`` > 1 starts the ranks)."""
    if tp == 1:
        return _measure(0, 1, preset, batch, seq, mode, False)
    from tests.distributed import run_ranks

    return max(run_ranks(_measure, tp, preset, batch, seq, mode, sp, timeout=600))


def formulas(preset: str, batch: int, seq: int, tp: int = 1, sp: bool = False) -> dict:
    from megallama.config import preset_config
    from tools.planner import Layout, activation_bytes_per_layer

    m = preset_config(preset).model
    s, b, h, a, t = seq, batch, m.dim, m.n_heads, tp
    sbh, split = s * b * h, (t if sp else 1)  # Korthikanti et al.: 10sbh replicated unless SP splits it
    korthikanti16 = {"none": (10 * sbh) / split + (24 * sbh + 5 * a * s * s * b) / t,
                     "selective": (10 * sbh) / split + 24 * sbh / t, "full": 2 * sbh / split}
    out = {}
    for mode in MODES:
        lay = Layout(gpus=t, tp=t, micro_batch_size=batch, seq_len=seq, global_batch_size=batch, activation_checkpointing=mode,
                     sequence_parallel=sp, flash_attention=True, precision="fp32")
        out[mode] = (activation_bytes_per_layer(m, lay), 2 * korthikanti16[mode])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (gloo, this machine)")
    ap.add_argument("--sp", action="store_true", help="sequence parallelism (with --tp > 1)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sp and args.tp == 1:
        ap.error("--sp needs --tp > 1")
    if args.child:
        print(json.dumps(measure(args.preset, args.batch, args.seq, args.child, args.tp, args.sp)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    refs = formulas(args.preset, args.batch, args.seq, args.tp, args.sp)
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                              "--seq", str(args.seq), "--tp", str(args.tp), "--child", mode]
                             + (["--sp"] if args.sp else []), env=env, capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        planner, korthikanti = refs[mode]
        rows.append([mode, f"{measured / 2**20:.2f}", f"{planner / 2**20:.2f}", f"{measured / planner:.2f}",
                     f"{korthikanti / 2**20:.2f}"])
    layout = f"tp={args.tp}{' sp' if args.sp else ''}, largest rank" if args.tp > 1 else "one process"
    print(f"{args.preset}: s={args.seq} b={args.batch} fp32, {layout}, MiB per layer | load {loadavg()}")
    print_table(["checkpointing", "measured", "planner (LLaMA)", "measured/planner", "Korthikanti GPT (x2 fp32)"],
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
