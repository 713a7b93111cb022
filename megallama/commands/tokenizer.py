"""`megallama tokenizer`: train a SentencePiece BPE model with the LLaMA settings.

Numbers split into digits, byte fallback for unknown UTF-8, no normalisation and
no whitespace collapsing (code and newlines round-trip exactly), <s>=1, </s>=2.
Training reads a bounded, seeded reservoir sample of the inputs, so large inputs
stay cheap and the same inputs and seed give the same model."""

from __future__ import annotations

from megallama.data.sources import ReadStats, add_input_arguments, documents_from_args
from megallama.data.tokenizer import Tokenizer, train_tokenizer


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--vocab-size", type=int, required=True, metavar="N")
    p.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--sample-mb", type=float, default=64.0, help="text sampled for training (default: 64 MB)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (default: 1234)")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.model")


def run(args) -> int:
    stats = ReadStats()
    texts = (d.text for d in documents_from_args(args, stats))
    model = train_tokenizer(texts, args.vocab_size, args.output, sample_mb=args.sample_mb, seed=args.seed,
                            force=args.force)
    tok = Tokenizer(str(model))
    print(f"wrote {model} (vocab {tok.vocab_size}, fingerprint {tok.fingerprint}) from {stats.documents:,} documents"
          + (f"; skipped {stats.skipped} malformed lines" if stats.skipped else ""))
    return 0
