"""`megallama import-hf`: read a Hugging Face LLaMA directory into a megallama checkpoint (see tools/hf.py)."""

from __future__ import annotations

from tools.checkpoint_io import add_layout_arguments
from tools.hf import import_hf


def add_arguments(p) -> None:
    p.add_argument("directory", metavar="DIR", help="a Hugging Face LLaMA model directory")
    p.add_argument("--output", required=True, metavar="DST", help="new run directory to write")
    add_layout_arguments(p, "written checkpoint")


def run(args) -> int:
    out = import_hf(args.directory, args.output, args.tp, args.pp)
    print(f"wrote {out} (weights only; tp={args.tp}, pp={args.pp})")
    return 0
