"""Data section of the megallama config (owned by the data pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Union


@dataclass
class DataSource:
    # prefix of PREFIX.bin / PREFIX.idx written by `megallama preprocess`; or a glob of prefixes, or a list of
    # prefixes/globs (the shards of `megallama preprocess --shards N`), read as one dataset in that order
    path: Union[str, List[str]] = ""
    weight: float = 1.0  # sampling proportion (normalised over all sources)
    name: str = ""
    # Size in tokens, used only by `megallama mixture` to plan a mixture whose
    # datasets are not built yet (a built dataset's .idx header wins).
    tokens: int = 0


@dataclass
class DataConfig:
    # Empty sources = the embedded default corpus (Python standard-library sources).
    sources: List[DataSource] = field(default_factory=list)
    tokenizer: str = ""  # SentencePiece .model; empty = the default corpus tokenizer
    valid_fraction: float = 0.01  # share of each source's documents held out for validation
    cache_dir: str = ""  # default corpus and sample indices are cached here; empty = ~/.cache/megallama
    # Caps that keep the embedded default corpus build around a minute on 2 cores.
    default_corpus_mb: float = 8.0  # standard-library text used for the corpus
    tokenizer_sample_mb: float = 4.0  # text sampled to train its tokenizer
    # Instruction finetuning (docs/finetuning.md): sources are `megallama preprocess-instruct`
    # prefixes; only response tokens are trained.
    instruction: bool = False
    packing: bool = True  # pack examples into rows (document-masked) or one padded example per row
