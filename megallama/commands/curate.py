"""`megallama curate`: exact dedup, heuristic filters and MinHash near-dedup for one source (see docs/data.md)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from megallama.data.curate import SOURCES, CurateConfig, Curator
from megallama.data.sources import ReadStats, add_input_arguments, documents_from_args, output_error
from megallama.errors import DataError


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--output", required=True, metavar="PATH", help="curated .jsonl (or .jsonl.gz), one {\"text\"} per line")
    p.add_argument("--source", choices=SOURCES, default="web", help="which steps apply (default: web)")
    p.add_argument("--near-dup-threshold", type=float, default=0.9,
                   help="drop documents this similar (MinHash Jaccard) to an earlier one; 0 disables (default: 0.9)")
    p.add_argument("--report", metavar="JSON", help="also write the counts as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")


def _open_out(path: Path):
    return gzip.open(path, "wt", encoding="utf-8") if path.name.endswith(".gz") else open(path, "w", encoding="utf-8")


def run(args) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise DataError(f"'{out}' already exists; pass --force to overwrite it or choose another --output")
    report_path = Path(args.report) if args.report else None
    if report_path is not None and report_path.is_file() and not args.force:
        raise DataError(f"'{report_path}' already exists; pass --force to overwrite it or choose another --report")
    if report_path is not None and (report_path.is_dir() or not report_path.parent.is_dir()):
        raise output_error(report_path, "--report", "it is a directory" if report_path.is_dir()
                           else "its directory does not exist")
    curator = Curator(CurateConfig(source=args.source, near_dup_threshold=args.near_dup_threshold))
    stats = ReadStats()
    texts = (d.text for d in documents_from_args(args, stats))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}" + (".gz" if out.name.endswith(".gz") else ""))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = _open_out(tmp)
    except OSError as exc:
        raise output_error(out, "--output", exc) from None
    try:
        with f:
            for text in curator.run(texts):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    report = curator.report
    print(f"curated {args.source} text into {out}" + (f" (skipped {stats.skipped} malformed lines)" if stats.skipped else ""))
    print(report.table())
    if args.report:
        try:
            Path(args.report).write_text(json.dumps(dict(documents_in=report.documents_in,
                                                         documents_out=report.documents_out,
                                                         bytes_in=report.bytes_in, bytes_out=report.bytes_out,
                                                         headers_stripped=report.headers_stripped,
                                                         removed=dict(report.removed)), indent=1) + "\n")
        except OSError as exc:
            raise output_error(args.report, "--report", exc) from None
    return 0
