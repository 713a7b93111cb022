"""What the trainer calls: :func:`build_datasets` and :func:`micro_batches`.

``build_datasets`` opens the configured sources (or builds the embedded default
corpus), checks them against the tokenizer, holds out a validation split per
source, and blends the sources by weight into train and valid datasets of
exactly the sizes the run needs.  ``micro_batches`` turns a dataset into each
data-parallel rank's stream of micro-batches under a fixed ordering contract,
so a resumed run (or any parallel layout) sees exactly the same samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from megallama.data.cache import build_once, cache_root
from megallama.data.config import DataSource
from megallama.data.gpt_dataset import BlendedDataset, GPTDataset
from megallama.data.indexed import open_dataset
from megallama.data.instruct import InstructDataset, InstructionSet
from megallama.data.tokenizer import SETTINGS, Tokenizer
from megallama.errors import ConfigError, DataError, UserError, say

DEFAULT_CORPUS_VERSION = 1
SPLIT_SEED = 20230227  # fixed: the validation documents do not change with train.seed
SPLITS = {"train": 0, "valid": 1}


@dataclass
class SourcePlan:
    """One row of the mixture table: a source's share, size and effective epochs."""

    name: str
    weight: float  # normalised sampling proportion
    tokens: int  # tokens available (the train split when built)
    sampled_tokens: int  # tokens drawn from it for the budget

    @property
    def epochs(self) -> float:
        return self.sampled_tokens / self.tokens if self.tokens else float("inf")


@dataclass
class DataBundle:
    train: object  # len() and [i] -> np.int64 array of seq_len + 1
    valid: Optional[object]  # None when data.valid_fraction == 0
    tokenizer: Tokenizer
    tokenizer_path: str
    plan: List[SourcePlan] = field(default_factory=list)

    def describe(self) -> str:
        return format_plan(self.plan)


def epochs_of(dataset) -> float:
    """Passes over its split's data that ``dataset`` makes (a blend: its most repeated source)."""
    return max(getattr(part, "epochs", 0.0) for part in getattr(dataset, "datasets", [dataset]))


def validation_note(data: "DataBundle", cfg) -> Optional[str]:
    """A line saying that every evaluation reads its samples more than once, or None."""
    if data.valid is None or (epochs := epochs_of(data.valid)) <= 1:
        return None
    t = cfg.train
    return (f"note: each evaluation reads the valid split {epochs:.1f} times over "
            f"(train.eval_iters x train.global_batch_size = {max(1, t.eval_iters) * t.global_batch_size:,} samples): "
            "its loss averages repeated samples; lower train.eval_iters or raise data.valid_fraction")


def format_plan(plan: Sequence[SourcePlan]) -> str:
    """The paper's Table 1 columns: sampling proportion, size, epochs."""
    head = f"{'source':<16}{'sampling prop.':>15}{'tokens':>16}{'sampled tokens':>18}{'epochs':>8}"
    rows = [f"{p.name:<16}{100 * p.weight:>14.1f}%{p.tokens:>16,}{p.sampled_tokens:>18,}{p.epochs:>8.2f}" for p in plan]
    return "\n".join([head, "-" * len(head), *rows])


# ----------------------------------------------------------------------------- default corpus

def stdlib_files(limit_bytes: int) -> List[Path]:
    """UTF-8 .py files of this interpreter's standard library (tests and site-packages excluded), sorted, capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    chosen, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            size = len(path.read_bytes().decode("utf-8").encode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if total + size > limit_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def _log(msg: str) -> None:
    say(f"megallama data: {msg}")


def _build_default_corpus(out: Path, vocab_size: int, corpus_mb: float, sample_mb: float) -> None:
    from megallama.data.preprocess import preprocess
    from megallama.data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    files = stdlib_files(int(corpus_mb * 1e6))
    if not files:
        raise DataError(f"no readable standard-library sources under '{sysconfig.get_paths()['stdlib']}'; "
                        "give data.sources and data.tokenizer explicitly")
    _log(f"building the default corpus from {len(files)} standard-library files into {out.parent} (once) ...")
    texts = (p.read_text(encoding="utf-8") for p in files)
    try:
        train_tokenizer(texts, vocab_size, str(out / "tokenizer"), sample_mb=sample_mb, seed=0)
    except DataError as exc:
        raise ConfigError(f"model.vocab_size={vocab_size} does not suit the default corpus tokenizer ({exc})") from None
    _log(f"trained a {vocab_size}-piece tokenizer in {time.perf_counter() - t0:.1f}s; tokenizing ...")
    report = preprocess([str(p) for p in files], str(out / "tokenizer.model"), str(out / "corpus"))
    (out / "files.txt").write_text("".join(f"{p}\n" for p in files))
    _log(f"default corpus: {report.line()}; total {time.perf_counter() - t0:.1f}s")


def default_corpus(vocab_size: int, cache_dir: str = "", corpus_mb: float = 8.0,
                   sample_mb: float = 4.0) -> tuple[str, str]:
    """(dataset prefix, tokenizer path) of the cached standard-library corpus, building it once."""
    key = dict(v=DEFAULT_CORPUS_VERSION, python=sys.version, stdlib=sysconfig.get_paths()["stdlib"],
               vocab=vocab_size, corpus_mb=corpus_mb, sample_mb=sample_mb, settings=SETTINGS)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"py{sys.version_info.major}.{sys.version_info.minor}-vocab{vocab_size}-{digest}"
    entry = build_once(cache_root(cache_dir) / "default-corpus" / name,
                       lambda tmp: _build_default_corpus(tmp, vocab_size, corpus_mb, sample_mb))
    return str(entry / "corpus"), str(entry / "tokenizer.model")


# ----------------------------------------------------------------------------- datasets

def split_documents(num_docs: int, valid_fraction: float, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(train doc ids, valid doc ids): a fixed pseudo-random ``valid_fraction`` of the documents is held out."""
    if valid_fraction <= 0:
        return np.arange(num_docs, dtype=np.int64), np.zeros(0, np.int64)
    if num_docs < 2:
        raise DataError(f"dataset '{prefix}' holds a single document, too few to hold out a validation split; "
                        "set data.valid_fraction=0 or add documents")
    n_valid = min(num_docs - 1, max(1, round(valid_fraction * num_docs)))
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_docs)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def source_name(path) -> str:
    """A source's display name from its path: the prefix's name (the first one of a list)."""
    return Path(path[0] if isinstance(path, (list, tuple)) and path else str(path)).name


def check_sources(sources: Sequence[DataSource], writer: str = "megallama preprocess", config: str = "") -> None:
    """Every source names a dataset and has a positive, finite sampling weight (``config``: the file
    to name in the error)."""
    fix = f"; fix it in '{config}'" if config else ""
    for i, s in enumerate(sources):
        if not s.path:
            raise ConfigError(f"data.sources[{i}].path is empty; set it to a PREFIX written by `{writer}`{fix}")
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise ConfigError(f"data.sources[{i}].weight must be positive, got {s.weight}{fix}")


def _check_config(cfg) -> None:
    d = cfg.data
    if not 0 <= d.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction}")
    check_sources(d.sources)
    for name in ("default_corpus_mb", "tokenizer_sample_mb"):  # else blamed on model.vocab_size below
        if not getattr(d, name) > 0:
            raise ConfigError(f"data.{name} must be a positive number of megabytes, got {getattr(d, name)}")
    if d.sources and not d.tokenizer:
        raise ConfigError("data.tokenizer is empty but data.sources is set; set it to the .model file "
                          "the sources were preprocessed with")
    if d.tokenizer and not d.sources:
        raise ConfigError("data.tokenizer is set but data.sources is empty; the default corpus trains its own "
                          "tokenizer: clear data.tokenizer or list the datasets made with it in data.sources")


def _blend(parts: List[GPTDataset], weights: Sequence[float], num_samples: int):
    return parts[0] if len(parts) == 1 else BlendedDataset(parts, weights, num_samples)


def build_datasets(cfg) -> DataBundle:
    """Train and valid datasets for ``cfg`` (a megallama.config.Config), sized for the whole run."""
    if cfg.data.instruction:
        return build_instruct_datasets(cfg)
    _check_config(cfg)
    d, t = cfg.data, cfg.train
    if d.sources:
        sources, tok_path = list(d.sources), d.tokenizer
    else:
        prefix, tok_path = default_corpus(cfg.model.vocab_size, d.cache_dir, d.default_corpus_mb, d.tokenizer_sample_mb)
        sources = [DataSource(path=prefix, weight=1.0, name="stdlib")]
    tok = Tokenizer(tok_path)
    if cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of "
                          f"'{tok_path}' ({tok.vocab_size}); set model.vocab_size to at least {tok.vocab_size}")
    weights = [s.weight for s in sources]
    n_train = t.total_steps() * t.global_batch_size
    n_valid = max(1, t.eval_iters) * t.global_batch_size
    need = {"train": BlendedDataset.samples_needed(weights, n_train)}
    if d.valid_fraction > 0:
        need["valid"] = BlendedDataset.samples_needed(weights, n_valid)
    index_dir = cache_root(d.cache_dir) / "index"
    parts: dict[str, List[GPTDataset]] = {split: [] for split in need}
    for i, s in enumerate(sources):
        indexed = open_dataset(s.path)
        indexed.check_tokenizer(tok.vocab_size, tok.fingerprint, tok_path)
        ids = dict(zip(("train", "valid"), split_documents(indexed.num_docs, d.valid_fraction, indexed.prefix)))
        for split, counts in need.items():
            parts[split].append(GPTDataset(indexed, ids[split], t.seq_len, max(1, int(counts[i])),
                                           seed=(t.seed, i, SPLITS[split]), cache_dir=index_dir, split=split))
    plan = [SourcePlan(s.name or source_name(s.path), w / sum(weights), ds.tokens_per_epoch,
                       int(n) * t.seq_len) for s, w, ds, n in zip(sources, weights, parts["train"], need["train"])]
    return DataBundle(train=_blend(parts["train"], weights, n_train),
                      valid=_blend(parts["valid"], weights, n_valid) if "valid" in parts else None,
                      tokenizer=tok, tokenizer_path=tok_path, plan=plan)


def build_instruct_datasets(cfg):
    """Train/valid :class:`InstructDataset` of ``data.sources`` (blended by weight), as a DataBundle."""
    d, t = cfg.data, cfg.train
    if not d.sources or not d.tokenizer:
        raise ConfigError("data.instruction needs data.sources (prefixes written by `megallama preprocess-instruct`) "
                          "and data.tokenizer (the .model they were made with)")
    if not 0 <= d.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction}")
    check_sources(d.sources, "megallama preprocess-instruct")
    tok = Tokenizer(d.tokenizer)
    if cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of "
                          f"'{d.tokenizer}' ({tok.vocab_size}); set model.vocab_size to at least {tok.vocab_size}")
    weights = [s.weight for s in d.sources]
    n_train, n_valid = t.total_steps() * t.global_batch_size, max(1, t.eval_iters) * t.global_batch_size
    need = {"train": BlendedDataset.samples_needed(weights, n_train)}
    if d.valid_fraction > 0:
        need["valid"] = BlendedDataset.samples_needed(weights, n_valid)
    parts: dict = {split: [] for split in need}
    for i, s in enumerate(d.sources):
        examples = InstructionSet(s.path)
        examples.tokens.check_tokenizer(tok.vocab_size, tok.fingerprint, d.tokenizer)
        ids = dict(zip(("train", "valid"), split_documents(len(examples), d.valid_fraction, s.path)))
        for split, counts in need.items():
            parts[split].append(InstructDataset(examples, ids[split], t.seq_len, max(1, int(counts[i])), d.packing,
                                                (t.seed, i, SPLITS[split]), tok.eos_id))

    def blend(split: str, n: int) -> Optional[object]:
        if split not in parts:
            return None
        return parts[split][0] if len(parts[split]) == 1 else BlendedDataset(parts[split], weights, n)

    plan = [SourcePlan(s.name or Path(s.path).name, w / sum(weights), int(ds.examples.tokens.num_tokens),
                       int(n) * t.seq_len) for s, w, ds, n in zip(d.sources, weights, parts["train"], need["train"])]
    return DataBundle(train=blend("train", n_train), valid=blend("valid", n_valid), tokenizer=tok,
                      tokenizer_path=d.tokenizer, plan=plan)


def micro_batches(dataset, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> Iterator["torch.LongTensor"]:
    """This rank's micro-batches ``[micro_batch_size, seq_len + 1]``, forever, from ``consumed_samples`` on.

    Global batch ``k`` is dataset samples ``[k*G, (k+1)*G)`` (modulo ``len(dataset)``);
    rank ``r`` owns the contiguous slice ``[r*G/dp, (r+1)*G/dp)`` and yields it in
    consecutive chunks of ``micro_batch_size``.  Only this rank's samples are read.
    """
    import torch

    G, mbs = global_batch_size, micro_batch_size
    if G <= 0 or mbs <= 0 or dp_size <= 0 or G % (mbs * dp_size):
        raise ConfigError(f"global batch {G} must be a positive multiple of micro_batch_size*dp = {mbs}*{dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    if consumed_samples < 0 or consumed_samples % G:
        raise UserError(f"consumed_samples {consumed_samples} is not a multiple of the global batch {G}; "
                        "resume from a checkpoint saved with the same train.global_batch_size")
    n, per_rank = len(dataset), G // dp_size
    k = consumed_samples // G
    while True:
        base = k * G + dp_rank * per_rank
        for m in range(0, per_rank, mbs):
            rows = [dataset[(base + m + j) % n] for j in range(mbs)]
            yield torch.from_numpy(np.stack(rows))
        k += 1
