"""`megallama sweep`: train a grid of model sizes x budgets (x learning rates), gather results.csv (see tools/sweep.py)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from megallama.errors import EXIT_PREEMPTED, UserError
from tools.sweep import DEFAULT_GRID, Preemption, gather, load_grid, run_one


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard '{text}': expected I/N with 0 <= I < N, e.g. --shard 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard '{text}': expected I/N with 0 <= I < N, e.g. --shard 0/4")
    return i, n


def add_arguments(p):
    p.add_argument("--grid", default=str(DEFAULT_GRID), help="grid YAML (default: the small CPU grid)")
    p.add_argument("--output", required=True, metavar="DIR", help="sweep directory (runs/<name>/, results.csv)")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m megallama",
                   help="command that runs megallama, e.g. 'torchrun --nproc_per_node 2 -m megallama'")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="run only runs I, I+N, I+2N, ... (parallel sweeps)")
    p.add_argument("--gather-only", action="store_true", help="only rebuild results.csv from finished runs")
    p.add_argument("--dry-run", action="store_true", help="list the runs (name, steps, tokens) and exit")


def run(args) -> int:
    runs = load_grid(Path(args.grid))
    out = Path(args.output)
    shard, shards = _parse_shard(args.shard)
    launcher = shlex.split(args.launcher)
    if not launcher:
        raise UserError("--launcher is empty; give the command that runs megallama, e.g. 'python -m megallama'")
    if args.dry_run:
        for r in runs:
            t = r.config["train"]
            print(f"{r.name:<28}steps={t['steps']:<7}tokens={t['tokens']}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    failed, preempted = [], False
    preemption = Preemption()
    if not args.gather_only:
        preemption.install()  # SLURM's preemption signals go to the running trainer (tools/sweep.py)
        for run_ in runs[shard::shards]:
            if preemption.signal:
                preempted = True
                break
            status = run_one(run_, out, launcher, preemption)
            if status == EXIT_PREEMPTED or preemption.signal:
                preempted = True
                break
            if status:
                failed.append(run_.name)
    done = gather(runs, out)
    print(f"[sweep] {done}/{len(runs)} runs finished; results in {out / 'results.csv'}")
    if preempted:
        print("[sweep] stopped on a preemption signal; run the same command to resume", flush=True)
        return EXIT_PREEMPTED
    if failed:
        print(f"[sweep] {len(failed)} failed: {', '.join(failed)} (re-run the same command to retry)")
        return 1
    return 0
