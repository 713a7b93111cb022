"""Saving during training: every rank writes what it owns, rank 0 commits; optionally in the background."""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megallama.atomic import commit_directory, fsync_write, write_bytes
from megallama.checkpoint.format import (MOMENTS, copy_tokenizer, file_record, layout_record, new_meta, part_file,
                                         save_tensors, step_name)
from megallama.checkpoint.validate import commit_latest
from megallama.config import Config
from megallama.errors import CheckpointError
from megallama.faults import fault_point
from parallel.init import is_sharded
from parallel.topology import ParallelContext

# per save of this process: {"asynchronous", "stall_s" (the training thread), "write_s" (writing + commit)}
SAVE_TIMES: list[dict] = []


def _rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": repr(random.getstate()), "numpy": None}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _gather_objects(obj, ctx: ParallelContext):
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


class PendingSave:
    """An asynchronous save in flight: its background thread writes this rank's files, then (on rank 0,
    once every rank's ``done/rankN.json`` marker is there) ``meta.json`` and the renames."""

    def __init__(self, final: Path, target, args):
        import threading

        self.final, self.error = final, None
        self._thread = threading.Thread(target=self._run, args=(target, args), name="checkpoint-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self, target, args):
        try:
            target(*args)
        except BaseException as exc:  # reported by wait(), on the training thread
            self.error = exc

    def wait(self) -> Path:
        self._thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error if isinstance(error, CheckpointError) else CheckpointError(
                f"saving checkpoint {self.final} failed ({error}); the previous checkpoint is kept")
        return self.final


_PENDING: Optional[PendingSave] = None


def wait_for_save() -> Optional[Path]:
    """Block until the asynchronous save in flight (if any) is committed; its directory, or None."""
    global _PENDING
    pending, _PENDING = _PENDING, None
    return pending.wait() if pending is not None else None


def save_checkpoint(engine, named_params: Iterable, cfg: Config, ctx: ParallelContext, step: int,
                    consumed_samples: int, tokenizer=None, asynchronous: bool = False,
                    anchor: Optional[tuple[int, int]] = None) -> Path:
    """Collective: every rank calls it.  Returns the committed checkpoint directory.

    Every data-parallel rank writes the part of each (TP, PP) shard's fp32 masters and Adam moments
    that its ZeRO partition holds (:func:`megallama.engine.local_part`).  With ``asynchronous`` the
    state is copied to host memory here and a background thread writes and commits it (a second save,
    and :func:`wait_for_save`, wait for it); the returned directory exists once committed.

    ``tokenizer`` (a :class:`~megallama.data.tokenizer.Tokenizer` with ``.path``/``.fingerprint``,
    or None) is copied in, so a checkpoint is self-contained for evaluation and export.  ``anchor``:
    the (step, consumed samples) the run started from, recorded so that a reader can check that
    ``consumed_samples`` adds up (:func:`megallama.checkpoint.validate.validate_meta`)."""
    global _PENDING
    import time

    from megallama.engine import local_part

    wait_for_save()  # a second save waits for the first
    began = time.perf_counter()
    root = Path(cfg.train.run_dir) / "checkpoints"
    final, tmp = root / step_name(step), root / (step_name(step) + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        (tmp / "done").mkdir()
    dist.barrier()

    from megallama.engine import _base_optimizer, link_optimizer_state

    named = list(named_params)
    link_optimizer_state(engine)
    weights, moments, held = {}, {}, {}
    for name, p in named:  # ZeRO-3: collective over DP inside DeepSpeed's gather
        start, part = local_part(engine, p, ctx.dp_rank, ctx.dp_size)
        if not part or (ctx.tp_rank and not is_sharded(p)):  # replicated over TP: TP rank 0 writes it
            continue
        held[name] = [start, part[""].numel()]
        weights[name] = part[""].clone() if asynchronous else part[""]  # host copies: training goes on
        moments.update({f"{name}/{key}": part[key].clone() if asynchronous else part[key] for key in MOMENTS})
    rng = json.dumps(_rng_state()).encode()
    stages = _gather_objects(([n for n, _ in named], ctx.pp_rank), ctx)
    meta = None
    if rank0:
        base_opt = _base_optimizer(engine)
        meta = new_meta(
            cfg, layout_record(cfg, ctx.tp_size, ctx.pp_size, ctx.dp_size), step, consumed_samples,
            tokenizer_fingerprint=getattr(tokenizer, "fingerprint", None),
            loss_scale=float(engine.optimizer.cur_scale) if hasattr(engine.optimizer, "cur_scale") else None,
            lr_scheduler_last_epoch=engine.lr_scheduler.last_epoch if engine.lr_scheduler else None,
            optimizer_lrs=[g["lr"] for g in base_opt.param_groups],
            stage_of={n: stage for names, stage in stages for n in names})
        if anchor is not None:
            meta["data_anchor"] = {"step": anchor[0], "consumed_samples": anchor[1]}
    times = {"asynchronous": asynchronous}
    SAVE_TIMES.append(times)
    args = (ctx, tmp, final, root, weights, moments, held, rng, meta, tokenizer, cfg.train.keep_last, step, times)
    if asynchronous:
        _PENDING = PendingSave(final, _write_and_commit, args)
        times["stall_s"] = time.perf_counter() - began
        return final
    error = None
    try:
        _write_and_commit(*args)
    except CheckpointError as exc:
        error = str(exc)
    errors = [e for e in _gather_objects(error, ctx) if e]  # every rank returns after the commit
    if errors:
        raise CheckpointError(errors[0])
    times["stall_s"] = time.perf_counter() - began
    return final


def _write_and_commit(ctx: ParallelContext, tmp: Path, final: Path, root: Path, weights: dict, moments: dict,
                      held: dict, rng: bytes, meta: Optional[dict], tokenizer, keep_last: int, step: int,
                      times: Optional[dict] = None) -> None:
    """Write this rank's files; rank 0 then commits once every rank reported its files (or an error).

    Synchronous saves report with an all-gather.  Asynchronous ones run on a background thread while
    training runs collectives, so none runs here: each rank writes a ``done/rankN.json`` marker and
    rank 0 waits for all of them; the other ranks return once their own files are durable."""
    import time

    began = time.perf_counter()
    files, parts, error = {}, {}, None
    try:
        if weights:
            for kind, tensors in (("model", weights), ("optim", moments)):
                file = part_file(kind, ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
                files[file] = save_tensors(tensors, tmp / file)
                parts[file] = {t: held[t.split("/")[0]] for t in tensors}
        name = f"rng/rank{ctx.rank:05d}.json"
        fsync_write(tmp / name, rng)
        files[name] = file_record(rng)
    except OSError as exc:
        error = f"rank {ctx.rank}: {exc}"
    mine = {"files": files, "parts": parts, "error": error}
    if times is not None and not times["asynchronous"]:  # on the training thread: an all-gather
        reports = _gather_objects(mine, ctx)
    else:
        marker = tmp / "done" / f"rank{ctx.rank:05d}.json"
        write_bytes(marker, json.dumps(mine).encode(), durable=True)
        reports = []
        if ctx.rank == 0:
            done = tmp / "done"
            while len(list(done.glob("rank*.json"))) < ctx.world_size:
                time.sleep(0.01)
            reports = [json.loads(path.read_text()) for path in sorted(done.glob("rank*.json"))]
    error = next((r["error"] for r in reports if r["error"]), error)
    if ctx.rank != 0 or error:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error:
            raise CheckpointError(f"saving checkpoint {final} failed ({error}); the previous checkpoint is kept")
        return
    all_files, all_parts = {}, {}
    for got in reports:
        all_files.update(got["files"])
        all_parts.update(got["parts"])
    shutil.rmtree(tmp / "done", ignore_errors=True)
    copied = copy_tokenizer(getattr(tokenizer, "path", None), tmp)
    if copied:
        all_files[copied[0]] = copied[1]
    meta = dict(meta, files=all_files, parts=all_parts)
    fault_point("kill-during-save", step)  # MEGALLAMA_FAULT=kill-during-save@STEP (tests)
    fsync_write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
    commit_directory(tmp, final)  # durable before `latest` names it
    commit_latest(root, final.name, step)
    _prune(root, keep_last, keep=final.name)
    if times is not None:
        times["write_s"] = time.perf_counter() - began


def _prune(root: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                      and (p / "meta.json").is_file())
    for old in complete[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
