"""Collectives per transformer layer equal the Megatron analysis (Shoeybi et al. 2019;
Korthikanti et al. 2022), counted through a thin wrapper over torch.distributed."""

import pytest
import torch

from tests.distributed import run_ranks

S, B = 16, 3


def _count_case(rank, world, sp, checkpointing="none"):
    from megallama.config import preset_config
    from megallama.model import TransformerBlock, init_parameters
    from parallel.comm_counter import CommCounter
    from parallel.topology import ParallelContext

    cfg = preset_config("tiny").model
    ctx = ParallelContext.from_distributed(tp=world)
    block = TransformerBlock(0, cfg, ctx, sequence_parallel=sp, checkpointing=checkpointing)
    init_parameters(block.named_parameters(prefix="layers.0"), cfg, 0, ctx)
    s_local = S // world if sp else S
    x = torch.randn(s_local, B, cfg.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with CommCounter() as fwd:
        y = block(x)
    with CommCounter() as bwd:
        y.sum().backward()
    overlapped = sorted((c.op, c.numel) for c in bwd.calls if c.async_op)
    return {"fwd": fwd.summary(), "bwd": bwd.summary(), "h": cfg.dim, "async": overlapped}


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
@pytest.mark.parametrize("sp", [False, True])
def test_collectives_per_layer(sp, checkpointing):
    """Selective recompute keeps the parallel linears' outputs (collectives inside), so it
    communicates exactly what no recompute does; the planner counts the same."""
    world = 2
    res = run_ranks(_count_case, world, sp, checkpointing, timeout=120)[0]
    _assert_planner_counts(res, world, sp, checkpointing)
    sbh, h = S * B * res["h"], res["h"]
    if not sp:
        # Megatron: forward g (all-reduce after attention and MLP), backward f (input-grad all-reduce
        # of the QKV and the w13 column-parallel linears), each s*b*h elements.
        assert res["fwd"] == {("all_reduce", sbh): 2}
        assert res["bwd"] == {("all_reduce", sbh): 2}
        # both input-gradient all-reduces are launched asynchronously (overlapping the wgrad matmul)
        assert res["async"] == [("all_reduce", sbh)] * 2
    else:
        # Korthikanti et al.: each all-reduce becomes all-gather + reduce-scatter of the same volume.
        # all_gather counts the local input (s/t*b*h), reduce_scatter the full input (s*b*h).
        assert res["fwd"] == {("all_gather", sbh // world): 2, ("reduce_scatter", sbh): 2}
        assert res["bwd"] == {
            ("all_gather", sbh // world): 2 + 2,  # backward of the 2 reduce-scatters + 2 re-gathers for wgrad
            ("reduce_scatter", sbh): 2,           # input gradients of the 2 column-parallel linears
            ("all_reduce", h): 2,                 # gradients of the 2 replicated norm weights
        }
        # overlapped: the re-gathers (with the dgrad matmul) and the reduce-scatters (with the wgrad matmul)
        assert res["async"] == sorted([("all_gather", sbh // world)] * 2 + [("reduce_scatter", sbh)] * 2)


def _zero_step_case(rank, world, stage):
    from megallama.config import load_config, validate
    from parallel.comm_counter import CommCounter
    from tests.synthetic import synthetic_engine

    cfg = validate(load_config(None, ["train.tensorboard=false", "train.precision=fp32", "train.global_batch_size=8",
                                      "train.micro_batch_size=2", f"parallel.zero_stage={stage}"], preset="tiny"),
                   world)
    run = synthetic_engine(cfg, world)
    run.step()  # warm-up
    # per backward: how many calls had been made when it began, and when each gradient was produced
    # (a tensor hook runs as the gradient is computed, before DeepSpeed's reduction hooks)
    windows, backward = [], run.engine.backward

    def marked_backward(*args, **kwargs):
        windows.append((len(cc.calls), []))
        return backward(*args, **kwargs)

    run.engine.backward = marked_backward
    for p in run.engine.module.parameters():
        p.register_hook(lambda _: windows[-1][1].append(len(cc.calls)))
    with CommCounter() as cc:
        run.step()
    by_op: dict = {}
    for c in cc.calls:
        if c.numel > 1:  # scalars (loss, gradient norm) are bookkeeping
            by_op[c.op] = by_op.get(c.op, 0) + c.sent
    # of each backward's gradient reductions, the bytes issued while gradients were still to come
    overlapped = []
    for i, (start, marks) in enumerate(windows):
        end = windows[i + 1][0] if i + 1 < len(windows) else len(cc.calls)
        reduces = [(j, c.bytes) for j, c in enumerate(cc.calls[start:end], start) if c.op == "reduce" and c.numel > 1]
        if reduces:
            overlapped.append(sum(b for j, b in reduces if j < marks[-1]) / sum(b for _, b in reduces))
    return by_op, run.gas, cfg.model.num_parameters(tp=1) * 4, overlapped


@pytest.mark.parametrize("sp", [False, True])
def test_planner_counts_the_collectives_of_a_block(sp):
    """Full recompute re-runs the forward's collectives up to the FFN's matmuls; the planner counts
    them (none and selective: in test_collectives_per_layer)."""
    world = 2
    _assert_planner_counts(run_ranks(_count_case, world, sp, "full", timeout=120)[0], world, sp, "full")


def _assert_planner_counts(res, world, sp, checkpointing):
    """The planner's per-block TP communication (in all-gathers/reduce-scatters of s*b*h, an
    all-reduce counting 2) is what one block really ran, forward + backward, recomputation included."""
    from dataclasses import replace

    from tools.planner import Layout, tp_collectives_per_layer

    sbh = S * B * res["h"]
    weight = {("all_reduce", sbh): 2, ("all_gather", sbh // world): 1, ("reduce_scatter", sbh): 1}
    measured = sum(weight.get(k, 0) * n for phase in ("fwd", "bwd") for k, n in res[phase].items())
    lay = replace(Layout(gpus=2, tp=2), sequence_parallel=sp, activation_checkpointing=checkpointing)
    assert lay.sp == sp
    assert tp_collectives_per_layer(lay) == measured


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_sends_the_minimum(stage):
    """ZeRO-1/2 on 2 ranks: each slice of the gradients goes to the rank that owns it, (d-1)/d*N bytes
    per rank, not DeepSpeed's default all-reduce of every bucket (2(d-1)/d*N); ZeRO-2 does that
    after each micro-batch, ZeRO-1 once per step; then the parameters are all-gathered once."""
    by_op, gas, n, overlapped = run_ranks(_zero_step_case, 2, stage, timeout=240)[0]
    assert gas == 2
    reductions = 1 if stage == 1 else gas
    assert set(by_op) == {"reduce", "all_gather"}, by_op
    assert by_op["reduce"] == pytest.approx(reductions * n / 2, rel=1e-3)
    assert by_op["all_gather"] == pytest.approx(n / 2, rel=1e-3)
    # overlapped with the backward (overlap_comm, buckets of d^2): each reducing backward issues its
    # reductions from the gradient hooks as buckets fill, all but the last gradients' (the
    # embedding's: 12% of the tiny model) before the backward has produced its last gradient
    assert len(overlapped) == reductions and all(share > 0.8 for share in overlapped), overlapped
