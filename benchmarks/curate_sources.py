"""Curation throughput per source, 1 vs 2 workers, and C4's rules beside datatrove's.

    python benchmarks/curate_sources.py [--copies 6] [--workers 1 2] [--sources web c4 ...]

Inputs are built from English text every Python installation has (``pydoc_data.topics``: the
language reference, and the standard library's module docstrings), shaped as each source ships
(pages as JSONL, wikitext with links/templates/refs/tables, LaTeX papers with macros and a
bibliography, StackExchange-style questions with HTML answers, long books, a directory of source
files), ``--copies`` times with a suffix per copy so nothing is a duplicate across copies.  For
each source, `megallama curate` runs in one process, then as 2 shards on 2 workers; printed: MB/s
and docs/s (input over wall time), the documents kept, the peak RSS of the whole command (GNU
time), and whether both outputs are identical.

Then (`pip install -e .[bench]`: datatrove, with the orjson and spacy its reader and C4 filter need)
the C4 pages go through datatrove's ``C4QualityFilter`` (its C4 rules, citations kept,
paragraph splitting as ours) on the same 1 and 2 workers: its throughput and the agreement of the
kept documents (the same text out) with ``--source c4``.  Language id is off in both
(``--languages any``: datatrove's needs a model download).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def prose() -> list[str]:
    """English documents: the language reference's topics and the stdlib modules' docstrings."""
    import pydoc_data.topics as topics

    docs = [t for t in topics.topics.values() if len(t.split()) > 80]
    for f in sorted(STDLIB.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc.split()) > 80:
            docs.append(doc)
    return docs


def write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path.stat().st_size


def build(root: Path, copies: int) -> dict[str, tuple[Path, int, int]]:
    """{source: (input directory, bytes, documents)}."""
    docs, out = prose(), {}

    def copy(text: str, c: int) -> str:
        return text if c == 0 else "\n".join(f"{line} (copy {c})" if line.strip() else line for line in text.split("\n"))

    def pages(c):
        return [copy(d, c) for d in docs]

    def wikitext(d: str) -> str:
        words = d.split(" ")
        linked = " ".join(f"[[{w}|{w}]]" if i % 12 == 5 and w.isalpha() else w for i, w in enumerate(words))
        return ("{{Infobox topic|name=x}}\n" + linked + "<ref>{{cite web|url=http://x}}</ref>\n<!-- note -->\n"
                "{| class=\"wikitable\"\n|-\n| a || b\n|}\n[[Category:Python]]")

    def latex(d: str, i: int) -> str:
        return ("\\documentclass{article}\n\\newcommand{\\py}{Python}\n\\begin{document}\n\\title{T%d}\\maketitle\n"
                "\\section{Introduction}\n%s\n%% a comment\nWe use \\py{} here.\n\\section{More}\n%s\n"
                "\\begin{thebibliography}{9}\\bibitem{a} A. B.\\end{thebibliography}\n\\end{document}\n"
                % (i, d.replace("%", "\\%"), d[: len(d) // 2].replace("%", "\\%")))

    for source in ("web", "c4", "books", "wiki", "qa", "arxiv", "code"):
        d = root / source
        size = n = 0
        for c in range(copies):
            texts = pages(c)
            if source in ("web", "c4"):
                size += write_jsonl(d / f"part-{c:03d}.jsonl", ({"text": t} for t in texts))
                n += len(texts)
            elif source == "books":
                books = ["\n\n".join(texts[i:i + 20]) for i in range(0, len(texts), 20)]
                size += write_jsonl(d / f"part-{c:03d}.jsonl", ({"text": t} for t in books))
                n += len(books)
            elif source == "wiki":
                size += write_jsonl(d / f"part-{c:03d}.jsonl", ({"text": wikitext(t), "title": f"T{c}-{i}"}
                                                               for i, t in enumerate(texts)))
                n += len(texts)
            elif source == "qa":
                records = [{"title": t.split("\n")[0][:80], "question": f"<p>{t[:300]}</p>",
                            "answers": [{"score": k, "text": f"<p>{p}</p><pre><code>x = {k}</code></pre>"}
                                        for k, p in enumerate(t[300:].split("\n\n")[:4])]} for t in texts]
                size += write_jsonl(d / f"part-{c:03d}.jsonl", records)
                n += len(records)
            elif source == "arxiv":
                for i, t in enumerate(texts):
                    p = d / f"c{c:03d}" / f"paper-{i:04d}.tex"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_text(latex(t, i))
                    size += p.stat().st_size
                n += len(texts)
            else:  # code: a directory of repositories (each a unit), the stdlib's packages
                for pkg in ("json", "email", "http", "xml", "urllib", "logging", "importlib", "concurrent"):
                    repo = d / f"c{c:03d}-{pkg}"
                    for f in sorted((STDLIB / pkg).rglob("*.py")):
                        target = repo / f.relative_to(STDLIB / pkg)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_text(copy(f.read_text(encoding="utf-8"), c))
                        size += target.stat().st_size
                        n += 1
        out[source] = (d, size, n)
    return out


def curate(inp: Path, out: Path, source: str, workers: int) -> dict:
    extra = ["--languages", "any"] if source in ("web", "c4") else []
    extra += ["--licenses", "any"] if source == "code" else []
    if source == "arxiv":
        extra += ["--suffix", ".tex"]
    if source in ("wiki", "arxiv", "qa"):
        extra += ["--on-error", "skip"]  # a malformed document (the grammar's "]]" in wikitext) is counted, not fatal
    if source == "code":
        inputs = sorted(str(p) for p in inp.iterdir())
    else:
        inputs = [str(inp)]
    shards = ["--shards", str(workers), "--workers", str(workers)] if workers > 1 else []
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "megallama", "curate", "--input", *inputs,
           "--output", str(out), "--source", source, "--report", f"{out}.report.json", *extra, *shards]
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"curate --source {source} failed: {r.stderr[-2000:]}")
    kept = sum(1 for _ in open(out))
    return dict(seconds=seconds, kept=kept, rss_mb=int(r.stderr.strip().splitlines()[-1]) / 1024)


def datatrove_c4(inp: Path, out: Path, workers: int) -> dict:
    code = f"""
import sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import C4QualityFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
ex = LocalPipelineExecutor([JsonlReader({str(inp)!r}, doc_progress=False),
                            C4QualityFilter(remove_citations=False, split_paragraph=True),
                            JsonlWriter({str(out)!r}, compression=None)],
                           tasks={workers}, workers={workers}, logging_dir={str(out) + '.logs'!r},
                           start_method="fork")
ex.run()
"""
    start = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"datatrove failed: {r.stderr[-2000:]}")
    texts = [json.loads(line)["text"] for f in sorted(out.glob("*.jsonl")) for line in open(f)]
    return dict(seconds=seconds, texts=texts, rss_mb=int(r.stderr.strip().splitlines()[-1]) / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sources", nargs="+", default=["web", "c4", "code", "wiki", "books", "arxiv", "qa"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="curate-sources-"))
    inputs = build(tmp / "in", args.copies)
    print(f"{'source':<7}{'MB':>7}{'docs':>7}  " + "  ".join(f"{'W=' + str(w) + ' MB/s':>10}{'docs/s':>8}{'kept':>6}"
                                                              f"{'RSS MB':>8}" for w in args.workers) + "  same")
    for source in args.sources:
        inp, size, n = inputs[source]
        runs, outs = [], []
        for w in args.workers:
            out = tmp / f"{source}-w{w}.jsonl"
            runs.append(curate(inp, out, source, w))
            outs.append(out.read_bytes())
        print(f"{source:<7}{size / 1e6:>7.1f}{n:>7}  " + "  ".join(
            f"{size / 1e6 / r['seconds']:>10.2f}{n / r['seconds']:>8.0f}{r['kept']:>6}{r['rss_mb']:>8.0f}" for r in runs)
            + f"  {len(set(outs)) == 1}")
    # datatrove has no dedup: compare on the first copy alone (distinct pages), ours with --near-dup-threshold 0
    one = tmp / "c4-first-copy"
    one.mkdir()
    (one / "part-000.jsonl").write_bytes((inputs["c4"][0] / "part-000.jsonl").read_bytes())
    size, n = (one / "part-000.jsonl").stat().st_size, sum(1 for _ in open(one / "part-000.jsonl"))
    mine = curate(one, tmp / "c4-first.jsonl", "c4", 1)
    ours = {json.loads(line)["text"] for line in open(tmp / "c4-first.jsonl")}
    print(f"megallama --source c4 on the first copy ({n} pages, {size / 1e6:.1f} MB): {size / 1e6 / mine['seconds']:.2f} "
          f"MB/s, kept {len(ours)}")
    for w in args.workers:
        got = datatrove_c4(one, tmp / f"datatrove-c4-w{w}", w)
        theirs = set(got["texts"])
        both = len(ours & theirs)
        print(f"datatrove C4QualityFilter W={w}: {size / 1e6 / got['seconds']:.2f} MB/s, {n / got['seconds']:.0f} docs/s, "
              f"kept {len(theirs)} (megallama --source c4: {len(ours)}), identical kept texts {both} "
              f"(Jaccard {both / max(1, len(ours | theirs)):.3f}), peak RSS {got['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
