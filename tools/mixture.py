"""`megallama mixture`: sampling proportions and effective epochs per source for a token budget.

Reads the ``data.sources`` of a config (e.g. ``megallama/configs/llama_mixture.yaml``,
the paper's Table 1).  A source's size comes from its built ``.idx`` header when
it exists, otherwise from its ``tokens`` field.
"""

from __future__ import annotations

from pathlib import Path

import megallama
from megallama.data.indexed import open_dataset, resolve_prefixes
from megallama.data.pipeline import SourcePlan, source_name
from megallama.errors import DataError

DEFAULT_CONFIG = Path(megallama.__file__).resolve().parent / "configs" / "llama_mixture.yaml"


def _built(path) -> bool:
    try:
        return bool(path) and all(Path(p + ".idx").is_file() for p in resolve_prefixes(path))
    except DataError:  # a glob that matches nothing yet
        return False


def source_tokens(path, declared: int, name: str) -> int:
    if _built(path):
        return open_dataset(path).num_tokens
    if declared > 0:
        return declared
    raise DataError(f"source '{name}' has no built dataset at '{path}.idx' and no 'tokens' size; "
                    "preprocess it or give its size in tokens")


def plan_mixture(sources, budget: int) -> list[SourcePlan]:
    total = sum(s.weight for s in sources)
    return [SourcePlan(s.name or source_name(s.path), s.weight / total,
                       source_tokens(s.path, s.tokens, s.name or source_name(s.path)), round(budget * s.weight / total))
            for s in sources]
