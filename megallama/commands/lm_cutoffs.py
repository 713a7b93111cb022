"""`megallama lm-cutoffs`: CCNet's perplexity bucket cutoffs (30th and 60th percentiles) of a sample of
documents under a KenLM model, for ``megallama curate --lm-cutoffs``.  See docs/data.md."""

from __future__ import annotations

import itertools

from megallama.data.sources import ReadStats, add_input_arguments, documents_from_args
from megallama.data.steps.lm_filter import KenLMScorer, perplexity_cutoffs
from megallama.errors import ConfigError


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--lm-model", required=True, metavar="ARPA|BIN", help="the KenLM model curate will use")
    p.add_argument("--lm-tokenizer", metavar="MODEL", help="SentencePiece model the KenLM model was trained on")
    p.add_argument("--percentiles", nargs=2, type=float, default=[30.0, 60.0], metavar=("HEAD", "MIDDLE"),
                   help="percentiles ending the head and middle buckets (default: CCNet's 30 60)")
    p.add_argument("--max-documents", type=int, default=10_000, metavar="N",
                   help="score at most the first N documents of the input (default: 10000)")


def run(args) -> int:
    head, middle = args.percentiles
    if not 0 < head <= middle < 100:
        raise ConfigError(f"--percentiles HEAD MIDDLE must satisfy 0 < HEAD <= MIDDLE < 100, got {head:g} {middle:g}")
    if args.max_documents < 1:
        raise ConfigError(f"--max-documents must be at least 1, got {args.max_documents}")
    scorer = KenLMScorer(args.lm_model, args.lm_tokenizer)
    scorer.load()
    stats = ReadStats()
    texts = (d.text for d in itertools.islice(documents_from_args(args, stats), args.max_documents))
    cutoffs, n = perplexity_cutoffs(scorer, texts, (head, middle))
    print(f"perplexity percentiles {head:g} {middle:g} of {n:,} documents: {cutoffs[0]:g} {cutoffs[1]:g}"
          + (f" (skipped {stats.skipped} malformed lines)" if stats.skipped else ""))
    print(f"--lm-cutoffs {cutoffs[0]:g} {cutoffs[1]:g}")
    return 0
