"""The training loop of `megallama train` (its entry and checks: :mod:`megallama.commands.train`).

One process, or under ``deepspeed``, ``torchrun``, ``srun`` or ``mpirun``: the code path
is the same.  With no config it trains the ``demo`` preset on the embedded default corpus.
The loop is short and flat: build, then for each step pull micro-batches, forward/backward,
step, log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megallama.config import Config, gradient_accumulation_steps
from megallama.distributed import device, init_distributed
from megallama.checkpoint import is_weights_only, latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from megallama.data.instruct import split_instruct_batch
from megallama.engine import build_engine, guard_nonfinite_steps
from megallama.energy import EnergyMeter, write_summary as write_energy_summary
from megallama.faults import StepMonitor, TrainingHalted
from megallama.finetune import init_weights_from
from megallama.kernels import describe as describe_kernels
from megallama.metrics import Progress, peak_flops_per_device
from megallama.model import canonical_name
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


@dataclass
class Summary:
    params: int
    tokens: int
    flops: float
    steps: int
    final_train_loss: float
    final_valid_loss: Optional[float]
    tokens_per_sec: float
    mfu: float
    data_wait_fraction: float
    losses: list
    grad_norms: list
    bad_steps: int = 0  # non-finite steps skipped (no update applied)


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
    start_step, start_consumed, ckpt = 0, 0, latest_checkpoint(t.run_dir)
    if ckpt is not None and is_weights_only(read_meta(ckpt)):
        # weights only (import-hf/import-meta, reshard --weights-only): initialise from them and
        # train from step 0 with a fresh optimizer and data stream
        load_checkpoint(engine, params, cfg, ctx, ckpt, load_optimizer=False)
        if rank0:
            print(f"initialised from the weights of {ckpt} (no optimizer state: starting at step 0)", flush=True)
    elif ckpt is not None:
        meta = load_checkpoint(engine, params, cfg, ctx, ckpt)
        # the data position is the checkpoint's, not step * global batch: the batch size may change
        start_step, start_consumed = meta["step"], meta["consumed_samples"]
        if rank0:
            print(f"resumed from {ckpt} (step {start_step}, {meta['consumed_samples']:,} samples consumed)",
                  flush=True)
    elif t.init_from:
        init_weights_from(engine, params, cfg, ctx, getattr(data, "tokenizer", None), rank0)
    # created after loading: a refused checkpoint leaves the run directory exactly as it was
    monitor = StepMonitor(t.run_dir, dist.get_rank(), t.max_bad_steps, t.collective_timeout_s)
    monitor.faults.attach(engine.module, monitor)
    batches = stream(data.train, start_consumed)
    tokenizer = getattr(data, "tokenizer", None)

    def save(step: int) -> None:
        if t.save_interval < 0:  # -1: a benchmark or smoke run that keeps no checkpoint
            return
        consumed = start_consumed + (step - start_step) * t.global_batch_size
        path = save_checkpoint(engine, params, cfg, ctx, step, consumed, tokenizer)
        if rank0:
            print(f"saved checkpoint {path}", flush=True)

    total_steps = t.total_steps()
    if start_step >= total_steps:
        if rank0:
            print(f"{t.run_dir} is already trained to step {start_step} (train.steps={total_steps}); raise "
                  "train.steps to continue it, or choose a new train.run_dir", flush=True)
        return None
    meter = EnergyMeter(str(dev)).start()
    tokens_per_step = t.global_batch_size * t.seq_len
    flops_per_token = cfg.model.flops_per_token(t.seq_len)
    progress = Progress(total_steps, tokens_per_step, flops_per_token, ctx.world_size,
                        peak_flops_per_device(cfg), enabled=rank0, log_interval=t.log_interval,
                        consumed_tokens=start_consumed * t.seq_len)
    writer = _tensorboard(cfg, start_step) if rank0 and t.tensorboard else None

    losses, grad_norms, valid_loss = [], [], None
    wait_total, time_total = 0.0, 0.0
    if rank0:
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
    log = _metrics_log(Path(t.run_dir) / "metrics.jsonl", start_step) if rank0 else None
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
        losses.append(loss)
        grad_norms.append(norm)
        wait_total, time_total = wait_total + batches.wait, time_total + elapsed
        stats = progress.update(step + 1, loss, elapsed, batches.wait, lr=lr, grad_norm=grad_norms[-1],
                                memory=_memory_bytes())
        if writer is not None:
            for key, value in {**stats, **meter.tensorboard_scalars()}.items():
                writer.add_scalar(key, value, step + 1)
        if log is not None:
            log.write(json.dumps(_json_safe({"step": step + 1, "loss": loss, "grad_norm": grad_norms[-1], "lr": lr}),
                                 allow_nan=False) + "\n")
            log.flush()
        if halted is not None:
            if writer is not None:
                writer.flush()
            raise halted
        if t.eval_interval and data.valid is not None and ((step + 1) % t.eval_interval == 0
                                                           or step + 1 == total_steps):
            valid_loss = evaluate(engine, stream(data.valid), cfg, gas, ctx, pipelined)
            progress.log_eval(step + 1, valid_loss)
            if writer is not None:
                writer.add_scalar("valid/loss", valid_loss, step + 1)
                writer.add_scalar("valid/perplexity", float(torch.tensor(valid_loss).exp()), step + 1)
        if tasks and (step + 1) % t.task_eval_interval == 0:
            from megallama.eval.harness import evaluate_during_training

            evaluate_during_training(engine.module, cfg.model, data.tokenizer, tasks, task_opts, writer, step + 1)
        if step + 1 < total_steps and stop.agreed():
            save(step + 1)
            if rank0:
                then = ("run the same command to resume" if t.save_interval >= 0 else
                        "no checkpoint was written (train.save_interval=-1)")
                print(f"stopping on signal {stop.signal or 'from another rank'} after step {step + 1}; {then}",
                      flush=True)
            raise SystemExit(EXIT_PREEMPTED)
        if t.save_interval > 0 and (step + 1) % t.save_interval == 0 and step + 1 < total_steps:
            save(step + 1)

    save(total_steps)

    # the run's whole count: the checkpoint's position plus this session's steps (the global batch may
    # have changed at a resume)
    tokens = (start_consumed + (total_steps - start_step) * t.global_batch_size) * t.seq_len
    summary = Summary(params=cfg.model.num_parameters(), tokens=tokens,
                      flops=float(tokens * flops_per_token), steps=total_steps,
                      final_train_loss=losses[-1], final_valid_loss=valid_loss,
                      tokens_per_sec=progress.mean_tokens_per_sec(), mfu=progress.mean_mfu(),
                      data_wait_fraction=wait_total / max(time_total, 1e-9), losses=losses,
                      grad_norms=grad_norms, bad_steps=monitor.bad_steps)
    hosts = None
    if dev.type == "cpu":  # the CPU meter reads the whole host, shared by its ranks: count the hosts
        names = [None] * ctx.world_size
        dist.all_gather_object(names, socket.gethostname())
        hosts = len(set(names))
    if rank0:
        _write_summary(cfg, summary)
        write_energy_summary(t.run_dir, meter, world_size=ctx.world_size, hosts=hosts)
        log.close()
        if writer is not None:
            writer.close()
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


def _tensorboard(cfg: Config, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # a resume replays the steps after its checkpoint: hide the earlier session's events from then on
    return SummaryWriter(log_dir=str(Path(cfg.train.run_dir) / "tensorboard"), purge_step=start_step + 1)


def _metrics_log(path: Path, start_step: int):
    """``metrics.jsonl`` opened for appending, without the lines of steps after ``start_step``: a
    resume replays them, and each step keeps one line (a torn last line of a killed run goes too)."""
    if path.is_file():
        text, kept = path.read_text(), []
        lines = text.splitlines()
        for line in lines:
            try:
                if json.loads(line)["step"] <= start_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        if len(kept) == len(lines) and text.endswith("\n"):
            return open(path, "a")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return open(path, "a")


def _json_safe(x):
    """``x`` with every non-finite float (the loss of a skipped step) as None: strict JSON (``null``),
    which jq and other parsers read, where ``NaN``/``Infinity`` are not JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _write_summary(cfg: Config, summary: Summary) -> None:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = _json_safe(dict(summary.__dict__))
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, run_dir / "summary.json")
    (run_dir / "config.yaml").write_text(_yaml(cfg))


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
