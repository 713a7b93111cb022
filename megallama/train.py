"""The training loop of `megallama train` (its entry and checks: :mod:`megallama.commands.train`).

One process, or under ``deepspeed``, ``torchrun``, ``srun`` or ``mpirun``: the code path
is the same.  With no config it trains the ``demo`` preset on the embedded default corpus.
The loop is short and flat: build, then for each step pull micro-batches, forward/backward,
step, log.
"""

from __future__ import annotations

import logging
import resource
import signal
import socket
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megallama.config import Config, gradient_accumulation_steps
from megallama.distributed import device, init_distributed
from megallama.checkpoint import save_checkpoint
from megallama.data.instruct import split_instruct_batch
from megallama.engine import build_engine, guard_nonfinite_steps
from megallama.energy import EnergyMeter, write_summary as write_energy_summary
from megallama.faults import StepMonitor, TrainingHalted
from megallama.kernels import describe as describe_kernels
from megallama.metrics import Progress, RunLog, Summary, peak_flops_per_device
from megallama.model import canonical_name
from megallama.restore import choose_start, restore
from parallel.grad import global_grad_norm
from parallel.topology import ParallelContext


# ----------------------------------------------------------------------------- building blocks

def canonical_parameters(engine, cfg: Config):
    """(canonical name, parameter) of this rank's part of the model."""
    named = engine.module.named_parameters()
    if cfg.parallel.pp == 1:
        return list(named)
    return [(canonical_name(n, cfg.model.n_layers), p) for n, p in named]


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1; run the same command to resume


class StopRequest:
    """SIGTERM/SIGUSR1 (how SLURM announces preemption) set a flag; all ranks agree on it at the
    next step boundary, save a checkpoint and exit with EXIT_PREEMPTED."""

    def __init__(self):
        self.signal = 0
        self.install()

    def install(self) -> None:
        """(Re)install the handlers: at the very start of :func:`train`, so a preemption announced
        while the process group, data and engine are still being built is kept, not fatal (the
        default action), and again once the engine exists, in case a library replaced them."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self) -> bool:
        flag = torch.tensor([self.signal], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Timed:
    """Wraps the micro-batch iterator: splits (inputs, labels) and accumulates the wait for data."""

    def __init__(self, batches: Iterator[torch.Tensor], dev: torch.device):
        self.batches, self.dev, self.wait = batches, dev, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        tokens = next(self.batches)
        self.wait += time.perf_counter() - start
        tokens = tokens.to(self.dev, non_blocking=True)
        return split_instruct_batch(tokens)  # (inputs, targets), or with doc ids and a loss mask


def _dp_mean(x: torch.Tensor, ctx: ParallelContext) -> float:
    if ctx.dp_size > 1:
        dist.all_reduce(x, group=ctx.dp_group)
        x = x / ctx.dp_size
    return x.item()


def model_loss(engine, inputs, labels) -> torch.Tensor:
    """Loss of one micro-batch: plain ``(tokens, targets)`` or instruction
    ``((tokens, doc_ids), (targets, loss_mask))`` (the pipeline engine takes both as they are)."""
    if isinstance(inputs, tuple):
        (tokens, doc_ids), (targets, loss_mask) = inputs, labels
        return engine(tokens, targets, loss_mask, doc_ids=doc_ids)
    return engine(inputs, labels)


def train_step(engine, batches: Timed, gas: int, ctx: ParallelContext, pipelined: bool) -> tuple[float, float]:
    """One optimizer step over ``gas`` micro-batches: (loss averaged over the global batch, grad norm)."""
    if pipelined:
        loss = engine.train_batch(batches).item()  # DeepSpeed's 1F1B schedule; loss already DP-averaged
        return loss, _grad_norm(engine)
    total, norm = torch.zeros((), device=engine.device), None
    for micro in range(gas):
        loss = model_loss(engine, *next(batches))
        engine.backward(loss)
        if micro == gas - 1 and engine.zero_optimization_stage() == 0:
            norm = global_grad_norm(engine.module.parameters(), ctx)  # ZeRO-0 clips without reporting it
        engine.step()
        total += loss.detach().float()
    return _dp_mean(total / gas, ctx), norm if norm is not None else _grad_norm(engine)


@torch.no_grad()
def evaluate(engine, batches: Timed, cfg: Config, gas: int, ctx: ParallelContext, pipelined: bool) -> float:
    """Mean validation loss over ``eval_iters`` global batches (the same samples every time)."""
    if pipelined:
        losses = [engine.eval_batch(batches).item() for _ in range(cfg.train.eval_iters)]
        return sum(losses) / len(losses)
    engine.eval()
    total = torch.zeros((), device=engine.device)
    for _ in range(cfg.train.eval_iters * gas):
        total += model_loss(engine, *next(batches)).float()
    engine.train()
    return _dp_mean(total / (cfg.train.eval_iters * gas), ctx)


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config, data=None) -> Optional[Summary]:
    """Train ``cfg``; ``data`` (a DataBundle-like object with .train/.valid) defaults to the config's.

    Returns None when the run directory is already trained to ``train.steps``."""
    stop = StopRequest()  # first: a preemption signal during start-up is acted on at the first step boundary
    tasks, task_opts = _prepare_tasks(cfg)  # read and check task files before any process group exists
    p, t = cfg.parallel, cfg.train
    init_distributed(t.collective_timeout_s)
    from megallama.data.pipeline import build_datasets, micro_batches, validation_note

    ctx = ParallelContext.from_distributed(p.tp, p.pp)
    rank0 = dist.get_rank() == 0
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(t.seed)

    data = data if data is not None else build_datasets(cfg)
    if rank0 and (note := validation_note(data, cfg)):
        print(note, flush=True)
    engine = build_engine(cfg, ctx)
    stop.install()
    guard_nonfinite_steps(engine.optimizer)
    gas = gradient_accumulation_steps(cfg, ctx.world_size)
    pipelined = p.pp > 1
    dev = device()
    kernels = describe_kernels(dev)
    if rank0 and kernels:
        print(kernels, flush=True)

    def stream(dataset, consumed: int = 0) -> Timed:
        return Timed(micro_batches(dataset, consumed, t.global_batch_size, t.micro_batch_size,
                                   ctx.dp_rank, ctx.dp_size), dev)

    params = canonical_parameters(engine, cfg)
    tokenizer = getattr(data, "tokenizer", None)
    start_step, start_consumed = restore(choose_start(cfg), engine, params, cfg, ctx, tokenizer, rank0)
    # created after loading: a refused checkpoint leaves the run directory exactly as it was
    monitor = StepMonitor(t.run_dir, dist.get_rank(), t.max_bad_steps, t.collective_timeout_s)
    monitor.faults.attach(engine.module, monitor)
    batches = stream(data.train, start_consumed)

    def save(step: int, wait: bool = False) -> None:
        if t.save_interval < 0:  # -1: a benchmark or smoke run that keeps no checkpoint
            return
        consumed = start_consumed + (step - start_step) * t.global_batch_size
        background = t.async_save and not wait  # the last save, and one on a signal, commit before exit
        path = save_checkpoint(engine, params, cfg, ctx, step, consumed, tokenizer, asynchronous=background,
                               anchor=(start_step, start_consumed))
        if rank0:
            print(f"{'saving' if background else 'saved'} checkpoint {path}"
                  f"{' in the background' if background else ''}", flush=True)

    total_steps = t.total_steps()
    if start_step >= total_steps:
        if rank0:
            print(f"{t.run_dir} is already trained to step {start_step} (train.steps={total_steps}); raise "
                  "train.steps to continue it, or choose a new train.run_dir", flush=True)
        return None
    meter = EnergyMeter(str(dev)).start()
    flops_per_token = cfg.model.flops_per_token(t.seq_len)
    progress = Progress(total_steps, t.global_batch_size * t.seq_len, flops_per_token, ctx.world_size,
                        peak_flops_per_device(cfg), enabled=rank0, log_interval=t.log_interval,
                        consumed_tokens=start_consumed * t.seq_len)
    log = RunLog(cfg, start_step, enabled=rank0)
    for step in range(start_step, total_steps):
        monitor.begin(step + 1)
        start, batches.wait = time.perf_counter(), 0.0
        lr = engine.get_lr()[0]
        loss, norm = train_step(engine, batches, gas, ctx, pipelined)
        elapsed = time.perf_counter() - start
        try:
            monitor.end(step + 1, engine.was_step_applied(), loss)
            halted = None
        except TrainingHalted as exc:  # the step that halts the run is logged first, like every other
            halted = exc
        stats = progress.update(step + 1, loss, elapsed, batches.wait, lr=lr, grad_norm=norm, memory=_memory_bytes())
        log.step(step + 1, loss, norm, lr, batches.wait, elapsed, {**stats, **meter.tensorboard_scalars()})
        if halted is not None:
            log.flush()
            raise halted
        if t.eval_interval and data.valid is not None and ((step + 1) % t.eval_interval == 0
                                                           or step + 1 == total_steps):
            valid_loss = evaluate(engine, stream(data.valid), cfg, gas, ctx, pipelined)
            progress.log_eval(step + 1, valid_loss)
            log.valid(step + 1, valid_loss)
        if tasks and (step + 1) % t.task_eval_interval == 0:
            from megallama.eval.harness import evaluate_during_training

            evaluate_during_training(engine.module, cfg.model, data.tokenizer, tasks, task_opts, log.writer, step + 1, ctx)
        if step + 1 < total_steps and stop.agreed():
            save(step + 1, wait=True)
            if rank0:
                then = ("run the same command to resume" if t.save_interval >= 0 else
                        "no checkpoint was written (train.save_interval=-1)")
                print(f"stopping on signal {stop.signal or 'from another rank'} after step {step + 1}; {then}",
                      flush=True)
            raise SystemExit(EXIT_PREEMPTED)
        if t.save_interval > 0 and (step + 1) % t.save_interval == 0 and step + 1 < total_steps:
            save(step + 1)

    save(total_steps, wait=True)

    # the run's whole count: the checkpoint's position plus this session's steps (the global batch may
    # have changed at a resume)
    tokens = (start_consumed + (total_steps - start_step) * t.global_batch_size) * t.seq_len
    summary = log.summary(tokens, total_steps, progress, monitor.bad_steps)
    hosts = None
    if dev.type == "cpu":  # the CPU meter reads the whole host, shared by its ranks: count the hosts
        names = [None] * ctx.world_size
        dist.all_gather_object(names, socket.gethostname())
        hosts = len(set(names))
    if rank0:
        log.finish(summary)
        write_energy_summary(t.run_dir, meter, world_size=ctx.world_size, hosts=hosts)
    return summary


def _prepare_tasks(cfg: Config):
    if not cfg.train.eval_tasks:
        return [], None
    from megallama.eval.harness import EvalOptions, TaskSpec, prepare_task

    opts = EvalOptions(limit=cfg.train.task_eval_limit, seed=cfg.train.seed)
    return [prepare_task(TaskSpec.parse(text), opts) for text in cfg.train.eval_tasks], opts


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
