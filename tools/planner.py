"""`megallama plan`: memory, step time, throughput, MFU and days of a training layout.

An analytical model, every term of which is a physical quantity (see
docs/planning.md for the formulas and the assumptions):

* memory per GPU = model states (per ZeRO stage, DeepSpeed's accounting)
  + activations (Korthikanti et al. 2022, re-derived for LLaMA's SwiGLU block)
  x micro-batches in flight (1F1B) + the fused loss's working memory + a fixed reserve;
* step time = (m + pp - 1) x per-micro-batch stage time (matmuls at an achievable
  fraction of peak, memory-bound elementwise ops at HBM bandwidth, exposed
  tensor-parallel collectives, pipeline sends) + the data-parallel gradient
  traffic not hidden behind the last backward + the optimizer update.

``--search`` enumerates valid layouts, keeps those that fit and ranks them by
tokens/s/GPU.  ``--calibrate-step-time`` rescales the matmul efficiency so the
predicted step time equals one measured on the target machine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

from megallama.config import (ACTIVATION_CHECKPOINTING, PIPELINE_PARTITIONS, Config, ModelConfig, load_config,
                              validate)
from megallama.errors import ConfigError, UserError
from megallama.hardware import GiB, GpuSpec
from tools.carbon import estimate as carbon_estimate

RESERVED_BYTES = 2 * GiB  # CUDA context, NCCL buffers, allocator slack

# Bytes per parameter of the model states, by precision (mixed precision keeps an
# fp32 master copy, fp32 gradients for accumulation and Adam's two fp32 moments).
_MIXED = dict(params=2, grads=2, grads32=4, master=4, adam=8)
_FP32 = dict(params=4, grads=4, grads32=0, master=0, adam=8)


@dataclass(frozen=True)
class Layout:
    """How one training run is laid out on the cluster."""

    gpus: int
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    micro_batch_size: int = 1
    seq_len: int = 2048
    global_batch_size: int = 2048  # sequences per optimizer step
    activation_checkpointing: str = "selective"  # config.ACTIVATION_CHECKPOINTING
    pipeline_partition: str = "parameters"  # config.PIPELINE_PARTITIONS: how training balances its stages
    sequence_parallel: bool = True  # only meaningful with tp > 1
    flash_attention: bool = True  # memory-efficient attention: no s^2 probabilities stored
    precision: str = "bf16"

    @classmethod
    def from_config(cls, cfg: Config, gpus: int, **overrides) -> "Layout":
        """The layout ``cfg`` trains with on ``gpus`` GPUs; ``overrides`` (None: keep the config's) win.
        The fields are named as the config's, so this and :meth:`apply` are the whole mapping."""
        p, t = cfg.parallel, cfg.train
        fields = dict(tp=p.tp, pp=p.pp, zero_stage=p.zero_stage, pipeline_partition=p.pipeline_partition,
                      sequence_parallel=p.sequence_parallel, micro_batch_size=t.micro_batch_size,
                      global_batch_size=t.global_batch_size, seq_len=t.seq_len,
                      activation_checkpointing=t.activation_checkpointing, precision=t.precision)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(gpus=gpus, **fields)

    def apply(self, cfg: Config) -> Config:
        """``cfg`` at this layout (data parallelism derived from the GPU count)."""
        return replace(cfg, parallel=replace(cfg.parallel, tp=self.tp, pp=self.pp, dp=0, zero_stage=self.zero_stage,
                                             sequence_parallel=self.sp, pipeline_partition=self.pipeline_partition),
                       train=replace(cfg.train, seq_len=self.seq_len, micro_batch_size=self.micro_batch_size,
                                     global_batch_size=self.global_batch_size,
                                     activation_checkpointing=self.activation_checkpointing, precision=self.precision))

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on each pipeline (= gradient accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)


@dataclass
class Estimate:
    layout: Layout
    gpu: str
    params: int
    params_per_gpu: int
    memory_gib_per_gpu: float
    memory_breakdown_gib: dict
    fits: bool
    step_time_s: float
    time_breakdown_s: dict
    bubble_fraction: float
    tokens_per_sec_per_gpu: float
    mfu: float
    tokens: int
    days: float
    gpu_hours: float
    mwh: float
    tco2eq: float
    matmul_efficiency: float
    checkpoint: dict = dataclasses.field(default_factory=dict)  # checkpoint_io()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layout"]["dp"] = self.layout.dp
        d["layout"]["micro_batches"] = self.layout.micro_batches
        return d


# ----------------------------------------------------------------------------- memory

def layer_params(m: ModelConfig) -> int:
    """Parameters of one transformer block (attention + SwiGLU FFN + two RMSNorm weights)."""
    return (m.num_parameters(include_embedding=False) - m.dim) // m.n_layers


_STAGES: dict = {}


def stages(m: ModelConfig, lay: Layout) -> list[tuple[int, int]]:
    """(transformer blocks, vocabulary matrices) of each pipeline stage, as training places them
    (:func:`megallama.sharding.stage_assignment` with the layout's ``pipeline_partition``)."""
    from megallama.sharding import stage_assignment

    key = (repr(m), lay.pp, lay.pipeline_partition)
    if key not in _STAGES:
        where = stage_assignment(m, lay.pp, lay.pipeline_partition)
        blocks = [set() for _ in range(lay.pp)]
        vocab = [0] * lay.pp
        for name, stage in where.items():
            if name.startswith("layers."):
                blocks[stage].add(int(name.split(".")[1]))
            elif name in ("tok_embeddings.weight", "output.weight"):
                vocab[stage] += 1
        _STAGES[key] = [(len(b), v) for b, v in zip(blocks, vocab)]
    return _STAGES[key]


def stage_blocks(m: ModelConfig, lay: Layout) -> int:
    """Transformer blocks of the stage holding the most (the slowest, most activations)."""
    return max(b for b, _ in stages(m, lay))


def params_per_gpu(m: ModelConfig, lay: Layout) -> int:
    """Parameters held by the heaviest rank: its stage's blocks and vocabulary matrices (and the
    final norm) / tp, stages as training partitions them."""
    vocab = m.padded_vocab_size(lay.tp) * m.dim
    return max(blocks * layer_params(m) + matrices * vocab + m.dim for blocks, matrices in stages(m, lay)) // lay.tp


def model_state_bytes(params: int, dp: int, zero_stage: int, largest_layer_params: int = 0,
                      precision: str = "bf16") -> dict:
    """Parameters, gradients and optimizer states on one GPU holding ``params`` parameters.

    Matches DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs`` and
    ``estimate_zero3_model_states_mem_needs``, no offload): ZeRO-1 partitions the
    optimizer (fp32 master, fp32 gradients, Adam moments) over ``dp`` ranks,
    ZeRO-2 also the 16-bit gradients, ZeRO-3 also the 16-bit parameters, which
    are gathered one layer at a time (params + grads of the largest layer).
    In fp32 (measured by ``benchmarks/parallel_layouts.py``) ZeRO-1/2/3 still keep an fp32
    partition beside the parameters (ZeRO-0 steps the parameters themselves), and ZeRO-3
    keeps its reduce-scattered gradient partition in the training dtype.
    """
    b = _MIXED if precision in ("bf16", "fp16") else _FP32
    master = b["master"]
    if precision == "fp32" and zero_stage >= 1:
        master = 4  # DeepSpeed's ZeRO optimizers step an fp32 partition of their own even in fp32
    opt = (master + b["adam"] + b["grads32"]) * params
    p16, g16 = b["params"] * params, b["grads"] * params
    if zero_stage >= 1:
        opt /= dp
    if zero_stage >= 2:
        g16 /= dp
    gathered = 0
    if zero_stage == 3:
        p16 /= dp
        # mixed precision: reduce-scattered into the fp32 partition (counted with the optimizer, as
        # DeepSpeed's estimator does); fp32: a gradient partition of its own
        g16 = b["grads"] * params / dp if precision == "fp32" else 0
        gathered = (b["params"] + b["grads"]) * largest_layer_params
    return dict(parameters=p16, gradients=g16, optimizer=opt, zero3_gathered=gathered)


def activation_bytes_per_layer(m: ModelConfig, lay: Layout) -> float:
    """Activations one LLaMA block keeps for backward, one micro-batch (bytes, 16-bit).

    Korthikanti et al. 2022 counted 34sbh + 5as^2b for a GPT block; a LLaMA block
    (no dropout, RMSNorm, SwiGLU with hidden f, k/v heads r = kv_heads/heads) keeps
    norm inputs 4sbh, the QKV and FFN inputs 4sbh (these 8sbh are replicated across
    tensor-parallel ranks unless sequence parallelism splits them), the rotated q, k and v
    (one tensor, so the projection output is freed) 2(1 + 2r)sbh and the attention output
    2sbh, the FFN gate, up and product 6sbf, and either the
    softmax probabilities 2as^2b (eager attention, no selective recompute) or the
    log-sum-exp 4asb (memory-efficient attention).

    Selective recomputation keeps what megallama's policy keeps
    (``megallama/model.py: _save_matmuls_policy``): the block input 2sbh and the two
    row-parallel projections' reduced outputs 4sbh (replicated unless SP splits them), the
    QKV output 2(1 + 2r)sbh, the attention output 2sbh (and its log-sum-exp), and the w13
    output 4sbf; norms, rotary and the SwiGLU product are recomputed.  Full recomputation
    keeps the block input.
    """
    s, b, h, a, t = lay.seq_len, lay.micro_batch_size, m.dim, m.n_heads, lay.tp
    sbh = s * b * h
    scale = _act_bytes(lay) / 2  # the coefficients below are for 16-bit activations
    if lay.activation_checkpointing == "full":
        return scale * 2 * sbh / (t if lay.sp else 1)  # only the block input
    r = m.kv_heads / m.n_heads
    selective = lay.activation_checkpointing == "selective"  # what the policy keeps (above)
    replicated = (6 if selective else 8) * sbh
    split = (4 + 4 * r) * sbh + (4 if selective else 6) * s * b * m.ffn_hidden
    if lay.flash_attention:
        split += 4 * a * s * b
    elif lay.activation_checkpointing == "none":
        split += 2 * a * s * s * b
    return scale * ((replicated + split) / t if lay.sp else replicated + split / t)


def _act_bytes(lay: Layout) -> int:
    return 4 if lay.precision == "fp32" else 2


def fused_loss_bytes(tokens: int, dim: int, local_vocab: int, act_bytes: int, weight_bytes: int,
                     chunk_rows: int) -> int:
    """Peak working memory of the output layer fused with the loss (``parallel/cross_entropy.py``):
    it never holds the ``[tokens, V/t]`` logits, but computes both gradients during its forward.
    Forward, at its last chunk: the input gradient ``[tokens, d]`` and the fp32 weight-gradient
    accumulator ``[V/t, d]`` so far, one chunk's fp32 logits (turned into probabilities in place)
    with their 16-bit copy, and for 16-bit weights the chunk's 16-bit weight-gradient product.
    Backward: both kept gradients and their scaled copies (the weight's in its own dtype)."""
    rows = min(tokens, chunk_rows)
    sixteen = act_bytes < 4
    forward = (tokens * dim * act_bytes + 4 * local_vocab * dim + rows * local_vocab * (4 + (act_bytes if sixteen else 0))
               + (weight_bytes * local_vocab * dim if weight_bytes < 4 else 0))
    backward = 2 * tokens * dim * act_bytes + 4 * local_vocab * dim + weight_bytes * local_vocab * dim
    return max(forward, backward)


def loss_bytes(m: ModelConfig, lay: Layout) -> int:
    """:func:`fused_loss_bytes` of this layout on a GPU (the loss's own chunk size there).
    Under SP the output layer sees the whole sequence (its input is gathered)."""
    from parallel.cross_entropy import chunk_rows

    local_vocab = m.padded_vocab_size(lay.tp) // lay.tp
    a = _act_bytes(lay)
    return fused_loss_bytes(lay.seq_len * lay.micro_batch_size, m.dim, local_vocab, a, a,
                            chunk_rows(local_vocab, "cuda"))


def memory_bytes(m: ModelConfig, lay: Layout) -> dict:
    """Per-GPU memory of the heaviest rank (the first pipeline stage holds pp micro-batches)."""
    p = params_per_gpu(m, lay)
    largest = max(layer_params(m), m.padded_vocab_size(lay.tp) * m.dim) // lay.tp
    states = model_state_bytes(p, lay.dp, lay.zero_stage, largest, lay.precision)
    in_flight = min(lay.pp, lay.micro_batches)
    acts = activation_bytes_per_layer(m, lay) * stage_blocks(m, lay) * in_flight
    return dict(**states, activations=acts, loss=loss_bytes(m, lay), reserved=RESERVED_BYTES)


# ----------------------------------------------------------------------------- time

def recompute_flops_per_token(m: ModelConfig, lay: Layout) -> float:
    """Extra forward FLOPs of activation recomputation (same 6N + 12Lds convention)."""
    attention_core = 4 * m.n_layers * m.dim * lay.seq_len  # QK^T and AV, forward only
    if lay.activation_checkpointing == "full":
        return m.flops_per_token(lay.seq_len) / 3  # one more forward pass
    if lay.activation_checkpointing == "selective" and not lay.flash_attention:
        return attention_core
    return 0.0


def tp_collectives_per_layer(lay: Layout) -> int:
    """Tensor-parallel collectives of one block per micro-batch, in all-gathers/reduce-scatters of
    the s·b·h activation (an all-reduce counts 2), as ``tests/test_comm_count.py`` counts them:
    forward 2 all-reduces (SP: 2 all-gathers + 2 reduce-scatters), backward the same; SP also
    re-gathers the 2 column-parallel inputs in backward (its activation saving).  Selective
    recomputation keeps the parallel linears' outputs, so it re-runs no collective; full
    recomputation re-runs the forward up to the FFN's matmuls, collectives included: the
    attention's all-reduce (SP: the attention input's all-gather, its reduce-scatter and the
    FFN input's all-gather)."""
    units = 8 + (2 if lay.sp else 0)
    if lay.activation_checkpointing == "full":
        units += 3 if lay.sp else 2
    return units


def _ring_time(nbytes: float, n: int, bandwidth: float) -> float:
    """Reduce-scatter or all-gather of ``nbytes`` (the full tensor) over ``n`` ranks in a ring."""
    return 0.0 if n <= 1 else nbytes * (n - 1) / n / bandwidth


def step_time(m: ModelConfig, lay: Layout, gpu: GpuSpec, matmul_efficiency: float) -> dict:
    """Seconds per optimizer step, split into its parts."""
    s, b, h, t = lay.seq_len, lay.micro_batch_size, m.dim, lay.tp
    tokens_mb = s * b
    layers = stage_blocks(m, lay)
    nvlink = gpu.nvlink_bandwidth * gpu.comm_efficiency
    net = gpu.network_bandwidth * gpu.comm_efficiency
    node = gpu.gpus_per_node
    flops = (m.flops_per_token(s) + recompute_flops_per_token(m, lay)) * tokens_mb / (t * lay.pp)
    matmul = flops / (gpu.peak_flops(lay.precision) * matmul_efficiency)
    # Memory-bound ops per token and layer (norms, residual adds, rotary, SwiGLU product,
    # forward and backward, 16-bit): about (60h + 16f) bytes.
    elementwise = (60 * h + 16 * m.ffn_hidden) * tokens_mb * layers / t / gpu.hbm_bandwidth
    collectives = tp_collectives_per_layer(lay)
    tp_comm = collectives * layers * _ring_time(_act_bytes(lay) * tokens_mb * h, t, nvlink if t <= node else net)
    # Pipeline: one activation and one gradient per micro-batch cross each stage boundary.
    pp_bw = net if lay.gpus > node and t * lay.dp >= node else nvlink
    pp_comm = 0.0 if lay.pp == 1 else 2 * _act_bytes(lay) * tokens_mb * h / (t if lay.sp else 1) / pp_bw
    # Data parallel (ring over dp ranks, all on the same links).  Gradients: an all-reduce
    # (ZeRO-0) or a reduce-scatter (ZeRO >= 1) of 16-bit gradients, bucketed while the last
    # micro-batch's backward runs.  ZeRO-1/2 then all-gather the updated parameters after
    # the optimizer step (nothing to hide it behind).  ZeRO-3 also gathers every layer's
    # parameters in forward and backward of every micro-batch, prefetched behind matmuls.
    p = params_per_gpu(m, lay)
    dp_bw = nvlink if t * lay.dp <= node else net
    gather = _ring_time(_act_bytes(lay) * p, lay.dp, dp_bw)  # gradients/parameters in the training precision
    hidden_comm = (2 if lay.zero_stage == 0 else 1) * gather
    window = 2 / 3 * matmul
    if lay.zero_stage == 3:
        hidden_comm += 2 * gather * lay.micro_batches
        window = matmul * lay.micro_batches
    dp_exposed = max(0.0, hidden_comm - window) + (gather if lay.zero_stage in (1, 2) else 0.0)
    per_micro = matmul + elementwise + tp_comm + pp_comm
    pipeline = (lay.micro_batches + lay.pp - 1) * per_micro
    # Optimizer: read grads32/master/moments, write them and the 16-bit copy (memory-bound).
    shard = p / (lay.dp if lay.zero_stage >= 1 else 1)
    optimizer = 34 * shard / gpu.hbm_bandwidth
    return dict(matmul=matmul * lay.micro_batches, elementwise=elementwise * lay.micro_batches,
                tp_comm=tp_comm * lay.micro_batches, pp_comm=pp_comm * lay.micro_batches,
                bubble=(lay.pp - 1) * per_micro, dp_exposed=dp_exposed, optimizer=optimizer,
                total=pipeline + dp_exposed + optimizer)


# ----------------------------------------------------------------------------- checkpoints

# An aggregate parallel-filesystem bandwidth (bytes/s): AWS FSx for Lustre Persistent-2 provisions
# 1,000 MB/s per TiB, so 100 TiB give 100 GB/s; OLCF's Alpine (GPFS) reaches 2.5 TB/s.  A conservative
# figure for a 2,048-GPU cluster's scratch; --fs-bandwidth sets the one a cluster has.
FS_BANDWIDTH = 100e9
# Device -> host copy of a rank's state for an asynchronous save (bytes/s): PCIe 4.0 x16, ~25 GB/s.
HOST_COPY_BANDWIDTH = 25e9
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 master + two fp32 Adam moments (docs/checkpoints.md)


def checkpoint_io(m: ModelConfig, lay: Layout, fs_bandwidth: float = FS_BANDWIDTH,
                  host_bandwidth: float = HOST_COPY_BANDWIDTH) -> dict:
    """Size of a training checkpoint and the time to write and load it at ``lay``.

    Every rank writes what it owns (its ZeRO partition of its TP/PP shard), so the ranks share the
    filesystem's aggregate bandwidth: a save takes size / fs_bandwidth.  A resume reads what each
    rank holds, the same bytes, except at ZeRO-3, where a rank still reads its whole TP shard (dp
    times the bytes; docs/checkpoints.md).  An asynchronous save stalls training only for the copy
    of the rank's share to host memory."""
    size = CHECKPOINT_BYTES_PER_PARAM * m.num_parameters()
    per_rank = size / lay.gpus
    read = size * (lay.dp if lay.zero_stage == 3 else 1)
    return dict(size_gb=size / 1e9, per_rank_gb=per_rank / 1e9, write_s=size / fs_bandwidth,
                load_s=read / fs_bandwidth, async_stall_s=per_rank / host_bandwidth,
                fs_bandwidth_gb_s=fs_bandwidth / 1e9)


# ----------------------------------------------------------------------------- estimate

def plan(cfg: Config, lay: Layout, gpu: GpuSpec, tokens: Optional[int] = None,
         matmul_efficiency: Optional[float] = None, fs_bandwidth: float = FS_BANDWIDTH) -> Estimate:
    """Validate the layout against the model and estimate memory, throughput and time."""
    m = cfg.model
    check_layout(cfg, lay)
    eff = gpu.matmul_efficiency if matmul_efficiency is None else matmul_efficiency
    mem = memory_bytes(m, lay)
    times = step_time(m, lay, gpu, eff)
    if tokens is None:  # the run's budget: train.tokens, or train.steps of this layout's batches
        tokens = cfg.train.steps * lay.global_batch_size * lay.seq_len if cfg.train.steps else cfg.train.tokens
    tok_s_gpu = lay.global_batch_size * lay.seq_len / times["total"] / lay.gpus
    seconds = tokens / (tok_s_gpu * lay.gpus)
    gpu_hours = seconds * lay.gpus / 3600
    carbon = carbon_estimate(gpu_hours, gpu.power_w)
    total_mem = sum(mem.values())
    return Estimate(
        layout=lay, gpu=gpu.name, params=m.num_parameters(), params_per_gpu=params_per_gpu(m, lay),
        memory_gib_per_gpu=total_mem / GiB, memory_breakdown_gib={k: v / GiB for k, v in mem.items()},
        fits=total_mem <= gpu.memory_bytes, step_time_s=times["total"], time_breakdown_s=times,
        bubble_fraction=(lay.pp - 1) / (lay.micro_batches + lay.pp - 1),
        tokens_per_sec_per_gpu=tok_s_gpu,
        mfu=tok_s_gpu * m.flops_per_token(lay.seq_len) / gpu.peak_flops(lay.precision),
        tokens=tokens, days=seconds / 86400, gpu_hours=gpu_hours, mwh=carbon.mwh, tco2eq=carbon.tco2eq,
        matmul_efficiency=eff, checkpoint=checkpoint_io(m, lay, fs_bandwidth))


def check_layout(cfg: Config, lay: Layout, gpus_flag: str = "--gpus") -> None:
    """Reuse the trainer's validation so the planner never blesses a layout training rejects.

    ``gpus_flag`` is the flag that set ``lay.gpus`` (``--calibrate-gpus`` for a measured run)."""
    if lay.gpus < 1:
        raise ConfigError(f"{gpus_flag} must be >= 1, got {lay.gpus}")
    if lay.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ConfigError(f"--activation-checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, got '{lay.activation_checkpointing}'")
    if lay.pipeline_partition not in PIPELINE_PARTITIONS:
        raise ConfigError(f"parallel.pipeline_partition must be one of {', '.join(PIPELINE_PARTITIONS)}, "
                          f"got '{lay.pipeline_partition}'")
    for flag, value in (("--tp", lay.tp), ("--pp", lay.pp)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if lay.gpus % (lay.tp * lay.pp):
        raise ConfigError(f"{gpus_flag} {lay.gpus} is not divisible by tp*pp = {lay.tp * lay.pp}; change --tp/--pp")
    validate(lay.apply(cfg), world_size=lay.gpus)


def calibrated_efficiency(cfg: Config, lay: Layout, gpu: GpuSpec, measured_step_s: float) -> float:
    """The matmul efficiency that makes the predicted step time equal a measured one.

    Predicted step time falls monotonically as the efficiency rises, so bisection finds
    it; a measurement faster than the model allows even at 100% of peak is refused.
    """
    if not measured_step_s > 0:
        raise UserError(f"--calibrate-step-time must be positive seconds, got {measured_step_s}")
    total = lambda eff: step_time(cfg.model, lay, gpu, eff)["total"]  # noqa: E731
    if measured_step_s < total(1.0):
        raise UserError(f"measured step time {measured_step_s:g} s is faster than this layout allows at peak "
                        f"({total(1.0):.3g} s); check --gpus/--tp/--pp/--micro-batch-size match the measured run")
    lo, hi = 1e-4, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > measured_step_s else (lo, mid)
    return (lo + hi) / 2


def measured_run(run_dir: str, gpus: int) -> tuple[Config, Layout, float]:
    """A finished run's config, layout and measured step time (its summary's steady tokens/s)."""
    d = Path(run_dir)
    summary_path, config_path = d / "summary.json", d / "config.yaml"
    for path in (summary_path, config_path):
        if not path.is_file():
            raise UserError(f"'{path}' does not exist; --calibrate-from needs a finished run directory "
                            "(megallama train writes summary.json and config.yaml at the end)")
    try:
        tokens_per_sec = float(json.loads(summary_path.read_text())["tokens_per_sec"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"'{summary_path}' has no numeric tokens_per_sec; re-run training to rewrite it") from None
    if not tokens_per_sec > 0:
        raise UserError(f"'{summary_path}' reports tokens_per_sec={tokens_per_sec}; the run was too short to time")
    cfg = load_config(str(config_path))
    t = cfg.train
    lay = Layout.from_config(cfg, gpus)
    try:
        check_layout(cfg, lay, gpus_flag="--calibrate-gpus")
    except ConfigError as exc:
        raise ConfigError(f"--calibrate-from {run_dir} on {gpus} GPUs: {exc} "
                          "(--calibrate-gpus must be the GPU count of the measured run)") from None
    return cfg, lay, t.global_batch_size * t.seq_len / tokens_per_sec


def search(cfg: Config, gpus: int, gpu: GpuSpec, base: Layout, tokens: Optional[int] = None,
           matmul_efficiency: Optional[float] = None, fixed: Optional[dict] = None,
           fs_bandwidth: float = FS_BANDWIDTH) -> list[Estimate]:
    """Every valid layout that fits in memory, fastest first; ``fixed`` pins Layout fields (the
    ``--tp``/``--pp``/``--zero``/``--micro-batch-size``/``--activation-checkpointing``/``--no-sequence-parallel``
    given)."""
    found = []
    fixed = fixed or {}
    for lay in _candidates(cfg.model, gpus, gpu, base, keep_none=fixed.get("activation_checkpointing") == "none"):
        lay = replace(lay, **{k: v for k, v in fixed.items() if k == "sequence_parallel"})
        if any(getattr(lay, k) != v for k, v in fixed.items()):
            continue
        try:
            est = plan(cfg, lay, gpu, tokens, matmul_efficiency, fs_bandwidth)
        except ConfigError:
            continue
        if est.fits:
            found.append(est)
    return sorted(found, key=lambda e: (-e.tokens_per_sec_per_gpu, e.memory_gib_per_gpu))


def _candidates(m: ModelConfig, gpus: int, gpu: GpuSpec, base: Layout, keep_none: bool = False) -> Iterator[Layout]:
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpu.gpus_per_node and m.n_heads % t == 0]
    pps = [p for p in range(1, m.n_layers + 1) if m.n_layers % p == 0]
    for tp in tps:
        for pp in pps:
            if gpus % (tp * pp):
                continue
            for zero in ((0, 1) if pp > 1 else (0, 1, 2, 3)):
                for mb in (1, 2, 4, 8):
                    for ckpt in ACTIVATION_CHECKPOINTING:
                        if ckpt == "none" and base.flash_attention and not keep_none:
                            continue  # selective: the same time here, fewer bytes kept
                        yield replace(base, tp=tp, pp=pp, zero_stage=zero, micro_batch_size=mb, activation_checkpointing=ckpt,
                                      sequence_parallel=tp > 1)


# ----------------------------------------------------------------------------- CLI
