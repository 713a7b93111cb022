"""Count collectives and bytes through a thin wrapper over ``torch.distributed``.

    with CommCounter() as cc:
        loss.backward()
    cc.summary()  # {("all_reduce", group_size): (count, elements), ...}

Used by tests (the Megatron per-layer analysis) and by benchmarks (communication
volume against the analytical minimum).  It wraps the module attributes that
:mod:`parallel.comm` and DeepSpeed call, only inside the ``with`` block.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.distributed as dist

_WRAPPED = {
    # name -> index of the tensor whose size is the message (input for gathers, input for reductions)
    "all_reduce": 0,
    "all_gather_single": 1,
    "all_gather_into_tensor": 1,
    "reduce_scatter_single": 1,
    "reduce_scatter_tensor": 1,
    "broadcast": 0,
    "reduce": 0,
    "send": 0,
    "recv": 0,
    "isend": 0,
    "irecv": 0,
}
_CANONICAL = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
              "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}


_DS_BOUND = {"all_gather_function": "all_gather_into_tensor", "reduce_scatter_function": "reduce_scatter_tensor"}


def _deepspeed_backend():
    """DeepSpeed's communication backend object if DeepSpeed is imported and initialised, else None."""
    import sys

    ds_comm = sys.modules.get("deepspeed.comm.comm")
    return getattr(ds_comm, "cdb", None) if ds_comm is not None else None


@dataclass
class Call:
    op: str
    numel: int  # elements of the input tensor (the local contribution)
    bytes: int
    group_size: int
    async_op: bool = False
    root_rank: int | None = None  # reduce/broadcast: the global rank receiving / sending the result
    root: bool = False  # this rank is that root

    @property
    def sent(self) -> float:
        """Bytes this rank puts on the wire for the call, with bandwidth-optimal algorithms: ring
        all-reduce 2(g−1)/g·n, all-gather (g−1)·n (n: the local shard), reduce-scatter (g−1)/g·n,
        send n; a reduce costs every rank but the destination its contribution n; a broadcast
        n/g on average (the root sends it); receives cost the senders."""
        g, n = self.group_size, self.bytes
        if g <= 1:
            return 0.0
        if self.op == "reduce":
            return 0.0 if self.root else float(n)
        return {"all_reduce": 2 * (g - 1) / g * n, "all_gather": (g - 1) * n, "reduce_scatter": (g - 1) / g * n,
                "send": n, "isend": n, "broadcast": n / g}.get(self.op, 0.0)


class CommCounter:
    def __init__(self):
        self.calls: list[Call] = []
        self._saved: dict = {}

    def __enter__(self) -> "CommCounter":
        for name, idx in _WRAPPED.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn
            setattr(dist, name, self._wrap(name, idx, fn))
        # DeepSpeed's torch backend binds all_gather_into_tensor / reduce_scatter_tensor when it is
        # created (ZeRO-1/2's parameter all-gather, ZeRO-3's gathers and reduce-scatters): wrap those too.
        self._backend = _deepspeed_backend()
        for attr, name in _DS_BOUND.items():
            fn = getattr(self._backend, attr, None)
            if fn is not None:
                self._saved[attr] = fn
                setattr(self._backend, attr, self._wrap(name, _WRAPPED[name], fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self._backend if name in _DS_BOUND else dist, name, fn)
        self._saved.clear()

    def _wrap(self, name, idx, fn):
        op = _CANONICAL.get(name, name)

        def wrapper(*args, **kwargs):
            t = args[idx] if len(args) > idx else kwargs.get("tensor", kwargs.get("input_tensor", kwargs.get("input")))
            group = kwargs.get("group")
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            root = None
            if op in ("reduce", "broadcast"):  # the global rank that receives (reduce) or sends (broadcast)
                root = args[1] if len(args) > 1 else kwargs.get("dst", kwargs.get("src"))
            self.calls.append(Call(op, t.numel(), t.numel() * t.element_size(), size,
                                   bool(kwargs.get("async_op", False)), root, root == dist.get_rank()))
            return fn(*args, **kwargs)

        return wrapper

    def summary(self) -> dict:
        out: dict = defaultdict(lambda: [0, 0])
        for c in self.calls:
            out[(c.op, c.numel)][0] += 1
        return {k: v[0] for k, v in out.items()}

    def count(self, op: str, numel: int | None = None) -> int:
        return sum(1 for c in self.calls if c.op == op and (numel is None or c.numel == numel))

    def sent_bytes(self) -> float:
        """Bytes this rank put on the wire (:attr:`Call.sent` summed)."""
        return sum(c.sent for c in self.calls)
