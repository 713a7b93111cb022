"""Writing whole checkpoints offline (import, reshard, tests) from full canonical tensors in memory.

The one writer is the streaming one (:mod:`megallama.checkpoint.stream`); these take dicts of full
tensors, as tests and small tools hold them, and hand them to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megallama.checkpoint.stream import dict_source, write_checkpoint_from, write_run_checkpoint_from
from megallama.config import Config


def write_checkpoint(out: str | Path, cfg: Config, weights: dict[str, torch.Tensor],
                     moments: Optional[dict[str, torch.Tensor]] = None, step: int = 0, consumed_samples: int = 0,
                     tokenizer_path: Optional[str] = None, extra_meta: Optional[dict] = None) -> Path:
    """Write a checkpoint from *full* canonical tensors at the layout ``cfg.parallel`` (tp, pp).

    ``moments`` maps ``"<name>/exp_avg"`` and ``"<name>/exp_avg_sq"`` to full tensors; without
    it the checkpoint is weights-only (for inference, conversion, or ``--init-from``).
    The directory is written under a temporary name and renamed when complete.
    """
    return write_checkpoint_from(out, cfg, dict_source(weights, moments), step, consumed_samples, tokenizer_path,
                                 extra_meta)


def write_run_checkpoint(run_dir: str | Path, cfg: Config, weights: dict[str, torch.Tensor],
                         moments: Optional[dict[str, torch.Tensor]] = None, step: int = 0,
                         consumed_samples: int = 0, tokenizer_path: Optional[str] = None,
                         extra_meta: Optional[dict] = None) -> Path:
    """:func:`write_checkpoint` into a *new run directory* ``run_dir/checkpoints/step_N`` plus ``latest``.

    Offline tools (reshard, import-hf, import-meta) write run directories so that
    ``megallama train --set train.run_dir=RUN_DIR`` resumes from them and every reader
    (eval, export, reshard) accepts them.  Refuses an existing non-empty ``run_dir``.
    """
    return write_run_checkpoint_from(run_dir, cfg, dict_source(weights, moments), step, consumed_samples,
                                     tokenizer_path, extra_meta)
