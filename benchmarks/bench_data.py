"""Data pipeline benchmark: preprocessing throughput and training data-wait fraction.

    python benchmarks/bench_data.py [--mb 16] [--steps 30]

1. ``preprocess`` of standard-library sources (as .jsonl) with the demo's
   4096-piece tokenizer, 1 and 2 workers: MB/s of text and tokens/s.
2. The demo preset's data path: time to fetch each rank's micro-batches of a
   global batch (``micro_batches`` over ``build_datasets``) against the time of
   a training step (forward + backward over the same micro-batches) of the
   demo model (``megallama.model.Transformer`` when present, else a same-shape
   torch proxy), reported as the data-wait fraction of step time (target < 1%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megallama.config import load_config  # noqa: E402
from megallama.data.pipeline import build_datasets, micro_batches, stdlib_files  # noqa: E402
from megallama.data.preprocess import preprocess  # noqa: E402


def bench_preprocess(tmp: Path, tokenizer: str, mb: float) -> list[tuple]:
    corpus = tmp / "stdlib.jsonl"
    with open(corpus, "w") as f:
        for p in stdlib_files(int(mb * 1e6)):
            f.write(json.dumps({"text": p.read_text(encoding="utf-8")}) + "\n")
    rows = []
    for workers in (1, 2):
        r = preprocess([str(corpus)], tokenizer, str(tmp / f"out{workers}"), workers=workers)
        rows.append((workers, r.text_bytes / 1e6 / r.seconds, r.tokens / r.seconds, r.documents, r.tokens))
    return rows


def demo_model(cfg):
    try:
        from megallama.model import Transformer

        return Transformer(cfg.model), "megallama.model.Transformer"
    except ImportError:
        m = cfg.model
        layer = torch.nn.TransformerEncoderLayer(m.dim, m.n_heads, m.ffn_hidden, dropout=0.0, batch_first=True,
                                                 norm_first=True)

        class Proxy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(m.vocab_size, m.dim)
                self.layers = torch.nn.TransformerEncoder(layer, m.n_layers, enable_nested_tensor=False)
                self.out = torch.nn.Linear(m.dim, m.vocab_size, bias=False)

            def forward(self, x):
                mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
                return self.out(self.layers(self.emb(x), mask=mask, is_causal=True))

        return Proxy(), "torch proxy of the demo shape"


def bench_data_wait(cfg, steps: int) -> dict:
    bundle = build_datasets(cfg)
    t = cfg.train
    model, which = demo_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = micro_batches(bundle.train, 0, t.global_batch_size, t.micro_batch_size, 0, 1)
    accum = t.global_batch_size // t.micro_batch_size
    data_s = step_s = 0.0
    for step in range(steps + 2):
        t0 = time.perf_counter()
        batches = [next(it) for _ in range(accum)]
        t1 = time.perf_counter()
        for b in batches:
            logits = model(b[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step >= 2:  # warm-up excluded
            data_s += t1 - t0
            step_s += t2 - t0
    return dict(model=which, data_ms=1e3 * data_s / steps, step_ms=1e3 * step_s / steps, fraction=data_s / step_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=16.0, help="text preprocessed (default 16 MB)")
    ap.add_argument("--steps", type=int, default=20, help="demo training steps timed (default 20)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(preset="demo", overrides=[f"data.cache_dir={tmp}"])
        t0 = time.perf_counter()
        bundle = build_datasets(cfg)
        build_s = time.perf_counter() - t0
        rows = bench_preprocess(Path(tmp), bundle.tokenizer_path, args.mb)
        print(f"\ndefault corpus build (stdlib, vocab {bundle.tokenizer.vocab_size}): {build_s:.1f}s, cold cache; "
              f"{os.cpu_count()} CPU cores")
        print(f"\n{'workers':>8}{'MB/s':>10}{'tokens/s':>14}{'documents':>11}{'tokens':>13}")
        for w, mbs, tps, docs, toks in rows:
            print(f"{w:>8}{mbs:>10.2f}{tps:>14,.0f}{docs:>11,}{toks:>13,}")
        r = bench_data_wait(cfg, args.steps)
        print(f"\ndemo training step ({r['model']}, global batch {cfg.train.global_batch_size} x "
              f"{cfg.train.seq_len + 1} tokens, micro-batch {cfg.train.micro_batch_size}):")
        print(f"{'data ms/step':>14}{'step ms':>10}{'data wait':>11}")
        print(f"{r['data_ms']:>14.3f}{r['step_ms']:>10.1f}{100 * r['fraction']:>10.3f}%")


if __name__ == "__main__":
    main()
