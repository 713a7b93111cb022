"""Reading checkpoints: any slice of any canonical tensor, from only the files and bytes that hold it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megallama.checkpoint.format import (IO_BYTES, MOMENTS, is_weights_only, read_meta, resolve, shard_file,
                                         verify_file)
from megallama.config import config_from_dict
from megallama.errors import CheckpointError
from megallama.sharding import ShardSpec, rank_ranges, shard_specs
from parallel.init import unshard


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
