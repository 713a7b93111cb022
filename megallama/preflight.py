"""Input checks that run before any process group, directory or file is created.

Everything a user can get wrong about the *files* a run needs (tokenizer, datasets)
is checked here, on every rank, by opening them read-only: a typo costs one line
and exit status 2 instead of a stack trace from 1,000 ranks after the rendezvous.
"""

from __future__ import annotations

import os

from megallama.config import Config
from megallama.errors import ConfigError


def memory_per_rank() -> tuple[int, str]:
    """Bytes one rank can hold, and what they are: its GPU's memory, or the host's available memory
    shared by its local ranks; (0, "") when unknown."""
    import torch

    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        return torch.cuda.get_device_properties(device).total_memory, "its GPU's memory"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        avail = info.get("MemAvailable", info.get("MemTotal", 0))
    except (OSError, ValueError, IndexError):
        return 0, ""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
                       or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1))
    return avail // local, "this host's available memory" + (f" over its {local} ranks" if local > 1 else "")


def check_model_fits(cfg: Config, world_size: int) -> None:
    """Refuse a model whose fp32 master weights alone (a lower bound of what a rank holds: gradients,
    Adam moments and activations come on top) exceed what a rank has: one line, not an allocation
    failure after the rendezvous.  ZeRO-1/2/3 partition the masters over data parallelism."""
    p = cfg.parallel
    dp = p.resolve_dp(world_size) if p.zero_stage >= 1 else 1
    need = 4 * cfg.model.num_parameters() // (p.tp * p.pp * dp)
    have, where = memory_per_rank()
    if have and need > have:
        raise ConfigError(f"the model's fp32 master weights alone need {need / 2 ** 30:,.1f} GiB per rank "
                          f"(tp={p.tp}, pp={p.pp}, ZeRO over dp={dp}) but {where} is {have / 2 ** 30:,.1f} GiB; "
                          "raise parallel.tp/pp or the number of ranks, or choose a smaller model "
                          "(`megallama plan` finds a layout that fits)")


def check_inputs(cfg: Config) -> None:
    """Raise a one-line UserError if a configured tokenizer or dataset is missing or mismatched."""
    from megallama.data.indexed import open_dataset
    from megallama.data.pipeline import _check_config
    from megallama.data.tokenizer import Tokenizer

    _check_config(cfg)
    d = cfg.data
    if not d.sources:
        return  # the default corpus is built (and cached) by the run itself
    tok = Tokenizer(d.tokenizer)
    for s in d.sources:
        open_dataset(s.path).check_tokenizer(tok.vocab_size, tok.fingerprint, d.tokenizer)
