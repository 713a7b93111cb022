"""Process-group topology for tensor (TP), pipeline (PP) and data (DP) parallelism.

Ranks are laid out with TP innermost, then DP, then PP (the Megatron-LM and
DeepSpeed ``PipeModelDataParallelTopology`` order)::

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so the ``tp`` ranks of a tensor-parallel group are consecutive and stay inside a
node.  :class:`ParallelContext` owns the process groups and is passed explicitly
to every layer: there is no hidden global state.  ``ParallelContext.single()``
needs no ``torch.distributed`` at all (world size 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch.distributed as dist


class Coord(NamedTuple):
    dp: int
    pp: int
    tp: int


@dataclass(frozen=True)
class Topology:
    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1 or self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by tp*pp = {self.tp}*{self.pp}; "
                f"launch a multiple of {self.tp * self.pp} processes or change tp/pp"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def coord(self, rank: int) -> Coord:
        return Coord(dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp), tp=rank % self.tp)

    def rank(self, dp: int, pp: int, tp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(d, p, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(d, p, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(d, p, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups: all TP x PP ranks holding one replica of the model."""
        return [[self.rank(d, p, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]


class ParallelContext:
    """Process groups and coordinates of this rank.  Pass it to layers explicitly.

    Under ``torch.distributed`` every group exists, size-1 groups included (DeepSpeed
    wants real group objects).  In :meth:`single` all groups are ``None``, which
    layers treat as "no communication" (never as the default WORLD group).
    """

    def __init__(self, topology: Topology, rank: int, groups: Optional[dict] = None):
        self.topology = topology
        self.rank = rank
        self.coord = topology.coord(rank)
        groups = groups or {}
        self.tp_group = groups.get("tp")
        self.pp_group = groups.get("pp")
        self.dp_group = groups.get("dp")
        self.mp_group = groups.get("mp")

    # sizes and ranks -------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        return self.topology.tp

    @property
    def pp_size(self) -> int:
        return self.topology.pp

    @property
    def dp_size(self) -> int:
        return self.topology.dp

    @property
    def tp_rank(self) -> int:
        return self.coord.tp

    @property
    def pp_rank(self) -> int:
        return self.coord.pp

    @property
    def dp_rank(self) -> int:
        return self.coord.dp

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def __repr__(self) -> str:
        t = self.topology
        return (f"ParallelContext(rank={self.rank}, world={t.world_size}, tp={t.tp}, pp={t.pp}, dp={t.dp}, "
                f"coord={tuple(self.coord)})")

    # construction ----------------------------------------------------------------------
    @classmethod
    def single(cls) -> "ParallelContext":
        return cls(Topology(1, 1, 1), 0)

    @classmethod
    def from_distributed(cls, tp: int = 1, pp: int = 1) -> "ParallelContext":
        """Create every TP/PP/DP/MP group (collectively: all ranks must call this)."""
        if not dist.is_available() or not dist.is_initialized():
            return cls.single() if tp == pp == 1 else _not_initialized(tp, pp)
        topo = Topology(dist.get_world_size(), tp, pp)
        rank = dist.get_rank()
        groups = {}
        for kind, lists in (("tp", topo.tp_groups()), ("dp", topo.dp_groups()), ("pp", topo.pp_groups()),
                            ("mp", topo.mp_groups())):
            for ranks in lists:  # every rank creates every group, in the same order
                group = dist.new_group(ranks)
                if rank in ranks:
                    groups[kind] = group
        return cls(topo, rank, groups)


def _not_initialized(tp: int, pp: int):
    raise RuntimeError(f"tp={tp}, pp={pp} needs torch.distributed to be initialized first")
