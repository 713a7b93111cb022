"""Shared pieces of the offline checkpoint tools (reshard, export/import for HF and Meta).

The weight *mapping* lives in :mod:`megallama.convert`; the checkpoint *format* in
:mod:`megallama.checkpoint`.  This module only holds what several tools repeat: building a
validated :class:`Config` for an imported model, recovering LLaMA's FFN settings from a
hidden size, and writing an output directory atomically.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from megallama.atomic import check_new_output, commit_directory  # noqa: F401 (the tools' imports of the one helper)
from megallama.config import Config, ModelConfig, ParallelConfig, validate
from megallama.errors import CheckpointError, UserError


def add_layout_arguments(p, what: str) -> None:
    p.add_argument("--tp", type=int, default=1, help=f"tensor-parallel size of the {what} (default: 1)")
    p.add_argument("--pp", type=int, default=1, help=f"pipeline stages of the {what} (default: 1)")


def source_number(values: dict, key: str, default, path, integer: bool = False):
    """``values[key]`` of a source's config file (``default`` when absent or null), refused in one
    line unless it is a number (an integer if ``integer``): validation would fail on it with a
    traceback."""
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise CheckpointError(f"'{path}': '{key}' must be {'an integer' if integer else 'a number'}, "
                              f"got {value!r}; fix the model's config file")
    return value


def ffn_settings(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) that make :attr:`ModelConfig.ffn_hidden` equal ``hidden``.

    HF configs store the FFN width itself; we store LLaMA's recipe (2/3 * 4d rounded up).
    Prefer the paper's recipe with the largest rounding multiple, else an exact multiplier.
    """
    for multiple in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ModelConfig(dim=dim, multiple_of=multiple).ffn_hidden == hidden:
            return multiple, None
    base = int(2 * 4 * dim / 3)
    for mult in (hidden / base, (hidden + 0.5) / base):
        if ModelConfig(dim=dim, multiple_of=1, ffn_dim_multiplier=mult).ffn_hidden == hidden:
            return 1, mult
    raise UserError(f"cannot express FFN width {hidden} for dim {dim} as LLaMA's SwiGLU recipe; "
                    "this architecture is not supported")


def imported_config(model: ModelConfig, tp: int, pp: int) -> Config:
    """A validated config holding ``model`` at layout (tp, pp); training fields keep their defaults
    (override them with ``--set`` when training from the import)."""
    seq = min(Config().train.seq_len, model.max_seq_len)
    cfg = Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp, zero_stage=0 if pp > 1 else 1))
    cfg = replace(cfg, train=replace(cfg.train, seq_len=seq, precision="fp32"))
    return validate(cfg, tp * pp)


def check_not_source(out: Path, source: Path) -> None:
    """``--force`` replaces the output: refuse an output that is (or holds) the checkpoint read."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise CheckpointError(f"output '{out}' holds the source checkpoint '{source}'; --force would delete it, "
                              "choose another --output")


def import_source(shapes: dict, to_ours, meta_name, load):
    """A tensor source (:class:`megallama.checkpoint.stream.BuildSource`) for an imported model, built one
    canonical tensor at a time from only the source tensors it is made of.

    ``shapes``: source name -> meta-device tensor of its shape; ``to_ours``: the whole-dict mapping
    (:mod:`megallama.convert`), run once on ``shapes`` (names, shapes and the mapping's own errors,
    before anything is written) and then on each tensor's sources; ``meta_name``: source name -> its
    Meta name (None: dropped); ``load(names)``: those source tensors, real."""
    from megallama.checkpoint.stream import BuildSource
    from megallama.convert import fused_name

    ours = to_ours(shapes)
    deps: dict[str, list] = {}
    for name in shapes:
        meta = meta_name(name)
        fused = fused_name(meta) if meta is not None else None
        if fused is not None:
            deps.setdefault(fused, []).append(name)

    def build(name: str, key):
        need = deps.get(name) or deps["tok_embeddings.weight"]  # a tied output is the embedding's copy
        return to_ours({k: v.float() for k, v in load(need).items()})[name]

    return BuildSource(list(ours), build)
