"""The pieces of curation shared by its stages (section 2.1 of the paper): line keys, MinHash signatures.

The run itself, sharded and resumable (line-level and exact dedup by hash
partition, MinHash/LSH near dedup as bucket -> cluster -> filter), is
:mod:`megallama.data.shards`; the per-source document steps are
:mod:`megallama.data.steps`.  Here:

* CCNet's line key for line-level dedup (:func:`normalize_line`);
* MinHash signatures of word 5-gram shingles (:class:`MinHashLSH`): the
  estimated Jaccard similarity of two documents is the share of equal entries.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megallama.errors import ConfigError

SOURCES = ("web", "c4", "code", "wiki", "books", "arxiv", "qa")


@dataclass
class CurateConfig:
    source: str = "web"
    near_dup_threshold: float = 0.9  # estimated Jaccard similarity of shingle sets; 0 disables near dedup
    num_perm: int = 128
    bands: int = 16  # LSH bands of num_perm/bands rows: candidates above ~(1/bands)^(rows/num_perm) similarity
    shingle_words: int = 5
    seed: int = 1

    def check(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"--source must be one of {', '.join(SOURCES)}, got '{self.source}'")
        if not 0 <= self.near_dup_threshold <= 1:
            raise ConfigError(f"--near-dup-threshold must be in [0, 1], got {self.near_dup_threshold}")
        if self.num_perm % self.bands:
            raise ConfigError(f"num_perm ({self.num_perm}) must be divisible by bands ({self.bands})")


def hash64(data: str) -> int:
    """An 8-byte BLAKE2b hash of the text (line keys, whole documents)."""
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8"), digest_size=8).digest(), "little")


_DIGITS = re.compile(r"\d")
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_line(line: str) -> str:
    """CCNet-style line key: lower case, digits to 0, surrounding whitespace stripped."""
    return _DIGITS.sub("0", line.strip().lower())


# ----------------------------------------------------------------------------- MinHash / LSH

class MinHashLSH:
    """MinHash signatures of word shingles (num_perm 32-bit minima of seeded universal hashes)."""

    _MASK32 = np.uint64(0xFFFFFFFF)

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.a = rng.integers(1, 2**63, cfg.num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, cfg.num_perm, dtype=np.uint64)

    def shingle_hashes(self, text: str) -> np.ndarray:
        words = np.array([zlib.crc32(w.encode("utf-8")) for w in _WORD.findall(text.lower())], np.uint64)
        k = min(self.cfg.shingle_words, len(words))
        if k == 0:
            return words
        n = len(words) - k + 1
        h = np.zeros(n, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):  # polynomial combination of k consecutive word hashes (wraps mod 2^64)
                h = h * np.uint64(1_000_003) + words[j:j + n]
        return np.unique(h)

    def signature(self, text: str) -> Optional[np.ndarray]:
        shingles = self.shingle_hashes(text)
        if len(shingles) == 0:
            return None
        sig = np.full(self.cfg.num_perm, np.iinfo(np.uint32).max, np.uint64)
        with np.errstate(over="ignore"):
            for s in range(0, len(shingles), 4096):  # bounded memory: num_perm x 4096 at a time
                block = (self.a[:, None] * shingles[None, s:s + 4096] + self.b[:, None]) >> np.uint64(32)
                sig = np.minimum(sig, block.min(axis=1))
        return sig.astype(np.uint32)
