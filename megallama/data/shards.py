"""Sharded, resumable curation: document steps, exact and near dedup as independent tasks.

A run is a chain of *stages*; each stage is a set of independent *tasks* that
read the previous stages' files and write their own, so any executor can run
them: one process, a local pool (``--workers``), SLURM array jobs (one per
stage, ``slurm/curate_array.sbatch``) or Ray tasks (``--executor ray``).
Deduplication is global, as at scale, by hash partitioning:

=========  =====  ============================================================
stage      tasks  what one task does
=========  =====  ============================================================
lines      N      web: hash every line of its shard's documents; write the
                  (hash, doc, line) records into P partition files by hash
linedup    P      web: the first occurrence (lowest doc, line) of each line
                  hash is kept; the other occurrences are sent to their shard
docs       N      read its shard again, drop the duplicate lines (web), run the
                  source's document steps; write the survivors, and (not web)
                  their text hashes into partition files
exact      P      not web: of identical documents the first is kept
minhash    N      MinHash signatures of the survivors; one record per LSH band
                  (band, key, doc) into partition files by band key
buckets    P      the documents sharing a band key are compared by signature:
                  an edge joins two whose estimated Jaccard similarity reaches
                  the threshold
clusters   1      union-find over the edges: every connected cluster keeps its
                  first document
filter     N      its shard's survivors minus the duplicates, as final text
merge      1      the shards' outputs concatenated in input order, the report
=========  =====  ============================================================

Documents are numbered by position (input unit << 32 | ordinal in the unit), and
every decision depends only on those numbers, never on which task saw what: the
kept documents, their text and order are the same for any number of shards,
workers or executor.  The input units (files; a ``code`` directory is one
repository) are split into N contiguous shards balanced by bytes; P = N.

A task's files are written under temporary names and renamed when complete,
then its marker ``<stage>/task-IIIII.done`` (JSON: counts, seconds, peak RSS)
is committed by an atomic rename: a killed task leaves no marker and is simply
run again, a task with a marker is never redone, and a stage whose inputs lack
a marker refuses to start.  Memory per task is its shard's (or partition's)
working set: a shard's line/document hashes, one partition of records, its
drop lists; the clusters task holds only the near-duplicate edges.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import resource
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megallama.atomic import committing, write_text
from megallama.data.curate import CurateConfig, MinHashLSH, hash64, normalize_line
from megallama.data.sources import READ_ERRORS, contiguous_shards, expand_inputs, unicode_problem
from megallama.data.steps import StepError, StepsConfig, read_documents, source_steps
from megallama.errors import DataError, UserError
from megallama.process import pid_alive

PLAN_VERSION = 1
STAGES = ("lines", "linedup", "docs", "exact", "minhash", "buckets", "clusters", "filter", "merge")
PARTITION_STAGES = ("linedup", "exact", "buckets")  # task i reads partition i of every shard; the others: shard i
UNIT_BITS = 32  # doc id = unit << 32 | ordinal

LINE = np.dtype([("h", "<u8"), ("doc", "<u8"), ("line", "<u4")])
DOCLINE = np.dtype([("doc", "<u8"), ("line", "<u4")])
HASH = np.dtype([("h", "<u8"), ("doc", "<u8")])
BAND = np.dtype([("band", "<u2"), ("key", "<u8"), ("doc", "<u8"), ("pos", "<u4")])
EDGE = np.dtype([("a", "<u8"), ("b", "<u8")])
IDS = np.dtype("<u8")

FLUSH_RECORDS = 1 << 16  # records buffered per task before they are appended to the partition files


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads hashes before they pick a partition."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


# ----------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Everything a task needs; written once to ``<work>/plan.json``, every task checks it agrees."""

    source: str
    units: List[str]  # input paths, in order: one read_documents() call each
    sizes: List[int]
    shards: int
    near_dup_threshold: float = 0.9
    num_perm: int = 128
    bands: int = 16
    shingle_words: int = 5
    seed: int = 1
    on_error: str = "fail"
    steps: dict = field(default_factory=dict)  # StepsConfig fields
    version: int = PLAN_VERSION

    @property
    def partitions(self) -> int:
        return self.shards

    @functools.cached_property
    def _unit_shards(self) -> np.ndarray:
        return np.asarray(contiguous_shards(self.sizes, self.shards), np.int64)

    def unit_shards(self) -> np.ndarray:
        """Shard of each unit: contiguous runs balanced by bytes (:func:`contiguous_shards`)."""
        return self._unit_shards

    def shard_units(self, shard: int) -> List[int]:
        return [u for u, s in enumerate(self.unit_shards()) if s == shard]

    def shard_of(self, docs: np.ndarray) -> np.ndarray:
        return self.unit_shards()[(np.asarray(docs, np.uint64) >> np.uint64(UNIT_BITS)).astype(np.int64)]

    def curate_config(self) -> CurateConfig:
        return CurateConfig(source=self.source, near_dup_threshold=self.near_dup_threshold, num_perm=self.num_perm, bands=self.bands,
                            shingle_words=self.shingle_words, seed=self.seed)

    def steps_config(self) -> StepsConfig:
        return StepsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.steps.items()})

    def stages(self) -> List[Tuple[str, int]]:
        """The stages that apply to this run, with their number of tasks."""
        web = self.source == "web"
        near = self.near_dup_threshold > 0
        use = {"lines": web, "linedup": web, "docs": True, "exact": not web, "minhash": near, "buckets": near,
               "clusters": near, "filter": True, "merge": True}
        count = {"lines": self.shards, "linedup": self.partitions, "docs": self.shards, "exact": self.partitions,
                 "minhash": self.shards, "buckets": self.partitions, "clusters": 1, "filter": self.shards, "merge": 1}
        return [(s, count[s]) for s in STAGES if use[s]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"


def make_plan(inputs: Sequence[str], source: str, shards: int, suffixes: Sequence[str], steps: StepsConfig,
              near_dup_threshold: float = 0.9, on_error: str = "fail") -> Plan:
    """The input units (files; for ``code`` an input directory is one unit) and the run's settings."""
    if shards < 1:
        raise DataError(f"--shards must be >= 1, got {shards}")
    units: List[Path] = []
    for raw in inputs:
        if source == "code" and Path(raw).is_dir():
            units.append(Path(raw))
        else:
            units.extend(expand_inputs([raw], suffixes))
    sizes = [_unit_bytes(u) for u in units]
    plan = Plan(source=source, units=[str(u) for u in units], sizes=sizes, shards=shards,
                near_dup_threshold=near_dup_threshold, on_error=on_error,
                steps={k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(steps).items()})
    plan.curate_config().check()
    if len(units) >= 1 << UNIT_BITS:
        raise DataError(f"{len(units):,} input files are more than {1 << UNIT_BITS:,}; concatenate some into .jsonl")
    return plan


def _unit_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


class WorkDir:
    """``<work>/plan.json`` and one folder per stage holding the tasks' files and markers."""

    def __init__(self, root: Path, plan: Plan):
        self.root, self.plan = Path(root), plan
        self.attach()

    def attach(self) -> None:
        """Write plan.json (atomically) or check that the one there describes this run."""
        path = self.root / "plan.json"
        text = self.plan.to_json()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                if path.read_text() != text:
                    raise DataError(f"work directory '{self.root}' belongs to another run (other inputs, shards or "
                                    "settings in its plan.json); give the same arguments to resume it, or another "
                                    "--work-dir (or remove it) to start over")
                return
            write_text(path, text)
        except OSError as exc:
            raise DataError(f"cannot use work directory '{self.root}' ({exc.strerror or exc}); "
                            "choose a writable --work-dir") from None

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def marker(self, stage: str, index: int) -> Path:
        return self.stage_dir(stage) / f"task-{index:05d}.done"

    def done(self, stage: str, index: int) -> bool:
        return self.marker(stage, index).is_file()

    def result(self, stage: str, index: int) -> dict:
        return json.loads(self.marker(stage, index).read_text())

    def missing(self, stage: str) -> List[int]:
        n = dict(self.plan.stages())[stage]
        return [i for i in range(n) if not self.done(stage, i)]

    def require(self, stage: str) -> None:
        """Refuse to start ``stage`` unless every task of every earlier stage has committed its marker."""
        for prev, n in self.plan.stages():
            if prev == stage:
                return
            missing = self.missing(prev)
            if missing:
                shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
                raise DataError(f"stage '{prev}' is incomplete in '{self.root}': task(s) {shown} of {n} have no "
                                f"marker; run them first (`megallama curate ... --stage {prev} --shard I`, or the "
                                "whole run again: finished tasks are skipped)")

    def path(self, stage: str, name: str) -> Path:
        return self.stage_dir(stage) / name


# ----------------------------------------------------------------------------- task outputs

class Outputs:
    """The files of one task, written under temporary names; :meth:`commit` renames them, then the marker."""

    def __init__(self, work: WorkDir, stage: str, index: int):
        self.work, self.stage, self.index = work, stage, index
        self.tag = f".tmp-{os.getpid()}"
        self.files: Dict[Path, object] = {}
        work.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Temporary files a killed run of this task left (their process is gone): never committed, removed."""
        own = "" if self.stage == "clusters" else ("p" if self.stage in PARTITION_STAGES else "s") + f"{self.index:05d}"
        for pattern in (f"{own}*.tmp-*", f"task-{self.index:05d}.done.tmp-*"):
            for tmp in self.work.stage_dir(self.stage).glob(pattern):
                pid = tmp.name.rsplit(".tmp-", 1)[1].split(".")[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    tmp.unlink(missing_ok=True)

    def open(self, name: str, mode: str = "wb"):
        final = self.work.path(self.stage, name)
        f = open(final.with_name(final.name + self.tag), mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        self.files[final] = f
        return f

    def commit(self, result: dict) -> None:
        for f in self.files.values():
            f.close()
        for final in self.files:
            os.replace(final.with_name(final.name + self.tag), final)
        marker = self.work.marker(self.stage, self.index)
        tmp = marker.with_name(marker.name + self.tag)
        tmp.write_text(json.dumps(result, sort_keys=True) + "\n")
        os.replace(tmp, marker)

    def abort(self) -> None:
        for final, f in self.files.items():
            f.close()
            tmp = final.with_name(final.name + self.tag)
            if tmp.exists():
                tmp.unlink()


class PartitionWriter:
    """Records of one dtype, buffered, appended to P partition files by ``part`` (an array of partition ids)."""

    def __init__(self, out: Outputs, pattern: str, dtype: np.dtype, partitions: int):
        self.dtype, self.P = dtype, partitions
        self.files = [out.open(pattern.format(p=p)) for p in range(partitions)]
        self.buffer: List[tuple] = []
        self.parts: List[int] = []

    def add(self, record: tuple, part: int) -> None:
        self.buffer.append(record)
        self.parts.append(part)
        if len(self.buffer) >= FLUSH_RECORDS:
            self.flush()

    def add_array(self, records: np.ndarray, parts: np.ndarray) -> None:
        for p in np.unique(parts):
            self.files[int(p)].write(records[parts == p].tobytes())

    def flush(self) -> None:
        if self.buffer:
            self.add_array(np.array(self.buffer, self.dtype), np.asarray(self.parts, np.int64))
            self.buffer, self.parts = [], []


def _read_records(paths: Sequence[Path], dtype) -> np.ndarray:
    arrays = [np.fromfile(p, dtype) for p in paths if p.stat().st_size]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


def _ids(work: WorkDir, stage: str, pattern: str, count: int) -> set:
    """The union of the doc-id files ``pattern`` (formatted with p) of a stage, as a set."""
    if stage not in dict(work.plan.stages()):
        return set()
    return set(_read_records([work.path(stage, pattern.format(p=p)) for p in range(count)], IDS).tolist())


def _peak_rss_mb() -> float:
    """This process's own peak RSS: /proc's VmHWM (ru_maxrss carries the high-water mark of the
    process that forked it, e.g. a launcher that built the corpus)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- reading a shard

def _documents(plan: Plan, shard: int, counts: Counter) -> Iterator[Tuple[int, str]]:
    """(doc id, text) of the shard's units, in order; a unit that cannot be read is a one-line DataError."""
    for u in plan.shard_units(shard):
        path = plan.units[u]
        ordinal = 0
        try:
            for doc in read_documents(plan.source, Path(path)):
                text = doc.get("text") if isinstance(doc, dict) else None
                if not isinstance(text, str) or unicode_problem(text):
                    raise DataError(f"'{path}' document {ordinal + 1} has no valid string 'text'; fix the input")
                counts["documents in"] += 1
                counts["bytes in"] += len(text.encode("utf-8"))
                yield (u << UNIT_BITS) | ordinal, doc
                ordinal += 1
        except UserError:
            raise
        except (StepError, UnicodeError, ValueError, *READ_ERRORS) as exc:
            raise DataError(f"cannot read '{path}' ({' '.join(str(exc).split()) or type(exc).__name__}); "
                            "check the file (a truncated .gz?) or drop it from --input") from None


# ----------------------------------------------------------------------------- the stages

def _stage_lines(work: WorkDir, shard: int, out: Outputs) -> dict:
    plan, counts = work.plan, Counter()
    writer = PartitionWriter(out, f"s{shard:05d}-p{{p:05d}}.bin", LINE, plan.partitions)
    P = np.uint64(plan.partitions)
    for doc, d in _documents(plan, shard, counts):
        for i, line in enumerate(d["text"].splitlines(keepends=True)):
            key = normalize_line(line)
            if key:
                h = hash64(key)
                writer.add((h, doc, i), int(_mix(np.uint64(h)) % P))
    writer.flush()
    return dict(counts={}, documents=counts["documents in"])  # the docs stage counts what it reads


def _stage_linedup(work: WorkDir, part: int, out: Outputs) -> dict:
    plan = work.plan
    rec = _read_records([work.path("lines", f"s{s:05d}-p{part:05d}.bin") for s in range(plan.shards)], LINE)
    order = np.lexsort((rec["line"], rec["doc"], rec["h"]))
    rec = rec[order]
    later = np.zeros(len(rec), bool)
    later[1:] = rec["h"][1:] == rec["h"][:-1]  # not the first (doc, line) of its hash: a repeated line
    drop = rec[later]
    shard_of = plan.shard_of(drop["doc"])
    for s in range(plan.shards):
        mine = drop[shard_of == s]
        records = np.empty(len(mine), DOCLINE)
        records["doc"], records["line"] = mine["doc"], mine["line"]
        out.open(f"p{part:05d}-s{s:05d}.bin").write(records.tobytes())
    return dict(counts={"exact duplicate lines": int(later.sum())})


class _StepRunner:
    """The source's document steps with their counts (in, dropped, changed)."""

    def __init__(self, plan: Plan):
        self.steps = source_steps(plan.source, plan.steps_config())
        self.on_error = plan.on_error
        self.stats = {s.name: Counter() for s in self.steps}

    def __call__(self, doc: dict, where: str) -> Optional[dict]:
        for step in self.steps:
            st = self.stats[step.name]
            st["in"] += 1
            text = doc["text"]
            try:
                doc = step(doc)
            except StepError as exc:
                if self.on_error == "fail":
                    raise DataError(f"{where}: step '{step.name}' failed ({' '.join(str(exc).split())}); fix the "
                                    "document or pass --on-error skip to skip and count it") from None
                st["malformed (skipped)"] += 1
                return None
            if doc is None:
                st["dropped"] += 1
                return None
            st["changed"] += doc["text"] != text
        return doc


def _stage_docs(work: WorkDir, shard: int, out: Outputs) -> dict:
    plan, counts = work.plan, Counter()
    web = plan.source == "web"
    dropped_lines: Dict[int, set] = {}
    if web:
        recs = _read_records([work.path("linedup", f"p{p:05d}-s{shard:05d}.bin") for p in range(plan.partitions)],
                             DOCLINE)
        for doc, line in zip(recs["doc"].tolist(), recs["line"].tolist()):
            dropped_lines.setdefault(doc, set()).add(line)
        del recs
    steps = _StepRunner(plan)
    docs = out.open(f"s{shard:05d}.jsonl", "w")
    hashes = None if web else PartitionWriter(out, f"s{shard:05d}-p{{p:05d}}.bin", HASH, plan.partitions)
    P = np.uint64(plan.partitions)
    for doc_id, doc in _documents(plan, shard, counts):
        if web:
            drop = dropped_lines.pop(doc_id, None)
            if drop:
                text = "".join(line for i, line in enumerate(doc["text"].splitlines(keepends=True)) if i not in drop)
                doc = dict(doc, text=text)
            if not doc["text"].strip():
                counts["empty after line dedup"] += 1
                continue
        unit, ordinal = doc_id >> UNIT_BITS, doc_id & ((1 << UNIT_BITS) - 1)
        doc = steps(doc, f"'{plan.units[unit]}' document {ordinal + 1}")
        if doc is None:
            continue
        text = doc["text"]
        docs.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        if hashes is not None:
            h = hash64(text)
            hashes.add((h, doc_id), int(_mix(np.uint64(h)) % P))
    if hashes is not None:
        hashes.flush()
    return dict(counts=dict(counts), steps={k: dict(v) for k, v in steps.stats.items()},
                order=[s.name for s in steps.steps])


def _stage_exact(work: WorkDir, part: int, out: Outputs) -> dict:
    plan = work.plan
    rec = _read_records([work.path("docs", f"s{s:05d}-p{part:05d}.bin") for s in range(plan.shards)], HASH)
    rec = rec[np.lexsort((rec["doc"], rec["h"]))]
    later = np.zeros(len(rec), bool)
    later[1:] = rec["h"][1:] == rec["h"][:-1]
    drop = rec["doc"][later]
    shard_of = plan.shard_of(drop)
    for s in range(plan.shards):
        out.open(f"p{part:05d}-s{s:05d}.bin").write(np.sort(drop[shard_of == s]).astype(IDS).tobytes())
    return dict(counts={"exact duplicate documents": int(later.sum())})


def _surviving(work: WorkDir, shard: int, drop: set) -> Iterator[Tuple[int, str]]:
    with open(work.path("docs", f"s{shard:05d}.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["id"] not in drop:
                yield rec["id"], rec["text"]


def _band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    rows = sig.reshape(bands, -1).astype(np.uint64)
    key = np.zeros(bands, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows.shape[1]):
            key = key * np.uint64(0x100000001B3) + rows[:, j]
    return _mix(key)


def _stage_minhash(work: WorkDir, shard: int, out: Outputs) -> dict:
    plan = work.plan
    lsh = MinHashLSH(plan.curate_config())
    exact = _ids(work, "exact", f"p{{p:05d}}-s{shard:05d}.bin", plan.partitions)
    sigs = out.open(f"s{shard:05d}.sig")
    writer = PartitionWriter(out, f"s{shard:05d}-p{{p:05d}}.bin", BAND, plan.partitions)
    bands = np.arange(plan.bands, dtype=np.uint16)
    pos = 0
    for doc_id, text in _surviving(work, shard, exact):
        sig = lsh.signature(text)
        if sig is None:  # no words: never a near duplicate
            continue
        sigs.write(sig.astype("<u4").tobytes())
        keys = _band_keys(sig, plan.bands)
        records = np.empty(plan.bands, BAND)
        records["band"], records["key"], records["doc"], records["pos"] = bands, keys, doc_id, pos
        writer.add_array(records, (keys % np.uint64(plan.partitions)).astype(np.int64))
        pos += 1
    return dict(counts={}, signatures=pos)


def _stage_buckets(work: WorkDir, part: int, out: Outputs) -> dict:
    plan = work.plan
    thr = plan.near_dup_threshold
    rec = _read_records([work.path("minhash", f"s{s:05d}-p{part:05d}.bin") for s in range(plan.shards)], BAND)
    rec = rec[np.lexsort((rec["doc"], rec["key"], rec["band"]))]
    sig_files = {}

    def signatures(docs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        rows = []
        for doc, p in zip(plan.shard_of(docs).tolist(), positions.tolist()):
            if doc not in sig_files:
                path = work.path("minhash", f"s{doc:05d}.sig")
                sig_files[doc] = np.memmap(path, "<u4", "r").reshape(-1, plan.num_perm)
            rows.append(sig_files[doc][p])
        return np.stack(rows)

    edges = []
    if len(rec):
        new = np.ones(len(rec), bool)
        new[1:] = (rec["band"][1:] != rec["band"][:-1]) | (rec["key"][1:] != rec["key"][:-1])
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], len(rec))
        for s, e in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
            group = rec[s:e]
            sig = signatures(group["doc"], group["pos"])
            for j in range(1, len(group)):
                close = np.flatnonzero((sig[:j] == sig[j]).mean(axis=1) >= thr)
                edges.extend((int(group["doc"][i]), int(group["doc"][j])) for i in close)
    arr = np.unique(np.array(edges, EDGE)) if edges else np.zeros(0, EDGE)
    out.open(f"p{part:05d}.bin").write(arr.tobytes())
    return dict(counts={}, edges=len(arr))


def _stage_clusters(work: WorkDir, index: int, out: Outputs) -> dict:
    plan = work.plan
    edges = _read_records([work.path("buckets", f"p{p:05d}.bin") for p in range(plan.partitions)], EDGE)
    parent: Dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in zip(edges["a"].tolist(), edges["b"].tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:  # the root of a cluster is its lowest document: the one kept
            parent[max(ra, rb)] = min(ra, rb)
    drop = np.array(sorted(x for x in parent if find(x) != x), IDS)
    shard_of = plan.shard_of(drop)
    for s in range(plan.shards):
        out.open(f"s{s:05d}.bin").write(drop[shard_of == s].tobytes())
    return dict(counts={"near duplicates (MinHash)": len(drop)}, edges=len(edges))


def _stage_filter(work: WorkDir, shard: int, out: Outputs) -> dict:
    plan = work.plan
    drop = _ids(work, "exact", f"p{{p:05d}}-s{shard:05d}.bin", plan.partitions)
    drop |= _ids(work, "clusters", f"s{shard:05d}.bin", 1)
    f = out.open(f"s{shard:05d}.jsonl", "w")
    counts = Counter()
    for _, text in _surviving(work, shard, drop):
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        counts["documents out"] += 1
        counts["bytes out"] += len(text.encode("utf-8"))
    return dict(counts=dict(counts))


STAGE_FUNCTIONS: Dict[str, Callable[[WorkDir, int, Outputs], dict]] = {
    "lines": _stage_lines, "linedup": _stage_linedup, "docs": _stage_docs, "exact": _stage_exact,
    "minhash": _stage_minhash, "buckets": _stage_buckets, "clusters": _stage_clusters, "filter": _stage_filter,
}


def run_task(work_root: str, stage: str, index: int) -> dict:
    """Run task ``index`` of ``stage`` unless its marker exists; the marker's contents."""
    work = load_work(work_root)
    n = dict(work.plan.stages()).get(stage)
    if n is None or stage == "merge":
        raise DataError(f"stage '{stage}' is not a task stage of this run (its stages: "
                        f"{', '.join(s for s, _ in work.plan.stages())})")
    if not 0 <= index < n:
        raise DataError(f"--shard {index} is outside stage '{stage}''s tasks 0..{n - 1}")
    if work.done(stage, index):
        return dict(work.result(stage, index), skipped=True)
    work.require(stage)
    out = Outputs(work, stage, index)
    start = time.perf_counter()
    try:
        result = STAGE_FUNCTIONS[stage](work, index, out)
        result.update(seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(), pid=os.getpid())
        out.commit(result)
    except BaseException:
        out.abort()
        raise
    return result


def load_work(root: str) -> WorkDir:
    path = Path(root) / "plan.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"no readable plan in '{path}' ({exc}); start the run with `megallama curate` "
                        "(or one task of it) so that it writes one") from None
    return WorkDir(Path(root), Plan(**d))


# ----------------------------------------------------------------------------- merge and report

@dataclass
class Report:
    documents_in: int = 0
    documents_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    removed: Dict[str, int] = field(default_factory=dict)
    steps: List[dict] = field(default_factory=list)  # per document step, in order: name, in, dropped, changed

    def table(self) -> str:
        rows = [f"{'documents in':<40}{self.documents_in:>12,}"]
        for s in self.steps:
            rows.append(f"  step {s['name']:<33}{s.get('in', 0):>12,} in {-s.get('dropped', 0):>10,}"
                        + (f"  (changed {s['changed']:,})" if s.get("changed") else "")
                        + (f"  (malformed, skipped {s['malformed (skipped)']:,})" if s.get("malformed (skipped)") else ""))
        rows += [f"  {name:<38}{-n:>12,}" for name, n in sorted(self.removed.items())]
        rows += [f"{'documents out':<40}{self.documents_out:>12,}",
                 f"{'bytes in -> out':<40}{self.bytes_in:>12,} -> {self.bytes_out:,}"]
        return "\n".join(rows)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"


def gather_report(work: WorkDir) -> Report:
    """Sum the markers' counts (every task must be done)."""
    rep, counts = Report(), Counter()
    step_stats: Dict[str, Counter] = {}
    order: List[str] = []
    for stage, n in work.plan.stages():
        if stage == "merge":
            continue
        for i in range(n):
            r = work.result(stage, i)
            counts.update(r.get("counts", {}))
            for name, st in r.get("steps", {}).items():
                step_stats.setdefault(name, Counter()).update(st)
            order = r.get("order", order) or order
    rep.documents_in, rep.bytes_in = counts.pop("documents in", 0), counts.pop("bytes in", 0)
    rep.documents_out, rep.bytes_out = counts.pop("documents out", 0), counts.pop("bytes out", 0)
    rep.removed = {k: v for k, v in counts.items() if v}
    for name in order:
        rep.removed.update({name: step_stats[name]["dropped"]} if step_stats[name]["dropped"] else {})
        rep.steps.append(dict(name=name, **step_stats[name]))
    return rep


def merge(work: WorkDir, output: Path) -> Report:
    """Concatenate the filter outputs in shard order into ``output`` (written to a temporary name, then renamed)."""
    work.require("merge")
    report = gather_report(work)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with committing(output) as tmp:
            with (gzip.open(tmp, "wb") if output.name.endswith(".gz") else open(tmp, "wb")) as dst:
                for s in range(work.plan.shards):
                    with open(work.path("filter", f"s{s:05d}.jsonl"), "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
    except OSError as exc:
        raise DataError(f"cannot write --output '{output}' ({exc.strerror or exc}); "
                        "choose an --output in a writable directory") from None
    return report


# ----------------------------------------------------------------------------- executors

def _task(job: Tuple[str, str, int]) -> dict:
    return run_task(*job)


def run_stages(work: WorkDir, workers: int = 1, executor: str = "local", ray_address: Optional[str] = None,
               log: Callable[[str], None] = lambda s: None) -> None:
    """Run every task stage (not merge) whose tasks lack a marker: in this process, a local pool or Ray."""
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    ray = _ray(ray_address) if executor == "ray" else None
    pool = None
    try:
        for stage, n in work.plan.stages():
            if stage == "merge":
                continue
            todo = work.missing(stage)
            start = time.perf_counter()
            jobs = [(str(work.root), stage, i) for i in todo]
            if ray is not None:
                _ray_run(ray, jobs)
            elif workers == 1 or len(jobs) <= 1:
                for job in jobs:
                    _task(job)
            else:
                if pool is None:
                    import multiprocessing as mp

                    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
                    pool = ctx.Pool(workers, maxtasksperchild=1)  # a fresh process per task: its own peak RSS
                errors, results = [], pool.imap_unordered(_task, jobs)
                while True:  # the other tasks finish (and commit) even when one fails
                    try:
                        next(results)
                    except StopIteration:
                        break
                    except Exception as exc:  # noqa: BLE001 - re-raised below
                        errors.append(exc)
                if errors:
                    raise errors[0]
            log(f"stage {stage:<9} {n} task(s), {len(todo)} run, {n - len(todo)} already done "
                f"({time.perf_counter() - start:.1f}s)")
    finally:
        if pool is not None:
            pool.terminate()
        if ray is not None and ray_address is None:
            ray.shutdown()


def _ray(address: Optional[str]):
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs the 'ray' package; pip install 'megallama[scale]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    return ray


def _ray_run(ray, jobs: List[Tuple[str, str, int]]) -> None:
    remote = ray.remote(num_cpus=1, max_retries=0)(_task)
    try:
        ray.get([remote.remote(job) for job in jobs])
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if hasattr(exc, "cause") else None
        if isinstance(cause, UserError):
            raise cause from None
        raise
