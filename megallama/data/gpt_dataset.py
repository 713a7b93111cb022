"""Fixed-length training samples over an indexed dataset, and weighted blends of several.

:class:`GPTDataset` follows Megatron's GPTDataset: per epoch the documents are
shuffled (``doc_idx``), concatenated into one token stream, and cut into
samples of ``seq_len + 1`` tokens that run across document boundaries
(consecutive samples share one token, the next-token target).  Sample ``j``
starts at stream position ``j * seq_len``; ``sample_pos/sample_off`` record which
``doc_idx`` entry and offset that is, and ``shuffle`` permutes the samples.  As
many epochs are stacked as the requested number of samples needs.  All index
arrays are built vectorised with numpy and cached as .npy files that are
memory-mapped when read, and the tokens themselves are memory-mapped, so RAM
does not grow with the corpus.

:class:`BlendedDataset` interleaves datasets with given weights, deterministically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megallama.data.cache import build_once
from megallama.data.indexed import IndexedDataset
from megallama.errors import DataError

INDEX_VERSION = 1
_INDEX_ARRAYS = ("doc_idx", "sample_pos", "sample_off", "shuffle")


def build_sample_index(lengths: np.ndarray, doc_ids: np.ndarray, seq_len: int, num_samples: int,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four index arrays for ``num_samples`` samples (see the module docstring)."""
    tokens_per_epoch = int(lengths[doc_ids].sum())
    epochs = math.ceil((num_samples * seq_len + 1) / tokens_per_epoch)
    doc_idx = np.concatenate([rng.permutation(doc_ids) for _ in range(epochs)])
    doc_len = lengths[doc_idx]
    ends = np.cumsum(doc_len)
    starts = np.arange(num_samples, dtype=np.int64) * seq_len
    pos = np.searchsorted(ends, starts, side="right")
    off = starts - (ends[pos] - doc_len[pos])
    shuffle = rng.permutation(num_samples)
    return dict(doc_idx=doc_idx.astype(np.int64), sample_pos=pos.astype(np.int64),
                sample_off=off.astype(np.int64), shuffle=shuffle.astype(np.int64))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, np.int64).tobytes()).hexdigest()


def _cache_key(indexed: IndexedDataset, lengths: np.ndarray, doc_ids: np.ndarray, seq_len: int, num_samples: int,
               seed: Sequence[int]) -> str:
    """Names the cached index; changes whenever the documents, the split, the sizes or the seed do."""
    meta = dict(v=INDEX_VERSION, prefix=os.path.abspath(indexed.prefix), fp=indexed.fingerprint,
                tokens=indexed.num_tokens, lengths=_digest(lengths), ids=_digest(doc_ids), seq_len=seq_len,
                n=num_samples, seed=list(seed))
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]


class GPTDataset:
    """``num_samples`` samples of ``seq_len + 1`` tokens (numpy int64) from documents ``doc_ids``."""

    def __init__(self, indexed: IndexedDataset, doc_ids: np.ndarray, seq_len: int, num_samples: int,
                 seed: Sequence[int], cache_dir: Optional[Path] = None, split: str = "train"):
        self.indexed, self.seq_len, self.num_samples = indexed, int(seq_len), int(num_samples)
        lengths = indexed.lengths
        self.tokens_per_epoch = int(lengths[doc_ids].sum())
        if self.tokens_per_epoch < seq_len + 1:
            raise DataError(f"the {split} split of dataset '{indexed.prefix}' holds {self.tokens_per_epoch} tokens, "
                            f"fewer than train.seq_len + 1 = {seq_len + 1}; lower train.seq_len or give more data"
                            + (" (or raise data.valid_fraction)" if split == "valid" else ""))
        self.epochs = (self.num_samples * self.seq_len + 1) / self.tokens_per_epoch

        def build() -> dict[str, np.ndarray]:
            rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
            return build_sample_index(lengths, np.asarray(doc_ids, np.int64), self.seq_len, self.num_samples, rng)

        def build_into(out: Path) -> None:
            for name, arr in build().items():
                np.save(out / f"{name}.npy", arr)

        if cache_dir is None:
            arrays = build()
        else:
            key = _cache_key(indexed, lengths, doc_ids, seq_len, num_samples, seed)
            entry = build_once(Path(cache_dir) / key, build_into)
            arrays = {n: np.load(entry / f"{n}.npy", mmap_mode="r") for n in _INDEX_ARRAYS}
        self.doc_idx, self.sample_pos = arrays["doc_idx"], arrays["sample_pos"]
        self.sample_off, self.shuffle = arrays["sample_off"], arrays["shuffle"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        j = int(self.shuffle[i])
        return self.sample_at(int(self.sample_pos[j]), int(self.sample_off[j]))

    def sample_at(self, pos: int, off: int) -> np.ndarray:
        """``seq_len + 1`` tokens starting ``off`` tokens into document ``doc_idx[pos]``."""
        need, parts = self.seq_len + 1, []
        while need:
            doc = self.indexed.document(int(self.doc_idx[pos]))
            n = min(len(doc) - off, need)
            parts.append(doc[off:off + n])
            need -= n
            pos, off = pos + 1, 0
        return np.concatenate(parts).astype(np.int64)


BLEND_PERIOD = 1 << 16


def blend_pattern(weights: Sequence[float], period: int = BLEND_PERIOD) -> tuple[np.ndarray, np.ndarray]:
    """One period of the blend: which dataset serves each slot, and that dataset's running count.

    Dataset ``d`` gets slots at the ideal times ``(k + 0.5) / w_d``; merging these
    sequences gives every prefix within ``0.5 + D * w_d / 2`` samples of dataset ``d``'s
    exact share among ``D`` datasets (no sampling noise at all): each count is
    ``floor(w_d t + 0.5)`` at the prefix's last time ``t``, and the D roundings move
    ``t`` at most ``D / 2`` from the prefix length.  The pattern repeats every ``period`` samples, so a blend of any
    length needs O(period) memory.
    """
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    ids, ks, times = [], [], []
    for d, wd in enumerate(w):
        k = np.arange(int(math.ceil(wd * period)) + 1)
        ids.append(np.full(len(k), d, np.int64))
        ks.append(k)
        times.append((k + 0.5) / wd)
    order = np.argsort(np.concatenate(times), kind="stable")[:period]
    return np.concatenate(ids)[order], np.concatenate(ks)[order]


class BlendedDataset:
    """Interleave ``datasets`` so that any stretch of samples follows ``weights``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int, period: int = BLEND_PERIOD):
        self.datasets, self.num_samples = list(datasets), int(num_samples)
        self.period = min(period, self.num_samples)
        self.pattern_ds, self.pattern_k = blend_pattern(weights, self.period)
        self.per_period = np.bincount(self.pattern_ds, minlength=len(self.datasets))

    @staticmethod
    def samples_needed(weights: Sequence[float], num_samples: int, period: int = BLEND_PERIOD) -> np.ndarray:
        """How many samples each dataset must provide for a blend of ``num_samples``."""
        period = min(period, num_samples)
        ds, _ = blend_pattern(weights, period)
        full, rest = divmod(num_samples, period)
        return full * np.bincount(ds, minlength=len(weights)) + np.bincount(ds[:rest], minlength=len(weights))

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset, sample within it) of blended sample ``i``."""
        q, r = divmod(i, self.period)
        d = int(self.pattern_ds[r])
        return d, int(q * self.per_period[d] + self.pattern_k[r])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        d, k = self.locate(i)
        return self.datasets[d][k]
