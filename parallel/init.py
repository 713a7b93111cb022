"""Sharding metadata and layout-independent initialisation.

Every tensor-parallel parameter carries how it is cut from its full ("logical")
tensor: the dimension, and the sub-blocks (``chunks``) that are each split evenly
across the TP ranks.  A fused QKV weight, for example, is the logical
``[q; k; v]`` with ``chunks=(q_rows, k_rows, v_rows)`` and rank ``r`` holds
``[q_r; k_r; v_r]``.  :func:`shard` and :func:`unshard` are exact inverses and are
what checkpoint resharding and conversion use.

Initialisation draws the *full* logical tensor from a generator seeded by
``(seed, parameter name)`` and keeps this rank's shard, so with one seed the TP=k
shards are exactly slices of the TP=1 model, whatever the pipeline split.
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch


def mark_sharded(param: torch.nn.Parameter, dim: int, chunks: Optional[Sequence[int]] = None,
                 logical_rows: Optional[int] = None) -> torch.nn.Parameter:
    """Tag ``param`` as a TP shard along ``dim`` (DeepSpeed reads ``tensor_model_parallel``
    so that gradient-norm clipping counts each shard exactly once)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_chunks = tuple(chunks) if chunks else None  # logical (full) sizes
    param.logical_rows = logical_rows  # unpadded size along dim (vocab padding), or None
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if is_sharded(param):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def shard(full: torch.Tensor, dim: int, rank: int, size: int,
          chunks: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full``: each logical chunk split evenly, concatenated."""
    pieces = full.split(list(chunks), dim) if chunks else [full]
    out = []
    for p in pieces:
        if p.shape[dim] % size:
            raise ValueError(f"cannot split {p.shape[dim]} rows along dim {dim} into {size} equal shards")
        out.append(p.chunk(size, dim)[rank])
    return torch.cat(out, dim) if len(out) > 1 else out[0].clone()


def unshard(shards: Sequence[torch.Tensor], dim: int, chunks: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's shard, in rank order."""
    size = len(shards)
    if not chunks:
        return torch.cat(list(shards), dim)
    local = [c // size for c in chunks]
    per_rank = [s.split(local, dim) for s in shards]
    return torch.cat([torch.cat([pr[i] for pr in per_rank], dim) for i in range(len(chunks))], dim)


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@torch.no_grad()
def init_normal_(param: torch.Tensor, name: str, seed: int, std: float, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
    """Fill ``param`` with its shard of a full N(0, std) tensor drawn from (seed, name)."""
    shape = list(full_shape(param, tp_size))
    dim = getattr(param, "partition_dim", 0)
    logical = getattr(param, "logical_rows", None)
    if logical is not None:
        shape[dim] = logical
    g = torch.Generator().manual_seed(param_seed(seed, name))
    full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)
    if logical is not None:  # padded vocabulary rows are zero
        pad = list(full.shape)
        pad[dim] = full_shape(param, tp_size)[dim] - logical
        full = torch.cat([full, full.new_zeros(pad)], dim)
    if is_sharded(param):
        full = shard(full, dim, tp_rank, tp_size, param.partition_chunks)
    param.copy_(full.to(param.dtype))
