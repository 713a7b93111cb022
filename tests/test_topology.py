"""Rank <-> (dp, pp, tp) layout and process groups; DeepSpeed-compatible mpu."""

import pytest

from parallel.topology import ParallelContext, Topology
from tests.distributed import run_ranks


def test_tp_is_innermost_and_groups_partition_the_world():
    t = Topology(16, tp=2, pp=2)
    assert t.dp == 4
    assert t.tp_groups()[0] == [0, 1]  # consecutive ranks: one node
    assert t.dp_groups()[0] == [0, 2, 4, 6]
    assert t.pp_groups()[0] == [0, 8]
    for groups in (t.tp_groups(), t.dp_groups(), t.pp_groups(), t.mp_groups()):
        assert sorted(r for g in groups for r in g) == list(range(16))
    for r in range(16):
        assert t.rank(*t.coord(r)) == r


def test_matches_deepspeed_pipe_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ours = Topology(8, tp=2, pp=2)
    theirs = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    for r in range(8):
        c = theirs.get_coord(r)
        assert (c.pipe, c.data, c.model) == (ours.coord(r).pp, ours.coord(r).dp, ours.coord(r).tp)


def test_bad_world_size():
    with pytest.raises(ValueError, match="not divisible by tp\\*pp"):
        Topology(6, tp=4, pp=1)


def test_single_needs_no_distributed():
    ctx = ParallelContext.single()
    assert (ctx.tp_size, ctx.pp_size, ctx.dp_size, ctx.tp_group) == (1, 1, 1, None)


def _mpu_case(rank, world):
    import torch.distributed as dist
    from parallel.mpu import MPU

    ctx = ParallelContext.from_distributed(tp=2, pp=2)
    mpu = MPU(ctx)
    return dict(tp=mpu.get_tensor_model_parallel_rank(), pp=mpu.get_pipe_parallel_rank(),
                dp=mpu.get_data_parallel_rank(), dp_size=dist.get_world_size(mpu.get_data_parallel_group()),
                mp_size=dist.get_world_size(mpu.get_model_parallel_group()),
                dp_ranks=mpu.get_data_parallel_group_ranks())


@pytest.mark.slow
def test_mpu_on_8_ranks():
    res = run_ranks(_mpu_case, 8, timeout=120)
    t = Topology(8, 2, 2)
    for r, m in enumerate(res):
        c = t.coord(r)
        assert (m["tp"], m["pp"], m["dp"]) == (c.tp, c.pp, c.dp)
        assert m["dp_size"] == 2 and m["mp_size"] == 4
        assert r in m["dp_ranks"]
