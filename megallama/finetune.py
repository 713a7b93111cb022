"""Finetuning entry points of `megallama train`: ``--init-from`` and ``--resume``.

``--init-from CHECKPOINT`` starts a *new* run from existing weights: step 0, a fresh
optimizer state, data position and learning-rate schedule, at any parallel layout (the
checkpoint is resharded on load).  Resuming continues the *same* run and is what
happens whenever ``train.run_dir`` already holds a checkpoint; ``--resume`` only makes
that explicit (and fails when there is nothing to resume).  So a preempted finetune
resumes from its own checkpoint, never re-initialises from ``init_from``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from megallama.checkpoint import check_compatible, latest_checkpoint, load_checkpoint, read_meta
from megallama.checkpoint import resolve as resolve_checkpoint
from megallama.config import Config
from megallama.errors import CheckpointError, ConfigError
from parallel.topology import ParallelContext


def add_finetune_arguments(p) -> None:
    p.add_argument("--init-from", metavar="CHECKPOINT", default=None,
                   help="start a new run (step 0, new optimizer and schedule) from these weights: a megallama "
                        "checkpoint or run directory, e.g. made by import-hf/import-meta (sets train.init_from)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.run_dir (the default when it holds a checkpoint); "
                        "fails if there is nothing to resume")


def finetune_config(cfg: Config, args) -> Config:
    """Apply --init-from / --resume to the validated config (one-line errors before anything starts)."""
    if getattr(args, "init_from", None):
        if args.resume:
            raise ConfigError("--init-from starts a new run and --resume continues one; pass only one of them")
        cfg = replace(cfg, train=replace(cfg.train, init_from=args.init_from))
    if getattr(args, "resume", False) and latest_checkpoint(cfg.train.run_dir) is None:
        raise ConfigError(f"--resume: train.run_dir '{cfg.train.run_dir}' holds no checkpoint to resume; "
                          "drop --resume to start a new run (or --init-from a checkpoint)")
    return cfg


def resolve_init_from(path: str) -> Path:
    """The checkpoint directory ``init_from`` names (a checkpoint, or a run directory's latest)."""
    p = Path(path)
    if (p / "config.json").is_file() and not (p / "meta.json").is_file():
        raise CheckpointError(f"--init-from '{path}' is a Hugging Face model directory; convert it first with "
                              "`megallama import-hf` and pass the converted checkpoint")
    return resolve_checkpoint(p)


def check_init_from(cfg: Config) -> None:
    """The ``init_from`` checkpoint exists, is complete enough to read, and fits the model config
    and ``data.tokenizer`` (checked before any process group or file exists)."""
    ckpt = resolve_init_from(cfg.train.init_from)
    meta = read_meta(ckpt)
    check_compatible(meta, cfg, ckpt)
    if cfg.data.tokenizer:
        from megallama.data.tokenizer import Tokenizer

        check_tokenizer(meta, ckpt, Tokenizer(cfg.data.tokenizer).fingerprint)


def check_tokenizer(meta: dict, ckpt: Path, fingerprint, what: str = "--init-from") -> None:
    theirs = meta.get("tokenizer_fingerprint")
    if theirs and fingerprint and theirs != fingerprint:
        raise CheckpointError(f"{what} '{ckpt}' was trained with another tokenizer (fingerprint {theirs}) "
                              f"than data.tokenizer (fingerprint {fingerprint}); preprocess the data with the "
                              "checkpoint's tokenizer.model")


def init_weights_from(engine, params, cfg: Config, ctx: ParallelContext, tokenizer, verbose: bool) -> None:
    """``train.init_from``: the checkpoint's weights, resharded to this layout; the optimizer
    state, step, data position and schedule start fresh (a new run, unlike resuming)."""
    ckpt = resolve_init_from(cfg.train.init_from)
    check_tokenizer(read_meta(ckpt), ckpt, getattr(tokenizer, "fingerprint", None))
    load_checkpoint(engine, params, cfg, ctx, ckpt, load_optimizer=False)
    if verbose:
        print(f"initialised weights from {ckpt}; new run from step 0", flush=True)
