"""Global gradient norm of a tensor/pipeline-parallel model replica.

Each TP shard is counted on every rank that holds it; a TP-replicated parameter
only on TP rank 0; the squares are summed over the model-parallel (TP x PP) group.
This is the norm DeepSpeed clips with, given the ``tensor_model_parallel`` tags.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from parallel.init import is_sharded
from parallel.topology import ParallelContext


def global_grad_norm(params: Iterable[torch.nn.Parameter], ctx: ParallelContext) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None or (not is_sharded(p) and ctx.tp_rank != 0):
            continue
        total += p.grad.detach().double().pow(2).sum().cpu()
    if ctx.mp_group is not None and ctx.tp_size * ctx.pp_size > 1:
        dist.all_reduce(total, group=ctx.mp_group)
    return float(total.sqrt())
