"""`megallama show-model`: validate a config and print its model, layout and sizes."""

from __future__ import annotations

import json

import torch

from megallama.config import add_config_arguments, config_from_args, gradient_accumulation_steps
from megallama.errors import ConfigError


def add_arguments(p):
    add_config_arguments(p)
    p.add_argument("--world-size", type=int, default=1, help="number of processes the layout is checked against")
    p.add_argument("--modules", action="store_true", help="also print the module tree of one rank")


def run(args) -> int:
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1 (the number of processes to check the layout against), "
                          f"got {args.world_size}")
    cfg = config_from_args(args, args.world_size, default_preset="demo")
    m, par, t = cfg.model, cfg.parallel, cfg.train
    dp = par.resolve_dp(args.world_size)
    info = {
        "preset": cfg.preset or "(none)",
        "parameters": m.num_parameters(),
        "layout": f"tp={par.tp} pp={par.pp} dp={dp} sp={par.sequence_parallel} zero={par.zero_stage}",
        "shape": f"dim={m.dim} layers={m.n_layers} heads={m.n_heads} kv_heads={m.kv_heads} ffn={m.ffn_hidden} "
                 f"vocab={m.vocab_size} (padded {m.padded_vocab_size(par.tp)})",
        "batch": f"global={t.global_batch_size} micro={t.micro_batch_size} "
                 f"accumulation={gradient_accumulation_steps(cfg, args.world_size)} seq_len={t.seq_len}",
        "steps": t.total_steps(),
        "flops_per_token": m.flops_per_token(t.seq_len),
    }
    print(json.dumps(info, indent=2))
    if args.modules:
        from megallama.model import Transformer

        with torch.device("meta"):
            print(Transformer(m, sequence_parallel=par.sequence_parallel))
    return 0
