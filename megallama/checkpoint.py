"""Checkpoints: a consolidated, layout-independent format with atomic commits.

Layout of a run directory::

    RUN_DIR/checkpoints/latest                  text: the name of the newest complete checkpoint
    RUN_DIR/checkpoints/step_00000100/
        model_tp00_pp00_dp000.safetensors       fp32 masters: the flat ranges of TP rank 0, stage 0's
                                                parameters that DP rank 0's ZeRO partition holds
        optim_tp00_pp00_dp000.safetensors       Adam moments: "<name>/exp_avg", "<name>/exp_avg_sq"
        rng/rank00000.json                      per-rank RNG states (torch, numpy, python)
        tokenizer.model                         the run's SentencePiece model (when it has one)
        meta.json                               written last: config, layout, step, data position,
                                                tokenizer fingerprint, version, file sizes and sha256,
                                                and "parts" (file -> tensor -> [flat start, numel])

Format version 2: every data-parallel rank writes its own ZeRO partition (no gather to one rank),
so a checkpoint is still layout-independent -- any reader cuts any TP/PP/DP layout out of it with
slice reads of only the bytes it needs (:meth:`CheckpointReader.read`).  Version 1 (one unflattened
``model_tpXX_ppYY.safetensors`` per shard, written by DP rank 0) is still read.  Loading at another
layout reshards on the fly, and ``megallama reshard`` does the same offline.

Atomicity: every rank writes into ``step_N.tmp/``, files are fsynced, all ranks
meet at a barrier, then rank 0 writes ``meta.json``, renames the directory to
``step_N`` and moves ``latest`` with an atomic ``os.replace``.  A crash at any
moment leaves the previous checkpoint loadable.  Nothing is unpickled on load
(safetensors and JSON only).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megallama import __version__
from megallama.config import Config, ModelConfig, config_from_dict
from megallama.atomic import building, commit_directory, fsync_write, write_bytes
from megallama.ckpt_validate import commit_latest, latest_target, validate_meta
from megallama.errors import CheckpointError
from megallama.faults import fault_point
from parallel.init import is_sharded, shard, unshard
from parallel.topology import ParallelContext, Topology

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


# ----------------------------------------------------------------------------- shard specs

@dataclass(frozen=True)
class ShardSpec:
    """How a canonical parameter is cut across TP ranks (``dim`` None = replicated)."""

    shape: tuple  # full shape at tp (vocabulary rows padded for that tp)
    dim: Optional[int]
    chunks: Optional[tuple]


def shard_specs(model_cfg: ModelConfig, tp: int) -> dict[str, ShardSpec]:
    """Canonical name -> ShardSpec, from a meta-device model at tensor-parallel size ``tp``."""
    from megallama.model import Transformer

    ctx = ParallelContext(Topology(tp, tp, 1), 0)
    with torch.device("meta"):
        model = Transformer(model_cfg, ctx)
    specs = {}
    for name, p in model.named_parameters():
        if is_sharded(p):
            full = list(p.shape)
            full[p.partition_dim] *= tp
            specs[name] = ShardSpec(tuple(full), p.partition_dim, p.partition_chunks)
        else:
            specs[name] = ShardSpec(tuple(p.shape), None, None)
    return specs


def reshard_tensor(full: torch.Tensor, spec: ShardSpec, rank: int, tp: int) -> torch.Tensor:
    """The ``rank``-th TP shard of a full tensor, padding/cropping vocabulary rows to ``spec``."""
    if spec.dim is None:
        return full
    want = spec.shape[spec.dim]
    if full.shape[spec.dim] != want:  # vocabulary padding differs between TP sizes
        if full.shape[spec.dim] > want:
            full = full.narrow(spec.dim, 0, want)
        else:
            pad = list(full.shape)
            pad[spec.dim] = want - full.shape[spec.dim]
            full = torch.cat([full, full.new_zeros(pad)], spec.dim)
    return shard(full, spec.dim, rank, tp, spec.chunks)


# ----------------------------------------------------------------------------- reading

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


# what every reader of meta.json indexes without a default
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# bytes of tensor data read from and written to checkpoint files by this process (benchmarks/checkpoint_io.py)
IO_BYTES = {"read": 0, "written": 0, "verified": 0}
# per save of this process: {"asynchronous", "stall_s" (the training thread), "write_s" (writing + commit)}
SAVE_TIMES: list[dict] = []


def verify_file(ckpt: Path, name: str, meta: dict, hash: bool = True) -> Path:
    """``ckpt/name`` after checking its size (and, with ``hash``, its sha256) against ``meta``."""
    path = ckpt / name
    info = meta["files"].get(name)
    if info is None or not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, "
                              "resume from an earlier one")
    if path.stat().st_size != info["bytes"] or (hash and _sha256(path) != info["sha256"]):
        raise CheckpointError(f"checkpoint file '{path}' is truncated or corrupt (size/sha256 mismatch); "
                              "restore it or resume from an earlier checkpoint")
    if hash:
        IO_BYTES["verified"] += info["bytes"]
    return path


def rank_ranges(size: int, chunks: Optional[tuple], rank: int, tp: int) -> list[tuple[int, int]]:
    """The index ranges of a full tensor's shard dim (``size`` rows) that TP ``rank`` holds, in its
    local order (:func:`parallel.init.shard`: each logical chunk split evenly, concatenated)."""
    out, offset = [], 0
    for c in (chunks or (size,)):
        if c % tp:
            raise ValueError(f"cannot split {c} rows into {tp} equal shards")
        out.append((offset + rank * (c // tp), offset + (rank + 1) * (c // tp)))
        offset += c
    return out


class CheckpointReader:
    """Full (unsharded) fp32 tensors of a checkpoint, or any slice of them, read lazily from only the
    files (and, through safetensors' slices, only the bytes) that hold them, whatever its layout.

    A file is checked against ``meta.json`` when first opened: size and sha256 with ``verify=True``
    (each process hashes only the files it opens), size only with ``verify="size"``."""

    def __init__(self, ckpt: str | Path, verify: bool | str = True):
        self.path = resolve(ckpt)
        self.meta = read_meta(self.path)
        self.config = config_from_dict(self.meta["config"])
        layout = self.meta["layout"]
        self.tp, self.pp = layout["tp"], layout["pp"]
        self.specs = shard_specs(self.config.model, self.tp)
        self.verify = verify
        self._files = {}
        self.stage_of = self.meta["stage_of"]
        missing = sorted(set(self.specs) - set(self.stage_of))
        if missing:
            raise CheckpointError(f"checkpoint '{self.path}' meta.json does not place tensor '{missing[0]}' "
                                  "in any file; it is incomplete or of another model")
        self._parts = None  # version 2: (kind, tp, tensor) -> [(flat start, numel, file)]
        if self.meta.get("version", 1) >= 2:
            self._parts = {}
            for file, held in (self.meta.get("parts") or {}).items():
                verify_file(self.path, file, self.meta, hash=False)
                kind, t = file.split("_")[0], int(file.split("_tp")[1][:2])
                for tensor, (start, numel) in held.items():
                    self._parts.setdefault((kind, t, tensor), []).append((start, numel, file))
            for name in self.specs:  # every element of every tensor is in exactly one part
                for kind, tensor in [("model", name)] + ([("optim", f"{name}/{k}") for k in MOMENTS]
                                                         if self.has_optimizer else []):
                    for t in range(self.tp if self.specs[name].dim is not None else 1):
                        parts = sorted(self._parts.get((kind, t, tensor), []))
                        self._parts[(kind, t, tensor)] = parts
                        end = 0
                        for start, numel, _ in parts:
                            if start != end:
                                break
                            end += numel
                        if end != self._local_shape(name).numel():
                            raise CheckpointError(f"checkpoint '{self.path}' meta.json does not cover tensor "
                                                  f"'{tensor}' (tp {t}); it is incomplete, resume from an "
                                                  "earlier checkpoint")
        else:
            for t in range(self.tp):  # every file exists with the size meta.json records: cheap, no hashing
                for s in range(self.pp):
                    for kind in ("model", "optim"):
                        if kind == "model" or self.has_optimizer:
                            verify_file(self.path, shard_file(kind, t, s), self.meta, hash=False)

    def _local_shape(self, name: str) -> torch.Size:
        spec = self.specs[name]
        shape = list(spec.shape)
        if spec.dim is not None:
            shape[spec.dim] //= self.tp
        return torch.Size(shape)

    @property
    def has_optimizer(self) -> bool:
        return not is_weights_only(self.meta)

    def _open(self, name: str):
        from safetensors import safe_open

        key = name
        if key not in self._files:
            path = verify_file(self.path, name, self.meta, hash=self.verify is True) if self.verify \
                else self.path / name
            try:
                self._files[key] = safe_open(str(path), framework="pt")
            except Exception as exc:  # a damaged header
                raise CheckpointError(f"checkpoint file '{path}' is truncated or corrupt ({exc}); "
                                      "restore it or resume from an earlier checkpoint") from None
        return self._files[key]

    def names(self) -> list[str]:
        return list(self.specs)

    def _read_file(self, file: str, tensor: str, index: tuple = ()) -> torch.Tensor:
        try:
            handle = self._open(file)
            out = handle.get_slice(tensor)[index] if index else handle.get_tensor(tensor)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint '{self.path}' lacks tensor '{tensor}' in "
                                  f"{file} ({exc}); it is incomplete or of another model") from None
        IO_BYTES["read"] += out.numel() * out.element_size()
        return out

    def _get(self, kind: str, t: int, stage: int, tensor: str, index: tuple = ()) -> torch.Tensor:
        """TP shard ``t`` of ``tensor`` (or ``[index]`` of it: slices, the last one a row range)."""
        if self._parts is None:
            return self._read_file(shard_file(kind, t, stage), tensor, index)
        shape = self._local_shape(tensor.split("/")[0])
        dim = len(index) - 1 if index else 0
        a, b = (index[-1].start, index[-1].stop) if index else (0, shape[0])
        r0, r1 = (index[0].start or 0, shape[0] if index[0].stop is None else index[0].stop) if dim else (0, 0)
        if dim and (a, b) == (0, shape[dim]) and (r0, r1) == (0, shape[0]):
            dim, a, b = 0, 0, shape[0]
        if dim == 1 and len(shape) == 2:  # columns a:b of rows r0:r1: one short read per row and part
            cols = shape[1]
            out = torch.empty(r1 - r0, b - a)
            for start, numel, file in self._parts[(kind, t, tensor)]:
                for r in range(max(r0, start // cols), min(r1, -(-(start + numel) // cols))):
                    x, y = max(r * cols + a, start), min(r * cols + b, start + numel)
                    if x < y:
                        out[r - r0, x - r * cols - a:y - r * cols - a] = self._read_file(
                            file, tensor, (slice(x - start, y - start),))
            return out
        if dim:  # a range of a later dim: the rows hold it, read them all
            a, b = 0, shape[0]
        row = shape[1:].numel()
        lo, hi = a * row, b * row
        pieces = []
        for start, numel, file in self._parts[(kind, t, tensor)]:
            x, y = max(lo, start), min(hi, start + numel)
            if x < y:
                pieces.append(self._read_file(file, tensor, (slice(x - start, y - start),)))
        flat = torch.cat(pieces) if len(pieces) > 1 else (pieces[0] if pieces else torch.zeros(0))
        out = flat.reshape(b - a, *shape[1:])
        return out[index] if dim else out

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """Full tensor of parameter ``name`` (or of its optimizer moment ``key``)."""
        kind, tensor = ("model", name) if key is None else ("optim", f"{name}/{key}")
        stage, spec = self.stage_of[name], self.specs[name]
        if spec.dim is None:
            return self._get(kind, 0, stage, tensor)
        return unshard([self._get(kind, t, stage, tensor) for t in range(self.tp)], spec.dim, spec.chunks)

    def read(self, name: str, key: Optional[str] = None, dim: int = 0, start: int = 0,
             stop: Optional[int] = None, rows: Optional[tuple] = None) -> torch.Tensor:
        """Rows ``start:stop`` along ``dim`` of the full tensor ``name`` (or of its moment ``key``),
        reading only those bytes; ``rows`` (dim 1 only) restricts dim 0 too.  Rows past the end
        (vocabulary padding of another TP size) are zeros."""
        kind, tensor = ("model", name) if key is None else ("optim", f"{name}/{key}")
        stage, spec = self.stage_of[name], self.specs[name]
        size = spec.shape[dim]
        stop = size if stop is None else stop
        have = min(stop, size)

        def index(a, b):
            return tuple(slice(*rows) if rows and i == 0 else slice(None) for i in range(dim)) + (slice(a, b),)

        if spec.dim is None:
            pieces = [self._get(kind, 0, stage, tensor, index(start, have))] if have > start else []
        elif spec.dim != dim:
            pieces = [unshard([self._get(kind, t, stage, tensor, index(start, have)) for t in range(self.tp)],
                              spec.dim, spec.chunks)] if have > start else []
        else:
            found = []
            for t in range(self.tp):
                local = 0
                for a, b in rank_ranges(size, spec.chunks, t, self.tp):
                    lo, hi = max(a, start), min(b, have)
                    if lo < hi:
                        found.append((lo, self._get(kind, t, stage, tensor, index(local + lo - a, local + hi - a))))
                    local += b - a
            pieces = [x for _, x in sorted(found, key=lambda f: f[0])]
        if stop > max(size, start):  # rows this checkpoint does not have: zero padding
            shape = list(spec.shape)
            shape[dim] = stop - max(size, start)
            if rows:
                shape[0] = rows[1] - rows[0]
            pieces.append(torch.zeros(shape, dtype=torch.float32))
        return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]

    def read_shard(self, name: str, key: Optional[str], spec: ShardSpec, rank: int, tp: int) -> torch.Tensor:
        """TP ``rank``'s shard (at ``tp``, shaped by ``spec``) of ``name``: what
        ``reshard_tensor(self.full(name, key), spec, rank, tp)`` gives, reading only its bytes."""
        if spec.dim is None:
            return self.full(name, key)
        parts = [self.read(name, key, spec.dim, a, b) for a, b in rank_ranges(spec.shape[spec.dim], spec.chunks,
                                                                               rank, tp)]
        return torch.cat(parts, spec.dim) if len(parts) > 1 else parts[0]

    def read_flat(self, name: str, key: Optional[str], spec: ShardSpec, rank: int, tp: int, start: int,
                  numel: int) -> torch.Tensor:
        """Elements ``start:start+numel`` of TP ``rank``'s shard (flattened) of ``name``: the part of it a
        ZeRO partition holds, reading only the rows that contain it."""
        shape = list(spec.shape)
        if spec.dim is not None:
            shape[spec.dim] //= tp
        row = int(np.prod(shape[1:], dtype=np.int64))
        r0, r1 = start // row, -(-(start + numel) // row)
        if spec.dim is None:
            rows = self.read(name, key, 0, r0, r1)
        elif spec.dim == 0:
            parts, local = [], 0
            for a, b in rank_ranges(spec.shape[0], spec.chunks, rank, tp):
                x, y = max(r0, local), min(r1, local + b - a)
                if x < y:
                    parts.append(self.read(name, key, 0, a + x - local, a + y - local))
                local += b - a
            rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        else:
            parts = [self.read(name, key, spec.dim, a, b, rows=(r0, r1))
                     for a, b in rank_ranges(spec.shape[spec.dim], spec.chunks, rank, tp)]
            rows = torch.cat(parts, spec.dim) if len(parts) > 1 else parts[0]
        return rows.reshape(-1)[start - r0 * row:start - r0 * row + numel]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: self.full(n) for n in self.names()}


# ----------------------------------------------------------------------------- engine access

def _has_master(p) -> bool:
    """Does DeepSpeed keep this parameter's fp32 master (and Adam state) in its own partitions?"""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # a None mapping: another DP rank holds it


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's ZeRO / bf16 wrappers."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def init_optimizer_state(engine) -> None:
    """Create AdamW's (zero) state before the first step, so a checkpoint can be loaded into it.

    torch creates ``step``/``exp_avg``/``exp_avg_sq`` lazily at the first step; we create them
    the way ``torch.optim.AdamW`` does, then let DeepSpeed link its fragments to them.
    """
    opt = _base_optimizer(engine)
    for group, params in _optimizer_params(engine, opt):
        on_device = group.get("fused") or group.get("capturable")
        for p in params:
            if opt.state.get(p):
                continue
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    link_optimizer_state(engine)


def _optimizer_params(engine, opt) -> list:
    """(param group, the tensors AdamW steps) pairs.

    ZeRO-3 keeps its param groups *empty* between steps and puts each group's flat fp32
    partition in only while stepping it, so its state must be keyed on those flat tensors.
    """
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        group_of = getattr(engine.optimizer, "sub_group_to_group_id", {})
        return [(opt.param_groups[group_of.get(i, i)], [flat]) for i, flat in enumerate(flats)]
    return [(group, group["params"]) for group in opt.param_groups]


def link_optimizer_state(engine) -> None:
    """(Re)link DeepSpeed's per-parameter views of the Adam moments.

    DeepSpeed (0.19) links them right after stepping the *first* parameter group, before
    the other groups' states exist, and never again: parameters of later groups (here the
    no-weight-decay norms) would have no moments to read or write.  Relinking is cheap.
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def get_master(engine, p) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return (safe_get_full_fp32_param(p) if _has_master(p) else p.detach()).float().cpu()


def get_moment(engine, p, key: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    value = safe_get_full_optimizer_state(p, key) if _has_master(p) else _base_optimizer(engine).state[p][key]
    return value.float().cpu()


def set_master(engine, p, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    value = value.to(p.device)
    if _has_master(p):
        safe_set_full_fp32_param(p, value)
        return  # the model's copy is refreshed from the masters by _refresh_low_precision
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def set_moment(engine, p, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    value = value.to(p.device)
    if _has_master(p):
        safe_set_full_optimizer_state(p, value, key)
    else:
        _base_optimizer(engine).state[p][key].copy_(value)


def set_optimizer_step(engine, step: int) -> None:
    opt = _base_optimizer(engine)
    for state in opt.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step


# ----------------------------------------------------------------------------- saving

def _rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": repr(random.getstate()), "numpy": None}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _save_tensors(tensors: dict, path: Path) -> dict:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()})
    fsync_write(path, data)
    IO_BYTES["written"] += len(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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
    ``consumed_samples`` adds up (:func:`megallama.ckpt_validate.validate_meta`)."""
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
        meta = {
            "format": FORMAT, "version": VERSION, "megallama_version": __version__,
            "step": step, "consumed_samples": consumed_samples,
            "layout": {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size,
                       "zero_stage": cfg.parallel.zero_stage, "sequence_parallel": cfg.parallel.sequence_parallel},
            "precision": cfg.train.precision,
            "tokenizer_fingerprint": getattr(tokenizer, "fingerprint", None),
            "loss_scale": float(engine.optimizer.cur_scale) if hasattr(engine.optimizer, "cur_scale") else None,
            "lr_scheduler_last_epoch": engine.lr_scheduler.last_epoch if engine.lr_scheduler else None,
            "optimizer_lrs": [g["lr"] for g in base_opt.param_groups],
            "config": cfg.to_dict(), "stage_of": {n: stage for names, stage in stages for n in names},
        }
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
                files[file] = _save_tensors(tensors, tmp / file)
                parts[file] = {t: held[t.split("/")[0]] for t in tensors}
        name = f"rng/rank{ctx.rank:05d}.json"
        fsync_write(tmp / name, rng)
        files[name] = {"bytes": len(rng), "sha256": hashlib.sha256(rng).hexdigest()}
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
    if tokenizer is not None and getattr(tokenizer, "path", None):
        data = Path(tokenizer.path).read_bytes()
        fsync_write(tmp / TOKENIZER_FILE, data)
        all_files[TOKENIZER_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
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


# ----------------------------------------------------------------------------- loading

def check_compatible(meta: dict, cfg: Config, ckpt: Path) -> None:
    theirs = config_from_dict(meta["config"]).model
    ours = cfg.model
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden", "vocab_size"):
        a, b = getattr(theirs, field), getattr(ours, field)
        if a != b:
            raise CheckpointError(f"checkpoint '{ckpt}' has model.{field}={a} but the config says {b}; "
                                  "use the checkpoint's model settings or another checkpoint")


def load_checkpoint(engine, named_params: Iterable, cfg: Config, ctx: ParallelContext, ckpt: Path,
                    load_optimizer: bool = True) -> dict:
    """Load weights (and optimizer state) into the engine at *this* layout.  Returns meta."""
    reader = CheckpointReader(ckpt)
    check_compatible(reader.meta, cfg, ckpt)
    specs = shard_specs(cfg.model, ctx.tp_size)
    if load_optimizer and not reader.has_optimizer:
        raise CheckpointError(f"checkpoint '{ckpt}' holds weights only; start a new run from it with "
                              "--init-from instead of resuming")
    init_optimizer_state(engine)
    from megallama.engine import held_range, set_held

    for name, p in named_params:
        held = held_range(p)
        if held is not None:  # ZeRO-1/2: read and set only this rank's partition
            start, numel = held
            for key in (None, *MOMENTS) if load_optimizer else (None,):
                if numel:
                    set_held(p, key, reader.read_flat(name, key, specs[name], ctx.tp_rank, ctx.tp_size, start, numel))
            continue
        set_master(engine, p, reader.read_shard(name, None, specs[name], ctx.tp_rank, ctx.tp_size))
        if load_optimizer:
            for key in MOMENTS:
                set_moment(engine, p, key, reader.read_shard(name, key, specs[name], ctx.tp_rank, ctx.tp_size))
    _refresh_low_precision(engine)
    if load_optimizer:
        step = reader.meta["step"]
        set_optimizer_step(engine, step)
        if engine.lr_scheduler is not None and reader.meta.get("lr_scheduler_last_epoch") is not None:
            engine.lr_scheduler.last_epoch = reader.meta["lr_scheduler_last_epoch"]
            for group, lr in zip(_base_optimizer(engine).param_groups, engine.lr_scheduler.get_lr()):
                group["lr"] = lr
            engine.lr_scheduler._last_lr = [g["lr"] for g in _base_optimizer(engine).param_groups]
        if reader.meta.get("loss_scale") and hasattr(engine.optimizer, "cur_scale"):
            engine.optimizer.cur_scale = reader.meta["loss_scale"]
        rng = ckpt / f"rng/rank{ctx.rank:05d}.json"
        if rng.is_file() and reader.meta["layout"]["tp"] * reader.meta["layout"]["pp"] * \
                reader.meta["layout"]["dp"] == ctx.world_size:
            _set_rng_state(json.loads(verify_file(ckpt, f"rng/rank{ctx.rank:05d}.json", reader.meta).read_text()))
    return reader.meta


def _refresh_low_precision(engine) -> None:
    """Copy fp32 masters into the model's low-precision (or ZeRO-3 partitioned) parameters."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2 and the bf16 optimizer: copy and all-gather over DP
        opt.update_lp_params()
    elif engine.zero_optimization_stage() == 3:
        for i in range(len(opt.fp16_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)


# ----------------------------------------------------------------------------- offline writing

def stage_assignment(model_cfg: ModelConfig, pp: int, method: str = "parameters") -> dict[str, int]:
    """Canonical parameter name -> pipeline stage, exactly as training at ``pp`` stages places it."""
    from megallama.model import pipeline_layers
    from parallel.pipeline import partition

    if pp == 1:
        return {name: 0 for name in shard_specs(model_cfg, 1)}
    _, weights = pipeline_layers(model_cfg, ParallelContext.single(), False, "none", method)
    parts = partition(weights, pp, method)

    def stage(layer_index: int) -> int:
        return next(s for s in range(pp) if parts[s] <= layer_index < parts[s + 1])

    out = {}
    for name in shard_specs(model_cfg, 1):
        if name.startswith("layers."):
            out[name] = stage(int(name.split(".")[1]) + 1)
        else:
            out[name] = stage(0 if name.startswith("tok_embeddings") else model_cfg.n_layers + 1)
    return out


VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")


def _check_shape(name: str, tensor: torch.Tensor, spec: ShardSpec, model_cfg: ModelConfig) -> None:
    """A full tensor must have the configured shape; vocabulary rows may carry any TP padding."""
    shape, want = tuple(tensor.shape), tuple(spec.shape)
    if name in VOCAB_PARAMS and len(shape) == 2 and shape[1] == want[1] and shape[0] >= model_cfg.vocab_size:
        return
    if shape != want:
        raise CheckpointError(f"parameter '{name}' has shape {shape}, the config needs {want}; "
                              "the source is of another model shape (check its config/params)")


def write_checkpoint(out: str | Path, cfg: Config, weights: dict[str, torch.Tensor],
                     moments: Optional[dict[str, torch.Tensor]] = None, step: int = 0, consumed_samples: int = 0,
                     tokenizer_path: Optional[str] = None, extra_meta: Optional[dict] = None) -> Path:
    """Write a checkpoint from *full* canonical tensors at the layout ``cfg.parallel`` (tp, pp).

    ``moments`` maps ``"<name>/exp_avg"`` and ``"<name>/exp_avg_sq"`` to full tensors; without
    it the checkpoint is weights-only (for inference, conversion, or ``--init-from``).
    The directory is written under a temporary name and renamed when complete.
    """
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"output '{out}' already exists; choose a new path or remove it")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    specs = shard_specs(cfg.model, tp)
    missing = sorted(set(specs) - set(weights))
    if missing:
        raise CheckpointError(f"weights lack {len(missing)} parameters of the configured model, e.g. "
                              f"'{missing[0]}'; the source is of another model shape")
    extra = sorted(set(weights) - set(specs))
    if extra:
        raise CheckpointError(f"weights hold {len(extra)} parameters the configured model lacks, e.g. "
                              f"'{extra[0]}'; the source is of another model shape")
    stage_of = stage_assignment(cfg.model, pp, cfg.parallel.pipeline_partition)
    with building(out) as tmp:
        files, parts = {}, {}
        for t in range(tp):
            for s in range(pp):
                names = [n for n in specs if stage_of[n] == s and (t == 0 or specs[n].dim is not None)]
                model = {}
                for n in names:
                    _check_shape(n, weights[n], specs[n], cfg.model)
                    model[n] = reshard_tensor(weights[n].float(), specs[n], t, tp).reshape(-1)
                kinds = [("model", model)]
                if moments is not None:
                    kinds.append(("optim", {f"{n}/{k}": reshard_tensor(moments[f"{n}/{k}"].float(), specs[n], t,
                                                                       tp).reshape(-1)
                                            for n in names for k in MOMENTS}))
                for kind, tensors in kinds:
                    if tensors:
                        file = part_file(kind, t, s, 0)
                        files[file] = _save_tensors(tensors, tmp / file)
                        parts[file] = {k: [0, v.numel()] for k, v in tensors.items()}
        if tokenizer_path:
            data = Path(tokenizer_path).read_bytes()
            fsync_write(tmp / TOKENIZER_FILE, data)
            files[TOKENIZER_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta = {"format": FORMAT, "version": VERSION, "megallama_version": __version__, "step": step,
                "consumed_samples": consumed_samples,
                "layout": {"tp": tp, "pp": pp, "dp": 1, "zero_stage": cfg.parallel.zero_stage,
                           "sequence_parallel": cfg.parallel.sequence_parallel},
                "precision": cfg.train.precision, "tokenizer_fingerprint": None, "loss_scale": None,
                "lr_scheduler_last_epoch": step if moments is not None else None, "optimizer_lrs": None,
                "config": cfg.to_dict(), "stage_of": stage_of, "files": files, "parts": parts,
                **(extra_meta or {})}
        fsync_write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        commit_directory(tmp, out)
    return out


def write_run_checkpoint(run_dir: str | Path, cfg: Config, weights: dict[str, torch.Tensor],
                         moments: Optional[dict[str, torch.Tensor]] = None, step: int = 0,
                         consumed_samples: int = 0, tokenizer_path: Optional[str] = None,
                         extra_meta: Optional[dict] = None) -> Path:
    """:func:`write_checkpoint` into a *new run directory* ``run_dir/checkpoints/step_N`` plus ``latest``.

    Offline tools (reshard, import-hf, import-meta) write run directories so that
    ``megallama train --set train.run_dir=RUN_DIR`` resumes from them and every reader
    (eval, export, reshard) accepts them.  Refuses an existing non-empty ``run_dir``.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise CheckpointError(f"output '{run_dir}' already exists; choose a new path or remove it")
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))
    with building(run_dir) as tmp:  # the whole run dir appears at once, or not at all
        (tmp / "checkpoints").mkdir(parents=True)
        final = write_checkpoint(tmp / "checkpoints" / step_name(step), cfg, weights, moments, step,
                                 consumed_samples, tokenizer_path, extra_meta)
        fsync_write(tmp / "checkpoints" / "latest", final.name.encode())
        commit_directory(tmp, run_dir)  # also replaces an existing *empty* directory
    return run_dir / "checkpoints" / final.name
