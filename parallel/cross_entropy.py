"""Cross-entropy over vocabulary-parallel logits, never gathering the full vocabulary.

Each TP rank holds logits for its slice ``[start, start + V/t)`` of the (padded)
vocabulary.  Three all-reduces of ``[tokens]``-sized tensors (max, target logit,
sum of exponentials) give the exact loss; the backward is local:
``softmax - onehot``.  Columns at or beyond ``vocab_size`` (padding) are excluded
from the softmax.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from parallel.comm import Group, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        logits = logits.float()
        n_local = logits.shape[-1]
        start = group_rank(group) * n_local
        end = start + n_local
        if vocab_size is not None and end > vocab_size:  # padded columns never win mass
            pad = torch.arange(start, end, device=logits.device) >= vocab_size
            logits = logits.masked_fill(pad, float("-inf"))

        logits_max = logits.max(dim=-1)[0]
        if group_size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group_size(group) > 1:
            both = torch.stack([predicted, sum_exp])
            dist.all_reduce(both, group=group)
            predicted, sum_exp = both[0], both[1]

        loss = sum_exp.log() - predicted
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax
        inside = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Group = None,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token loss ``[...]`` from logits ``[..., V/t]`` (fp32 math; inputs of any float dtype).

    ``vocab_size`` is the real vocabulary; padded columns beyond it are masked.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size)
