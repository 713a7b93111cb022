"""`megallama sweep`: train a grid of model sizes x budgets (x learning rates), gather results.csv.

Every run is the real trainer in its own process::

    <launcher> train --config DIR/sweep/<name>.yaml    (train.run_dir = DIR/runs/<name>)

(launcher default: ``python -m megallama``; e.g. ``--launcher "torchrun --nproc_per_node 2 -m megallama"``).
The trainer writes ``summary.json`` (params, tokens, flops, steps, final train and
validation loss) at the end; a run whose summary exists is finished and skipped, so
an interrupted sweep resumes where it stopped.  ``--shard I/N`` runs every N-th run
(for N independent processes, e.g. a Slurm array: slurm/sweep_array.sbatch); ``--gather-only``
only rebuilds ``DIR/results.csv`` from the summaries present.

Preemption: SIGUSR1 or SIGTERM (SLURM's warning before a time limit or a requeue) is passed on
to the running trainer, which saves a checkpoint and exits 75; the sweep then starts no further
run and exits 75 itself.  The same command later resumes that run from its checkpoint.

Grid YAML (see megallama/configs/sweep_default.yaml)::

    base: {preset: demo, train: {...}}       # shared config, as in a training YAML
    models: {small: {dim: 64, n_layers: 2, n_heads: 4}, ...}
    flops: [1e11, 1e12]     # compute budgets: tokens = C / flops_per_token  (IsoFLOP design)
    tokens: [1e6, 4e6]      # or token budgets (exactly one of flops / tokens)
    lr: [1e-3, 3e-3]        # optional
    warmup_fraction: 0.05   # optional: each run warms up for this share of its own steps

Every run's cosine schedule spans its own steps (``train.steps``); its warmup is
``optim.warmup_steps`` as configured, or with ``warmup_fraction`` that share of the run's
steps.  A run whose steps do not exceed its warmup never reaches its decay, so its loss
is no point of a schedule-matched sweep: such a grid is an error that names the run.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from megallama.atomic import replacing, write_text
from megallama.config import Config, _deep_update, config_from_dict, preset_config, validate
from megallama.errors import EXIT_PREEMPTED, ConfigError, UserError
from megallama.hardware import read_yaml_mapping

DEFAULT_GRID = Path(__file__).resolve().parent.parent / "megallama" / "configs" / "sweep_default.yaml"
RESULT_COLUMNS = ["name", "model", "lr", "params", "tokens", "flops", "steps", "final_train_loss", "final_valid_loss"]
SUMMARY_KEYS = ("params", "tokens", "flops", "steps", "final_train_loss", "final_valid_loss")


@dataclass(frozen=True)
class SweepRun:
    name: str
    model: str
    lr: Optional[float]
    config: dict  # a complete training YAML (preset + sections)


# ----------------------------------------------------------------------------- grid

def load_grid(path: Path) -> list[SweepRun]:
    """Expand a grid file into runs, each with a validated training config."""
    grid = read_yaml_mapping(path, "grid file", "be a mapping with base:, models: and flops: or tokens: "
                                                "(see docs/planning.md)")
    unknown = set(grid) - {"base", "models", "flops", "tokens", "lr", "warmup_fraction"}
    if unknown:
        raise UserError(f"grid file '{path}': unknown key(s) {', '.join(sorted(unknown))}; "
                        "valid: base, models, flops, tokens, lr, warmup_fraction")
    base, models = grid.get("base") or {}, grid.get("models")
    if not isinstance(base, dict) or not isinstance(models, dict) or not models:
        raise UserError(f"grid file '{path}': 'base' must be a mapping and 'models' a non-empty mapping "
                        "of name -> model overrides")
    if ("flops" in grid) == ("tokens" in grid):
        raise UserError(f"grid file '{path}': give exactly one of 'flops:' (compute budgets) or 'tokens:'")
    budget_key = "flops" if "flops" in grid else "tokens"
    budgets = _positive_list(grid[budget_key], budget_key, path)
    lrs = _positive_list(grid["lr"], "lr", path) if "lr" in grid else [None]
    warmup = grid.get("warmup_fraction")
    if warmup is not None:
        warmup = _number(warmup)
        if not 0 <= warmup < 1:
            raise UserError(f"grid file '{path}': 'warmup_fraction' must be a number in [0, 1), e.g. 0.05, "
                            f"got {grid['warmup_fraction']!r}")
    runs = []
    for (model, overrides), budget, lr in itertools.product(models.items(), budgets, lrs):
        if not isinstance(overrides, dict):
            raise UserError(f"grid file '{path}': models.{model} must be a mapping of model fields")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(model)):
            raise UserError(f"grid file '{path}': model name '{model}' names a directory; "
                            "use letters, digits, '_', '.' and '-' only")
        runs.append(_make_run(path, base, str(model), overrides, budget_key, budget, lr, warmup))
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # one run directory for two points: the second would be skipped as finished
        raise UserError(f"grid file '{path}': two points share the run name {twice[0]}; '{budget_key}' values must "
                        "differ in their first 3 significant digits and 'lr' values in their first 6 (no repeats)")
    return runs


def _number(value) -> float:
    """``value`` as a float, strings such as '1e11' too (YAML 1.1 reads them as text); -1 if it is none."""
    try:
        return float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        return -1.0


def _positive_list(values, key: str, path: Path) -> list[float]:
    """Positive numbers; strings such as '1e11' are accepted (YAML 1.1 reads them as text)."""
    out = []
    for v in values if isinstance(values, list) else [None]:
        x = _number(v)
        if not (x > 0 and math.isfinite(x)):
            raise UserError(f"grid file '{path}': '{key}' must be a non-empty list of positive numbers, "
                            "e.g. [1.0e+11, 1.0e+12]")
        out.append(x)
    if not out:
        raise UserError(f"grid file '{path}': '{key}' must be a non-empty list of positive numbers")
    return out


def _make_run(path: Path, base: dict, model: str, overrides: dict, budget_key: str, budget: float,
              lr: Optional[float], warmup_fraction: Optional[float] = None) -> SweepRun:
    raw = _deep_update(copy.deepcopy(base), {"model": dict(overrides)})
    if lr is not None:
        _deep_update(raw, {"optim": {"lr": lr}})
    preset = raw.pop("preset", None)
    try:
        full = preset_config(preset).to_dict() if preset else Config().to_dict()
        cfg = validate(config_from_dict(_deep_update(full, copy.deepcopy(raw))))
    except ConfigError as exc:
        raise UserError(f"grid file '{path}', model '{model}': {exc}") from None
    tokens = budget if budget_key == "tokens" else budget / cfg.model.flops_per_token(cfg.train.seq_len)
    batch = cfg.train.global_batch_size * cfg.train.seq_len
    steps = max(1, round(tokens / batch))
    train = {"steps": steps, "tokens": steps * batch}
    if not cfg.train.eval_interval:
        train["eval_interval"] = steps  # the trainer validates only on eval steps; the fit needs the last
    _deep_update(raw, {"train": train})
    name = (f"{model}_{budget_key[0]}{budget:.3g}" + (f"_lr{lr:g}" if lr is not None else "")).replace("+", "")
    warmup = cfg.optim.warmup_steps if warmup_fraction is None else round(warmup_fraction * steps)
    if warmup >= steps:  # the schedule would end in its warmup, at the peak rate, never decaying
        fix = ("lower 'warmup_fraction'" if warmup_fraction is not None
               else "lower base optim.warmup_steps or set 'warmup_fraction:' (e.g. 0.05)")
        raise UserError(f"grid file '{path}': run {name} trains {steps} steps, not more than its "
                        f"{warmup} warmup steps (its learning rate would never decay); {fix}, or raise its budget")
    if warmup_fraction is not None:
        _deep_update(raw, {"optim": {"warmup_steps": warmup}})
    return SweepRun(name=name, model=model, lr=lr,
                    config=dict(preset=preset, **raw) if preset else raw)


# ----------------------------------------------------------------------------- running

class Preemption:
    """SIGUSR1/SIGTERM while the sweep runs: recorded, and passed on to the running trainer (which
    checkpoints at its next step boundary and exits 75).  ``install()`` before the first run."""

    def __init__(self):
        self.signal = 0
        self.child: Optional[subprocess.Popen] = None

    def install(self) -> "Preemption":
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, cmd: list[str], log) -> int:
        """Run ``cmd`` (output to ``log``) as the child the signals go to; its exit status."""
        self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if self.signal:  # arrived between the fork and the assignment
            self.child.send_signal(self.signal)
        try:
            return self.child.wait()
        finally:
            self.child = None


def run_one(run: SweepRun, out: Path, launcher: list[str], preemption: Optional[Preemption] = None) -> int:
    """Train one run unless its summary exists; 0 when it is finished, else the trainer's exit
    status (EXIT_PREEMPTED: it saved a checkpoint on a signal).

    ``runs/<name>/`` belongs to the trainer (it refuses a non-empty run directory without a
    checkpoint), so the sweep keeps its per-run config and log in ``sweep/``.  A run directory
    with a checkpoint but no summary (a preempted or crashed run) is resumed from it, as the
    trainer resumes any run directory.  One without a checkpoint is what an earlier attempt
    left before its first save: it is moved to ``runs/<name>.attempt-K`` (kept for inspection)
    and the run starts afresh.
    """
    run_dir = out / "runs" / run.name
    if (run_dir / "summary.json").is_file():
        return 0
    resuming = (run_dir / "checkpoints" / "latest").is_file()  # megallama.checkpoint's pointer to the newest save
    if run_dir.exists() and not resuming:
        k = 1
        while run_dir.with_name(f"{run.name}.attempt-{k}").exists():
            k += 1
        run_dir.rename(run_dir.with_name(f"{run.name}.attempt-{k}"))
    own = out / "sweep"
    own.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(run.config)
    _deep_update(config, {"train": {"run_dir": str(run_dir)}})
    cfg_path = own / f"{run.name}.yaml"
    write_text(cfg_path, yaml.safe_dump(config, sort_keys=False))
    cmd = [*launcher, "train", "--config", str(cfg_path)]
    log_path = own / f"{run.name}.log"
    print(f"[sweep] {run.name}: {'resuming from its checkpoint: ' if resuming else ''}"
          f"{' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    with open(log_path, "a") as log:
        rc = (preemption or Preemption()).run(cmd, log)
    if rc == EXIT_PREEMPTED:
        print(f"[sweep] {run.name}: checkpointed on a signal (exit {rc}); the same command resumes it", flush=True)
        return rc
    if rc != 0 or not (run_dir / "summary.json").is_file():
        print(f"[sweep] {run.name}: FAILED (exit {rc}); see {log_path}", flush=True)
        return rc or 1
    return 0


def gather(runs: list[SweepRun], out: Path) -> int:
    """Write DIR/results.csv from the finished runs' summaries; returns the number of rows."""
    rows = []
    for run in runs:
        path = out / "runs" / run.name / "summary.json"
        if not path.is_file():
            continue
        try:
            summary = json.loads(path.read_text())
            row = {k: summary[k] for k in SUMMARY_KEYS}
        except (ValueError, KeyError, TypeError):
            raise UserError(f"'{path}' is not a trainer summary (needs {', '.join(SUMMARY_KEYS)}); "
                            "delete it to re-run that point") from None
        rows.append(dict(name=run.name, model=run.model, lr="" if run.lr is None else run.lr, **row))
    with replacing(out / "results.csv", newline="") as f:  # shards of an array may gather at once
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)




# ----------------------------------------------------------------------------- CLI
