"""`megallama reshard`: move a checkpoint to another TP/PP(/DP) layout, offline (see tools/reshard.py)."""

from __future__ import annotations

from tools.reshard import reshard


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="SRC", help="checkpoint (step_N) or run directory")
    p.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, required=True, help="target pipeline stages")
    p.add_argument("--dp", type=int, default=0, help="target data-parallel size: validated and recorded only "
                   "(the format is independent of DP/ZeRO)")
    p.add_argument("--output", required=True, metavar="DST", help="new run directory to write")
    p.add_argument("--weights-only", action="store_true", help="drop the optimizer state")


def run(args) -> int:
    out = reshard(args.checkpoint, args.output, args.tp, args.pp, args.dp, args.weights_only)
    print(f"wrote {out} (tp={args.tp}, pp={args.pp}{', weights only' if args.weights_only else ''})")
    return 0
