"""`megallama train`: pretrain (or finetune) a model; the loop itself is :func:`megallama.train.train`.

Everything a user can get wrong is checked here, before any process group or file exists:
the config, the DeepSpeed template, the run directory and what it holds, the input files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megallama.checkpoint import check_compatible, is_weights_only, latest_checkpoint, read_meta
from megallama.config import Config, add_config_arguments, config_from_args, config_from_dict
from megallama.distributed import shutdown, world_size_from_env
from megallama.engine import deepspeed_config
from megallama.errors import ConfigError, UserError, say
from megallama.faults import EXIT_HALTED, Faults, TrainingHalted, report_failure
from megallama.finetune import add_finetune_arguments, check_init_from, check_tokenizer, finetune_config
from megallama.preflight import check_inputs
from megallama.train import EXIT_PREEMPTED, train


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
                 "energy.json", "failure.json"}


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


