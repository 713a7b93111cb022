"""Finetuning entry points of `megallama train`: ``--init-from`` and ``--resume``.

``--init-from CHECKPOINT`` starts a *new* run from existing weights: step 0, a fresh
optimizer state, data position and learning-rate schedule, at any parallel layout (the
checkpoint is resharded on load).  Resuming continues the *same* run and is what
happens whenever ``train.run_dir`` already holds a checkpoint; ``--resume`` only makes
that explicit (and fails when there is nothing to resume).  So a preempted finetune
resumes from its own checkpoint, never re-initialises from ``init_from``.  Which start a
run takes, and its checks, are :mod:`megallama.restore`'s.
"""

from __future__ import annotations

from dataclasses import replace

from megallama.checkpoint import latest_checkpoint
from megallama.config import Config
from megallama.errors import ConfigError


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
