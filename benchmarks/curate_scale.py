"""Curation at scale: memory per task stays flat when shards grow with the corpus.

    python benchmarks/curate_scale.py [--docs-per-shard 3000] [--shards 1 4] [--workers 2]

A web corpus is built from the Python standard library's sources (documents of 40 lines, every 10th
repeated exactly, every 7th with a near duplicate), as `megallama curate --source web --languages any`
input; a corpus S times larger is S copies of it made distinct (a suffix on every line), so the
duplicate structure per document stays the same.  For a corpus of S x docs-per-shard documents, each stage's tasks run as their own processes,
exactly as the SLURM array runs them (`megallama curate --stage STAGE --shard I --shards S`), so a
task's peak RSS is its own.  Printed per run: documents, wall time of all tasks, MB/s, and the
largest peak RSS of any task of each stage; then the same largest corpus in ONE shard (what a
single-process curate holds), and whether the outputs of every sharding are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _letters(n: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 26)
        out += chr(ord("a") + r)
    return out


def corpus(path: Path, docs: int, base: int, per_file: int = 250) -> int:
    """A directory of ``docs`` documents, ``per_file`` to a .jsonl file (a crawl is many files; a task's
    shard is a run of whole files): copy c of a ``base``-document corpus has a tag (c in letters) appended to each line,
    so every copy has the same duplicate structure and no line or document repeats across copies (a 4x
    corpus is 4 corpora of the 1x corpus's nature).  Returns the input's bytes."""
    lines = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            lines.extend(f.read_text(encoding="utf-8").splitlines())
        except (UnicodeDecodeError, OSError):
            continue
        if len(lines) > base * 40:
            break
    first = []
    for i in range(base):
        text = "\n".join(lines[i * 40:(i + 1) * 40])
        if i % 10 == 9:
            text = first[-5]  # an exact duplicate
        elif i % 7 == 6:
            text = first[-3].replace("self", "this", 1)  # a near duplicate
        first.append(text)
    path.mkdir(parents=True)
    n = 0
    for start in range(0, docs, per_file):
        with open(path / f"part-{start // per_file:05d}.jsonl", "w") as fh:
            for i in range(start, min(docs, start + per_file)):
                copy = i // base
                tag = _letters(copy)  # letters: line dedup's key maps digits to 0, so " 1" and " 2" would collide
                text = first[i % base] if copy == 0 else "\n".join(f"{line} {tag}" for line in first[i % base].split("\n"))
                line = json.dumps({"text": text}) + "\n"
                fh.write(line)
                n += len(line.encode())
    return n


def curate(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "megallama", "curate", *map(str, args)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"curate failed: {r.stderr.strip()[-2000:]}")
    return r


def run(inp: Path, out: Path, shards: int, workers: int) -> dict:
    common = ["--input", inp, "--output", out, "--source", "web", "--languages", "any", "--shards", shards]
    stages = [line.split() for line in curate(*common, "--print-stages").stdout.splitlines()]
    work = Path(f"{out}.work")
    start, peak = time.perf_counter(), {}
    for stage, n in stages:
        if stage == "merge":
            curate(*common, "--stage", "merge", "--shard", 0)
            continue
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda i: curate(*common, "--stage", stage, "--shard", i), range(int(n))))
        rss = [json.loads(p.read_text())["peak_rss_mb"] for p in (work / stage).glob("task-*.done")]
        peak[stage] = max(rss)
    return dict(seconds=time.perf_counter() - start, peak=peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs-per-shard", type=int, default=3000)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--workers", type=int, default=2, help="tasks run at once (default 2)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="curate-scale-"))
    rows, outputs, sizes = [], {}, {}
    biggest = max(args.shards)
    cases = [(s, s) for s in args.shards] + ([(biggest, 1)] if biggest > 1 else [])
    for corpus_shards, shards in cases:
        docs = corpus_shards * args.docs_per_shard
        inp = tmp / f"web-{docs}"
        if not inp.exists():
            sizes[docs] = corpus(inp, docs, args.docs_per_shard)
        out = tmp / f"out-{docs}-{shards}.jsonl"
        r = run(inp, out, shards, args.workers)
        mb = sizes[docs] / 1e6
        rows.append((docs, shards, r, mb))
        outputs.setdefault(docs, set()).add(out.read_bytes())
    stages = list(rows[0][2]["peak"])
    print(f"{'docs':>7}{'shards':>7}{'input MB':>9}{'wall s':>8}{'MB/s':>7}  peak RSS per task (MB): "
          + " ".join(f"{s:>8}" for s in stages))
    for docs, shards, r, mb in rows:
        print(f"{docs:>7}{shards:>7}{mb:>9.1f}{r['seconds']:>8.1f}{mb / r['seconds']:>7.2f}  "
              + " " * 24 + " ".join(f"{r['peak'].get(s, 0):>8.1f}" for s in stages))
    same = all(len(v) == 1 for v in outputs.values())
    print(f"outputs identical for every sharding of the same corpus: {same}")


if __name__ == "__main__":
    main()
