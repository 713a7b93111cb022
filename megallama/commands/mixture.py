"""`megallama mixture`: sampling proportions and effective epochs per source for a token budget (see tools/mixture.py)."""

from __future__ import annotations

import math

from megallama.config import load_config
from megallama.data.pipeline import check_sources, format_plan
from megallama.errors import ConfigError
from tools.mixture import DEFAULT_CONFIG, plan_mixture


def add_arguments(p) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="config with data.sources (default: the paper's Table 1 mixture)")
    p.add_argument("--tokens", type=float, default=None,
                   help="token budget (default: the config's, train.tokens or "
                   "train.steps x global_batch_size x seq_len)")


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
