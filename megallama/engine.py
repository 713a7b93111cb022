"""DeepSpeed wiring: the DeepSpeed config derived from ours, the optimizer, the schedule and the
engine; the one module that reaches into DeepSpeed's internals (a DeepSpeed upgrade is checked
here: the replica-norm clipping patches, the non-finite step guard, the checkpoint state access).

One source of truth: batch sizes, accumulation, clipping, precision and ZeRO stage
come from :class:`~megallama.config.Config`; a template from ``ds_configs/`` adds
only what megallama does not own (bucket sizes, offload, ...).  A template that
contradicts the megallama config is a one-line error.

The optimizer is ``torch.optim.AdamW`` handed to DeepSpeed as an object (no JIT
``fused_adam`` build; torch's own ``fused=True`` kernel on CPU and CUDA) and the
schedule is our warmup + cosine, also an object.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from megallama.config import Config, gradient_accumulation_steps
from megallama.errors import ConfigError
from megallama.model import (PipelineLoss, Transformer, TransformerBlock, canonical_name, init_parameters,
                             pipeline_layers)
from parallel import gemm
from parallel.grad import global_grad_norm
from parallel.mpu import MPU
from parallel.topology import ParallelContext

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# facts megallama owns: dotted key -> how to read the derived value
_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "gradient_clipping", "zero_optimization.stage", "bf16.enabled", "fp16.enabled")


def _load_template(cfg: Config) -> tuple[dict, str]:
    name = cfg.train.ds_template or f"zero{cfg.parallel.zero_stage}.json"
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = DS_CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"train.ds_template '{name}' not found (looked in ds_configs/); "
                          f"use one of: {', '.join(sorted(p.name for p in DS_CONFIG_DIR.glob('*.json')))}")
    try:
        template = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed template '{path}:{exc.lineno}' is not valid JSON: {exc.msg}") from None
    if not isinstance(template, dict):
        raise ConfigError(f"DeepSpeed template '{path}' must be a JSON object of DeepSpeed settings, "
                          f"got a {type(template).__name__}")
    for key in ("zero_optimization", "bf16", "fp16", "pipeline"):  # sections megallama merges into
        if key in template and not isinstance(template[key], dict):
            raise ConfigError(f"DeepSpeed template '{path}': '{key}' must be an object, got {template[key]!r}; "
                              f"give {{...}} settings (the stage and precision come from the megallama config)")
    return template, str(path)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bucket_sizes(hidden: int) -> dict:
    """Gradient-reduction buckets scaled with the model (DeepSpeed's recommended 'auto' rule)."""
    return {"reduce_bucket_size": hidden * hidden, "allgather_bucket_size": max(hidden * hidden, 5 * 10**7),
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config of this run (see module docstring)."""
    t, p = cfg.train, cfg.parallel
    template, where = _load_template(cfg)
    if "optimizer" in template or "scheduler" in template:
        raise ConfigError(f"DeepSpeed template '{where}' names an optimizer/scheduler; remove it "
                          "(megallama passes AdamW and its schedule from the optim section)")
    derived = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
    }
    zt = template.get("zero_optimization")
    zt = zt if isinstance(zt, dict) else {}
    offloaded = {k for k in ("offload_optimizer", "offload_param")
                 if isinstance(zt.get(k), dict) and zt[k].get("device", "none") != "none"}
    if "offload_optimizer" in offloaded:
        # the optimizer is torch's AdamW (fused on CPU), not DeepSpeedCPUAdam (a JIT build); DeepSpeed
        # refuses a client optimizer under ZeRO-Offload unless told it is meant
        derived["zero_force_ds_cpu_optimizer"] = False
    for key in _OWNED:
        theirs, ours = _get(template, key), _get(derived, key)
        if theirs is not None and theirs != ours:
            section = {"train_batch_size": "train.global_batch_size",
                       "train_micro_batch_size_per_gpu": "train.micro_batch_size",
                       "gradient_accumulation_steps": "train.global_batch_size / (micro_batch_size*dp)",
                       "gradient_clipping": "optim.grad_clip", "zero_optimization.stage": "parallel.zero_stage",
                       }.get(key, "train.precision")
            raise ConfigError(f"DeepSpeed template '{where}' sets {key}={theirs} but the megallama config gives "
                              f"{ours} ({section}); remove it from the template, megallama derives it")
    if "offload_param" in offloaded and p.zero_stage != 3:
        raise ConfigError(f"DeepSpeed template '{where}' offloads parameters (zero_optimization.offload_param), "
                          f"which needs ZeRO-3; set parallel.zero_stage=3 (it is {p.zero_stage})")
    if "offload_optimizer" in offloaded and p.zero_stage == 0:
        raise ConfigError(f"DeepSpeed template '{where}' offloads the optimizer (zero_optimization.offload_optimizer), "
                          "which needs ZeRO; set parallel.zero_stage to 1, 2 or 3 (it is 0)")
    precision = {"bf16": "bf16.json", "fp16": "fp16.json"}.get(t.precision)
    if precision:
        template = _merge(json.loads((DS_CONFIG_DIR / precision).read_text()), template)
    zero = {"stage": p.zero_stage}
    if p.zero_stage > 0:
        zero.update({k: v for k, v in bucket_sizes(cfg.model.dim).items()
                     if p.zero_stage == 3 or not k.startswith("stage3")})
    out = _merge(template, {"zero_optimization": {k: v for k, v in zero.items()
                                                  if k not in template.get("zero_optimization", {})}})
    out = _merge(out, derived)
    if p.pp > 1:
        # DeepSpeed splits stage-to-stage activations across the TP ranks and all-gathers them on
        # arrival, which assumes they are replicated over TP; under sequence parallelism each TP
        # rank already holds its own slice, so they must travel as they are.
        sp = p.sequence_parallel and p.tp > 1
        out["pipeline"] = {"activation_checkpoint_interval": 0, "pipe_partitioned": not sp,
                           "grad_partitioned": not sp}
    return out


# ----------------------------------------------------------------------------- optimizer and schedule

def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups.  Exempt from weight decay: 1-D parameters (RMSNorm weights; the model has
    no biases).  Embedding and output matrices are decayed, as in the paper's recipe."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The paper's AdamW.  ``fused=True`` (torch's one-kernel step, on CPU since torch 2.4) wherever
    every parameter allows it: on CPU tensors torch otherwise defaults to a Python loop over the
    parameters, 11x slower on the demo preset (20 ms against 1.8 ms a step,
    docs/performance.md)."""
    o = cfg.optim
    groups = param_groups(model.named_parameters(), o.weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


def lr_at(step: int, cfg: Config) -> float:
    """The rate of update ``step`` (from 0): linear warmup to the peak, then cosine decay reaching
    ``min_lr_ratio`` x peak at ``step == total_steps``, one past the last update (as Megatron's
    scheduler and Hugging Face's cosine schedule do)."""
    o, total = cfg.optim, cfg.train.total_steps()
    warmup = min(o.warmup_steps, total)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """The paper's schedule as a torch scheduler (DeepSpeed steps it after each optimizer step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config, last_epoch: int = -1):
        self.cfg = cfg
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [lr_at(self.last_epoch, self.cfg) for _ in self.optimizer.param_groups]


# ----------------------------------------------------------------------------- the engine

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
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile()


# ----------------------------------------------------------------------------- non-finite steps

def guard_nonfinite_steps(optimizer, group=None) -> None:
    """Make a plain torch optimizer skip steps with non-finite gradients, like DeepSpeed's own.

    The flag is reduced (MAX) over ``group`` so tensor/pipeline shards agree; the skipped
    step sets ``optimizer.overflow`` which DeepSpeed's engine reads to report
    ``was_step_applied() == False`` and to hold the LR schedule back.
    """
    if hasattr(optimizer, "overflow"):
        return  # DeepSpeed ZeRO / bf16 optimizers detect and skip overflow themselves
    step = optimizer.step

    @functools.wraps(step)
    def checked_step(*args, **kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        optimizer.overflow = bool(bad.item())
        if optimizer.overflow:
            optimizer.zero_grad(set_to_none=True)
            return None
        return step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = checked_step


# --- checkpoint state access (DeepSpeed internals) ---


def local_part(engine, p, dp_rank: int, dp_size: int) -> tuple[int, dict]:
    """(flat start, {"": fp32 master, "exp_avg": ..., "exp_avg_sq": ...}) of the contiguous flat range
    of ``p`` (its TP shard, flattened) that this data-parallel rank writes to a checkpoint.

    ZeRO-1/2 and the bf16 optimizer: the fragment DeepSpeed's partition holds (``_hp_mapping``;
    None when another DP rank holds all of ``p``) -- no communication.  ZeRO-3: the full tensor is
    gathered (DeepSpeed's own partition is padded and interleaved per sub-group) and this rank's
    equal share cut from it.  No ZeRO: every rank holds all of ``p``; each writes its equal share."""
    from megallama.checkpoint.format import MOMENTS

    mapping = getattr(p, "_hp_mapping", False)
    if mapping is None:
        return 0, {}
    if mapping is not False:
        address = mapping.lp_fragment_address
        out = {"": mapping.get_hp_fragment().detach().float().cpu()}
        out.update({k: mapping.get_hp_fragment(k).detach().float().cpu() for k in MOMENTS})
        return address.start, {k: v.reshape(-1) for k, v in out.items()}
    full = {"": get_master(engine, p), **{k: get_moment(engine, p, k) for k in MOMENTS}}
    numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    share = -(-numel // dp_size)
    start, stop = min(dp_rank * share, numel), min((dp_rank + 1) * share, numel)
    return start, {k: v.reshape(-1)[start:stop].clone() for k, v in full.items()} if stop > start else {}


def held_range(p) -> tuple[int, int] | None:
    """(flat start, numel) of ``p``'s TP shard whose fp32 master and moments this data-parallel rank's
    ZeRO-1/2 (or bf16 optimizer) partition holds -- (0, 0) when it holds none; None when DeepSpeed
    does not partition ``p`` that way (ZeRO-3, no ZeRO): then the whole shard is set."""
    mapping = getattr(p, "_hp_mapping", False)
    if mapping is False:
        return None
    return (0, 0) if mapping is None else (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)


def set_held(p, key: str | None, value: torch.Tensor) -> None:
    """Copy ``value`` (the :func:`held_range` of the master, or of moment ``key``) into the partition."""
    fragment = p._hp_mapping.get_hp_fragment(key)
    fragment.data.copy_(value.to(fragment.device).view_as(fragment))


def zero3_partition(p) -> tuple[int, int, int] | None:
    """ZeRO-3: (flat start, numel, partition size) of the range of ``p``'s TP shard whose fp32 master and
    moments this rank's partition holds (the last rank's partition is padded past the tensor's end);
    None when ``p`` is not ZeRO-3 partitioned."""
    opt = getattr(p, "_z3_optimizer", None)
    if opt is None or not hasattr(p, "ds_tensor"):
        return None
    part = p.ds_tensor.numel()
    start = min(opt._get_param_partition_rank(p) * part, p.ds_numel)
    return start, min(part, p.ds_numel - start), part


def set_zero3_partition(p, key: str | None, value: torch.Tensor, size: int) -> None:
    """Set this rank's ZeRO-3 partition of the master (``key`` None) or of moment ``key`` from the flat
    range :func:`zero3_partition` names (zero-padded to the partition's size)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    flat = torch.zeros(size, dtype=torch.float32)
    flat[:value.numel()] = value.reshape(-1)
    if key is None:
        safe_set_local_fp32_param(p, flat)
    else:
        safe_set_local_optimizer_state(p, flat, key)


# --- optimizer state (DeepSpeed internals) ---

def _has_master(p) -> bool:
    """Does DeepSpeed keep this parameter's fp32 master (and Adam state) in its own partitions?"""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # a None mapping: another DP rank holds it


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's ZeRO / bf16 wrappers."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def init_optimizer_state(engine) -> None:
    """Create AdamW's (zero) state before the first step, so a checkpoint can be loaded into it.

    torch creates ``step``/``exp_avg``/``exp_avg_sq`` lazily at the first step; we create them
    the way ``torch.optim.AdamW`` does, then let DeepSpeed link its fragments to them.
    """
    opt = _base_optimizer(engine)
    for group, params in _optimizer_params(engine, opt):
        on_device = group.get("fused") or group.get("capturable")
        for p in params:
            if opt.state.get(p):
                continue
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    link_optimizer_state(engine)


def _optimizer_params(engine, opt) -> list:
    """(param group, the tensors AdamW steps) pairs.

    ZeRO-3 keeps its param groups *empty* between steps and puts each group's flat fp32
    partition in only while stepping it, so its state must be keyed on those flat tensors.
    """
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        group_of = getattr(engine.optimizer, "sub_group_to_group_id", {})
        return [(opt.param_groups[group_of.get(i, i)], [flat]) for i, flat in enumerate(flats)]
    return [(group, group["params"]) for group in opt.param_groups]


def link_optimizer_state(engine) -> None:
    """(Re)link DeepSpeed's per-parameter views of the Adam moments.

    DeepSpeed (0.19) links them right after stepping the *first* parameter group, before
    the other groups' states exist, and never again: parameters of later groups (here the
    no-weight-decay norms) would have no moments to read or write.  Relinking is cheap.
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def get_master(engine, p) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return (safe_get_full_fp32_param(p) if _has_master(p) else p.detach()).float().cpu()


def get_moment(engine, p, key: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    value = safe_get_full_optimizer_state(p, key) if _has_master(p) else _base_optimizer(engine).state[p][key]
    return value.float().cpu()


def set_master(engine, p, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    value = value.to(p.device)
    if _has_master(p):
        safe_set_full_fp32_param(p, value)
        return  # the model's copy is refreshed from the masters by _refresh_low_precision
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def set_moment(engine, p, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    value = value.to(p.device)
    if _has_master(p):
        safe_set_full_optimizer_state(p, value, key)
    else:
        _base_optimizer(engine).state[p][key].copy_(value)


def set_optimizer_step(engine, step: int) -> None:
    opt = _base_optimizer(engine)
    for state in opt.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step


def _refresh_low_precision(engine) -> None:
    """Copy fp32 masters into the model's low-precision (or ZeRO-3 partitioned) parameters."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2 and the bf16 optimizer: copy and all-gather over DP
        opt.update_lp_params()
    elif engine.zero_optimization_stage() == 3:
        for i in range(len(opt.fp16_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
