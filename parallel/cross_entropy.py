"""Cross-entropy over vocabulary-parallel logits, never gathering the full vocabulary.

Each TP rank holds logits for its slice ``[start, start + V/t)`` of the (padded)
vocabulary.  Three all-reduces of ``[tokens]``-sized tensors (max, target logit,
sum of exponentials) give the exact loss; the backward is local:
``softmax - onehot``.  Columns at or beyond ``vocab_size`` (padding) are excluded
from the softmax.

Two forms:

* :func:`vocab_parallel_cross_entropy` takes logits someone else computed (for a model
  that needs its logits anyway, e.g. to sample from them).
* :func:`linear_cross_entropy` fuses the output projection with the loss: it walks the
  tokens in chunks, and for each chunk computes the logits, the loss and, when gradients
  are wanted, already the gradients of the input and the weight (``softmax - onehot`` is
  known as soon as the chunk's log-sum-exp is).  The ``[tokens, V/t]`` logits are never
  materialised: per step that saves their memory (``tokens·V`` floats, the largest
  activation of a LLaMA model) and three to four passes over them, which on a CPU are
  also fresh page-faulting allocations (``benchmarks/train_throughput.py``).  Its
  backward only scales the stored gradients by the incoming one.  Same FLOPs as the
  unfused form.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from parallel import gemm
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
        exp = shifted.exp_()  # in place: ``shifted`` is a fresh tensor no one else holds
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


# fp32 logits elements per chunk.  CPU: 8 MiB, which stays in cache and was the fastest of 64 to
# 2048 tokens measured on the demo (docs/performance.md, item 4).  GPU: 256 MiB, because every
# chunk also adds its weight-gradient product into the [V/t, d] fp32 accumulator: with 8 MiB
# chunks LLaMA's 32k vocabulary gets 65 tokens per chunk, i.e. at b=4, s=2048 126 passes over a
# 250 MiB accumulator (and 126 weight-gradient matmuls with an inner dimension of 65) a step;
# at 256 MiB it is 4 passes of full-size matmuls, and the logits are still 1/32 of the whole.
CHUNK_ELEMENTS = {"cpu": 1 << 21}
CHUNK_ELEMENTS_DEFAULT = 1 << 26


def chunk_rows(n_local_vocab: int, device: torch.device) -> int:
    """Tokens per chunk so that a chunk's fp32 logits stay near ``CHUNK_ELEMENTS`` for the device."""
    budget = CHUNK_ELEMENTS.get(torch.device(device).type, CHUNK_ELEMENTS_DEFAULT)
    return max(1, budget // max(1, n_local_vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_t w_t · CE(x_t W^T, target_t)`` over vocab-parallel ``W``, gradients computed in forward."""

    @staticmethod
    def forward(ctx, x, weight, target, token_weight, group, vocab_size, want_grad, chunk):
        n_tokens = x.shape[0]
        n_local = weight.shape[0]
        tp = group_size(group)
        start = group_rank(group) * n_local
        first_pad = vocab_size - start if vocab_size is not None and start + n_local > vocab_size else None
        losses = torch.empty(n_tokens, dtype=torch.float32, device=x.device)
        grad_x = grad_w = None
        if want_grad:
            grad_x = torch.empty_like(x)
            # the weight gradient sums over chunks: accumulate in fp32 whatever the weight's dtype;
            # the first chunk writes it (no pass zeroing a vocabulary-sized tensor first)
            grad_w = (torch.empty if n_tokens else torch.zeros)(weight.shape, dtype=torch.float32, device=weight.device)
        for lo in range(0, n_tokens, chunk):
            hi = min(n_tokens, lo + chunk)
            xc, tc = x[lo:hi], target[lo:hi]
            logits = gemm.matmul(xc, weight.t()).float()  # [n, V/t]
            if first_pad is not None:
                logits[:, max(first_pad, 0):] = float("-inf")
            outside = (tc < start) | (tc >= start + n_local)
            local_t = (tc - start).masked_fill(outside, 0).unsqueeze(-1)
            picked = logits.gather(-1, local_t).squeeze(-1).masked_fill_(outside, 0.0)
            row_max = logits.amax(dim=-1)
            if tp > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            probs = logits.sub_(row_max.unsqueeze(-1)).exp_()  # in place: logits are ours alone
            sum_exp = probs.sum(dim=-1)
            if tp > 1:
                both = torch.stack([picked, sum_exp])
                dist.all_reduce(both, group=group)
                picked, sum_exp = both[0], both[1]
            losses[lo:hi] = sum_exp.log() + row_max - picked
            if not want_grad:
                del logits, probs
                continue
            # d(w_t · loss_t)/d logits = w_t · (softmax − onehot)
            probs.div_(sum_exp.unsqueeze(-1))
            probs.scatter_add_(-1, local_t, (~outside).to(probs.dtype).neg_().unsqueeze(-1))
            probs.mul_(token_weight[lo:hi].unsqueeze(-1))
            g = probs.to(x.dtype)
            gemm.matmul(g, weight, out=grad_x[lo:hi])
            if weight.dtype != torch.float32:  # a 16-bit product, summed in fp32
                part = torch.matmul(g.t(), xc)
                if lo == 0:
                    grad_w.copy_(part)
                else:
                    grad_w.add_(part)
            # torch's own products here: oneDNN's has no in-place form, and a [V/t, d] temporary per
            # chunk would add a weight-sized buffer to the loss's peak memory (what the planner counts)
            elif lo == 0:
                torch.mm(g.t(), xc, out=grad_w)
            else:
                grad_w.addmm_(g.t(), xc)
            # drop this chunk before the next one's logits are allocated: one chunk alive, not two
            del logits, probs, g
        if want_grad:
            ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return (losses * token_weight).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_loss.to(grad_x.dtype), (grad_w * grad_loss).to(ctx.weight_dtype),
                None, None, None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         token_weight: Optional[torch.Tensor] = None, group: Group = None,
                         vocab_size: Optional[int] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """``sum_t token_weight_t · CE(x_t · weight^T, target_t)`` without materialising the logits.

    ``x`` ``[tokens, d]`` is the full (TP-replicated) input: put it through the TP or SP
    region first so its gradient is reduced; ``weight`` ``[V/t, d]`` this rank's rows of
    the output projection; ``target`` ``[tokens]``; ``token_weight`` ``[tokens]`` (default
    ``1/tokens``: the mean).  ``vocab_size`` masks padded rows; ``chunk`` tokens per step
    (default: about 8 MiB of fp32 logits on CPU, 256 MiB on a GPU: ``CHUNK_ELEMENTS``).
    """
    if token_weight is None:
        token_weight = torch.full((x.shape[0],), 1.0 / max(1, x.shape[0]), dtype=torch.float32, device=x.device)
    want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, target, token_weight.float(), group, vocab_size, want_grad,
                                     chunk or chunk_rows(weight.shape[0], x.device))
