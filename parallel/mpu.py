"""A DeepSpeed-compatible ``mpu`` (model parallel unit) over a :class:`ParallelContext`.

DeepSpeed asks the ``mpu`` for the data-parallel group (gradient averaging, ZeRO
partitioning) and the model-parallel group/rank (gradient-norm clipping: a
replicated parameter is counted on model-parallel rank 0 only, a tensor-parallel
shard on every rank, then the squares are summed over the model-parallel group).
Following Megatron's legacy naming, "model parallel rank" is the *tensor*-parallel
rank and the "model parallel group" spans every TP x PP rank of one replica.

Ulysses-style sequence parallelism (DeepSpeed's ``get_sequence_parallel_*``) is a
different scheme and deliberately not exposed.
"""

from __future__ import annotations

from parallel.topology import ParallelContext


class MPU:
    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx

    # tensor parallel -------------------------------------------------------------------
    def get_tensor_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size

    def get_tensor_model_parallel_group(self):
        return self.ctx.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ctx.rank - self.ctx.tp_rank

    # model parallel (legacy names) --------------------------------------------------------
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size * self.ctx.pp_size

    def get_model_parallel_group(self):
        return self.ctx.mp_group

    # pipeline ----------------------------------------------------------------------------
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ctx.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ctx.pp_size

    def get_pipeline_model_parallel_group(self):
        return self.ctx.pp_group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    # data parallel -----------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp_size

    def get_data_parallel_group(self):
        return self.ctx.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        t = self.ctx.topology
        return next(g for g in t.dp_groups() if self.ctx.rank in g)

