"""Indexed token datasets: ``PREFIX.bin`` (tokens) and ``PREFIX.idx`` (header + document offsets).

``PREFIX.idx`` layout, little-endian (see docs/data.md)::

    offset size  field
    0      8     magic  b"MLLMIDX\\0"
    8      2     version (uint16, currently 1)
    10     1     dtype code (uint8): 1 = uint16 tokens, 2 = uint32 tokens
    11     1     reserved (0)
    12     4     vocabulary size (uint32)
    16     16    tokenizer fingerprint (16 ASCII hex characters)
    32     8     number of documents D (uint64)
    40     8     number of tokens T (uint64)
    48     8*(D+1) document start offsets in tokens (uint64), first 0, last T

``PREFIX.bin`` holds exactly T tokens of that dtype.  Both files are memory-mapped
when read, so RAM does not grow with the corpus.  The writer streams to
temporary names and renames .bin then .idx at the end: an interrupted run leaves
no .idx, hence nothing that looks complete.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from megallama.data.sources import output_error
from megallama.errors import DataError

MAGIC = b"MLLMIDX\0"
VERSION = 1
HEADER = struct.Struct("<8sHBBI16sQQ")
DTYPES = {1: np.uint16, 2: np.uint32}


def dtype_for_vocab(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _code(dtype) -> int:
    return next(c for c, d in DTYPES.items() if np.dtype(d) == np.dtype(dtype))


def pack_documents(docs: Sequence[Sequence[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token lists into one array plus their lengths (no per-token Python loop)."""
    lengths = np.fromiter((len(d) for d in docs), np.uint64, len(docs))
    flat = np.concatenate([np.asarray(d, dtype) for d in docs]) if docs else np.zeros(0, dtype)
    return flat, lengths


def _offsets_ok(offsets: np.ndarray, num_tokens: int, block: int = 1 << 24) -> bool:
    """Offsets start at 0, end at T and strictly increase (checked in blocks: bounded memory)."""
    if offsets[0] != 0 or offsets[-1] != num_tokens:
        return False
    for s in range(0, len(offsets) - 1, block):
        if np.any(np.diff(offsets[s:s + block + 1]).view(np.int64) <= 0):
            return False
    return True


def _rebuild_hint(prefix: str) -> str:
    return f"rebuild it with `megallama preprocess --output-prefix {prefix} ...`"


class IndexedDatasetWriter:
    """Append tokenized documents; :meth:`finish` makes the files visible, :meth:`abort` removes the temps."""

    def __init__(self, prefix: str, vocab_size: int, fingerprint: str, force: bool = False):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = Path(self.prefix + ".bin"), Path(self.prefix + ".idx")
        for p in (self.bin_path, self.idx_path):
            if p.exists() and not force:
                raise DataError(f"'{p}' already exists; pass --force to overwrite it or choose another --output-prefix")
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size, self.fingerprint = int(vocab_size), fingerprint
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + tag)
        self._off_tmp = self.idx_path.with_name(self.idx_path.name + tag + ".offsets")
        try:
            self.bin_path.parent.mkdir(parents=True, exist_ok=True)
            self._bin = open(self._bin_tmp, "wb")
        except OSError as exc:
            raise output_error(self.prefix, "--output-prefix", exc) from None
        try:
            self._off = open(self._off_tmp, "wb")
        except OSError as exc:
            self._bin.close()
            os.unlink(self._bin_tmp)
            raise output_error(self.prefix, "--output-prefix", exc) from None
        self.num_docs = 0
        self.num_tokens = 0
        self._off.write(np.zeros(1, np.uint64).tobytes())

    def add_documents(self, docs: Sequence[Sequence[int]]) -> None:
        """Append documents (each a sequence of token ids, EOS already included)."""
        flat, lengths = pack_documents(docs, self.dtype)
        self.add_packed(flat, lengths)

    def add_packed(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths (see :func:`pack_documents`)."""
        if len(lengths) == 0:
            return
        self._bin.write(np.ascontiguousarray(flat, self.dtype).tobytes())
        ends = np.cumsum(lengths, dtype=np.uint64) + np.uint64(self.num_tokens)
        self._off.write(ends.tobytes())
        self.num_docs += len(lengths)
        self.num_tokens += int(ends[-1]) - self.num_tokens

    def finish(self) -> None:
        self._bin.close()
        self._off.close()
        idx_tmp = self.idx_path.with_name(self.idx_path.name + f".tmp-{os.getpid()}")
        with open(idx_tmp, "wb") as out, open(self._off_tmp, "rb") as offsets:
            out.write(HEADER.pack(MAGIC, VERSION, _code(self.dtype), 0, self.vocab_size,
                                  self.fingerprint.encode("ascii").ljust(16, b"0")[:16],
                                  self.num_docs, self.num_tokens))
            while block := offsets.read(1 << 20):
                out.write(block)
        os.unlink(self._off_tmp)
        if self.idx_path.exists():  # --force: the old .idx must not pair with the new .bin
            os.unlink(self.idx_path)
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(idx_tmp, self.idx_path)

    def abort(self) -> None:
        for f in (self._bin, self._off):
            f.close()
        for p in (self._bin_tmp, self._off_tmp):
            if p.exists():
                os.unlink(p)


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/.idx, validated against its header."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        idx, bin_ = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for p in (idx, bin_):
            if not p.is_file():
                raise DataError(f"dataset file '{p}' not found; build it with "
                                f"`megallama preprocess --output-prefix {self.prefix} ...` or fix data.sources path")
        size = idx.stat().st_size
        if size < HEADER.size:
            raise DataError(f"'{idx}' is truncated ({size} bytes, header needs {HEADER.size}); {_rebuild_hint(self.prefix)}")
        with open(idx, "rb") as f:
            magic, version, code, _, vocab, fp, ndocs, ntok = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise DataError(f"'{idx}' is not a megallama index (bad magic); {_rebuild_hint(self.prefix)}")
        if version != VERSION or code not in DTYPES:
            raise DataError(f"'{idx}' has unsupported version {version} / dtype code {code}; {_rebuild_hint(self.prefix)}")
        if size != HEADER.size + 8 * (ndocs + 1):
            raise DataError(f"'{idx}' is truncated or corrupt ({size} bytes, header promises "
                            f"{HEADER.size + 8 * (ndocs + 1)}); {_rebuild_hint(self.prefix)}")
        self.dtype = np.dtype(DTYPES[code])
        if bin_.stat().st_size != ntok * self.dtype.itemsize:
            raise DataError(f"'{bin_}' is truncated or corrupt ({bin_.stat().st_size} bytes, index promises "
                            f"{ntok * self.dtype.itemsize}); {_rebuild_hint(self.prefix)}")
        if ndocs == 0:
            raise DataError(f"dataset '{self.prefix}' holds no documents; preprocess a non-empty corpus")
        self.vocab_size, self.fingerprint = int(vocab), fp.decode("ascii", "replace")
        self.num_docs, self.num_tokens = int(ndocs), int(ntok)
        self.offsets = np.memmap(idx, np.uint64, "r", HEADER.size, (ndocs + 1,))
        if not _offsets_ok(self.offsets, ntok):
            raise DataError(f"'{idx}' has corrupt document offsets; {_rebuild_hint(self.prefix)}")
        self.tokens = np.memmap(bin_, self.dtype, "r", 0, (ntok,))

    def __len__(self) -> int:
        return self.num_docs

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def check_tokenizer(self, vocab_size: int, fingerprint: str, tokenizer_path: str) -> None:
        """Refuse a dataset made with another tokenizer (vocabulary or fingerprint differ)."""
        if self.vocab_size != vocab_size or self.fingerprint != fingerprint:
            raise DataError(
                f"dataset '{self.prefix}' was made with another tokenizer (vocab {self.vocab_size}, fingerprint "
                f"{self.fingerprint}) than '{tokenizer_path}' (vocab {vocab_size}, fingerprint {fingerprint}); "
                "re-run `megallama preprocess` with this tokenizer or set data.tokenizer to the one it was made with")


_GLOB = set("*?[")


def resolve_prefixes(path) -> list:
    """The dataset prefixes a data source names: one PREFIX, a glob of them (``data/web-*-of-00064``, matched
    against the ``.idx`` files), or a list of either (the shards of ``megallama preprocess --shards``), in order."""
    import glob as globlib

    entries = list(path) if isinstance(path, (list, tuple)) else [path]
    prefixes = []
    for entry in entries:
        entry = str(entry)
        if _GLOB & set(entry):
            found = sorted(p[:-len(".idx")] for p in globlib.glob(entry + ".idx"))
            if not found:
                raise DataError(f"data source path '{entry}' matches no PREFIX.idx files; build them with "
                                "`megallama preprocess --shards N` or fix the pattern in data.sources")
            prefixes.extend(found)
        else:
            prefixes.append(entry)
    if not prefixes:
        raise DataError("a data source lists no dataset prefixes; give a PREFIX, a glob or a list of them")
    return prefixes


class IndexedDatasetGroup:
    """Several PREFIX.bin/.idx (the shards of one source) read as one dataset: documents in the listed order."""

    def __init__(self, prefixes):
        self.parts = [IndexedDataset(p) for p in prefixes]
        first = self.parts[0]
        for p in self.parts[1:]:
            if (p.vocab_size, p.fingerprint) != (first.vocab_size, first.fingerprint):
                raise DataError(f"dataset shards '{first.prefix}' and '{p.prefix}' were made with different tokenizers; "
                                "preprocess every shard of a source with the same --tokenizer")
        self.prefix = first.prefix + (f" (+{len(self.parts) - 1} more shards)" if len(self.parts) > 1 else "")
        self.vocab_size, self.fingerprint, self.dtype = first.vocab_size, first.fingerprint, first.dtype
        self.num_docs = sum(p.num_docs for p in self.parts)
        self.num_tokens = sum(p.num_tokens for p in self.parts)
        self._first_doc = np.cumsum([0] + [p.num_docs for p in self.parts])

    def __len__(self) -> int:
        return self.num_docs

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths for p in self.parts])

    def document(self, i: int) -> np.ndarray:
        part = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        return self.parts[part].document(i - int(self._first_doc[part]))

    def check_tokenizer(self, vocab_size: int, fingerprint: str, tokenizer_path: str) -> None:
        for p in self.parts:
            p.check_tokenizer(vocab_size, fingerprint, tokenizer_path)


def open_dataset(path):
    """A data source's dataset: :class:`IndexedDataset` for one prefix, :class:`IndexedDatasetGroup` for several."""
    prefixes = resolve_prefixes(path)
    return IndexedDataset(prefixes[0]) if len(prefixes) == 1 else IndexedDatasetGroup(prefixes)
