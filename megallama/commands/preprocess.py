"""`megallama preprocess`: tokenize text inputs into PREFIX.bin / PREFIX.idx (see docs/data.md)."""

from __future__ import annotations

import sys

from megallama.data.preprocess import preprocess
from megallama.data.sources import TEXT_SUFFIXES, add_input_arguments


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="SentencePiece .model")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default: 1)")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.bin/.idx")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def run(args) -> int:
    report = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers,
                        text_key=args.text_key, on_error=args.on_error, force=args.force,
                        progress=not args.no_progress and sys.stderr.isatty(),
                        suffixes=tuple(args.suffix or TEXT_SUFFIXES))
    print(f"wrote {args.output_prefix}.bin/.idx: {report.line()}")
    return 0
