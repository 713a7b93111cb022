"""`megallama train`: pretrain (or finetune) a model; the loop itself is :func:`megallama.train.train`.

Everything a user can get wrong is checked here, before any process group or file exists:
the config, the DeepSpeed template, the run directory and what it holds, the input files.
"""

from __future__ import annotations

import errno
import threading

import torch

from megallama.config import Config, add_config_arguments, config_from_args
from megallama.distributed import shutdown, world_size_from_env
from megallama.runlock import run_lock
from megallama.engine import deepspeed_config
from megallama.errors import ConfigError, UserError, say
from megallama.faults import EXIT_HALTED, Faults, TrainingHalted, report_failure
from megallama.finetune import add_finetune_arguments, finetune_config
from megallama.preflight import check_inputs, check_model_fits
from megallama.restore import check_start
from megallama.train import EXIT_PREEMPTED, train


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


def add_arguments(p):
    add_config_arguments(p)
    add_finetune_arguments(p)


def _quiet_disk_full_in_threads() -> None:
    """A background writer (TensorBoard's) that hits a full disk: one line, not a thread traceback
    (the training thread's own write fails next and ends the run in one line)."""
    previous = threading.excepthook

    def hook(info):
        if isinstance(info.exc_value, OSError) and info.exc_value.errno in DISK_FULL:
            say(f"megallama train: warning: {info.thread.name if info.thread else 'a thread'}: {info.exc_value}")
        else:
            previous(info)

    threading.excepthook = hook


def run(args) -> int:
    _quiet_disk_full_in_threads()
    world = world_size_from_env()
    cfg = finetune_config(config_from_args(args, world, default_preset="demo"), args)
    check_environment(cfg, world)
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
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            report_failure(cfg.train.run_dir, exc)
            raise
        where = f"writing '{exc.filename}'" if exc.filename else "a write"
        raise UserError(f"{where} failed ({exc.strerror}); the last complete checkpoint is kept: free space, "
                        "then run the same command to resume") from None
    except Exception as exc:
        report_failure(cfg.train.run_dir, exc)
        raise
    finally:
        shutdown(barrier=together)
    return 0


def check_environment(cfg: Config, world_size: int = 1) -> None:
    """Checks that need the machine, done before any process group or file exists."""
    Faults.from_env(0)  # a malformed MEGALLAMA_FAULT: one line now, not a traceback on every rank later
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (no fp16 loss scaling on DeepSpeed's CPU backend); "
                          "use bf16 or fp32 on CPU")
    check_model_fits(cfg, world_size)
    check_start(cfg)  # the run directory, and the checkpoint the run resumes or starts from
    check_inputs(cfg)


