"""`megallama train`: pretrain a LLaMA model with TP x SP x PP x ZeRO-DP on DeepSpeed.

One process (``megallama train``), or under ``deepspeed``, ``torchrun``, ``srun``
or ``mpirun``: the code path is the same.  With no config it trains the ``demo``
preset on the embedded default corpus.  The loop is short and flat: build, then
for each step pull micro-batches, forward/backward, step, log.
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

from megallama.config import (Config, add_config_arguments, config_from_args, config_from_dict,
                              gradient_accumulation_steps)
from megallama.distributed import device, init_distributed, shutdown, world_size_from_env
from megallama.checkpoint import (check_compatible, is_weights_only, latest_checkpoint, load_checkpoint, read_meta,
                                  save_checkpoint)
from megallama.data.instruct import split_instruct_batch
from megallama.engine import WarmupCosine, build_optimizer, deepspeed_config
from megallama.energy import EnergyMeter, write_summary as write_energy_summary
from megallama.errors import ConfigError, UserError, say
from megallama.faults import EXIT_HALTED, Faults, StepMonitor, TrainingHalted, guard_nonfinite_steps, report_failure
from megallama.finetune import (add_finetune_arguments, check_init_from, check_tokenizer, finetune_config,
                                init_weights_from)
from megallama.kernels import describe as describe_kernels
from megallama.metrics import Progress, peak_flops_per_device
from megallama.preflight import check_inputs
from megallama.runlock import run_lock
from megallama.model import PipelineLoss, Transformer, canonical_name, init_parameters, pipeline_layers
from parallel import gemm
from parallel.grad import global_grad_norm
from parallel.mpu import MPU
from parallel.topology import ParallelContext


def add_arguments(p):
    add_config_arguments(p)
    add_finetune_arguments(p)


def run(args) -> int:
    world = world_size_from_env()
    cfg = finetune_config(config_from_args(args, world, default_preset="demo"), args)
    check_environment(cfg)
    deepspeed_config(cfg, world)  # a bad or contradicting ds_template: one line before any process group
    together = False  # whether every rank reaches the end, so they can leave the group in step
    try:
        with run_lock(cfg.train.run_dir):  # rank 0: one trainer per run directory, or one line (exit 2)
            train(cfg)
        together = True
    except SystemExit as exc:
        together = exc.code == EXIT_PREEMPTED  # every rank agreed on the stop and saved
        return int(exc.code or 0)
    except TrainingHalted as exc:
        say(f"megallama train: error: {exc}")
        return EXIT_HALTED
    except UserError:
        raise  # already one actionable line (exit 2)
    except Exception as exc:
        report_failure(cfg.train.run_dir, exc)
        raise
    finally:
        shutdown(barrier=together)
    return 0


# What megallama itself writes into a run directory: a directory holding only these (say, a run
# that died before its first checkpoint) may be trained into again; anything else is refused.
RUN_ARTEFACTS = {"checkpoints", "tensorboard", "metrics.jsonl", "heartbeats", "config.yaml", "summary.json",
                 "energy.json", "failure.json", "run.lock"}


def check_environment(cfg: Config) -> None:
    """Checks that need the machine, done before any process group or file exists."""
    Faults.from_env(0)  # a malformed MEGALLAMA_FAULT: one line now, not a traceback on every rank later
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (no fp16 loss scaling on DeepSpeed's CPU backend); "
                          "use bf16 or fp32 on CPU")
    run_dir = Path(cfg.train.run_dir)
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ARTEFACTS) if run_dir.is_dir() else []
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None and foreign:
        raise ConfigError(f"train.run_dir '{run_dir}' holds files but no checkpoint to resume ({', '.join(foreign[:3])}); "
                          "choose a new train.run_dir (--set train.run_dir=...) or remove it")
    if ckpt is not None:  # resuming: the checkpoint must fit this config
        meta = read_meta(ckpt)
        check_compatible(meta, cfg, ckpt)
        consumed, batch, theirs = meta["consumed_samples"], cfg.train.global_batch_size, \
            config_from_dict(meta["config"]).train
        if not is_weights_only(meta) and theirs.seq_len != cfg.train.seq_len:
            # the data position counts samples of the checkpoint's seq_len: at another one it names other data
            raise ConfigError(f"checkpoint '{ckpt}' was trained with train.seq_len={theirs.seq_len} but the config "
                              f"says {cfg.train.seq_len}; its data position ({consumed:,} samples) does not carry over "
                              f"to another sequence length: resume with --set train.seq_len={theirs.seq_len}, or start "
                              f"a new run (a new train.run_dir) from its weights with --init-from {ckpt}")
        if not is_weights_only(meta) and consumed % batch:
            raise ConfigError(f"checkpoint '{ckpt}' has consumed {consumed:,} samples, not a whole number of "
                              f"train.global_batch_size={batch} batches; resume with a global batch size "
                              f"dividing {consumed} (it was {theirs.global_batch_size})")
        if cfg.data.tokenizer:  # resuming onto data of another tokenizer would train on other token ids
            from megallama.data.tokenizer import Tokenizer

            check_tokenizer(meta, ckpt, Tokenizer(cfg.data.tokenizer).fingerprint, what="checkpoint")
    elif cfg.train.init_from:
        check_init_from(cfg)
    check_inputs(cfg)


# ----------------------------------------------------------------------------- building blocks

def build_engine(cfg: Config, ctx: ParallelContext):
    """The model (or this rank's pipeline stage) with layout-independent init, wrapped by DeepSpeed."""
    import deepspeed

    m, p, t = cfg.model, cfg.parallel, cfg.train
    try:
        gemm.set_cpu_backend(t.cpu_gemm)
    except ValueError as exc:
        raise ConfigError(f"train.cpu_gemm={t.cpu_gemm}: {exc}") from None
    if p.pp == 1:
        model = Transformer(m, ctx, sequence_parallel=p.sequence_parallel, checkpointing=t.activation_checkpointing)
        init_parameters(model.named_parameters(), m, t.seed, ctx)
    else:
        from parallel.pipeline import PipelineStages

        specs, weights = pipeline_layers(m, ctx, p.sequence_parallel, t.activation_checkpointing,
                                         p.pipeline_partition)
        loss_fn = PipelineLoss()
        model = PipelineStages(specs, weights, ctx, loss_fn, method=p.pipeline_partition)
        loss_fn.bind(model)
        init_parameters(((canonical_name(n, m.n_layers), w) for n, w in model.named_parameters()), m, t.seed, ctx)
    if t.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=WarmupCosine(optimizer, cfg),
        config=deepspeed_config(cfg, ctx.world_size), mpu=MPU(ctx) if p.pp == 1 else None)
    if p.pp > 1 and not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()):
        _clip_by_replica_norm(engine, ctx)
        if engine.gradient_clipping() == 0:
            _report_unclipped_norm(engine, ctx)
    return engine


def _replica_norm(engine, ctx: ParallelContext) -> tuple[list, float]:
    """The parameters holding gradients, and their norm over the whole replica (recorded as the
    engine's, which the logs read)."""
    params = [q for q in engine.module.parameters() if q.grad is not None]
    engine._global_grad_norm = global_grad_norm(params, ctx)
    return params, engine._global_grad_norm


def _report_unclipped_norm(engine, ctx: ParallelContext) -> None:
    """Pipeline stages in fp32 without ZeRO and with clipping off: DeepSpeed's pipeline engine then
    computes no gradient norm (it does in its clipping and in every ZeRO optimizer), so measure it
    before each step for the logs."""
    step = engine.optimizer.step

    def step_with_norm(*args, **kwargs):
        _replica_norm(engine, ctx)
        return step(*args, **kwargs)

    engine.optimizer.step = step_with_norm


def _clip_by_replica_norm(engine, ctx: ParallelContext) -> None:
    """Pipeline stages without ZeRO in fp32: clip by the norm of the whole replica, and report it.

    DeepSpeed clips these with ``clip_grad_norm_`` over its pipeline grid, whose "model parallel
    rank" numbers the TP x PP ranks: a TP-replicated parameter (the norm weights) then counts on
    the first stage only, and the norm it clipped with is never reported (``grad_norm`` null)."""
    def clip_fp32_gradients():
        params, norm = _replica_norm(engine, ctx)
        coef = engine.gradient_clipping() / (norm + 1e-6)
        if coef < 1.0:  # a non-finite norm comes from non-finite gradients: guard_nonfinite_steps skips the step
            for p in params:
                p.grad.detach().mul_(coef)

    engine.clip_fp32_gradients = clip_fp32_gradients


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` every transformer block in place (``train.compile``): one graph per block,
    forward and backward, with the element-wise work around the matmuls fused. Parameters and
    their names are unchanged, so checkpoints and DeepSpeed see the same module."""
    from megallama.model import TransformerBlock

    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile()


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
