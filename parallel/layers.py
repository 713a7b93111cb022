"""Tensor-parallel layers (Shoeybi et al. 2019; sequence parallelism: Korthikanti et al. 2022).

Activations are sequence-first, ``[s, b, h]``.  With sequence parallelism the
activations *between* TP regions are split along ``s`` (``[s/t, b, h]``): the
column-parallel layer all-gathers them and the row-parallel layer reduce-scatters
back, replacing each all-reduce by an all-gather + reduce-scatter of the same
volume while norms and residuals work on 1/t of the tokens.

Weights are created on ``device`` uninitialised; call the model's init (see
:mod:`parallel.init`) to fill them layout-independently.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel import comm, gemm
from parallel.cross_entropy import linear_cross_entropy
from parallel.init import mark_sharded
from parallel.topology import ParallelContext


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {d}")
    return n // d


class ColumnParallelLinear(nn.Module):
    """``Y = X W^T`` with ``W`` split along its output rows: rank r computes ``Y_r``.

    ``chunks`` lists logical sub-blocks of the output (e.g. q, k, v of a fused QKV
    projection) that are split separately, so each rank owns whole heads of each.
    Backward overlaps the input-gradient all-reduce with the weight-gradient matmul.
    """

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, *,
                 chunks: Optional[Sequence[int]] = None, gather_output: bool = False,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__()
        if chunks is not None and sum(chunks) != out_features:
            raise ValueError(f"chunks {tuple(chunks)} do not add up to out_features {out_features}")
        self.group = ctx.tp_group
        self.tp = ctx.tp_size
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and self.tp > 1
        for c in chunks or [out_features]:
            _divide(c, self.tp, "output features")
        self.weight = nn.Parameter(torch.empty(out_features // self.tp, in_features, device=device, dtype=dtype))
        mark_sharded(self.weight, 0, chunks)

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None,
                token_weight: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None) -> torch.Tensor:
        """``x W^T`` (this rank's columns), or with ``target`` the loss of this layer as the
        vocab-parallel output projection: ``sum_t token_weight_t · CE(x_t W^T, target_t)``
        (default: the mean over tokens), never materialising the logits
        (:func:`parallel.cross_entropy.linear_cross_entropy`).  ``target`` and ``token_weight``
        have ``x``'s leading shape (the full sequence under sequence parallelism); rows at or
        beyond ``vocab_size`` are padding.  Both go through ``__call__``, so hooks that
        gather partitioned weights (ZeRO-3) see the layer used."""
        if target is not None:
            if self.gather_output:
                raise ValueError("the fused loss needs gather_output=False (it never gathers the logits)")
            x = comm.gather_from_sp(x, self.group) if self.sequence_parallel else comm.copy_to_tp(x, self.group)
            tw = None if token_weight is None else token_weight.reshape(-1)
            return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight, target.reshape(-1), tw,
                                        self.group, vocab_size)
        y = comm.column_parallel_linear(x, self.weight, self.group, self.sequence_parallel)
        return comm.gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tp={self.tp}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``Y = X W^T`` with ``W`` split along its input columns; the input is already split.

    The partial products are summed with an all-reduce, or reduce-scattered along the
    sequence under sequence parallelism.  ``fuse_collective`` makes matmul and collective one
    op (:func:`parallel.comm.row_parallel_linear`), whose reduced output a selective
    checkpointing policy keeps; unfused, the matmul's input is saved *before* the collective
    runs, so a full recomputation of a block that ends in this layer stops short of it.
    """

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, *,
                 sequence_parallel: bool = False, fuse_collective: bool = True, device=None, dtype=None):
        super().__init__()
        self.fuse_collective = fuse_collective
        self.group = ctx.tp_group
        self.tp = ctx.tp_size
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.weight = nn.Parameter(torch.empty(out_features, _divide(in_features, self.tp, "input features"),
                                               device=device, dtype=dtype))
        mark_sharded(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_collective:
            return comm.row_parallel_linear(x, self.weight, self.group, self.sequence_parallel)
        y = gemm.linear(x, self.weight)
        return comm.reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else comm.reduce_from_tp(y, self.group)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tp={self.tp}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary; rank r holds rows [r*V/t, (r+1)*V/t).

    Tokens outside a rank's range contribute zeros, and the partial embeddings are
    summed (all-reduce, or reduce-scatter along the sequence under SP).
    ``num_embeddings`` is the padded size; ``logical_rows`` the real vocabulary.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: ParallelContext, *,
                 logical_rows: Optional[int] = None, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.group = ctx.tp_group
        self.tp = ctx.tp_size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = _divide(num_embeddings, self.tp, "padded vocabulary size")
        self.vocab_start = ctx.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, device=device, dtype=dtype))
        mark_sharded(self.weight, 0, logical_rows=logical_rows)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sp(out, self.group)
        return comm.reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp}"


def replicated_weight(weight: torch.Tensor, ctx: ParallelContext, sequence_parallel: bool) -> torch.Tensor:
    """Use a TP-replicated parameter (e.g. a norm weight) inside a sequence-parallel region.

    Under SP each TP rank sees a different slice of the sequence, so the weight's
    gradient is a partial sum: routing the weight through ``copy_to_tp`` all-reduces
    its gradient over the TP group during backward, whatever engine runs the model.
    """
    return comm.copy_to_tp(weight, ctx.tp_group) if sequence_parallel and ctx.tp_size > 1 else weight
