"""Streaming checkpoint writing for the offline tools: one tensor (or one TP slice of it) in memory at
a time, never the model.

- :class:`SafetensorsWriter` writes a ``.safetensors`` file whose tensors are declared up front (name,
  dtype, shape): the header first, then each tensor's bytes as it arrives, hashing (sha256) as it
  goes and fsyncing at the end.  Its files equal ``safetensors.torch.save``'s byte for byte (same
  header JSON, same order: by dtype size descending, then name), so any safetensors reader loads them.
- :func:`write_checkpoint_from` writes a checkpoint at the layout ``cfg.parallel`` from a tensor
  *source* (:class:`ReaderSource`: another checkpoint's slice reads; :class:`BuildSource`: a function
  that makes one full tensor, e.g. from an imported model's files), file by file and tensor by tensor,
  with the same ``meta.json`` that :func:`megallama.checkpoint.write_checkpoint` writes.

Peak memory: one full tensor plus one TP slice of it (:class:`BuildSource`), or one TP slice
(:class:`ReaderSource`: :meth:`CheckpointReader.read_shard` reads only the slice's bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from megallama.atomic import building, check_new_output, commit_directory, fsync_write
from megallama.checkpoint.format import IO_BYTES, MOMENTS, copy_tokenizer, layout_record, new_meta, part_file, step_name
from megallama.checkpoint.reader import CheckpointReader
from megallama.config import Config, ModelConfig
from megallama.errors import CheckpointError
from megallama.sharding import ShardSpec, reshard_tensor, shard_specs, stage_assignment

# torch dtype -> safetensors dtype name
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")


def _check_shape(name: str, tensor: torch.Tensor, spec: ShardSpec, model_cfg: ModelConfig) -> None:
    """A full tensor must have the configured shape; vocabulary rows may carry any TP padding."""
    shape, want = tuple(tensor.shape), tuple(spec.shape)
    if name in VOCAB_PARAMS and len(shape) == 2 and shape[1] == want[1] and shape[0] >= model_cfg.vocab_size:
        return
    if shape != want:
        raise CheckpointError(f"parameter '{name}' has shape {shape}, the config needs {want}; "
                              "the source is of another model shape (check its config/params)")


def _open(path: Path):
    """The file a :class:`SafetensorsWriter` writes (a seam for tests that make a write fail)."""
    return open(path, "wb")


def safetensors_order(entries: Iterable[tuple]) -> list[tuple]:
    """``(name, dtype, shape)`` entries in the order safetensors stores them: larger dtypes first, then
    by name (``safetensors.torch.save`` sorts so; all our tensors are fp32: by name)."""
    return sorted(entries, key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0]))


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in :func:`safetensors_order` of ``entries``.

    ``write(name, tensor)`` must be called in that order (:attr:`order` lists it); ``close()``
    fsyncs and returns ``{"bytes", "sha256"}`` (as ``meta.json`` records files)."""

    def __init__(self, path: str | Path, entries: Iterable[tuple], metadata: Optional[dict] = None):
        self.path = Path(path)
        self.order = safetensors_order(entries)
        header, offset = ({"__metadata__": metadata} if metadata else {}), 0
        self._expect = []
        for name, dtype, shape in self.order:
            if dtype not in DTYPES:
                raise ValueError(f"safetensors cannot store dtype {dtype} ('{name}')")
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._expect.append((name, dtype, tuple(int(s) for s in shape), nbytes))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self._hash, self._bytes, self._next = hashlib.sha256(), 0, 0
        self._file = _open(self.path)
        try:
            self._emit(struct.pack("<Q", len(text)) + text)
        except BaseException:
            self._file.close()
            raise

    def _emit(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    @property
    def pending(self) -> Optional[str]:
        """The name the next :meth:`write` must carry (None when all are written)."""
        return self.order[self._next][0] if self._next < len(self.order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._expect) or self._expect[self._next][0] != name:
            raise ValueError(f"{self.path.name}: wrote '{name}', expected '{self.pending}' (safetensors order)")
        _, dtype, shape, nbytes = self._expect[self._next]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: '{name}' is {tensor.dtype} {tuple(tensor.shape)}, declared "
                             f"{dtype} {shape}")
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if nbytes:
            self._emit(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1
        IO_BYTES["written"] += nbytes

    def close(self) -> dict:
        try:
            if self._next != len(self._expect):
                raise ValueError(f"{self.path.name}: '{self.pending}' was never written")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        return {"bytes": self._bytes, "sha256": self._hash.hexdigest()}

    def abort(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------- reading

class StreamingReader(CheckpointReader):
    """A :class:`~megallama.checkpoint.CheckpointReader` that maps each file only for one read.

    ``safe_open`` maps a whole file and every page a read touches stays resident (counted in the
    process's RSS) while the file is open; the reader keeps its files open, so reading a whole
    checkpoint through it grows RSS to the checkpoint's size.  This one verifies each file once (as
    the reader does, when first used) and closes its files after each tensor (or slice) read:
    resident pages stay one tensor."""

    def __init__(self, ckpt, verify: bool | str = True):
        super().__init__(ckpt, verify)
        self._verified = set()

    def _open(self, name: str):
        if name in self._verified:  # checked already: the base class would hash it again
            verify, self.verify = self.verify, False
            try:
                return super()._open(name)
            finally:
                self.verify = verify
        handle = super()._open(name)
        self._verified.add(name)
        return handle

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        try:
            return super().full(name, key)
        finally:
            self._files.clear()  # unmapped: the pages this tensor's read touched leave this process

    def read(self, *args, **kwargs) -> torch.Tensor:
        try:
            return super().read(*args, **kwargs)
        finally:
            self._files.clear()


# ----------------------------------------------------------------------------- tensor sources

class ReaderSource:
    """Another checkpoint's tensors (weights and, with ``moments``, Adam moments), read slice by slice."""

    def __init__(self, reader: "CheckpointReader", moments: bool = True):
        self.reader, self.names = reader, reader.names()
        self.moments = moments and reader.has_optimizer

    def shard(self, name: str, key: Optional[str], spec: ShardSpec, rank: int, tp: int) -> torch.Tensor:
        return self.reader.read_shard(name, key, spec, rank, tp)


class BuildSource:
    """Full tensors made one at a time by ``build(name, key)`` (``key`` None: the weight); the last one
    is kept while its TP slices are written.  Its shape is checked against the config."""

    def __init__(self, names: Iterable[str], build: Callable[[str, Optional[str]], torch.Tensor],
                 moments: bool = False):
        self.names, self.build, self.moments = list(names), build, moments
        self._last = (None, None)
        self.model_cfg = None  # set by write_checkpoint_from (vocabulary rows may carry any padding)

    def shard(self, name: str, key: Optional[str], spec: ShardSpec, rank: int, tp: int) -> torch.Tensor:
        if self._last[0] != (name, key):
            self._last = (None, None)  # drop the previous tensor before building the next
            self._last = ((name, key), self.build(name, key).float())
        full = self._last[1]
        if key is None:
            _check_shape(name, full, spec, self.model_cfg)
        return reshard_tensor(full, spec, rank, tp)


def dict_source(weights: dict, moments: Optional[dict] = None) -> BuildSource:
    """A :class:`BuildSource` over in-memory full tensors (what ``write_checkpoint`` takes)."""
    return BuildSource(weights, lambda n, k: weights[n] if k is None else moments[f"{n}/{k}"], moments is not None)


# ----------------------------------------------------------------------------- writing

def _tensor_name(name: str, key: Optional[str]) -> str:
    return name if key is None else f"{name}/{key}"


def write_checkpoint_from(out: str | Path, cfg: Config, source, step: int = 0, consumed_samples: int = 0,
                          tokenizer_path: Optional[str] = None, extra_meta: Optional[dict] = None) -> Path:
    """:func:`megallama.checkpoint.write_checkpoint` from a tensor source, tensor by tensor.

    ``source`` has ``names`` (the canonical parameters it holds), ``moments`` (whether it has Adam
    moments) and ``shard(name, key, spec, rank, tp)``: TP ``rank``'s shard (at ``tp``) of the full
    tensor.  Each (TP, PP) file is streamed through a :class:`SafetensorsWriter`; the TP files of a
    stage are written side by side so a :class:`BuildSource` builds each full tensor once."""
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"output '{out}' already exists; choose a new path or remove it")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    specs = shard_specs(cfg.model, tp)
    names = set(source.names)
    missing = sorted(set(specs) - names)
    if missing:
        raise CheckpointError(f"weights lack {len(missing)} parameters of the configured model, e.g. "
                              f"'{missing[0]}'; the source is of another model shape")
    extra = sorted(names - set(specs))
    if extra:
        raise CheckpointError(f"weights hold {len(extra)} parameters the configured model lacks, e.g. "
                              f"'{extra[0]}'; the source is of another model shape")
    if isinstance(source, BuildSource):
        source.model_cfg = cfg.model
    stage_of = stage_assignment(cfg.model, pp, cfg.parallel.pipeline_partition)
    kinds = [("model", (None,))] + ([("optim", MOMENTS)] if source.moments else [])
    with building(out) as tmp:
        written = {}
        for s in range(pp):
            for kind, keys in kinds:
                writers, held_of = {}, {}
                try:
                    for t in range(tp):
                        held = [n for n in specs if stage_of[n] == s and (t == 0 or specs[n].dim is not None)]
                        entries = []
                        for n in held:
                            local = list(specs[n].shape)
                            if specs[n].dim is not None:
                                local[specs[n].dim] //= tp
                            numel = int(np.prod(local, dtype=np.int64))
                            entries += [(_tensor_name(n, k), torch.float32, (numel,)) for k in keys]
                        if entries:
                            writers[t] = SafetensorsWriter(tmp / part_file(kind, t, s, 0), entries)
                            held_of[t] = {e[0]: [0, int(e[2][0])] for e in entries}
                    for tensor in sorted({e[0] for w in writers.values() for e in w.order}):  # all fp32: by name
                        name, _, key = tensor.partition("/")
                        for t, w in writers.items():
                            if w.pending == tensor:
                                w.write(tensor, source.shard(name, key or None, specs[name], t, tp)
                                        .float().reshape(-1))
                    for t, w in writers.items():
                        file = part_file(kind, t, s, 0)
                        written[(t, s, kind)] = (file, w.close(), held_of[t])
                except BaseException:
                    for w in writers.values():
                        w.abort()
                    raise
        files, parts = {}, {}
        for t in range(tp):  # meta.json lists the files in write_checkpoint's order
            for s in range(pp):
                for kind, _ in kinds:
                    if (t, s, kind) in written:
                        file, info, held = written[(t, s, kind)]
                        files[file], parts[file] = info, held
        copied = copy_tokenizer(tokenizer_path, tmp)
        if copied:
            files[copied[0]] = copied[1]
        meta = new_meta(cfg, layout_record(cfg, tp, pp, 1), step, consumed_samples,
                        lr_scheduler_last_epoch=step if source.moments else None, stage_of=stage_of,
                        files=files, parts=parts)
        meta.update(extra_meta or {})  # a tool's own record (reshard: the source's schedule and layout)
        fsync_write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        commit_directory(tmp, out)
    return out


def write_run_checkpoint_from(run_dir: str | Path, cfg: Config, source, step: int = 0, consumed_samples: int = 0,
                              tokenizer_path: Optional[str] = None, extra_meta: Optional[dict] = None) -> Path:
    """:func:`megallama.checkpoint.write_run_checkpoint` (a new run directory) from a tensor source."""
    run_dir = check_new_output(run_dir)
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))
    with building(run_dir) as tmp:  # the whole run dir appears at once, or not at all
        (tmp / "checkpoints").mkdir(parents=True)
        final = write_checkpoint_from(tmp / "checkpoints" / step_name(step), cfg, source, step,
                                      consumed_samples, tokenizer_path, extra_meta)
        fsync_write(tmp / "checkpoints" / "latest", final.name.encode())
        commit_directory(tmp, run_dir)
    return run_dir / "checkpoints" / final.name
