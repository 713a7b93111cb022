"""Speed of the evaluation paths on a small random Llama (CPU by default).

Prints a table: multiple-choice scoring with shared contexts vs one row per choice (both batched and
length-sorted), and generation with the KV cache vs recomputing the whole sequence every step.

    python benchmarks/eval_speed.py [--questions 32] [--context-words 150] [--dim 256] [--threads 2]

``--sweep W1,W2,...`` instead times both multiple-choice paths for 16 questions at each context
length (in words) and 2 and 4 choices, and prints what scoring's rule (``share_pays``) picks: the
measurements the rule's break-even comes from (docs/eval.md).

    python benchmarks/eval_speed.py --sweep 8,16,32,64,128 --dim 64 --layers 2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's megallama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--context-words", type=int, default=150)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", default="", help="comma-separated context lengths (words): time shared vs flat")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    from megallama.eval.lm import load_model
    from megallama.eval.scoring import Request, loglikelihoods
    from megallama.eval.tiny import build_tiny_checkpoint
    from megallama.generation import SamplingParams, generate

    with tempfile.TemporaryDirectory() as d:
        lm = load_model(build_tiny_checkpoint(d, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                                              max_seq_len=1024))
    rng = random.Random(0)
    words = "the a model token context choice answer question value return class import data".split()
    if args.sweep:
        return sweep(lm, [int(w) for w in args.sweep.split(",")], rng, words, args)
    reqs = []
    for _ in range(args.questions):
        ctx = " ".join(rng.choice(words) for _ in range(args.context_words))
        reqs += [Request(ctx, " " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
                 for _ in range(args.choices)]
    rows = []
    for name, shared in (("choices: shared context (KV cache)", True), ("choices: one row per choice", False),
                         ("choices: by the rule (share_pays, default)", None)):
        loglikelihoods(lm, reqs[: args.choices * 2], share_context=shared)  # warm-up
        dt = float("inf")
        for _ in range(3):  # best of 3: the machine may be shared
            t = time.perf_counter()
            loglikelihoods(lm, reqs, batch_size=16, share_context=shared)
            dt = min(dt, time.perf_counter() - t)
        rows.append((name, len(reqs), dt, f"{len(reqs) / dt:.1f} req/s"))

    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(8)]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    t = time.perf_counter()
    out = generate(lm, prompts, params)
    dt = time.perf_counter() - t
    n = sum(len(o.tokens) for o in out)
    rows.append(("generate: batch of 8, KV cache", n, dt, f"{n / dt:.1f} tok/s"))
    t = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = lm.tokenizer.encode(p, bos=True)
            for _ in range(args.new_tokens):
                ids.append(int(lm.logits(torch.tensor([ids]))[0, -1].argmax()))
    dt = time.perf_counter() - t
    n = len(prompts) * args.new_tokens
    rows.append(("generate: one prompt at a time, no cache", n, dt, f"{n / dt:.1f} tok/s"))

    print(f"model dim={args.dim} layers={args.layers} vocab={lm.vocab_size}, {args.threads} CPU threads, "
          f"{args.questions} questions x {args.choices} choices, ~{args.context_words}-word contexts")
    print(f"{'path':<44}{'items':>8}{'seconds':>10}{'rate':>16}")
    for name, items, sec, rate in rows:
        print(f"{name:<44}{items:>8}{sec:>10.2f}{rate:>16}")


def sweep(lm, context_words, rng, words, args) -> None:
    from megallama.eval.scoring import Request, loglikelihoods, share_pays

    print(f"model dim={args.dim} layers={args.layers}, {args.threads} CPU threads, 16 questions per row, "
          f"best of 3")
    print(f"{'ctx tokens':>10}{'choices':>8}{'saved':>7}{'shared s':>10}{'flat s':>9}{'shared/flat':>12}{'rule':>8}")
    for cw in context_words:
        for k in (2, 4):
            reqs = []
            for _ in range(16):
                ctx = " ".join(rng.choice(words) for _ in range(cw))
                reqs += [Request(ctx, " " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
                         for _ in range(k)]
            c = len(lm.tokenizer.encode(reqs[0].context, bos=True))
            times = []
            for shared in (True, False):
                loglikelihoods(lm, reqs[: 2 * k], share_context=shared)  # warm-up
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    loglikelihoods(lm, reqs, batch_size=16, share_context=shared)
                    best = min(best, time.perf_counter() - t)
                times.append(best)
            pick = "shared" if share_pays(k, c, lm.width) else "flat"
            print(f"{c:>10}{k:>8}{(k - 1) * c:>7}{times[0]:>10.3f}{times[1]:>9.3f}{times[0] / times[1]:>12.2f}{pick:>8}",
                  flush=True)


if __name__ == "__main__":
    main()
