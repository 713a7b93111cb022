"""`megallama export-meta`: write a checkpoint in Meta's original release format (see tools/meta.py)."""

from __future__ import annotations

from tools.meta import export_meta


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="SRC", help="checkpoint (step_N) or run directory")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--mp", type=int, default=1, help="model-parallel shards to write (default: 1)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    out = export_meta(args.checkpoint, args.output, args.mp, args.force)
    print(f"wrote {out} ({args.mp} consolidated shard(s) and params.json)")
    return 0
