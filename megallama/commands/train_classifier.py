"""`megallama train-classifier`: the paper's (CCNet's) linear quality classifier, fastText supervised, from
positive documents (pages used as references in Wikipedia) and negative ones (random pages); its output is
``megallama curate --source web --classifier-model``.  See docs/data.md."""

from __future__ import annotations

from pathlib import Path

from megallama.data.sources import ON_ERROR, ReadStats, iter_documents, output_error
from megallama.data.steps.classifier import train_classifier
from megallama.errors import ConfigError, DataError


def add_arguments(p) -> None:
    p.add_argument("--positive", nargs="+", required=True, metavar="PATH",
                   help="documents to keep (.jsonl/.txt, .gz, directories), e.g. pages Wikipedia cites")
    p.add_argument("--negative", nargs="+", required=True, metavar="PATH", help="documents to drop, e.g. random pages")
    p.add_argument("--output", required=True, metavar="BIN", help="the fastText model written")
    p.add_argument("--text-key", default="text", help="JSON field holding the text in .jsonl inputs (default: text)")
    p.add_argument("--on-error", choices=ON_ERROR, default="fail", help="a malformed line: skip and count it, or stop")
    p.add_argument("--epoch", type=int, default=5, help="passes over the data (default: 5)")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate (default: 0.1)")
    p.add_argument("--word-ngrams", type=int, default=2, help="word n-gram features (default: 2)")
    p.add_argument("--dim", type=int, default=100, help="embedding size (default: 100)")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="documents held out to report accuracy (default: 0.1)")
    p.add_argument("--threads", type=int, default=1, help="training threads; 1 gives a reproducible model (default: 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the hold-out split and of fastText (default: 1)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")


def run(args) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise DataError(f"'{out}' already exists; pass --force to overwrite it or choose another --output")
    if out.is_dir() or not out.parent.is_dir():
        raise output_error(out, "--output", "it is a directory" if out.is_dir() else "its directory does not exist")
    for name in ("epoch", "dim", "word_ngrams", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.valid_fraction < 1 or args.lr <= 0:
        raise ConfigError("--valid-fraction must be in [0, 1) and --lr positive")
    try:
        import fasttext  # noqa: F401
    except ImportError:
        raise DataError("train-classifier needs the fasttext package: pip install fasttext-wheel "
                        "(or pip install -e .[data])") from None
    stats = ReadStats()

    def texts(paths):
        return (d.text for d in iter_documents(paths, args.text_key, args.on_error, stats))

    pos, neg, accuracy = train_classifier(texts(args.positive), texts(args.negative), out, epoch=args.epoch,
                                          lr=args.lr, word_ngrams=args.word_ngrams, dim=args.dim, seed=args.seed,
                                          threads=args.threads, valid_fraction=args.valid_fraction)
    print(f"wrote {out} from {pos:,} positive and {neg:,} negative documents"
          + (f"; held-out accuracy {accuracy:.3f}" if accuracy is not None else "")
          + (f"; skipped {stats.skipped} malformed lines" if stats.skipped else ""))
    return 0
