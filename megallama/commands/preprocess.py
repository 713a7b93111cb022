"""`megallama preprocess`: tokenize text inputs into PREFIX.bin / PREFIX.idx (see docs/data.md);
with ``--shards N``, into N shards PREFIX-IIIII-of-NNNNN.bin/.idx run by any executor."""

from __future__ import annotations

import sys

from megallama.data.preprocess import preprocess
from megallama.data.preprocess_shards import EXECUTORS, plan, run_all, run_shard, shard_glob, shard_prefix
from megallama.data.sources import TEXT_SUFFIXES, add_input_arguments


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="SentencePiece .model")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenizer processes (default: 1); with --shards, shards tokenized at once")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.bin/.idx (or shards)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    g = p.add_argument_group("sharded execution (docs/data.md)")
    g.add_argument("--shards", type=int, default=None, metavar="N",
                   help="split the input files into N shards, one PREFIX-IIIII-of-NNNNN.bin/.idx each")
    g.add_argument("--shard", type=int, default=None, metavar="I", help="run only shard I (a SLURM array task)")
    g.add_argument("--executor", choices=EXECUTORS, default="local", help="local processes (default) or Ray tasks")
    g.add_argument("--ray-address", default=None, metavar="ADDR", help="a running Ray cluster (default: start one)")


def run(args) -> int:
    suffixes = tuple(args.suffix or TEXT_SUFFIXES)
    if args.shards is None:
        if args.shard is not None or args.executor != "local":
            from megallama.errors import UserError

            raise UserError("--shard and --executor apply to a sharded run; add --shards N")
        report = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers,
                            text_key=args.text_key, on_error=args.on_error, force=args.force,
                            progress=not args.no_progress and sys.stderr.isatty(), suffixes=suffixes)
        print(f"wrote {args.output_prefix}.bin/.idx: {report.line()}")
        return 0
    if args.shard is not None and args.force:
        from megallama.errors import UserError

        raise UserError("--force with --shard would delete the other shards' outputs under a running array; run "
                        "once without --shard (or remove the outputs) to start over")
    sharded = plan(args.input, args.tokenizer, args.output_prefix, args.shards, text_key=args.text_key,
                   on_error=args.on_error, suffixes=suffixes, force=args.force)
    if args.shard is not None:
        got = run_shard(sharded, args.shard)
        name = shard_prefix(args.output_prefix, args.shard, args.shards)
        print(f"{name}.bin/.idx: " + ("already complete, kept" if got is None else
                                      f"{got['documents']:,} documents, {got['tokens']:,} tokens in "
                                      f"{got['seconds']:.1f}s, peak RSS {got['peak_rss_mb']:.0f} MB"))
        return 0
    reports = run_all(sharded, workers=args.workers, executor=args.executor, ray_address=args.ray_address)
    for got in reports:
        print(f"{shard_prefix(args.output_prefix, got['shard'], args.shards)}.bin/.idx: {got['documents']:,} "
              f"documents, {got['tokens']:,} tokens in {got['seconds']:.1f}s, peak RSS {got['peak_rss_mb']:.0f} MB")
    kept = args.shards - len(reports)
    print(f"wrote {args.shards} shard(s){f' ({kept} already complete)' if kept else ''}; a data source reads them "
          f"all as one dataset with path: {shard_glob(args.output_prefix, args.shards)}")
    return 0
