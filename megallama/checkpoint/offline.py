"""Writing whole checkpoints offline (import, reshard, tests) from full canonical tensors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from megallama.atomic import building, check_new_output, commit_directory, fsync_write
from megallama.checkpoint.format import MOMENTS, copy_tokenizer, layout_record, new_meta, part_file, save_tensors, step_name
from megallama.config import Config, ModelConfig
from megallama.errors import CheckpointError
from megallama.sharding import ShardSpec, reshard_tensor, shard_specs, stage_assignment

VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")


def _check_shape(name: str, tensor: torch.Tensor, spec: ShardSpec, model_cfg: ModelConfig) -> None:
    """A full tensor must have the configured shape; vocabulary rows may carry any TP padding."""
    shape, want = tuple(tensor.shape), tuple(spec.shape)
    if name in VOCAB_PARAMS and len(shape) == 2 and shape[1] == want[1] and shape[0] >= model_cfg.vocab_size:
        return
    if shape != want:
        raise CheckpointError(f"parameter '{name}' has shape {shape}, the config needs {want}; "
                              "the source is of another model shape (check its config/params)")


def write_checkpoint(out: str | Path, cfg: Config, weights: dict[str, torch.Tensor],
                     moments: Optional[dict[str, torch.Tensor]] = None, step: int = 0, consumed_samples: int = 0,
                     tokenizer_path: Optional[str] = None, extra_meta: Optional[dict] = None) -> Path:
    """Write a checkpoint from *full* canonical tensors at the layout ``cfg.parallel`` (tp, pp).

    ``moments`` maps ``"<name>/exp_avg"`` and ``"<name>/exp_avg_sq"`` to full tensors; without
    it the checkpoint is weights-only (for inference, conversion, or ``--init-from``).
    The directory is written under a temporary name and renamed when complete.
    """
    out = Path(out)
    if out.exists():  # even an empty directory: a checkpoint is never written into something that exists
        raise CheckpointError(f"output '{out}' already exists; choose a new path or remove it")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    specs = shard_specs(cfg.model, tp)
    missing = sorted(set(specs) - set(weights))
    if missing:
        raise CheckpointError(f"weights lack {len(missing)} parameters of the configured model, e.g. "
                              f"'{missing[0]}'; the source is of another model shape")
    extra = sorted(set(weights) - set(specs))
    if extra:
        raise CheckpointError(f"weights hold {len(extra)} parameters the configured model lacks, e.g. "
                              f"'{extra[0]}'; the source is of another model shape")
    stage_of = stage_assignment(cfg.model, pp, cfg.parallel.pipeline_partition)
    with building(out) as tmp:
        files, parts = {}, {}
        for t in range(tp):
            for s in range(pp):
                names = [n for n in specs if stage_of[n] == s and (t == 0 or specs[n].dim is not None)]
                model = {}
                for n in names:
                    _check_shape(n, weights[n], specs[n], cfg.model)
                    model[n] = reshard_tensor(weights[n].float(), specs[n], t, tp).reshape(-1)
                kinds = [("model", model)]
                if moments is not None:
                    kinds.append(("optim", {f"{n}/{k}": reshard_tensor(moments[f"{n}/{k}"].float(), specs[n], t,
                                                                       tp).reshape(-1)
                                            for n in names for k in MOMENTS}))
                for kind, tensors in kinds:
                    if tensors:
                        file = part_file(kind, t, s, 0)
                        files[file] = save_tensors(tensors, tmp / file)
                        parts[file] = {k: [0, v.numel()] for k, v in tensors.items()}
        copied = copy_tokenizer(tokenizer_path, tmp)
        if copied:
            files[copied[0]] = copied[1]
        meta = new_meta(cfg, layout_record(cfg, tp, pp, 1), step, consumed_samples,
                        lr_scheduler_last_epoch=step if moments is not None else None, stage_of=stage_of,
                        files=files, parts=parts)
        meta.update(extra_meta or {})  # a tool's own record (reshard: the source's schedule and layout)
        fsync_write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        commit_directory(tmp, out)
    return out


def write_run_checkpoint(run_dir: str | Path, cfg: Config, weights: dict[str, torch.Tensor],
                         moments: Optional[dict[str, torch.Tensor]] = None, step: int = 0,
                         consumed_samples: int = 0, tokenizer_path: Optional[str] = None,
                         extra_meta: Optional[dict] = None) -> Path:
    """:func:`write_checkpoint` into a *new run directory* ``run_dir/checkpoints/step_N`` plus ``latest``.

    Offline tools (reshard, import-hf, import-meta) write run directories so that
    ``megallama train --set train.run_dir=RUN_DIR`` resumes from them and every reader
    (eval, export, reshard) accepts them.  Refuses an existing non-empty ``run_dir``.
    """
    run_dir = check_new_output(run_dir)
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))
    with building(run_dir) as tmp:  # the whole run dir appears at once, or not at all
        (tmp / "checkpoints").mkdir(parents=True)
        final = write_checkpoint(tmp / "checkpoints" / step_name(step), cfg, weights, moments, step,
                                 consumed_samples, tokenizer_path, extra_meta)
        fsync_write(tmp / "checkpoints" / "latest", final.name.encode())
        commit_directory(tmp, run_dir)  # also replaces an existing *empty* directory
    return run_dir / "checkpoints" / final.name
