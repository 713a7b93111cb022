"""The checkpoint format: file names, ``meta.json`` (reading, checking, building) and file records.

See :mod:`megallama.checkpoint` for the layout of a checkpoint directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from megallama import __version__
from megallama.checkpoint.validate import latest_target, sha256_file, validate_meta
from megallama.config import Config
from megallama.errors import CheckpointError

FORMAT, VERSION = "megallama-checkpoint", 2
TOKENIZER_FILE = "tokenizer.model"
MOMENTS = ("exp_avg", "exp_avg_sq")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def shard_file(kind: str, tp: int, pp: int) -> str:
    """Version 1's file of one whole (TP, PP) shard (still read)."""
    return f"{kind}_tp{tp:02d}_pp{pp:02d}.safetensors"


def part_file(kind: str, tp: int, pp: int, dp: int) -> str:
    """Version 2: the part of the (TP, PP) shard that data-parallel rank ``dp`` wrote."""
    return f"{kind}_tp{tp:02d}_pp{pp:02d}_dp{dp:03d}.safetensors"


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = latest_target(root, pointer)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"'{pointer}' names '{path.name}', which is missing or incomplete; "
                              f"point it at a complete checkpoint directory in {root}")
    return path


META_KEYS = {"step": int, "consumed_samples": int, "layout": dict, "config": dict, "stage_of": dict, "files": dict}


def read_meta(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"'{ckpt}' is not a megallama checkpoint (no meta.json); "
                              "pass a checkpoints/step_N directory or a run directory")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"'{path}' is corrupt (not JSON); restore it or use an earlier checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{path}' is corrupt (not a JSON object); restore it or use an earlier checkpoint")
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise CheckpointError(f"'{path}' has format {meta.get('format')} v{meta.get('version')}; "
                              f"this megallama reads {FORMAT} v{VERSION}")
    missing = [k for k in META_KEYS if not isinstance(meta.get(k), META_KEYS[k])]
    if missing:
        raise CheckpointError(f"'{path}' is corrupt (its '{missing[0]}' is missing or malformed); "
                              "restore it or use an earlier checkpoint")
    return validate_meta(Path(ckpt), meta)


def is_weights_only(meta: dict) -> bool:
    """A checkpoint without optimizer state (imported, or resharded with ``--weights-only``)."""
    return not any(f.startswith("optim_") for f in meta["files"])


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, given it or a run directory (then its ``latest``)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"no checkpoint at '{path}'; pass a checkpoints/step_N directory "
                              "or a run directory with checkpoints/latest")
    return found


IO_BYTES = {"read": 0, "written": 0, "verified": 0}


def verify_file(ckpt: Path, name: str, meta: dict, hash: bool = True) -> Path:
    """``ckpt/name`` after checking its size (and, with ``hash``, its sha256) against ``meta``."""
    path = ckpt / name
    info = meta["files"].get(name)
    if info is None or not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, "
                              "resume from an earlier one")
    if path.stat().st_size != info["bytes"] or (hash and sha256_file(path) != info["sha256"]):
        raise CheckpointError(f"checkpoint file '{path}' is truncated or corrupt (size/sha256 mismatch); "
                              "restore it or resume from an earlier checkpoint")
    if hash:
        IO_BYTES["verified"] += info["bytes"]
    return path


def file_record(data: bytes) -> dict:
    """A file's entry in ``meta.json``'s ``files``: its size and sha256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_tensors(tensors: dict, path: Path) -> dict:
    """Write a safetensors file of flat tensors durably (inside a checkpoint being built); its record."""
    from safetensors.torch import save

    from megallama.atomic import fsync_write

    data = save({k: v.contiguous() for k, v in tensors.items()})
    fsync_write(path, data)
    IO_BYTES["written"] += len(data)
    return file_record(data)


def new_meta(cfg: Config, layout: dict, step: int, consumed_samples: int, **fields) -> dict:
    """``meta.json`` without its ``files``/``parts`` (added once the files are written): the one
    definition of its fields for training saves and offline writers."""
    return {"format": FORMAT, "version": VERSION, "megallama_version": __version__, "step": step,
            "consumed_samples": consumed_samples, "layout": layout, "precision": cfg.train.precision,
            "tokenizer_fingerprint": None, "loss_scale": None, "lr_scheduler_last_epoch": None,
            "optimizer_lrs": None, "config": cfg.to_dict(), **fields}


def layout_record(cfg: Config, tp: int, pp: int, dp: int) -> dict:
    return {"tp": tp, "pp": pp, "dp": dp, "zero_stage": cfg.parallel.zero_stage,
            "sequence_parallel": cfg.parallel.sequence_parallel}


def copy_tokenizer(path: Optional[str], into: Path) -> Optional[tuple[str, dict]]:
    """Copy the run's SentencePiece model into a checkpoint being built; its files entry."""
    from megallama.atomic import fsync_write

    if not path:
        return None
    data = Path(path).read_bytes()
    fsync_write(into / TOKENIZER_FILE, data)
    return TOKENIZER_FILE, file_record(data)
