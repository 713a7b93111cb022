"""Communication regions as small named autograd functions (after Megatron-LM's mappings).

Tensor-parallel (TP) regions, along the last (hidden) dimension::

    copy_to_tp          forward: identity            backward: all-reduce
    reduce_from_tp      forward: all-reduce          backward: identity
    gather_from_tp      forward: all-gather          backward: keep own chunk

Sequence-parallel (SP) regions, along dimension 0 (activations are sequence-first,
``[s, b, h]``, so these collectives work on contiguous memory)::

    gather_from_sp              forward: all-gather       backward: reduce-scatter
    reduce_scatter_to_sp        forward: reduce-scatter   backward: all-gather

``column_parallel_linear`` and ``row_parallel_linear`` are the two parallel matmuls with their
communication fused in, each a single custom op (so selective checkpointing keeps their outputs
and re-runs neither matmul nor collective); the column one's backward overlaps the input-gradient
all-reduce (reduce-scatter under SP) with the weight-gradient matmul.

A ``group`` of ``None`` means a TP size of 1: every function is then the identity.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from parallel import gemm

Group = Optional[dist.ProcessGroup]


def _all_gather_single(*args, **kwargs):  # torch >= 2.10 renamed all_gather_into_tensor
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_single(*args, **kwargs):  # torch >= 2.10 renamed reduce_scatter_tensor
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------- raw collectives

def all_reduce(x: torch.Tensor, group: Group, async_op: bool = False):
    if group_size(group) == 1:
        return None if async_op else x
    handle = dist.all_reduce(x, group=group, async_op=async_op)
    return handle if async_op else x


def all_gather_dim0(x: torch.Tensor, group: Group, async_op: bool = False):
    """Concatenate every rank's ``x`` along dim 0; returns (out, handle) when async."""
    n = group_size(group)
    if n == 1:
        return (x, None) if async_op else x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    handle = _all_gather_single(out, x, group=group, async_op=async_op)
    return (out, handle) if async_op else out


def reduce_scatter_dim0(x: torch.Tensor, group: Group, async_op: bool = False):
    """Sum over ranks, keep this rank's chunk of dim 0; returns (out, handle) when async."""
    n = group_size(group)
    if n == 1:
        return (x, None) if async_op else x
    if x.shape[0] % n:
        raise ValueError(f"dimension 0 ({x.shape[0]}) is not divisible by the group size {n}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    handle = _reduce_scatter_single(out, x, group=group, async_op=async_op)
    return (out, handle) if async_op else out


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"last dimension ({x.shape[-1]}) is not divisible by the group size {n}")
    return x.chunk(n, dim=-1)[group_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    gathered = all_gather_dim0(x.movedim(-1, 0), group)  # [n * h_local, ...]
    return gathered.movedim(0, -1).contiguous()


def _split_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ValueError(f"sequence length ({x.shape[0]}) is not divisible by the TP size {n}")
    return x.chunk(n, dim=0)[group_rank(group)].contiguous()


# ----------------------------------------------------------------------------- TP regions

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


# ----------------------------------------------------------------------------- SP regions

class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return reduce_scatter_dim0(grad, ctx.group), None, None
        return _split_dim0(grad, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group: Group, reduce_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence; the gradient is reduce-scattered (``reduce_grad``) or split."""
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group, reduce_grad)


def reduce_scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)


# ----------------------------------------------------------------------------- the parallel linears as single ops
#
# Selective activation checkpointing (``torch.utils.checkpoint`` with a policy) decides per op,
# below autograd, which outputs to keep.  Were the collectives separate ops, a policy that keeps
# the matmuls' outputs would re-run the forward collectives when it recomputes a block (they are
# cheap to compute, not to send), and keep the row-parallel matmul's full-size partial sums.  So
# each parallel linear -- its matmul and the collective that feeds or follows it -- is ONE custom
# op: a policy that keeps ``SAVE_IN_RECOMPUTE`` recomputes neither the matmul nor the collective.

SAVE_IN_RECOMPUTE = set()  # filled below: the ops whose outputs a selective policy should keep

_GROUPS: dict = {}  # custom ops take strings, not process groups: group_name -> group


def _group_name(group: dist.ProcessGroup) -> str:
    _GROUPS[group.group_name] = group  # the live group of that name (a re-initialised job reuses names)
    return group.group_name


@torch.library.custom_op("parallel::column_linear", mutates_args=())
def _column_linear(x: torch.Tensor, weight: torch.Tensor, group_name: str, sequence_parallel: bool) -> torch.Tensor:
    """``y = x @ W^T`` for a column-parallel weight; under SP the sequence-sharded input is
    all-gathered first."""
    total = all_gather_dim0(x, _GROUPS[group_name]) if sequence_parallel else x
    return gemm.matmul(total, weight.t())


@_column_linear.register_fake
def _(x, weight, group_name, sequence_parallel):
    s = x.shape[0] * (group_size(_GROUPS[group_name]) if sequence_parallel else 1)
    return x.new_empty((s,) + tuple(x.shape[1:-1]) + (weight.shape[0],))


def _save_linear_inputs(ctx, inputs, output):
    """Both parallel linears keep their input and weight, and their group and SP flag."""
    x, weight, group_name, sequence_parallel = inputs
    ctx.group, ctx.sp = _GROUPS[group_name], sequence_parallel
    ctx.save_for_backward(x, weight)


def _column_linear_backward(ctx, grad_out):
    """The input gradient ``dY @ W`` is all-reduced (reduce-scattered under SP) *asynchronously*
    while the weight gradient ``dY^T @ X`` is computed.  Under SP the full input is not kept:
    it is re-gathered here, overlapped with the input-gradient matmul (Korthikanti et al. 2022's
    memory accounting)."""
    x, weight = ctx.saved_tensors
    group, sp = ctx.group, ctx.sp
    gather = None
    if sp:
        total, gather = all_gather_dim0(x, group, async_op=True)
    else:
        total = x
    grad_input = gemm.matmul(grad_out, weight) if ctx.needs_input_grad[0] else None
    if gather is not None:
        gather.wait()
    comm = None
    if grad_input is not None:
        if sp:
            grad_input, comm = reduce_scatter_dim0(grad_input, group, async_op=True)
        else:
            comm = all_reduce(grad_input, group, async_op=True)
    grad_weight = gemm.weight_grad(grad_out, total) if ctx.needs_input_grad[1] else None
    if comm is not None:
        comm.wait()
    return grad_input, grad_weight, None, None


_column_linear.register_autograd(_column_linear_backward, setup_context=_save_linear_inputs)


@torch.library.custom_op("parallel::row_linear", mutates_args=())
def _row_linear(x: torch.Tensor, weight: torch.Tensor, group_name: str, sequence_parallel: bool) -> torch.Tensor:
    """``y = x @ W^T`` for a row-parallel weight (``x`` split along its last dimension): the
    partial products are all-reduced, or reduce-scattered along the sequence under SP."""
    partial = gemm.matmul(x, weight.t())
    group = _GROUPS[group_name]
    return reduce_scatter_dim0(partial, group) if sequence_parallel else all_reduce(partial, group)


@_row_linear.register_fake
def _(x, weight, group_name, sequence_parallel):
    n = group_size(_GROUPS[group_name]) if sequence_parallel else 1
    if x.shape[0] % n:
        raise ValueError(f"dimension 0 ({x.shape[0]}) is not divisible by the group size {n}")
    return x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:-1]) + (weight.shape[0],))


def _row_linear_backward(ctx, grad_out):
    """Under SP the output gradient (this rank's part of the sequence) is all-gathered first;
    the all-reduce's backward is the identity."""
    x, weight = ctx.saved_tensors
    if ctx.sp:
        grad_out = all_gather_dim0(grad_out, ctx.group)
    grad_input = gemm.matmul(grad_out, weight) if ctx.needs_input_grad[0] else None
    grad_weight = gemm.weight_grad(grad_out, x) if ctx.needs_input_grad[1] else None
    return grad_input, grad_weight, None, None


_row_linear.register_autograd(_row_linear_backward, setup_context=_save_linear_inputs)

SAVE_IN_RECOMPUTE.update({torch.ops.parallel.column_linear.default, torch.ops.parallel.row_linear.default})


def _as_autocast(x: torch.Tensor, weight: torch.Tensor):
    """Under ``torch.autocast`` both operands in its dtype, as ``F.linear`` gets them: a custom op
    has no autocast rule of its own, and its backward (run outside the autocast region) would meet
    a low-precision gradient and the full-precision weight.  The casts are autograd ops, so the
    weight's gradient comes back in the parameter's dtype."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), weight.to(dtype)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, group: Group,
                           sequence_parallel: bool = False) -> torch.Tensor:
    """``x @ W^T`` of a column-parallel weight, its communication fused in: under SP the input
    is all-gathered; backward overlaps the input-gradient all-reduce (reduce-scatter) with the
    weight-gradient matmul."""
    if group_size(group) == 1:
        return gemm.linear(x, weight)
    return _column_linear(*_as_autocast(x, weight), _group_name(group), sequence_parallel)


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, group: Group,
                        sequence_parallel: bool = False) -> torch.Tensor:
    """``x @ W^T`` of a row-parallel weight, the partial sums all-reduced (reduce-scattered
    along the sequence under SP)."""
    if group_size(group) == 1:
        return gemm.linear(x, weight)
    return _row_linear(*_as_autocast(x, weight), _group_name(group), sequence_parallel)
