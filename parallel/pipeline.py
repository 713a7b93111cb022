"""Pipeline stages: a list of layers cut into balanced stages run by DeepSpeed's 1F1B engine.

``PipelineStages`` is a DeepSpeed ``PipelineModule`` laid out on our
:class:`~parallel.topology.Topology` (the same rank order as DeepSpeed's
``PipeModelDataParallelTopology``).  Stages are balanced by per-layer weights
that the caller computes analytically (e.g. parameter counts), so no layer is
materialised just to be counted.  Only this rank's layers are ever built.
"""

from __future__ import annotations

from typing import Callable, Sequence

from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.utils import partition_balanced, partition_uniform

from parallel.topology import ParallelContext

__all__ = ["LayerSpec", "PipelineStages", "partition"]


def partition(weights: Sequence[int], stages: int, method: str = "parameters") -> list[int]:
    """Stage boundaries: stage i owns layers ``[parts[i], parts[i+1])``."""
    if method == "uniform":
        return list(partition_uniform(num_items=len(weights), num_parts=stages))
    return list(partition_balanced(weights=list(weights), num_parts=stages))


class PipelineStages(PipelineModule):
    def __init__(self, layers: Sequence[LayerSpec], weights: Sequence[int], ctx: ParallelContext,
                 loss_fn: Callable, method: str = "parameters"):
        if len(weights) != len(layers):
            raise ValueError("one weight per layer is needed to balance the pipeline")
        self._layer_weights = list(weights)
        topo = PipeModelDataParallelTopology(num_pp=ctx.pp_size, num_mp=ctx.tp_size, num_dp=ctx.dp_size)
        super().__init__(layers=list(layers), topology=topo, loss_fn=loss_fn, partition_method=method)

    def _partition_layers(self, method: str = "parameters"):  # overrides DeepSpeed's counting by building
        stage = self._topo.get_coord(self.global_rank).pipe
        self.parts = partition(self._layer_weights, self.num_stages, method)
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
