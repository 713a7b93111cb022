"""Loading a checkpoint into a running engine at this run's layout (resharding on the fly)."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from megallama.checkpoint.format import MOMENTS, verify_file
from megallama.checkpoint.reader import CheckpointReader
from megallama.config import Config, config_from_dict
from megallama.errors import CheckpointError
from megallama.sharding import shard_specs
from parallel.topology import ParallelContext


def check_compatible(meta: dict, cfg: Config, ckpt: Path) -> None:
    theirs = config_from_dict(meta["config"]).model
    ours = cfg.model
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden", "vocab_size"):
        a, b = getattr(theirs, field), getattr(ours, field)
        if a != b:
            raise CheckpointError(f"checkpoint '{ckpt}' has model.{field}={a} but the config says {b}; "
                                  "use the checkpoint's model settings or another checkpoint")


def load_checkpoint(engine, named_params: Iterable, cfg: Config, ctx: ParallelContext, ckpt: Path,
                    load_optimizer: bool = True) -> dict:
    """Load weights (and optimizer state) into the engine at *this* layout.  Returns meta."""
    reader = CheckpointReader(ckpt)
    check_compatible(reader.meta, cfg, ckpt)
    specs = shard_specs(cfg.model, ctx.tp_size)
    if load_optimizer and not reader.has_optimizer:
        raise CheckpointError(f"checkpoint '{ckpt}' holds weights only; start a new run from it with "
                              "--init-from instead of resuming")
    from megallama.engine import (_base_optimizer, _refresh_low_precision, held_range, init_optimizer_state, set_held,
                                  set_master, set_moment, set_optimizer_step, set_zero3_partition, zero3_partition)

    init_optimizer_state(engine)

    for name, p in named_params:
        local = zero3_partition(p)
        if local is not None:  # ZeRO-3: read and set only this rank's partition
            start, numel, size = local
            for key in (None, *MOMENTS) if load_optimizer else (None,):
                value = reader.read_flat(name, key, specs[name], ctx.tp_rank, ctx.tp_size, start, numel) if numel \
                    else torch.zeros(0)
                set_zero3_partition(p, key, value, size)
            continue
        held = held_range(p)
        if held is not None:  # ZeRO-1/2: read and set only this rank's partition
            start, numel = held
            for key in (None, *MOMENTS) if load_optimizer else (None,):
                if numel:
                    set_held(p, key, reader.read_flat(name, key, specs[name], ctx.tp_rank, ctx.tp_size, start, numel))
            continue
        set_master(engine, p, reader.read_shard(name, None, specs[name], ctx.tp_rank, ctx.tp_size))
        if load_optimizer:
            for key in MOMENTS:
                set_moment(engine, p, key, reader.read_shard(name, key, specs[name], ctx.tp_rank, ctx.tp_size))
    _refresh_low_precision(engine)
    if load_optimizer:
        step = reader.meta["step"]
        set_optimizer_step(engine, step)
        if engine.lr_scheduler is not None and reader.meta.get("lr_scheduler_last_epoch") is not None:
            engine.lr_scheduler.last_epoch = reader.meta["lr_scheduler_last_epoch"]
            for group, lr in zip(_base_optimizer(engine).param_groups, engine.lr_scheduler.get_lr()):
                group["lr"] = lr
            engine.lr_scheduler._last_lr = [g["lr"] for g in _base_optimizer(engine).param_groups]
        if reader.meta.get("loss_scale") and hasattr(engine.optimizer, "cur_scale"):
            engine.optimizer.cur_scale = reader.meta["loss_scale"]
        rng = ckpt / f"rng/rank{ctx.rank:05d}.json"
        if rng.is_file() and reader.meta["layout"]["tp"] * reader.meta["layout"]["pp"] * \
                reader.meta["layout"]["dp"] == ctx.world_size:
            _set_rng_state(json.loads(verify_file(ckpt, f"rng/rank{ctx.rank:05d}.json", reader.meta).read_text()))
    return reader.meta


def _set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))
