"""Checks that a checkpoint's ``meta.json`` adds up with its files, and that ``latest`` stays in its run.

Called from :mod:`megallama.checkpoint` through one-line hooks (``read_meta``, ``latest_checkpoint``
and the save path), so every reader (resume, eval, generate, export, reshard) gets them:

* ``latest`` holds the name of a ``step_N`` directory of its own ``checkpoints/`` (text, no path);
  anything else (binary data, a path, ``..``, a symlink leading out) is refused;
* ``files`` is a mapping of relative names to ``{"bytes": int, "sha256": hex}``; every listed file
  exists with its recorded size, and every file in the directory is listed (an optimizer shard
  whose entry was removed is not silently ignored, which turned a resume into a fresh start);
  ``tokenizer.model`` is checked against its sha256 whenever the meta is read (eval, generate and
  export use it); the weight and optimizer shards are hashed by the reader that loads them;
* every safetensors file has its ``parts`` entry (which ranges of which tensors it holds; the
  reader checks that they cover every tensor, optimizer moments included when any are listed); a
  checkpoint saved by training (it records the learning-rate schedule's position) with no
  optimizer state listed is refused rather than resumed as a fresh start;
* ``step`` and ``consumed_samples`` are non-negative integers; a ``step_N`` directory holds step N;
  and when the meta records where the run that saved it started (``data_anchor``, written by every
  training save), ``consumed_samples`` = anchor's + (step - anchor's step) x ``train.global_batch_size``.

Every failure is one line (:class:`CheckpointError`, exit status 2).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from megallama.atomic import write_bytes
from megallama.errors import CheckpointError

STEP_DIR = re.compile(r"step_(\d+)")
SHA256 = re.compile(r"[0-9a-f]{64}")
TOKENIZER_FILE = "tokenizer.model"


# ---- latest ----------------------------------------------------------------------------------------

def latest_target(root: Path, pointer: Path) -> Path:
    """The checkpoint directory ``pointer`` (``root/latest``) names, confined to ``root``."""
    try:
        data = pointer.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read '{pointer}' ({exc.strerror}); check the run directory's "
                              "permissions") from None
    try:
        name = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"'{pointer}' is not a checkpoint name (binary data); write the name of a complete "
                              f"checkpoint directory of {root} into it, e.g. step_00000100") from None
    if not STEP_DIR.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise CheckpointError(f"'{pointer}' names '{shown}', not a step_N directory of this run; write the name of "
                              f"a complete checkpoint directory of {root} into it, e.g. step_00000100")
    path = root / name
    if path.is_symlink() or (path.exists() and path.resolve().parent != root.resolve()):
        raise CheckpointError(f"'{pointer}' names '{name}', which leads outside {root}; a run resumes only from "
                              "its own checkpoints: copy the checkpoint in, or pass it with --init-from")
    return path


def commit_latest(root: Path, name: str, step: int) -> None:
    """Point ``root/latest`` at ``name`` atomically and durably.

    A failed write (a full disk) is one line; the new checkpoint is complete, ``latest`` still names
    the previous one, and no temporary file is left."""
    from megallama.faults import write_fault  # MEGALLAMA_FAULT is read there and nowhere else

    try:
        write_fault("latest", step)
        write_bytes(root / "latest", name.encode(), durable=True)
    except OSError as exc:
        raise CheckpointError(f"writing '{root / 'latest'}' failed ({exc.strerror or exc}); checkpoint {name} is "
                              "complete but 'latest' still names the previous one: free space, then run the same "
                              "command to resume") from None


# ---- meta.json against the files -------------------------------------------------------------------

def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _on_disk(ckpt: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(ckpt):
        rel = os.path.relpath(dirpath, ckpt)
        for n in filenames:
            out.add(n if rel == "." else f"{rel}/{n}")
    return out - {"meta.json"}


def validate_meta(ckpt: Path, meta: dict) -> dict:
    """Raise a one-line :class:`CheckpointError` unless ``meta`` (already a dict with the keys and
    types of ``META_KEYS``) agrees with the files of ``ckpt``; returns ``meta``."""
    ckpt = Path(ckpt)
    where = ckpt / "meta.json"

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"'{where}' {what}; restore the checkpoint or resume from an earlier one")

    # fields
    for key in ("step", "consumed_samples"):
        if not _int(meta[key]) or meta[key] < 0:
            raise bad(f"has {key}={meta[key]!r}, not a non-negative integer")
    m = STEP_DIR.fullmatch(ckpt.name)
    if m and int(m.group(1)) != meta["step"]:
        raise bad(f"says step {meta['step']} but its directory is {ckpt.name}")
    layout = meta["layout"]
    for key in ("tp", "pp"):
        if not _int(layout.get(key)) or layout[key] < 1:
            raise bad(f"has layout.{key}={layout.get(key)!r}, not a positive integer")
    tp, pp = layout["tp"], layout["pp"]
    if any(not isinstance(k, str) or not _int(v) or not 0 <= v < pp for k, v in meta["stage_of"].items()):
        raise bad(f"has a stage_of entry that is not a stage of its {pp} pipeline stages")

    # files: well-formed, confined, present with their size, and complete
    files = meta["files"]
    for name, info in files.items():
        parts = name.split("/") if isinstance(name, str) else []
        if not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise bad(f"has a files entry {name!r} that is not a file name inside the checkpoint")
        if not isinstance(info, dict) or not _int(info.get("bytes")) or info["bytes"] < 0 \
                or not isinstance(info.get("sha256"), str) or not SHA256.fullmatch(info["sha256"]):
            raise bad(f"has a malformed files entry for '{name}' ({type(info).__name__}; expected "
                      "{\"bytes\": int, \"sha256\": hex})")
    for name, info in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file '{path}' is missing (meta.json lists it); the checkpoint is "
                                  "incomplete, resume from an earlier one")
        if path.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file '{path}' is truncated or corrupt ({path.stat().st_size} bytes, "
                                  f"meta.json records {info['bytes']}); restore it or resume from an earlier checkpoint")
    unlisted = sorted(_on_disk(ckpt) - set(files))
    if unlisted:
        raise CheckpointError(f"checkpoint file '{ckpt / unlisted[0]}' is not covered by meta.json (no size or sha256 "
                              "recorded), so it cannot be trusted; restore meta.json or resume from an earlier one")
    if TOKENIZER_FILE in files and sha256_file(ckpt / TOKENIZER_FILE) != files[TOKENIZER_FILE]["sha256"]:
        raise CheckpointError(f"'{ckpt / TOKENIZER_FILE}' does not match the sha256 in meta.json: it is not the "
                              "tokenizer this model was trained with; restore the run's tokenizer.model")

    # the layout's shards (version 1: one file per (TP, PP) shard; version 2: the reader checks that the
    # "parts" of every tensor cover it, so a file dropped from meta.json is an error there)
    optim = [n for n in files if n.startswith("optim_")]
    if meta.get("version", 1) < 2:
        shard = lambda kind, t, s: f"{kind}_tp{t:02d}_pp{s:02d}.safetensors"  # noqa: E731 (checkpoint.shard_file)
        want = [(t, s) for t in range(tp) for s in range(pp)]
        missing = [shard("model", t, s) for t, s in want if shard("model", t, s) not in files]
        if missing:
            raise CheckpointError(f"checkpoint '{ckpt}' has no '{missing[0]}' in meta.json for its layout tp={tp} "
                                  f"pp={pp}; it is incomplete, resume from an earlier one")
        if optim and len(optim) != len(want):
            raise CheckpointError(f"checkpoint '{ckpt}' lists optimizer state for only {len(optim)} of its "
                                  f"{len(want)} shards; it is incomplete, resume from an earlier one")
    else:
        parts = meta.get("parts")
        if not isinstance(parts, dict) or any(n not in files or not isinstance(held, dict) for n, held in parts.items()):
            raise bad("has a malformed 'parts' (each entry a listed file mapping tensors to [start, numel])")
        unplaced = [n for n in files if n.endswith(".safetensors") and n not in parts]
        if unplaced:
            raise bad(f"lists '{unplaced[0]}' without its 'parts' entry (which tensor ranges it holds)")
    if not optim and _int(meta.get("lr_scheduler_last_epoch")):
        # training saves record the schedule's position with their optimizer state; weights-only
        # writers (import, reshard --weights-only) record none: a resume must not become a fresh start
        raise CheckpointError(f"checkpoint '{ckpt}' was saved by training (it records the learning-rate schedule "
                              f"at step {meta['lr_scheduler_last_epoch']}) but meta.json lists no optimizer state; "
                              "restore meta.json and the optim_*.safetensors files, or resume from an earlier "
                              "checkpoint")

    # the data position
    anchor = meta.get("data_anchor")
    if anchor is not None:
        try:
            batch = meta["config"]["train"]["global_batch_size"]
            a_step, a_consumed = anchor["step"], anchor["consumed_samples"]
            ok = all(_int(x) for x in (batch, a_step, a_consumed)) and 0 <= a_step <= meta["step"]
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise bad("has a malformed data_anchor")
        want_consumed = a_consumed + (meta["step"] - a_step) * batch
        if meta["consumed_samples"] != want_consumed:
            raise bad(f"says consumed_samples={meta['consumed_samples']:,} but step {meta['step']} x "
                      f"global batch {batch} from its start at step {a_step} ({a_consumed:,} samples) "
                      f"makes {want_consumed:,}")
    return meta

