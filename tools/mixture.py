"""`megallama mixture`: sampling proportions and effective epochs per source for a token budget.

Reads the ``data.sources`` of a config (e.g. ``megallama/configs/llama_mixture.yaml``,
the paper's Table 1).  A source's size comes from its built ``.idx`` header when
it exists, otherwise from its ``tokens`` field.
"""

from __future__ import annotations

from pathlib import Path

import megallama
from megallama.data.indexed import IndexedDataset
from megallama.data.pipeline import SourcePlan
from megallama.errors import DataError

DEFAULT_CONFIG = Path(megallama.__file__).resolve().parent / "configs" / "llama_mixture.yaml"


def source_tokens(path: str, declared: int, name: str) -> int:
    if path and Path(path + ".idx").is_file():
        return IndexedDataset(path).num_tokens
    if declared > 0:
        return declared
    raise DataError(f"source '{name}' has no built dataset at '{path}.idx' and no 'tokens' size; "
                    "preprocess it or give its size in tokens")


def plan_mixture(sources, budget: int) -> list[SourcePlan]:
    total = sum(s.weight for s in sources)
    return [SourcePlan(s.name or Path(s.path).name, s.weight / total,
                       source_tokens(s.path, s.tokens, s.name or s.path), round(budget * s.weight / total))
            for s in sources]
