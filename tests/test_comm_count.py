"""Collectives per transformer layer equal the Megatron analysis (Shoeybi et al. 2019;
Korthikanti et al. 2022), counted through a thin wrapper over torch.distributed."""

import pytest
import torch

from tests.distributed import run_ranks

S, B = 16, 3


def _count_case(rank, world, sp):
    from megallama.config import preset_config
    from megallama.model import TransformerBlock, init_parameters
    from parallel.comm_counter import CommCounter
    from parallel.topology import ParallelContext

    cfg = preset_config("tiny").model
    ctx = ParallelContext.from_distributed(tp=world)
    block = TransformerBlock(0, cfg, ctx, sequence_parallel=sp)
    init_parameters(block.named_parameters(prefix="layers.0"), cfg, 0, ctx)
    s_local = S // world if sp else S
    x = torch.randn(s_local, B, cfg.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with CommCounter() as fwd:
        y = block(x)
    with CommCounter() as bwd:
        y.sum().backward()
    overlapped = sorted((c.op, c.numel) for c in bwd.calls if c.async_op)
    return {"fwd": fwd.summary(), "bwd": bwd.summary(), "h": cfg.dim, "async": overlapped}


@pytest.mark.parametrize("sp", [False, True])
def test_collectives_per_layer(sp):
    world = 2
    res = run_ranks(_count_case, world, sp, timeout=120)[0]
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
