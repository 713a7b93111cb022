"""How a model's parameters are cut over a layout: tensor-parallel shard specs and pipeline stages.

The one room for "which rank holds which piece of which canonical tensor", used by training (through
the model's own layers), checkpoints (every reader and writer), the offline tools, evaluation under
tensor parallelism and the planner.  Derived from the model itself (a meta-device build at the
layout), so it cannot drift from what training does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megallama.config import ModelConfig
from parallel.init import is_sharded, shard
from parallel.topology import ParallelContext, Topology


@dataclass(frozen=True)
class ShardSpec:
    """How a canonical parameter is cut across TP ranks (``dim`` None = replicated)."""

    shape: tuple  # full shape at tp (vocabulary rows padded for that tp)
    dim: Optional[int]
    chunks: Optional[tuple]


def shard_specs(model_cfg: ModelConfig, tp: int) -> dict[str, ShardSpec]:
    """Canonical name -> ShardSpec, from a meta-device model at tensor-parallel size ``tp``."""
    from megallama.model import Transformer

    ctx = ParallelContext(Topology(tp, tp, 1), 0)
    with torch.device("meta"):
        model = Transformer(model_cfg, ctx)
    specs = {}
    for name, p in model.named_parameters():
        if is_sharded(p):
            full = list(p.shape)
            full[p.partition_dim] *= tp
            specs[name] = ShardSpec(tuple(full), p.partition_dim, p.partition_chunks)
        else:
            specs[name] = ShardSpec(tuple(p.shape), None, None)
    return specs


def reshard_tensor(full: torch.Tensor, spec: ShardSpec, rank: int, tp: int) -> torch.Tensor:
    """The ``rank``-th TP shard of a full tensor, padding/cropping vocabulary rows to ``spec``."""
    if spec.dim is None:
        return full
    want = spec.shape[spec.dim]
    if full.shape[spec.dim] != want:  # vocabulary padding differs between TP sizes
        if full.shape[spec.dim] > want:
            full = full.narrow(spec.dim, 0, want)
        else:
            pad = list(full.shape)
            pad[spec.dim] = want - full.shape[spec.dim]
            full = torch.cat([full, full.new_zeros(pad)], spec.dim)
    return shard(full, spec.dim, rank, tp, spec.chunks)


def rank_ranges(size: int, chunks: Optional[tuple], rank: int, tp: int) -> list[tuple[int, int]]:
    """The index ranges of a full tensor's shard dim (``size`` rows) that TP ``rank`` holds, in its
    local order (:func:`parallel.init.shard`: each logical chunk split evenly, concatenated)."""
    out, offset = [], 0
    for c in (chunks or (size,)):
        if c % tp:
            raise ValueError(f"cannot split {c} rows into {tp} equal shards")
        out.append((offset + rank * (c // tp), offset + (rank + 1) * (c // tp)))
        offset += c
    return out


def stage_assignment(model_cfg: ModelConfig, pp: int, method: str = "parameters") -> dict[str, int]:
    """Canonical parameter name -> pipeline stage, exactly as training at ``pp`` stages places it."""
    from megallama.model import pipeline_layers
    from parallel.pipeline import partition

    if pp == 1:
        return {name: 0 for name in shard_specs(model_cfg, 1)}
    _, weights = pipeline_layers(model_cfg, ParallelContext.single(), False, "none", method)
    parts = partition(weights, pp, method)

    def stage(layer_index: int) -> int:
        return next(s for s in range(pp) if parts[s] <= layer_index < parts[s + 1])

    out = {}
    for name in shard_specs(model_cfg, 1):
        if name.startswith("layers."):
            out[name] = stage(int(name.split(".")[1]) + 1)
        else:
            out[name] = stage(0 if name.startswith("tok_embeddings") else model_cfg.n_layers + 1)
    return out
