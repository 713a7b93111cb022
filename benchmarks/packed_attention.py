"""Cost of document-aware attention: forward+backward of one micro-batch, plain causal vs packed.

Rows: the plain causal path (``doc_ids=None``, the pretraining path), the same tokens as one
document through the masked path, and rows packed with examples of ~``--example`` tokens.
Run ``python benchmarks/packed_attention.py [--preset demo] [--device cuda]``; prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's megallama

from megallama.config import preset_config
from megallama.model import build_model


def bench(model, tokens, doc_ids, reps: int) -> float:
    targets = torch.roll(tokens, -1, dims=1)
    for i in range(reps + 2):  # two warm-up iterations
        if i == 2:
            if tokens.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        model(tokens, targets, doc_ids=doc_ids).backward()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--example", type=int, default=64, help="tokens per packed example")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    s, b = cfg.train.seq_len, args.batch
    model = build_model(cfg.model).to(args.device)
    tokens = torch.randint(3, cfg.model.vocab_size, (b, s), device=args.device)
    one_doc = torch.zeros_like(tokens)
    packed = (torch.arange(s, device=args.device) // args.example).expand(b, s).contiguous()
    rows = [("plain causal (doc_ids=None)", None), ("masked path, one document", one_doc),
            (f"packed, {s // args.example} examples of {args.example}", packed)]
    base = None
    print(f"{args.preset}: batch {b} x {s} tokens on {args.device}, forward+backward")
    print(f"{'attention':<36}{'ms/iter':>10}{'vs plain':>10}")
    for name, docs in rows:
        t = bench(model, tokens, docs, args.reps)
        base = base or t
        print(f"{name:<36}{1e3 * t:>10.1f}{t / base:>10.2f}")


if __name__ == "__main__":
    main()
