"""`megallama preprocess-instruct`: instruction JSONL -> tokens + loss mask (see docs/finetuning.md)."""

from __future__ import annotations

from megallama.data.instruct import TEMPLATES, preprocess_instruct


def add_arguments(p) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".jsonl (or .jsonl.gz) files or directories of them: one example per line")
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="SentencePiece .model (the model's own)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--seq-len", type=int, required=True, metavar="N",
                   help="the training train.seq_len; an example may hold at most N + 1 tokens")
    p.add_argument("--template", choices=sorted(TEMPLATES), default="alpaca",
                   help="how prompts and responses are rendered (default: alpaca)")
    p.add_argument("--truncate", action="store_true",
                   help="cut over-long examples to N + 1 tokens instead of failing on them")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX")


def run(args) -> int:
    report = preprocess_instruct(args.input, args.tokenizer, args.output_prefix, args.seq_len,
                                 template=args.template, truncate=args.truncate, force=args.force)
    print(f"wrote {args.output_prefix}.bin/.idx, .mask.bin/.idx and .instruct.json: {report.line()}")
    return 0
