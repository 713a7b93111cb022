"""Curation: exact dedup (lines for web, files for code), heuristic filters, MinHash near-dedup, CLI report.

The sharded engine itself (N shards == one process, resuming, SLURM, Ray) is tests/test_data_shards.py."""

import json
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from megallama.data.curate import CurateConfig, MinHashLSH
from megallama.data.steps.code import strip_license_header
from megallama.data.shards import WorkDir, make_plan, merge, run_stages
from megallama.data.steps import StepsConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])
WORDS = re.findall(r"[a-z]{3,9}", (STDLIB / "this.py").read_text().lower() + (STDLIB / "textwrap.py").read_text().lower())


def prose(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(n // 12)]
    return "\n".join(" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3))


def mutate(text: str, fraction: float, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(fraction * len(words))):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


def jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of word k-gram sets: the independent reference for MinHash."""
    def shingles(t):
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def curate(tmp_path, texts, source, near_dup_threshold=0.9, steps=StepsConfig()):
    """Run the curation engine in this process on ``texts`` (one .jsonl input, one shard): (kept, report)."""
    path = tmp_path / f"in-{source}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    plan = make_plan([str(path)], source, 1, (".jsonl",), steps, near_dup_threshold)
    work = WorkDir(tmp_path / f"work-{source}", plan)
    run_stages(work)
    out = tmp_path / f"out-{source}.jsonl"
    report = merge(work, out)
    return [json.loads(line)["text"] for line in out.read_text().splitlines()], report


def test_minhash_estimates_jaccard():
    lsh = MinHashLSH(CurateConfig(num_perm=256, bands=16))
    base = prose(1, 2000)
    for frac in (0.005, 0.05, 0.2):
        other = mutate(base, frac, 2)
        est = (lsh.signature(base) == lsh.signature(other)).mean()
        assert abs(est - jaccard(base, other)) < 0.08, frac


def test_near_duplicates_dropped_by_true_overlap(tmp_path):
    base = prose(3, 3000)
    near, far, unrelated = mutate(base, 0.002, 4), mutate(base, 0.1, 5), prose(6, 3000)
    assert jaccard(base, near) > 0.95 and jaccard(base, far) < 0.7
    kept, report = curate(tmp_path, [base, near, far, unrelated, base], "books")
    assert kept == [base, far, unrelated]
    assert report.removed == {"near duplicates (MinHash)": 1, "exact duplicate documents": 1}


def test_web_line_dedup_and_filters(tmp_path):
    a, b = prose(10), prose(11)
    shared = "Cookie policy: we use cookies to improve your experience on this website today.\n"
    doc1, doc2 = shared + a, shared + b + "\n" + a.splitlines()[0]
    short = "Too short to be a page."
    symbols = " ".join(["#tag"] * 30 + WORDS[:60])
    kept, report = curate(tmp_path, [doc1, doc2, short, symbols], "web", near_dup_threshold=0,
                          steps=StepsConfig(languages=("any",)))  # the Gopher rules alone
    assert kept == [doc1, b + "\n"]  # the shared line and the repeated line removed from the second page
    assert report.removed == {"exact duplicate lines": 2, "filter: too short": 1, "filter: symbol ratio": 1}
    assert (report.documents_in, report.documents_out) == (4, 2)


def test_code_file_dedup_filters_and_boilerplate(tmp_path):
    good = (STDLIB / "textwrap.py").read_text()
    long_line = "x = '" + "a" * 2000 + "'\n"
    minified = "x=1;" * 30 + "\n"
    symbols = ("{}[]();:,.<>!?" * 4 + "\n") * 20
    generated = "# This file is auto-generated. Do not edit.\nx = 1\n"
    licensed = "#!/usr/bin/env python\n# Copyright 2020 Someone\n# Licensed under the MIT License\n\nprint('hi')\n"
    docs = [good, good, long_line, minified, symbols, generated, licensed]
    kept, report = curate(tmp_path, docs, "code", steps=StepsConfig(licenses=("any",)))  # the heuristics alone
    assert kept == [good, "#!/usr/bin/env python\nprint('hi')\n"]
    assert report.removed == {"exact duplicate documents": 1, "filter: max line length": 1, "filter: mean line length": 1,
                              "filter: alphanumeric fraction": 1, "filter: boilerplate (generated)": 1}
    assert [(s["name"], s["in"], s.get("dropped", 0), s.get("changed", 0)) for s in report.steps] == [
        ("licence header stripped (kept)", 7, 0, 1), ("filter: max line length", 7, 1, 0),
        ("filter: mean line length", 6, 1, 0), ("filter: alphanumeric fraction", 5, 1, 0),
        ("filter: boilerplate (generated)", 4, 1, 0)]
    # by default only Apache/BSD/MIT code is kept (the paper): textwrap.py names no such licence
    (tmp_path / "default").mkdir()
    kept, _ = curate(tmp_path / "default", docs, "code")
    assert kept == ["#!/usr/bin/env python\nprint('hi')\n"]
    assert strip_license_header("# just a comment\nx = 1\n") == "# just a comment\nx = 1\n"


def test_cli_report_and_refusals(tmp_path):
    docs = [prose(20, 3000), prose(21, 3000)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + [docs[0], mutate(docs[1], 0.002, 1)]))
    out, rep = tmp_path / "out.jsonl", tmp_path / "rep.json"
    cmd = [sys.executable, "-m", "megallama", "curate", "--input", str(inp), "--output", str(out), "--source", "books",
           "--report", str(rep)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == docs
    report = json.loads(rep.read_text())
    assert report["removed"] == {"exact duplicate documents": 1, "near duplicates (MinHash)": 1}
    assert (report["documents_in"], report["documents_out"]) == (4, 2)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists; pass --force" in again.stderr
    # an existing report is kept too: a new output with the old --report is refused before curating
    out2 = tmp_path / "out2.jsonl"
    before = rep.read_text()
    again = subprocess.run(cmd[:7] + [str(out2)] + cmd[8:], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "rep.json' already exists" in again.stderr
    assert rep.read_text() == before and not out2.exists()
    forced = subprocess.run(cmd[:7] + [str(out2)] + cmd[8:] + ["--force"], capture_output=True, text=True)
    assert forced.returncode == 0 and out2.exists(), forced.stderr
