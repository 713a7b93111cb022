"""`megallama mixture`: sampling proportions and effective epochs per source for a token budget.

Reads the ``data.sources`` of a config (e.g. ``megallama/configs/llama_mixture.yaml``,
the paper's Table 1).  A source's size comes from its built ``.idx`` header when
it exists, otherwise from its ``tokens`` field.
"""

from __future__ import annotations

import math
from pathlib import Path

import megallama
from megallama.config import load_config
from megallama.data.indexed import IndexedDataset
from megallama.data.pipeline import SourcePlan, check_sources, format_plan
from megallama.errors import ConfigError, DataError

DEFAULT_CONFIG = Path(megallama.__file__).resolve().parent / "configs" / "llama_mixture.yaml"


def add_arguments(p) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="config with data.sources (default: the paper's Table 1 mixture)")
    p.add_argument("--tokens", type=float, default=None,
                   help="token budget (default: the config's, train.tokens or "
                   "train.steps x global_batch_size x seq_len)")


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


def run(args) -> int:
    cfg = load_config(args.config)
    if not cfg.data.sources:
        raise ConfigError(f"'{args.config}' lists no data.sources; add sources with name, path, weight")
    check_sources(cfg.data.sources, config=args.config)
    raw = args.tokens if args.tokens is not None else cfg.train.total_tokens()
    if not math.isfinite(raw) or int(raw) <= 0:
        raise ConfigError(f"--tokens must be a positive number of tokens, got {raw}")
    budget = int(raw)
    print(f"mixture of {len(cfg.data.sources)} sources for {budget:,} training tokens ({args.config})")
    print(format_plan(plan_mixture(cfg.data.sources, budget)))
    return 0
