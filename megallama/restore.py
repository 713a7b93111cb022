"""Where a run starts: a new run, a resume, a weights-only checkpoint, or ``--init-from``.

One choice, made the same way twice: :func:`check_start` before any process group or file
exists (one-line errors, exit status 2), and :func:`choose_start` + :func:`restore` in the
training loop once the engine is built.

* ``train.run_dir`` holds a checkpoint (``checkpoints/latest``): the run *resumes* from it
  (step, optimizer state, data position), or, if it holds weights only (``import-hf``,
  ``import-meta``, ``reshard --weights-only``), starts at step 0 from those weights.  A
  preempted finetune therefore resumes from its own checkpoint, never from ``init_from``.
* Otherwise ``train.init_from`` (``--init-from``) starts a *new* run from existing weights:
  step 0, a fresh optimizer state, data position and schedule, at any parallel layout.
* Otherwise the run starts from the layout-independent initialisation.

Only :mod:`megallama.checkpoint`'s public functions are called here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megallama.checkpoint import check_compatible, is_weights_only, latest_checkpoint, load_checkpoint, read_meta
from megallama.checkpoint import resolve as resolve_checkpoint
from megallama.config import Config, config_from_dict
from megallama.errors import CheckpointError, ConfigError
from parallel.topology import ParallelContext

# What megallama itself writes into a run directory: a directory holding only these (say, a run
# that died before its first checkpoint) may be trained into again; anything else is refused.
RUN_ARTEFACTS = {"checkpoints", "tensorboard", "metrics.jsonl", "heartbeats", "config.yaml", "summary.json",
                 "energy.json", "failure.json", "run.lock"}

NEW, RESUME, WEIGHTS, INIT_FROM = "new", "resume", "weights", "init-from"


@dataclass(frozen=True)
class Start:
    """How a run starts (``kind``: new, resume, weights or init-from) and from which checkpoint."""

    kind: str
    checkpoint: Optional[Path] = None
    meta: Optional[dict] = None


def resolve_init_from(path: str) -> Path:
    """The checkpoint directory ``init_from`` names (a checkpoint, or a run directory's latest)."""
    p = Path(path)
    if (p / "config.json").is_file() and not (p / "meta.json").is_file():
        raise CheckpointError(f"--init-from '{path}' is a Hugging Face model directory; convert it first with "
                              "`megallama import-hf` and pass the converted checkpoint")
    return resolve_checkpoint(p)


def choose_start(cfg: Config) -> Start:
    """The run directory's latest checkpoint (resume, or weights only), else ``train.init_from``,
    else a new run."""
    ckpt = latest_checkpoint(cfg.train.run_dir)
    if ckpt is not None:
        meta = read_meta(ckpt)
        return Start(WEIGHTS if is_weights_only(meta) else RESUME, ckpt, meta)
    if cfg.train.init_from:
        ckpt = resolve_init_from(cfg.train.init_from)
        return Start(INIT_FROM, ckpt, read_meta(ckpt))
    return Start(NEW)


def check_start(cfg: Config) -> Start:
    """The start of ``cfg``'s run, checked before any process group or file exists: the run
    directory holds nothing foreign, and the checkpoint it starts from fits the model config,
    the data position (when resuming) and ``data.tokenizer``."""
    run_dir = Path(cfg.train.run_dir)
    if run_dir.is_dir() and latest_checkpoint(run_dir) is None:
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ARTEFACTS)
        if foreign:
            raise ConfigError(f"train.run_dir '{run_dir}' holds files but no checkpoint to resume "
                              f"({', '.join(foreign[:3])}); choose a new train.run_dir (--set train.run_dir=...) "
                              "or remove it")
    start = choose_start(cfg)
    if start.checkpoint is None:
        return start
    ckpt, meta = start.checkpoint, start.meta
    check_compatible(meta, cfg, ckpt)
    if start.kind == RESUME:
        consumed, batch, theirs = meta["consumed_samples"], cfg.train.global_batch_size, \
            config_from_dict(meta["config"]).train
        if theirs.seq_len != cfg.train.seq_len:
            # the data position counts samples of the checkpoint's seq_len: at another one it names other data
            raise ConfigError(f"checkpoint '{ckpt}' was trained with train.seq_len={theirs.seq_len} but the config "
                              f"says {cfg.train.seq_len}; its data position ({consumed:,} samples) does not carry over "
                              f"to another sequence length: resume with --set train.seq_len={theirs.seq_len}, or start "
                              f"a new run (a new train.run_dir) from its weights with --init-from {ckpt}")
        if consumed % batch:
            raise ConfigError(f"checkpoint '{ckpt}' has consumed {consumed:,} samples, not a whole number of "
                              f"train.global_batch_size={batch} batches; resume with a global batch size "
                              f"dividing {consumed} (it was {theirs.global_batch_size})")
    if cfg.data.tokenizer:  # starting on data of another tokenizer would train on other token ids
        from megallama.data.tokenizer import Tokenizer

        check_tokenizer(meta, ckpt, Tokenizer(cfg.data.tokenizer).fingerprint,
                        what="--init-from" if start.kind == INIT_FROM else "checkpoint")
    return start


def check_tokenizer(meta: dict, ckpt: Path, fingerprint, what: str = "--init-from") -> None:
    theirs = meta.get("tokenizer_fingerprint")
    if theirs and fingerprint and theirs != fingerprint:
        raise CheckpointError(f"{what} '{ckpt}' was trained with another tokenizer (fingerprint {theirs}) "
                              f"than data.tokenizer (fingerprint {fingerprint}); preprocess the data with the "
                              "checkpoint's tokenizer.model")


def restore(start: Start, engine, params, cfg: Config, ctx: ParallelContext, tokenizer,
            verbose: bool) -> tuple[int, int]:
    """Load ``start``'s checkpoint into ``engine``; returns the (step, consumed samples) the run
    continues from: the checkpoint's when resuming, (0, 0) otherwise."""
    ckpt = start.checkpoint
    if start.kind == RESUME:
        meta = load_checkpoint(engine, params, cfg, ctx, ckpt)
        # the data position is the checkpoint's, not step * global batch: the batch size may change
        if verbose:
            print(f"resumed from {ckpt} (step {meta['step']}, {meta['consumed_samples']:,} samples consumed)",
                  flush=True)
        return meta["step"], meta["consumed_samples"]
    if start.kind == WEIGHTS:
        # weights only (import-hf/import-meta, reshard --weights-only): initialise from them and
        # train from step 0 with a fresh optimizer and data stream
        load_checkpoint(engine, params, cfg, ctx, ckpt, load_optimizer=False)
        if verbose:
            print(f"initialised from the weights of {ckpt} (no optimizer state: starting at step 0)", flush=True)
    elif start.kind == INIT_FROM:
        # the data's tokenizer (the default corpus trains its own): the same ids as the checkpoint's
        check_tokenizer(start.meta, ckpt, getattr(tokenizer, "fingerprint", None))
        load_checkpoint(engine, params, cfg, ctx, ckpt, load_optimizer=False)
        if verbose:
            print(f"initialised weights from {ckpt}; new run from step 0", flush=True)
    return 0, 0
