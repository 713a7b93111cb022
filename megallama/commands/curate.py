"""`megallama curate`: per-source document steps, exact and near dedup, sharded and resumable (see docs/data.md)."""

from __future__ import annotations

import dataclasses
import shutil
import typing
from pathlib import Path

from megallama.data.curate import SOURCES
from megallama.data.shards import STAGES, WorkDir, make_plan, merge, run_stages, run_task
from megallama.data.sources import TEXT_SUFFIXES, add_input_arguments, output_error
from megallama.data.steps import StepsConfig
from megallama.errors import DataError, say

EXECUTORS = ("local", "ray")


def _step_options(p) -> None:
    """One option per StepsConfig field (on_error is --on-error): --languages en fr, --lid-model PATH ..."""
    hints = typing.get_type_hints(StepsConfig)
    for f in dataclasses.fields(StepsConfig):
        if f.name == "on_error":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        many = typing.get_origin(hints[f.name]) in (tuple, list)
        kind = type(default[0]) if many and default else str if many else type(default)
        p.add_argument("--" + f.name.replace("_", "-"), dest="step_" + f.name, default=default,
                       nargs="+" if many else None, type=kind if kind in (int, float, str) else None,
                       help=f.metadata.get("help", f"document steps setting (default: {default!r}; docs/data.md)"))


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--output", required=True, metavar="PATH", help="curated .jsonl (or .jsonl.gz), one {\"text\"} per line")
    p.add_argument("--source", choices=SOURCES, default="web", help="which steps apply (default: web)")
    p.add_argument("--near-dup-threshold", type=float, default=0.9,
                   help="drop documents this similar (MinHash Jaccard) to an earlier one; 0 disables (default: 0.9)")
    p.add_argument("--report", metavar="JSON", help="also write the counts as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    g = p.add_argument_group("sharded execution")
    g.add_argument("--workers", type=int, default=1, metavar="W", help="local processes running tasks (default: 1)")
    g.add_argument("--shards", type=int, default=None, metavar="N",
                   help="input shards (default: --workers); the result is the same for any N")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="run the tasks here (a pool of --workers) or on a Ray cluster (default: local)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local one for this run)")
    g.add_argument("--stage", choices=STAGES, default=None,
                   help="run one task of this stage only (with --shard; what a SLURM array task does)")
    g.add_argument("--shard", type=int, default=None, metavar="I", help="the task index for --stage")
    g.add_argument("--work-dir", default=None, metavar="DIR",
                   help="stage files and task markers, for resuming (default: OUTPUT.work)")
    g.add_argument("--keep-work", action="store_true", help="keep --work-dir after the merge")
    g.add_argument("--print-stages", action="store_true",
                   help="print this run's stages and their task counts, one 'STAGE N' per line, and exit")
    _step_options(p)


def _steps_config(args) -> StepsConfig:
    values = {f.name: getattr(args, "step_" + f.name) for f in dataclasses.fields(StepsConfig)
              if hasattr(args, "step_" + f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return StepsConfig(on_error=args.on_error, **values)


def _check_outputs(args, out: Path, report_path) -> None:
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise output_error(out, "--output", f"'{blocker}' is not a directory")
    if out.exists() and not args.force:
        raise DataError(f"'{out}' already exists; pass --force to overwrite it or choose another --output")
    if report_path is not None and report_path.is_file() and not args.force:
        raise DataError(f"'{report_path}' already exists; pass --force to overwrite it or choose another --report")
    if report_path is not None and (report_path.is_dir() or not report_path.parent.is_dir()):
        raise output_error(report_path, "--report", "it is a directory" if report_path.is_dir()
                           else "its directory does not exist")


def run(args) -> int:
    out = Path(args.output)
    report_path = Path(args.report) if args.report else None
    if (args.stage is None) != (args.shard is None):
        raise DataError("--stage and --shard go together (one task of a sharded run); give both or neither")
    if args.stage is not None and args.shards is None:
        raise DataError("--stage needs --shards N, the same for every task of the run")
    if args.executor == "ray" and args.stage is not None:
        raise DataError("--executor ray runs every task itself; leave out --stage/--shard")
    shards = args.shards if args.shards is not None else args.workers
    plan = make_plan(args.input, args.source, shards, tuple(args.suffix or TEXT_SUFFIXES), _steps_config(args),
                     args.near_dup_threshold, args.on_error)
    if args.print_stages:
        print("\n".join(f"{stage} {n}" for stage, n in plan.stages()))
        return 0
    if args.stage is None:
        _check_outputs(args, out, report_path)
    if args.stage not in (None, "merge"):
        work = WorkDir(Path(args.work_dir or f"{out}.work"), plan)
        r = run_task(str(work.root), args.stage, args.shard)
        print(f"curate {args.stage} task {args.shard}: " + ("already done" if r.get("skipped") else
              f"done in {r['seconds']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB"))
        return 0
    if args.stage == "merge":
        _check_outputs(args, out, report_path)
    work = WorkDir(Path(args.work_dir or f"{out}.work"), plan)
    if args.stage is None:
        run_stages(work, args.workers, args.executor, args.ray_address, log=say)
    elif args.shard != 0:
        raise DataError(f"stage 'merge' has one task, 0; got --shard {args.shard}")
    report = merge(work, out)
    print(f"curated {args.source} text into {out} ({plan.shards} shard(s))")
    print(report.table())
    if report_path is not None:
        try:
            report_path.write_text(report.to_json())
        except OSError as exc:
            raise output_error(report_path, "--report", exc) from None
    if not args.keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    return 0
