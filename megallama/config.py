"""Typed configuration: dataclasses, presets, YAML loading, ``--set`` overrides, validation.

One source of truth: every fact (batch size, learning rate, layout, ...) lives
here once.  The DeepSpeed config is *derived* from it (see ``megallama.engine``).

Loading order: preset (``preset:`` key or ``--preset``) -> YAML sections ->
``--set section.key=value`` overrides -> :func:`validate`.  Any unknown key,
wrong type or impossible combination raises :class:`ConfigError` with one line
naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml

from megallama.data.config import DataConfig
from megallama.errors import ConfigError


# the values of parallel.pipeline_partition and train.activation_checkpointing (the planner offers the same)
PIPELINE_PARTITIONS = ("parameters", "flops", "uniform")
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")


def round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


@dataclass
class ModelConfig:
    """LLaMA architecture (Touvron et al. 2023, Table 2 and section 2.2)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads (the paper)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden = 2/3 * 4d rounded up to this multiple
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    init_std: float = 0.02
    # The embedding/output rows are padded to a multiple of vocab_pad_multiple * tp
    # so every tensor-parallel rank holds an equal, aligned slice.  Padded rows
    # never receive probability mass (they are masked out of the softmax).
    vocab_pad_multiple: int = 8

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return round_up(hidden, self.multiple_of)

    def padded_vocab_size(self, tp: int = 1) -> int:
        return round_up(self.vocab_size, self.vocab_pad_multiple * tp)

    def num_parameters(self, tp: int = 1, include_embedding: bool = True) -> int:
        """Exact parameter count (unpadded vocabulary unless ``tp`` pads it)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd + 2 * d * self.kv_heads * hd + self.n_heads * hd * d
        ffn = 3 * d * self.ffn_hidden
        per_layer = attn + ffn + 2 * d
        vocab = self.padded_vocab_size(tp) if tp > 1 else self.vocab_size
        emb = 2 * vocab * d if include_embedding else 0
        return self.n_layers * per_layer + d + emb

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N + 12*L*d*s (attention), N without embeddings."""
        n = self.num_parameters(include_embedding=False) + self.vocab_size * self.dim  # output matmul counts
        return 6 * n + 12 * self.n_layers * self.dim * seq_len


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor (model) parallel size; stays inside a node
    pp: int = 1  # pipeline stages
    dp: int = 0  # data parallel size; 0 = world_size / (tp * pp)
    sequence_parallel: bool = False
    zero_stage: int = 1
    pipeline_partition: str = "parameters"  # stage balance: parameters (memory) | flops (time) | uniform

    def resolve_dp(self, world_size: int) -> int:
        return self.dp or max(world_size // (self.tp * self.pp), 1)


@dataclass
class OptimConfig:
    lr: float = 3.0e-4
    min_lr_ratio: float = 0.1  # cosine decays to 10% of the peak
    warmup_steps: int = 2000
    weight_decay: float = 0.1  # not applied to norm weights (1-D parameters)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    seq_len: int = 2048
    global_batch_size: int = 2048  # sequences per optimizer step (4M tokens at 2048)
    micro_batch_size: int = 1  # sequences per rank per forward/backward
    steps: int = 0  # 0 = derived from ``tokens``
    tokens: int = 1_000_000_000_000
    precision: str = "bf16"  # fp32 | bf16 | fp16
    activation_checkpointing: str = "selective"  # none | selective | full
    compile: bool = False  # torch.compile each transformer block (fuses norms, rotary, SwiGLU, residuals)
    cpu_gemm: str = "auto"  # fp32 CPU matmuls: auto (oneDNN where torch has it), onednn or blas (parallel/gemm.py)
    seed: int = 1234
    run_dir: str = "runs/megallama"
    ds_template: str = ""  # a file in ds_configs/ (e.g. zero1.json); empty = chosen from zero_stage
    log_interval: int = 1
    eval_interval: int = 0  # 0 = no periodic validation
    eval_iters: int = 10
    save_interval: int = 0  # 0 = save only at the end (and on SIGTERM/SIGUSR1); -1 = never (benchmarks)
    keep_last: int = 3
    async_save: bool = False  # copy state to host memory; a background thread writes and commits
    device_peak_flops: float = 0.0  # for MFU; 0 = looked up (GPU table) or measured (CPU)
    tensorboard: bool = True
    # the paper's "evolution during training": benchmark tasks scored every task_eval_interval steps
    eval_tasks: List[str] = field(default_factory=list)  # NAME=PATH, as for `megallama eval --task`
    task_eval_interval: int = 0
    task_eval_limit: int = 0  # examples per task; 0 = all
    max_bad_steps: int = 5  # consecutive non-finite (skipped) steps before the run stops
    collective_timeout_s: float = 600.0  # a collective that waits longer fails the job instead of hanging it
    # Start a new run (step 0, fresh optimizer and schedule) from these weights: a megallama
    # checkpoint (or run directory), e.g. one written by import-hf/import-meta.  Ignored when
    # run_dir already holds a checkpoint: that run resumes instead.
    init_from: str = ""

    def total_steps(self) -> int:
        if self.steps:
            return self.steps
        return max(1, math.ceil(self.tokens / (self.global_batch_size * self.seq_len)))

    def total_tokens(self) -> int:
        """The run's token budget: ``tokens``, or ``steps`` x tokens per step when steps is set."""
        return self.steps * self.global_batch_size * self.seq_len if self.steps else self.tokens


@dataclass
class Config:
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- presets

_GLOBAL_4M = 2048  # sequences of 2048 tokens = 4,194,304 tokens (the paper's "4M")


def _llama(dim, heads, layers, lr, tokens):
    return dict(
        model=dict(dim=dim, n_heads=heads, n_layers=layers, vocab_size=32000, max_seq_len=2048),
        optim=dict(lr=lr, warmup_steps=2000),
        train=dict(seq_len=2048, global_batch_size=_GLOBAL_4M, tokens=tokens, precision="bf16"),
    )


_T = 1_000_000_000_000
PRESETS: dict[str, dict] = {
    # The paper's Table 2.
    "llama-7b": _llama(4096, 32, 32, 3.0e-4, 1 * _T),
    "llama-13b": _llama(5120, 40, 40, 3.0e-4, 1 * _T),
    "llama-33b": _llama(6656, 52, 60, 1.5e-4, int(1.4 * _T)),
    "llama-65b": _llama(8192, 64, 80, 1.5e-4, int(1.4 * _T)),
    # Small presets: tests, the demo, scaling sweeps and benchmarks.
    "tiny": dict(
        model=dict(dim=64, n_heads=4, n_layers=4, vocab_size=512, multiple_of=32, max_seq_len=64),
        optim=dict(lr=1e-3, warmup_steps=2),
        train=dict(seq_len=32, global_batch_size=8, micro_batch_size=2, steps=10, precision="fp32",
                   activation_checkpointing="none"),
    ),
    "demo": dict(
        model=dict(dim=256, n_heads=8, n_layers=4, vocab_size=4096, multiple_of=64, max_seq_len=256),
        optim=dict(lr=2e-3, warmup_steps=20),
        train=dict(seq_len=256, global_batch_size=16, micro_batch_size=8, steps=200, precision="fp32",
                   activation_checkpointing="none", eval_interval=50, eval_iters=4),
    ),
    "llama-100m": dict(
        model=dict(dim=768, n_heads=12, n_layers=12, vocab_size=8192, multiple_of=256, max_seq_len=512),
        optim=dict(lr=6e-4, warmup_steps=200),
        train=dict(seq_len=512, global_batch_size=64, micro_batch_size=4, tokens=2_000_000_000,
                   precision="bf16"),
    ),
    "llama-1b": dict(
        model=dict(dim=2048, n_heads=16, n_layers=16, vocab_size=32000, max_seq_len=2048),
        optim=dict(lr=4e-4, warmup_steps=2000),
        train=dict(seq_len=2048, global_batch_size=512, micro_batch_size=4, tokens=100_000_000_000,
                   precision="bf16"),
    ),
}

PAPER_PRESETS = ("llama-7b", "llama-13b", "llama-33b", "llama-65b")


# ----------------------------------------------------------------------------- loading

def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


MAX_INT = 2 ** 63 - 1


def _short(n: int) -> str:
    """An integer for a message: itself, or its sign and digit count when it is too long to show."""
    digits = len(str(abs(n))) if abs(n) < 10 ** 4000 else None
    if digits is not None and digits <= 24:
        return str(n)
    return f"{'-' if n < 0 else ''}an integer of {digits or 'over 4000'} digits"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; one-line error otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        listy = [a for a in args if typing.get_origin(a) in (list, typing.List)]
        if listy and isinstance(value, (list, tuple)):  # e.g. Union[str, List[str]]: a list takes the list type
            return _coerce(value, listy[0], where)
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _merge(tp(), value, where)
    if origin in (list, typing.List):
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:  # (an inf or nan float is no integer: int() of it would raise, not refuse)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if abs(int(value)) > MAX_INT:  # it would overflow a C long somewhere (numpy, torch) as a traceback
            raise ConfigError(f"{where}: {_short(int(value))} is out of range; use an integer of at most "
                              f"{MAX_INT:,} in magnitude")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _merge(obj, values: dict, where: str):
    """Return a copy of dataclass ``obj`` with ``values`` (a nested dict) applied."""
    ftypes = _field_types(type(obj))
    updates = {}
    for key, value in values.items():
        if key not in ftypes:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{_suggest(key, ftypes)}; "
                f"valid keys here: {', '.join(ftypes)}"
            )
        sub = f"{where}.{key}" if where else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[key] = _merge(current, value, sub)
        else:
            updates[key] = _coerce(value, ftypes[key], sub)
    return dataclasses.replace(obj, **updates)


def preset_config(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(
            f"unknown preset '{name}'{_suggest(name, PRESETS)}; "
            f"choose one of: {', '.join(PRESETS)} (see 'megallama presets')"
        )
    return _merge(Config(preset=name), PRESETS[name], "")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected section.key=value, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except ValueError:  # an integer longer than Python converts (4300 digits)
        raise ConfigError(f"--set '{key}': the value is a number of {len(raw.strip())} characters, out of range; "
                          f"use an integer of at most {MAX_INT:,} in magnitude") from None
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _deep_update(base: dict, extra: dict, where: str = "") -> dict:
    for k, v in extra.items():
        sub = f"{where}.{k}" if where else k
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v, sub)
        elif isinstance(v, dict) and base.get(k) is not None:  # `train: [1, 2]` must not vanish under --set
            raise ConfigError(f"{sub}: expected a mapping of fields, got {base[k]!r}; write it as '{sub}:' "
                              "followed by indented key: value lines")
        else:
            base[k] = v
    return base


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                preset: Optional[str] = None) -> Config:
    """Build a :class:`Config` from a preset, an optional YAML file and ``--set`` overrides."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            at = f":{line + 1}" if line is not None else ""
            raise ConfigError(f"config file '{path}{at}' is not valid YAML; fix the syntax there") from None
        except ValueError:  # an integer longer than Python converts (4300 digits)
            raise ConfigError(f"config file '{path}' holds a number too long to convert; use an integer of at "
                              f"most {MAX_INT:,} in magnitude") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of sections (model:, train:, ...)")
    for item in overrides or []:
        keys, value = parse_override(item)
        _deep_update(raw, _nest(keys, value))
    name = preset or raw.pop("preset", None)
    raw.pop("preset", None)
    cfg = preset_config(name) if name else Config()
    return _merge(cfg, raw, "")


def config_from_dict(d: dict) -> Config:
    """Inverse of :meth:`Config.to_dict` (used by checkpoints)."""
    return _merge(Config(), d, "")


# ----------------------------------------------------------------------------- validation

def tensor_parallel_uneven(m: ModelConfig, tp: int) -> list[str]:
    """What tensor parallelism over ``tp`` ranks cannot split evenly, e.g. ``["model.n_kv_heads (1)"]``
    (empty when ``tp`` fits): the heads, key/value heads and FFN rows are divided among the ranks."""
    sizes = {"model.n_heads": m.n_heads, "model.n_kv_heads": m.kv_heads, "the FFN hidden size": m.ffn_hidden}
    return [f"{name} ({n})" for name, n in sizes.items() if n % tp]


def tensor_parallel_sizes(m: ModelConfig) -> list[int]:
    """Every tensor-parallel size the model splits over evenly."""
    return [tp for tp in range(1, m.kv_heads + 1) if not tensor_parallel_uneven(m, tp)]


# Sizes beyond anything trainable (LLaMA-65B: dim 8192, 80 layers, 32k vocabulary, 2048 positions)
SIZE_CAPS = {"model.dim": 1 << 16, "model.n_layers": 1 << 10, "model.n_heads": 1 << 10, "model.vocab_size": 1 << 24,
             "model.max_seq_len": 1 << 20, "model.multiple_of": 1 << 16, "model.vocab_pad_multiple": 1 << 16,
             "train.micro_batch_size": 1 << 20, "train.global_batch_size": 1 << 30, "train.steps": 1 << 40,
             "train.tokens": 1 << 56}
MAX_PARAMETERS = 10 ** 13


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Check every field and combination; raise one-line ConfigError naming the field."""
    m, p, o, t = cfg.model, cfg.parallel, cfg.optim, cfg.train

    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    # inf passes every `> 0` check below and nan fails them with a misleading message: refuse both
    # first, in every float field (sources' weights included)
    sections = [("model", m), ("parallel", p), ("optim", o), ("train", t), ("data", cfg.data)]
    sections += [(f"data.sources[{i}]", s) for i, s in enumerate(cfg.data.sources)]
    for where, section in sections:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            need(not isinstance(value, float) or math.isfinite(value),
                 f"{where}.{f.name} must be a finite number, got {value}")

    for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len", "vocab_pad_multiple"):
        need(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    for name, cap in SIZE_CAPS.items():  # past these a typo fails as an allocation traceback, or never ends
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        need(value <= cap, f"{name} is {value:,}, above the limit of {cap:,}; check the value (a typo?)")
    need(m.num_parameters() <= MAX_PARAMETERS,
         f"the model has {m.num_parameters():,} parameters, above the limit of {MAX_PARAMETERS:,}; lower "
         "model.dim or model.n_layers")
    need(m.dim % m.n_heads == 0, f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
    need(m.head_dim % 2 == 0, f"model.dim / model.n_heads = {m.head_dim} must be even for rotary embeddings")
    need(m.n_kv_heads is None or m.n_kv_heads > 0,
         f"model.n_kv_heads must be positive (or null for n_heads), got {m.n_kv_heads}")
    need(m.ffn_dim_multiplier is None or m.ffn_dim_multiplier > 0,
         f"model.ffn_dim_multiplier must be positive (or null for LLaMA's 2/3*4d), got {m.ffn_dim_multiplier}")
    for name in ("norm_eps", "rope_theta", "init_std"):
        need(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    need(m.n_heads % m.kv_heads == 0,
         f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    for name in ("tp", "pp"):
        need(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    need(p.dp >= 0, f"parallel.dp must be >= 0 (0 = derived from the world size), got {p.dp}")
    uneven = tensor_parallel_uneven(m, p.tp)
    need(not uneven, f"{uneven[0]} must be divisible by parallel.tp ({p.tp}); choose tp among its divisors "
         f"(these fit this model: {', '.join(map(str, tensor_parallel_sizes(m)))})" if uneven else "")
    need(m.n_layers % p.pp == 0,
         f"model.n_layers ({m.n_layers}) must be divisible by parallel.pp ({p.pp}); choose pp among its divisors")
    if p.sequence_parallel:
        need(p.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1; set it to false or raise tp")
        need(t.seq_len % p.tp == 0,
             f"train.seq_len ({t.seq_len}) must be divisible by parallel.tp ({p.tp}) with sequence parallelism")
    need(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.pp > 1:
        need(p.zero_stage <= 1,
             f"parallel.zero_stage={p.zero_stage} is not supported with pipeline parallelism (pp={p.pp}); "
             "use zero_stage 0 or 1")
    need(p.pipeline_partition in PIPELINE_PARTITIONS,
         f"parallel.pipeline_partition must be 'parameters', 'flops' or 'uniform', got '{p.pipeline_partition}'")
    if p.dp and p.tp * p.pp * p.dp != world_size:
        raise ConfigError(
            f"world size {world_size} != tp*pp*dp = {p.tp}*{p.pp}*{p.dp}; "
            f"launch {p.tp * p.pp * p.dp} processes or set parallel.dp=0 to derive it"
        )
    need(world_size % (p.tp * p.pp) == 0,
         f"world size {world_size} is not divisible by tp*pp = {p.tp * p.pp}; "
         f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp/pp")
    dp = p.resolve_dp(world_size)
    need(t.seq_len > 0, f"train.seq_len must be positive, got {t.seq_len}")
    need(t.seq_len <= m.max_seq_len,
         f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); lower seq_len or raise max_seq_len")
    need(t.micro_batch_size > 0, f"train.micro_batch_size must be positive, got {t.micro_batch_size}")
    need(t.global_batch_size > 0, f"train.global_batch_size must be positive, got {t.global_batch_size}")
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"train.global_batch_size ({t.global_batch_size}) must be divisible by micro_batch_size*dp "
         f"= {t.micro_batch_size}*{dp}; adjust the batch sizes")
    need(t.steps >= 0 and t.tokens >= 0, "train.steps and train.tokens must be >= 0")
    need(t.precision in ("fp32", "bf16", "fp16"), f"train.precision must be fp32, bf16 or fp16, got '{t.precision}'")
    need(t.cpu_gemm in ("auto", "onednn", "blas"), f"train.cpu_gemm must be auto, onednn or blas, got '{t.cpu_gemm}'")
    need(not (t.precision == "bf16" and p.zero_stage == 0),
         "train.precision=bf16 needs parallel.zero_stage >= 1 on DeepSpeed (its bf16 optimizer); "
         "use zero_stage 1 or precision fp32")
    need(t.activation_checkpointing in ACTIVATION_CHECKPOINTING,
         f"train.activation_checkpointing must be none, selective or full, got '{t.activation_checkpointing}'")
    need(not (t.compile and p.tp > 1),
         "train.compile=true needs parallel.tp=1 (the tensor-parallel communication regions, with their "
         "asynchronous collectives, cannot be traced yet); set train.compile=false or parallel.tp=1")
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    need(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    need(t.log_interval >= 1, f"train.log_interval must be >= 1 (steps between progress lines), got {t.log_interval}")
    need(t.eval_interval >= 0, f"train.eval_interval must be >= 0 (0 = no periodic validation), got {t.eval_interval}")
    need(t.eval_iters >= 1, f"train.eval_iters must be >= 1 (validation batches per evaluation), got {t.eval_iters}")
    need(t.task_eval_interval >= 0 and t.task_eval_limit >= 0,
         "train.task_eval_interval and train.task_eval_limit must be >= 0")
    need(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    need(t.save_interval >= -1, f"train.save_interval must be >= 0 (0 = only at the end) or -1 (never), "
                                f"got {t.save_interval}")
    if t.eval_tasks:
        need(t.task_eval_interval > 0, "train.eval_tasks needs train.task_eval_interval > 0 (steps between evaluations)")
        judged = [x.partition("=")[0] for x in t.eval_tasks if x.partition("=")[0] in ("realtoxicityprompts", "truthfulqa_gen")]
        need(not judged, f"train.eval_tasks cannot score {judged[0] if judged else ''} during training (it needs a "
                         "second model as scorer); score the run's checkpoints with `megallama eval`")
    need(t.device_peak_flops >= 0, f"train.device_peak_flops must be >= 0 (0 = looked up or measured), "
                                   f"got {t.device_peak_flops}")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    need(t.collective_timeout_s > 0, f"train.collective_timeout_s must be positive, got {t.collective_timeout_s}")
    return cfg


def gradient_accumulation_steps(cfg: Config, world_size: int) -> int:
    dp = cfg.parallel.resolve_dp(world_size)
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


# ----------------------------------------------------------------------------- CLI glue

def add_config_arguments(parser) -> None:
    """The three ways to say what to run, shared by every subcommand that takes a config."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections: model, parallel, optim, "
                        "train, data; optional top-level 'preset')")
    parser.add_argument("--preset", help="start from a preset (see 'megallama presets')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field, e.g. --set parallel.tp=2 (repeatable)")


def config_from_args(args, world_size: int = 1, default_preset: Optional[str] = None) -> Config:
    preset = args.preset or (None if args.config else default_preset)
    return validate(load_config(args.config, args.overrides, preset), world_size)
