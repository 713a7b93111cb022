"""Offline checkpoint tools: time and bytes of write, verified read, reshard and conversion.

    python benchmarks/checkpoint_tools.py [--dim 768] [--layers 12] [--vocab 32000]

Builds a random model of the given shape (LLaMA recipe), writes it with Adam moments as a
1x1 checkpoint, then times: a full verified read (sha256 of every file + every tensor),
``reshard`` to 2x2 and back to 1x1, ``export-hf`` and ``import-hf``, ``export-meta --mp 2``
and ``import-meta``.  Prints one table row per operation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megallama.checkpoint import MOMENTS, CheckpointReader, write_run_checkpoint  # noqa: E402
from megallama.config import ModelConfig  # noqa: E402
from megallama.model import build_model  # noqa: E402
from tools.hf import export_hf, import_hf  # noqa: E402
from tools.meta import export_meta, import_meta  # noqa: E402
from tools.checkpoint_io import imported_config  # noqa: E402
from tools.reshard import reshard  # noqa: E402


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=max(args.dim // 64, 1), vocab_size=args.vocab,
                        max_seq_len=512)
    cfg = imported_config(model, 1, 1)  # a valid config around the model (seq_len <= max_seq_len)
    weights = build_model(model, seed=0).state_dict()
    moments = {f"{n}/{k}": torch.randn_like(w).abs() for n, w in weights.items() for k in MOMENTS}
    print(f"model: {model.num_parameters() / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, "
          f"vocab {args.vocab}), fp32 weights + Adam moments")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def timed(name, fn, out):
            start = time.perf_counter()
            fn()
            rows.append((name, time.perf_counter() - start, _size(out)))

        timed("write 1x1 (with moments)", lambda: write_run_checkpoint(tmp / "a", cfg, weights, moments), tmp / "a")

        def read_all():
            r = CheckpointReader(tmp / "a")
            for n in r.names():
                r.full(n), r.full(n, "exp_avg"), r.full(n, "exp_avg_sq")

        timed("verified full read", read_all, tmp / "a")
        timed("reshard 1x1 -> 2x2", lambda: reshard(tmp / "a", tmp / "b", 2, 2), tmp / "b")
        timed("reshard 2x2 -> 1x1", lambda: reshard(tmp / "b", tmp / "c", 1, 1), tmp / "c")
        timed("export-hf", lambda: export_hf(tmp / "a", tmp / "hf"), tmp / "hf")
        timed("import-hf (tp=2)", lambda: import_hf(tmp / "hf", tmp / "d", tp=2), tmp / "d")
        timed("export-meta --mp 2", lambda: export_meta(tmp / "a", tmp / "meta", mp=2), tmp / "meta")
        timed("import-meta", lambda: import_meta(tmp / "meta", tmp / "e"), tmp / "e")
    print(f"{'operation':<28}{'seconds':>9}{'output MB':>11}{'MB/s':>9}")
    for name, sec, size in rows:
        print(f"{name:<28}{sec:>9.2f}{size / 2**20:>11.1f}{size / 2**20 / sec:>9.1f}")


if __name__ == "__main__":
    main()
