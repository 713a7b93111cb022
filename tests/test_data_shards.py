"""Sharded curation (megallama/data/shards.py): N shards keep exactly what one process keeps, tasks resume.

* 1, 2 and 3 shards (in this process, a local pool, task by task through the CLI as a SLURM array
  runs it) give byte-identical outputs and reports, equal to an independent in-test reference of
  the documented semantics (CCNet line dedup, steps, exact dedup, MinHash LSH edges + union-find);
* a task that dies leaves no marker and no file; the rerun runs it alone, finished tasks are kept;
* a merge (or any stage) before its inputs are complete, an unreadable input, a work directory of
  another run: one-line errors, exit status 2, nothing written;
* the same run on the local SLURM (slurm/curate_array.sbatch) and on a local Ray cluster.
"""

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import megallama.data.shards as shards
from megallama.data.curate import CurateConfig, MinHashLSH, normalize_line
from megallama.data.steps import StepsConfig
from megallama.data.steps.web import web_rules
from megallama.data.shards import WorkDir, make_plan, merge, run_stages
from megallama.data.steps import StepsConfig
from tests.test_data_curate import WORDS, mutate, prose

ROOT = Path(__file__).resolve().parent.parent


def corpus(tmp_path: Path, files: int = 5) -> list:
    """Web pages over ``files`` .jsonl inputs: shared boilerplate lines, exact and near duplicates across files."""
    boiler = "Accept all cookies to continue reading this website and its many fine articles today.\n"
    base = [prose(100 + i, 600) for i in range(6)]
    base = [" ".join(b.split("\n")[:8]) + "\n" + " ".join(b.split("\n")[8:]) for b in base]  # two long lines
    pages = []
    for i in range(files * 4):
        k = i % 6
        if i in (8, 13, 18):  # a near duplicate of an earlier page: one word changed in each line
            text = "\n".join(mutate(line, 1 / len(line.split(" ")), i) for line in base[k].split("\n"))
        elif i in (5, 14):
            text = boiler  # emptied by line dedup
        else:
            text = (boiler if i % 2 else "") + (base[k] if i < 6 else prose(i, 300 + 40 * k))
        pages.append(text)
    pages[-1] = pages[1]  # an exact duplicate in the last file
    paths = []
    for f in range(files):
        p = tmp_path / f"crawl-{f}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in pages[f * 4:(f + 1) * 4]))
        paths.append(str(p))
    return paths, pages


def reference(pages: list, source: str, threshold: float = 0.9) -> list:
    """The documented semantics, sequentially, all in memory (independent of the engine)."""
    cfg = CurateConfig(source=source, near_dup_threshold=threshold)
    kept, seen = [], set()
    for text in pages:
        if source == "web":
            out = []
            for line in text.splitlines(keepends=True):
                key = normalize_line(line)
                if key and key in seen:
                    continue
                seen.add(key)
                out.append(line)
            text = "".join(out)
            if not text.strip() or any(rule.fails(text.split(), text) for rule in web_rules(StepsConfig())):
                continue
        elif text in seen:
            continue
        else:
            seen.add(text)
        kept.append(text)
    lsh = MinHashLSH(cfg)
    sigs = [lsh.signature(t) for t in kept]
    parent = list(range(len(kept)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    rows = cfg.num_perm // cfg.bands
    for j in range(len(kept)):
        for i in range(j):
            a, b = sigs[i], sigs[j]
            if a is None or b is None:
                continue
            share_band = any((a[r:r + rows] == b[r:r + rows]).all() for r in range(0, cfg.num_perm, rows))
            if share_band and (a == b).mean() >= threshold:
                ra, rb = find(i), find(j)
                parent[max(ra, rb)] = min(ra, rb)
    return [t for i, t in enumerate(kept) if find(i) == i]


def run(tmp_path: Path, inputs: list, source: str, n: int, workers: int = 1, name: str = ""):
    plan = make_plan(inputs, source, n, (".jsonl",), StepsConfig())
    work = WorkDir(tmp_path / f"work-{name or n}", plan)
    run_stages(work, workers)
    out = tmp_path / f"out-{name or n}.jsonl"
    report = merge(work, out)
    return out.read_bytes(), report


def texts(data: bytes) -> list:
    return [json.loads(line)["text"] for line in data.decode().splitlines()]


@pytest.mark.parametrize("source", ["web", "books"])
def test_one_two_three_shards_keep_the_same_documents(tmp_path, source):
    inputs, pages = corpus(tmp_path)
    results = {n: run(tmp_path, inputs, source, n, workers=min(n, 2)) for n in (1, 2, 3)}
    one, report = results[1]
    assert texts(one) == reference(pages, source)
    for n in (2, 3):
        assert results[n][0] == one, n
        assert results[n][1] == report, n
    removed = report.removed
    assert removed["near duplicates (MinHash)"] >= 2
    if source == "web":
        assert removed["exact duplicate lines"] > 5 and removed["empty after line dedup"] >= 2
    else:
        assert removed["exact duplicate documents"] >= 2
    assert report.documents_in == len(pages) and report.documents_out == len(texts(one))


def _markers(work: Path) -> dict:
    return {str(p.relative_to(work)): p.read_text() for p in sorted(work.glob("*/task-*.done"))}


def test_a_killed_task_reruns_alone_and_finished_tasks_are_kept(tmp_path, monkeypatch):
    inputs, pages = corpus(tmp_path)
    plan = make_plan(inputs, "web", 3, (".jsonl",), StepsConfig())
    work = WorkDir(tmp_path / "work", plan)
    real = shards.STAGE_FUNCTIONS["docs"]

    def dies_in_task_2(w, index, out):
        if index == 2:
            out.open(f"s{index:05d}.jsonl", "w").write("half a shard\n")
            raise KeyboardInterrupt  # killed after writing part of its files
        return real(w, index, out)

    monkeypatch.setitem(shards.STAGE_FUNCTIONS, "docs", dies_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        run_stages(work)
    assert work.missing("docs") == [2]
    assert not list((work.root / "docs").glob("s00002*")) and not list(work.root.rglob("*.tmp-*"))
    with pytest.raises(shards.DataError, match=r"stage 'docs' is incomplete .* task\(s\) 2 of 3 have no marker"):
        shards.run_task(str(work.root), "minhash", 0)
    # a SIGKILLed run leaves its temporary files (no cleanup runs): the rerun removes them
    stale = work.root / "docs" / "s00002.jsonl.tmp-999999"
    stale.write_text("x")
    before = _markers(work.root)
    monkeypatch.setitem(shards.STAGE_FUNCTIONS, "docs", real)
    ran = []
    monkeypatch.setattr(shards, "_task", lambda job: ran.append(job[1:]) or shards.run_task(*job))
    run_stages(work)
    assert [j for j in ran if j[0] in ("lines", "linedup", "docs")] == [("docs", 2)]
    after = _markers(work.root)
    assert all(after[k] == v for k, v in before.items())  # finished tasks untouched
    assert not stale.exists()
    out = tmp_path / "out.jsonl"
    merge(work, out)
    assert texts(out.read_bytes()) == reference(pages, "web")


def cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "megallama", "curate", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_task_mode_cli_matches_one_process_and_merge_refuses_partial_stages(tmp_path):
    inputs, pages = corpus(tmp_path, files=3)
    one, _ = run(tmp_path, inputs, "books", 1)
    out, work = tmp_path / "tasks.jsonl", tmp_path / "tasks.work"
    common = ["--input", *inputs, "--output", out, "--source", "books", "--shards", 2, "--work-dir", work]
    stages = cli(*common, "--print-stages")
    assert stages.returncode == 0, stages.stderr
    chain = [line.split() for line in stages.stdout.splitlines()]
    assert chain == [["docs", "2"], ["exact", "2"], ["minhash", "2"], ["buckets", "2"], ["clusters", "1"],
                     ["filter", "2"], ["merge", "1"]]
    for stage, n in chain[:-2]:
        for i in range(int(n)):
            r = cli(*common, "--stage", stage, "--shard", i)
            assert r.returncode == 0 and "done in" in r.stdout, r.stderr
    r = cli(*common, "--stage", "filter", "--shard", 0)
    assert r.returncode == 0
    again = cli(*common, "--stage", "filter", "--shard", 0)
    assert again.returncode == 0 and "already done" in again.stdout
    refused = cli(*common, "--stage", "merge", "--shard", 0)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "stage 'filter' is incomplete" in refused.stderr and "task(s) 1 of 2" in refused.stderr
    assert not out.exists()
    assert cli(*common, "--stage", "filter", "--shard", 1).returncode == 0
    merged = cli(*common, "--stage", "merge", "--shard", 0, "--report", tmp_path / "rep.json")
    assert merged.returncode == 0, merged.stderr
    assert out.read_bytes() == one and not work.exists()
    assert json.loads((tmp_path / "rep.json").read_text())["documents_in"] == len(pages)


def test_unreadable_shard_and_foreign_work_dir_are_one_line_errors(tmp_path):
    inputs, _ = corpus(tmp_path, files=3)
    bad = tmp_path / "crawl-9.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "fine"}\n' * 50)[:-30])  # truncated
    out = tmp_path / "out.jsonl"
    r = cli("--input", *inputs, bad, "--output", out, "--source", "books", "--workers", 2, "--shards", 2)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot read '{bad}'" in r.stderr
    work = Path(f"{out}.work")
    assert not out.exists() and work.is_dir() and not list(work.rglob("*.tmp-*"))
    assert (work / "docs" / "task-00000.done").exists() and not (work / "docs" / "task-00001.done").exists()
    assert not (work / "docs" / "s00001.jsonl").exists()  # the failed task committed nothing
    other = cli("--input", *inputs, "--output", out, "--source", "books", "--shards", 2)
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "belongs to another run" in other.stderr and not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_executor_keeps_the_same_documents(tmp_path):
    pytest.importorskip("ray")
    inputs, _ = corpus(tmp_path, files=3)
    one, _ = run(tmp_path, inputs, "web", 1)
    out = tmp_path / "ray.jsonl"
    r = cli("--input", *inputs, "--output", out, "--source", "web", "--executor", "ray", "--shards", 3,
            timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == one
