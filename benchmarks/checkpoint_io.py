"""Checkpoint I/O per rank: bytes written and read by each of 4 ranks (gloo, CPU), and the training
stall of an asynchronous save against a synchronous one.

    python benchmarks/checkpoint_io.py [--dim 256] [--layers 4] [--vocab 4096]

For each layout (dp=4 ZeRO-1/2/3, tp=2 x dp=2, tp=2 x pp=2) it trains 1 step and saves, then resumes
the checkpoint at the same layout and at another one (dp=4 ZeRO-1 <-> tp=2 x dp=2).  Bytes come from
the counters in megallama/checkpoint/ (``IO_BYTES``: tensor bytes written into / sliced out of
checkpoint files; the sha256 pass over the files a rank opens is counted apart as "verified").
"state/ranks" is the fp32 masters + 2 Adam moments of the whole model divided by 4; "held" is what a
rank holds of them at the resumed layout (its TP/PP shard, divided over DP by ZeRO).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYOUTS = {  # name -> (tp, pp, zero stage)
    "dp4-z1": (1, 1, 1), "dp4-z2": (1, 1, 2), "dp4-z3": (1, 1, 3), "tp2xdp2": (2, 1, 1), "tp2xpp2": (2, 2, 0),
}
OTHER = {"dp4-z1": "tp2xdp2", "dp4-z2": "tp2xpp2", "dp4-z3": "tp2xdp2", "tp2xdp2": "dp4-z1", "tp2xpp2": "dp4-z2"}


def _overrides(args, layout, run_dir, steps, extra=()):
    tp, pp, zero = LAYOUTS[layout]
    return [f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.vocab_size={args.vocab}",
            "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.tensorboard=false",
            f"train.steps={steps}", f"train.run_dir={run_dir}", f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"parallel.zero_stage={zero}", *extra]


def _case(rank, world, overrides):
    from megallama import checkpoint as C
    from megallama.config import load_config, validate
    from megallama.train import train
    from tests.synthetic import bundle

    cfg = validate(load_config(None, overrides, preset="demo"), world)
    for k in C.IO_BYTES:
        C.IO_BYTES[k] = 0
    del C.SAVE_TIMES[:]
    train(cfg, data=bundle(cfg))
    return dict(C.IO_BYTES), list(C.SAVE_TIMES)


def _held(run_dir: Path, layout: str, world: int) -> float:
    """Bytes of masters + moments one rank holds at ``layout`` (the mean over ranks)."""
    from megallama.checkpoint import CheckpointReader
    from megallama.sharding import shard_specs

    reader = CheckpointReader(run_dir, verify=False)
    tp, pp, zero = LAYOUTS[layout]
    total = sum(3 * 4 * s.shape[0] * (s.shape[1] if len(s.shape) > 1 else 1)
                for s in shard_specs(reader.config.model, 1).values())
    return total / world if zero else total / (tp * pp)


def main() -> None:
    from tests.distributed import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    args = ap.parse_args()
    world = 4
    print("| layout | state/ranks MB | written/rank MB (min-max) | resume same: read/rank MB (held) "
          "| resume at | read/rank MB (held) |")
    print("|---|---|---|---|---|---|")
    for layout in args.layouts.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            saved = run_ranks(_case, world, _overrides(args, layout, run, 1), timeout=900)
            written = [saved[r][0]["written"] for r in range(world)]
            ckpt = run / "checkpoints" / "step_00000001"
            state = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            same_dir = Path(tmp) / "same"
            import shutil

            shutil.copytree(run, same_dir)
            same = run_ranks(_case, world, _overrides(args, layout, same_dir, 2, ["train.save_interval=-1"]),
                             timeout=900)
            other = run_ranks(_case, world, _overrides(args, OTHER[layout], run, 2, ["train.save_interval=-1"]),
                              timeout=900)
            mb = 1e6
            r_same = [same[r][0]["read"] / mb for r in range(world)]
            r_other = [other[r][0]["read"] / mb for r in range(world)]
            print(f"| {layout} | {state / world / mb:.2f} | {min(written) / mb:.2f}-{max(written) / mb:.2f} | "
                  f"{min(r_same):.2f}-{max(r_same):.2f} ({_held(ckpt, layout, world) / mb:.2f}) | {OTHER[layout]} | "
                  f"{min(r_other):.2f}-{max(r_other):.2f} ({_held(ckpt, OTHER[layout], world) / mb:.2f}) |",
                  flush=True)
    # async stall: dp=4 ZeRO-1, a save every step; the last save (at the end) is synchronous
    for mode in ("false", "true"):
        with tempfile.TemporaryDirectory() as tmp:
            out = run_ranks(_case, world, _overrides(args, "dp4-z1", Path(tmp) / "run", 4,
                                                     ["train.save_interval=1", f"train.async_save={mode}"]),
                            timeout=900)
            times = [t for t in out[0][1] if t["asynchronous"] == (mode == "true")]
            stall = sum(t["stall_s"] for t in times) / len(times)
            write = sum(t.get("write_s", 0) for t in times) / len(times)
            print(f"async_save={mode}: training-thread stall per save {stall * 1e3:.1f} ms "
                  f"(rank 0 write+commit {write * 1e3:.1f} ms; {len(times)} saves)", flush=True)


if __name__ == "__main__":
    main()
