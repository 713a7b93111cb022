"""Peak memory of the offline checkpoint tools, which stream tensor by tensor.

    python benchmarks/offline_tools_memory.py [--dim 512] [--layers 16] [--vocab 8000]

Builds a random model of that shape (LLaMA recipe), writes it with Adam moments as a 1x1
checkpoint, then runs each tool as ``megallama`` in a fresh process and prints how far its peak RSS
(VmHWM, reset after the imports) rose during the command, next to the model's size and its largest
tensor.  The tools these replaced held the whole model (reshard: the weights and both moments),
so their peak grew by at least the model size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import loadavg, print_table  # noqa: E402
from megallama.checkpoint import MOMENTS, write_run_checkpoint  # noqa: E402
from megallama.config import preset_config  # noqa: E402
from megallama.model import build_model  # noqa: E402
from tests.ckpt_helpers import peak_rss_growth  # noqa: E402

MB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8000)
    a = p.parse_args()
    cfg = preset_config("tiny")
    cfg = replace(cfg, model=replace(cfg.model, dim=a.dim, n_layers=a.layers, n_heads=max(1, a.dim // 64),
                                     vocab_size=a.vocab))
    weights = build_model(cfg.model, seed=0).state_dict()
    largest = max(v.numel() * 4 for v in weights.values())
    model = sum(v.numel() * 4 for v in weights.values())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        moments = {f"{n}/{k}": torch.rand_like(v) for n, v in weights.items() for k in MOMENTS}
        ckpt = write_run_checkpoint(d / "run", cfg, weights, moments, step=1)
        del weights, moments
        runs = [("reshard 1x1 -> 2x2 (with moments)", ["reshard", "--checkpoint", str(ckpt), "--tp", "2", "--pp", "2",
                                                       "--output", str(d / "rs")]),
                ("export-hf", ["export-hf", "--checkpoint", str(ckpt), "--output", str(d / "hf")]),
                ("import-hf --tp 2", ["import-hf", str(d / "hf"), "--tp", "2", "--output", str(d / "ih")]),
                ("export-meta --mp 4", ["export-meta", "--checkpoint", str(ckpt), "--mp", "4",
                                        "--output", str(d / "meta")]),
                ("import-meta", ["import-meta", str(d / "meta"), "--output", str(d / "im")])]
        rows = []
        for name, args in runs:
            began = time.perf_counter()
            grew = peak_rss_growth(*args, timeout=3600)
            rows.append([name, f"{grew / MB:.1f}", f"{grew / largest:.1f}", f"{time.perf_counter() - began:.1f}"])
    print(f"model: dim {a.dim}, {a.layers} layers, vocab {a.vocab}: {model / MB:.1f} MB fp32 weights "
          f"({3 * model / MB:.1f} MB with Adam moments), largest tensor {largest / MB:.2f} MB; load {loadavg()}")
    print_table(["tool", "peak RSS growth (MB)", "x largest tensor", "seconds"], rows)


if __name__ == "__main__":
    main()
