"""Communication volume, overlap, pipeline bubble and ZeRO memory of 2-rank layouts, measured.

    python benchmarks/parallel_layouts.py [--preset demo] [--steps 2]

Each layout runs ``megallama train``'s own engine and step (DeepSpeed, fp32, gloo)
in 2 processes on synthetic batches; after a warm-up step, one optimizer step runs
inside a timing :class:`~parallel.comm_counter.CommCounter`.

* **Communication volume**: bytes each rank puts on the wire (ring algorithms:
  all-reduce 2(g−1)/g·n, all-gather (g−1)·n_local, reduce-scatter (g−1)/g·n, send n)
  over the analytical minimum of the layout (ratio 1.00 = no wasted bytes):
  TP: Megatron's 4 all-reduces of s·b·h per layer + embedding and output layer
  + the 3 token-sized cross-entropy reductions; SP: the same volume as all-gathers and
  reduce-scatters + the replicated norm weights' gradients; PP: one activation and one
  gradient of s·b·h per micro-batch and stage boundary; DP (N parameter bytes, a
  reduce-scatter or all-gather of them = (g−1)/g·N): ZeRO-0 one all-reduce per step,
  ZeRO-1 one reduce-scatter + the parameter all-gather, ZeRO-2 a reduce-scatter per
  micro-batch (its gradients are partitioned, so it cannot accumulate them) + the
  all-gather, ZeRO-3 per micro-batch one parameter all-gather (two for models over
  ``stage3_max_reuse_distance`` parameters, which DeepSpeed releases between forward and
  backward) and one reduce-scatter.  A reduce to one rank (ZeRO-1/2's per-partition
  reduction) costs the other ranks their contribution each.
* **Overlappable**: the share of the collectives' bytes issued with compute left to run
  behind them: asynchronous collectives (waited for later) and those issued inside a
  backward before its last parameter gradient was produced (ZeRO's bucketed gradient
  reductions, which DeepSpeed runs on a side stream on a GPU).  What the layout lets a
  machine hide; whether it is hidden is the next column.  (Pipeline layouts: "-".)
* **Hidden**: 1 − (time ranks were blocked in collectives during the step) / (time the
  same collectives take when replayed back to back afterwards).  Asynchronous
  collectives count only the time spent in ``wait()``.
* **Bubble**: per stage, the share of the step the stage spent blocked in
  send/recv/broadcast, next to (p−1)/(m+p−1).
* **ZeRO memory**: per-rank parameter, gradient (the peak over the step: after each
  micro-batch's backward) and optimizer bytes found in the engine, next to the planner.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import loadavg, print_table  # noqa: E402
from parallel.comm_counter import CommCounter  # noqa: E402

LAYOUTS = {  # name -> overrides (2 ranks each)
    "TP=2": ["parallel.tp=2", "parallel.zero_stage=0"],
    "TP=2 +SP": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=0"],
    # selective recompute keeps the parallel linears' outputs: the same bytes as no recompute
    "TP=2 selective": ["parallel.tp=2", "parallel.zero_stage=0", "train.activation_checkpointing=selective"],
    "TP=2 +SP selective": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=0",
                           "train.activation_checkpointing=selective"],
    "PP=2": ["parallel.pp=2", "parallel.zero_stage=0", "train.micro_batch_size=2"],
    "PP=2 flops": ["parallel.pp=2", "parallel.zero_stage=0", "train.micro_batch_size=2",
                   "parallel.pipeline_partition=flops"],
    # balanced stages (embedding and output layer of a 256-token vocabulary weigh next to nothing):
    # the idle time left is the schedule's own bubble
    "PP=2 balanced": ["parallel.pp=2", "parallel.zero_stage=0", "train.micro_batch_size=2", "model.vocab_size=256"],
    # DP: micro-batches of 4, so each step accumulates 2 of them (the gradient peak and ZeRO-2/3's
    # per-micro-batch communication show)
    "DP=2 ZeRO-0": ["parallel.zero_stage=0", "train.micro_batch_size=4"],
    "DP=2 ZeRO-1": ["parallel.zero_stage=1", "train.micro_batch_size=4"],
    "DP=2 ZeRO-2": ["parallel.zero_stage=2", "train.micro_batch_size=4"],
    "DP=2 ZeRO-3": ["parallel.zero_stage=3", "train.micro_batch_size=4"],
}
P2P = ("send", "recv", "isend", "irecv", "broadcast")


class TimedCounter(CommCounter):
    """A CommCounter that also records how long the caller was blocked, and the group (for replay)."""

    def _wrap(self, name, idx, fn):
        counted = super()._wrap(name, idx, fn)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            work = counted(*args, **kwargs)
            call = self.calls[-1]
            call.group = kwargs.get("group")
            call.issued = start
            call.blocked = time.perf_counter() - start
            if work is not None and hasattr(work, "wait"):
                return _TimedWork(work, call)
            return work

        return wrapper


class _TimedWork:
    """Forwards to an async collective's handle, adding the time spent in ``wait()`` to its call."""

    def __init__(self, work, call):
        self._work, self._call = work, call

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        self._call.blocked += time.perf_counter() - start
        return out

    def __getattr__(self, name):
        return getattr(self._work, name)


def minimum_bytes(name: str, cfg, gas: int, world: int) -> float:
    """The analytical minimum of bytes one rank sends per optimizer step (see the module docstring)."""
    m, t = cfg.model, cfg.train
    s, b, h, L, f = t.seq_len, t.micro_batch_size, m.dim, m.n_layers, 4
    sbh = s * b * h * f
    ring = 2 * (world - 1) / world
    if name.startswith("TP"):
        per_micro = ring * ((4 * L + 2) * sbh + 3 * s * b * f)
        if "SP" in name:
            per_micro += ring * (2 * L + 1) * h * f  # replicated norm weights see 1/t of the tokens
        return gas * per_micro
    if name.startswith("PP"):
        return gas * sbh  # each stage sends one s*b*h tensor per micro-batch (activation or gradient)
    # DP: N gradient/parameter bytes; a reduce-scatter or an all-gather of them costs half an all-reduce.
    n = cfg.model.num_parameters(tp=1) * f
    half = ring / 2 * n
    stage = cfg.parallel.zero_stage
    if stage <= 1:  # gradients accumulate locally; one reduction at the step (+ ZeRO-1's parameter gather)
        return 2 * half
    if stage == 2:  # partitioned gradients: reduce-scattered after every micro-batch's backward
        return gas * half + half
    # ZeRO-3: parameters gathered for each micro-batch's forward (and again for its backward when
    # DeepSpeed released them: models over stage3_max_reuse_distance parameters), gradients
    # reduce-scattered after each backward
    from megallama.engine import deepspeed_config

    reuse = deepspeed_config(cfg, world)["zero_optimization"].get("stage3_max_reuse_distance", 10**9)
    gathers = 2 if cfg.model.num_parameters(tp=1) > reuse else 1
    return gas * (gathers + 1) * half


def _replay_seconds(calls) -> float:
    """Time of the recorded collectives (not point-to-point) when run synchronously back to back."""
    import torch
    import torch.distributed as dist

    total = 0.0
    for c in calls:
        if c.op not in ("all_reduce", "all_gather", "reduce_scatter", "reduce"):
            continue
        g = c.group_size
        x = torch.zeros(c.numel)
        start = time.perf_counter()
        if c.op == "all_reduce":
            dist.all_reduce(x, group=c.group)
        elif c.op == "reduce":
            dist.reduce(x, c.root_rank, group=c.group)
        elif c.op == "all_gather":
            dist.all_gather_into_tensor(torch.empty(c.numel * g), x, group=c.group)
        else:
            dist.reduce_scatter_tensor(torch.empty(c.numel // g), x, group=c.group)
        total += time.perf_counter() - start
    return total


def _overlappable_bytes(collectives, windows, grad_times) -> tuple[float, float] | None:
    """(bytes, of all bytes) this rank sent in collectives issued with compute left to overlap:
    asynchronous ones (the caller computes before it waits: TP/SP backward, ZeRO-3 prefetch) and
    those issued during a backward before its last parameter gradient was produced (ZeRO's bucketed
    gradient reductions, which a GPU runs on a side stream).  None where no backward was timed
    (pipeline layouts)."""
    if not windows:
        return None
    last = [max((t for t in grad_times if a <= t <= b), default=a) for a, b in windows]

    def hideable(c) -> bool:
        return c.async_op or any(a <= c.issued < g for (a, _), g in zip(windows, last))

    return sum(c.sent for c in collectives if hideable(c)), sum(c.sent for c in collectives)


def _state_bytes(engine) -> dict:
    """Parameter, gradient and optimizer bytes this rank holds, each storage counted once.

    Parameters: the module's parameters (ZeRO-3: their local partitions).  Optimizer:
    the base optimizer's states and the fp32 partitions it steps (DeepSpeed keeps such a
    "master" partition even in fp32 under ZeRO-1/2/3).  Gradients: every other float
    tensor reachable from the engine's ZeRO optimizer (buckets, partitions) and ``.grad``.
    """
    import torch

    seen: set = set()

    def total(tensors) -> int:
        n = 0
        for x in tensors:
            if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0
                    or x.device.type == "meta"):  # DeepSpeed keeps meta-device shapes: no memory
                continue
            key = x.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                n += x.untyped_storage().nbytes()
        return n

    params = list(engine.module.parameters())
    p_bytes = total(getattr(p, "ds_tensor", p) for p in params)
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    # ZeRO-3 hands its fp32 partitions to the base optimizer only inside step()
    masters = [p for g in base.param_groups for p in g["params"]]
    masters += getattr(opt, "fp32_partitioned_groups_flat", [])
    o_bytes = total(masters) + total(v for st in base.state.values() for v in st.values())
    grads = [p.grad for p in params + masters if p.grad is not None]
    for value in vars(opt).values():  # ZeRO's gradient buckets and partitions
        if isinstance(value, torch.Tensor):
            grads.append(value)
        elif isinstance(value, (list, tuple)):
            grads += [v for v in value if isinstance(v, torch.Tensor)]
            grads += [w for v in value if isinstance(v, (list, tuple)) for w in v if isinstance(w, torch.Tensor)]
        elif isinstance(value, dict):
            for v in value.values():
                grads += v if isinstance(v, list) else [v]
    return {"parameters": p_bytes, "gradients": total(grads), "optimizer": o_bytes}


def _case(rank, world, preset, overrides, steps):
    import torch

    from megallama.config import load_config, validate
    from tests.synthetic import synthetic_engine

    torch.set_num_threads(1)
    base = ["train.tensorboard=false", "train.precision=fp32", "train.global_batch_size=16",
            "train.micro_batch_size=8", f"train.steps={steps + 2}"]
    cfg = validate(load_config(None, base + overrides, preset=preset), world)
    run = synthetic_engine(cfg, world)
    engine, gas = run.engine, run.gas
    run.step()  # warm-up
    memory = None
    if cfg.parallel.pp == 1:  # the peak over a step: after each micro-batch's backward (before the optimizer step)
        for _ in range(gas):
            inputs, targets = next(run.batches)
            engine.backward(engine(inputs, targets))
            now = _state_bytes(engine)
            memory = {k: max(v, (memory or now)[k]) for k, v in now.items()}
            engine.step()
    # when each backward ran and when its parameters' gradients were produced: a collective issued
    # inside a backward before its last gradient had compute left to hide behind
    windows, grad_times = [], []
    if cfg.parallel.pp == 1:
        backward = engine.backward

        def timed_backward(*args, **kwargs):
            windows.append([time.perf_counter(), None])
            out = backward(*args, **kwargs)
            windows[-1][1] = time.perf_counter()
            return out

        engine.backward = timed_backward
        for p in engine.module.parameters():  # a tensor hook runs as the gradient is produced, before
            p.register_hook(lambda _: grad_times.append(time.perf_counter()))  # DeepSpeed's reduction hooks
    results = []
    for _ in range(steps):
        windows.clear()
        grad_times.clear()
        with TimedCounter() as cc:
            start = time.perf_counter()
            run.step()
            elapsed = time.perf_counter() - start
        calls = [c for c in cc.calls if c.numel > 1]  # scalars (loss, norms) are bookkeeping
        collectives = [c for c in calls if c.op not in P2P]
        results.append(dict(
            sent=cc.sent_bytes(), overlappable=_overlappable_bytes(collectives, windows, grad_times),
            blocked=sum(c.blocked for c in collectives), replay=_replay_seconds(collectives),
            p2p_blocked=sum(c.blocked for c in cc.calls if c.op in P2P), step=elapsed))
    return dict(results=results, memory=memory, gas=gas, stage=run.ctx.pp_rank)


def main(argv=None) -> int:
    from megallama.config import load_config, validate
    from tests.distributed import run_ranks
    from tools.planner import Layout, model_state_bytes, params_per_gpu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per layout (medians reported)")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = ap.parse_args(argv)
    comm_rows, bubble_rows, mem_rows = [], [], []
    for name in args.layouts:
        out = run_ranks(_case, 2, args.preset, LAYOUTS[name], args.steps, timeout=600)
        cfg = validate(load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=8"]
                                   + LAYOUTS[name], preset=args.preset), 2)
        gas = out[0]["gas"]
        sent = max(statistics.median(r["sent"] for r in o["results"]) for o in out)
        minimum = minimum_bytes(name, cfg, gas, 2)
        blocked = statistics.median(r["blocked"] for r in out[0]["results"])
        replay = statistics.median(r["replay"] for r in out[0]["results"])
        hidden = f"{100 * max(0.0, 1 - blocked / replay):.0f}%" if replay > 0 else "-"
        shares = []  # per step, over both ranks (a reduce costs only the ranks it is not for)
        for step in zip(*(o["results"] for o in out)):
            parts = [r["overlappable"] for r in step if r["overlappable"] is not None]
            if parts and sum(t for _, t in parts) > 0:
                shares.append(sum(h for h, _ in parts) / sum(t for _, t in parts))
        overlappable = f"{100 * statistics.median(shares):.0f}%" if shares else "-"
        comm_rows.append([name, f"{sent / 2**20:.2f}", f"{minimum / 2**20:.2f}", f"{sent / minimum:.2f}",
                          overlappable, hidden, loadavg()])
        if name.startswith("PP"):
            m, pp = gas, 2
            for o in out:
                idle = statistics.median(r["p2p_blocked"] / r["step"] for r in o["results"])
                bubble_rows.append([f"stage {o['stage']}", m, f"{100 * idle:.1f}%",
                                    f"{100 * (pp - 1) / (m + pp - 1):.1f}%", loadavg()])
        if name.startswith("DP"):
            mem = out[0]["memory"]
            lay = Layout(gpus=2, zero_stage=cfg.parallel.zero_stage, precision="fp32")
            pl = model_state_bytes(params_per_gpu(cfg.model, lay), 2, lay.zero_stage, precision="fp32")
            mib = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
            mem_rows.append([name, mib(mem["parameters"]), mib(pl["parameters"]), mib(mem["gradients"]),
                             mib(pl["gradients"]), mib(mem["optimizer"]), mib(pl["optimizer"])])
    print(f"{args.preset}, 2 ranks (gloo, 1 thread each), fp32, global batch 16 (DP: micro-batches of 4, 2 "
          "accumulated per step); MiB per rank per step")
    print_table(["layout", "sent", "minimum", "ratio", "overlappable", "hidden", "load"], comm_rows)
    if bubble_rows:
        print()
        print_table(["pipeline", "micro-batches", "idle measured", "(p-1)/(m+p-1)", "load"], bubble_rows)
    if mem_rows:
        print()
        print_table(["layout", "params", "planner", "grads", "planner", "optimizer", "planner"], mem_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
