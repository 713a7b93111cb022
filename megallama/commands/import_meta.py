"""`megallama import-meta`: read Meta's original release into a megallama checkpoint (see tools/meta.py)."""

from __future__ import annotations

from tools.checkpoint_io import add_layout_arguments
from tools.meta import import_meta


def add_arguments(p) -> None:
    p.add_argument("directory", metavar="DIR", help="Meta release directory (params.json, consolidated.NN.pth)")
    p.add_argument("--output", required=True, metavar="DST", help="new run directory to write")
    add_layout_arguments(p, "written checkpoint")


def run(args) -> int:
    out = import_meta(args.directory, args.output, args.tp, args.pp)
    print(f"wrote {out} (weights only; tp={args.tp}, pp={args.pp})")
    return 0
