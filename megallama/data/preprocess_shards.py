"""Sharded tokenization: N independent shards, one ``.bin/.idx`` pair each, read back as one dataset.

``megallama preprocess --shards N`` splits the input files into N contiguous runs balanced by bytes
(:func:`megallama.data.sources.contiguous_shards`, the rule curation uses) and tokenizes each run
into ``PREFIX-IIIII-of-NNNNN.bin/.idx``.  A training source names them all with a glob
(``path: PREFIX-*-of-NNNNN``), read in shard order, which is input order: the N shards are the
one-process dataset, document for document and token for token.

Shards are independent tasks, so any executor runs them: this process, a local pool
(``--workers W``: W shards at a time), Ray tasks (``--executor ray``) or a SLURM array
(``slurm/preprocess_array.sbatch``: task I runs ``--shard I``).  ``PREFIX.shards.json`` records the
run (its inputs with their sizes, the tokenizer, the shard count) and is written first; a later
run with other settings is refused unless ``--force``.  A shard's pair appears only when complete
(the ``.idx`` last), so a killed shard leaves nothing a mixture would read; running the same
command again redoes only the shards without their pair.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from megallama.atomic import write_text
from megallama.data.sources import TEXT_SUFFIXES, contiguous_shards, expand_inputs
from megallama.errors import DataError, UserError

EXECUTORS = ("local", "ray")


def shard_prefix(prefix: str, index: int, shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{shards:05d}"


def shard_glob(prefix: str, shards: int) -> str:
    """The data-source path that reads every shard, in order."""
    return f"{prefix}-*-of-{shards:05d}"


@dataclass
class ShardedRun:
    prefix: str
    shards: int
    files: List[List[str]]  # per shard, its input files in order
    tokenizer: str
    text_key: str
    on_error: str
    suffixes: Sequence[str]

    def done(self, index: int) -> bool:
        base = shard_prefix(self.prefix, index, self.shards)
        return Path(base + ".idx").is_file() and Path(base + ".bin").is_file()

    def missing(self) -> List[int]:
        return [i for i in range(self.shards) if not self.done(i)]


def plan(inputs: Sequence[str], tokenizer: str, prefix: str, shards: int, text_key: str = "text",
         on_error: str = "fail", suffixes: Sequence[str] = TEXT_SUFFIXES, force: bool = False) -> ShardedRun:
    """Split the inputs into shards and record the run in ``PREFIX.shards.json`` (checked against an
    existing record: the same command resumes, another is refused unless ``force``)."""
    from megallama.data.tokenizer import Tokenizer

    if shards < 1:
        raise DataError(f"--shards must be >= 1, got {shards}")
    files = expand_inputs(inputs, suffixes)
    if shards > len(files):
        raise DataError(f"--shards {shards} is more than the {len(files)} input file(s); a shard is a run of whole "
                        "files: give fewer --shards or split the input into more files")
    sizes = [f.stat().st_size for f in files]
    of = contiguous_shards(sizes, shards)
    groups: List[List[str]] = [[] for _ in range(shards)]
    for f, s in zip(files, of):
        groups[s].append(str(f))
    empty = [i for i, g in enumerate(groups) if not g]
    if empty:
        raise DataError(f"shard {empty[0]} of {shards} gets no input file (the files are too uneven in size); give "
                        "fewer --shards or split the largest inputs")
    tok = Tokenizer(tokenizer)
    record = {"format": "megallama-preprocess-shards", "shards": shards, "tokenizer_fingerprint": tok.fingerprint,
              "text_key": text_key, "inputs": [[str(f), s] for f, s in zip(files, sizes)]}
    manifest = Path(prefix + ".shards.json")
    text = json.dumps(record, indent=1) + "\n"
    if manifest.is_file() and not force:
        if manifest.read_text() != text:
            raise DataError(f"'{manifest}' records another run (other inputs, sizes, tokenizer or --shards); run the "
                            "same command to resume it, or pass --force to start over")
    else:
        if not force:
            existing = [p for i in range(shards) for p in (Path(shard_prefix(prefix, i, shards) + ".idx"),)
                        if p.exists()]
            if existing:
                raise DataError(f"'{existing[0]}' already exists; pass --force to overwrite it or choose another "
                                "--output-prefix")
        try:
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            if force:
                for i in range(shards):
                    for suffix in (".idx", ".bin"):
                        Path(shard_prefix(prefix, i, shards) + suffix).unlink(missing_ok=True)
            write_text(manifest, text)
        except OSError as exc:
            raise DataError(f"cannot write '{manifest}' ({exc.strerror or exc}); choose a writable "
                            "--output-prefix") from None
    return ShardedRun(prefix, shards, groups, tokenizer, text_key, on_error, tuple(suffixes))


def run_shard(run: ShardedRun, index: int) -> Optional[dict]:
    """Tokenize shard ``index`` (single-threaded) unless its pair exists; its report, or None if done."""
    from megallama.data.preprocess import preprocess
    from megallama.data.shards import _peak_rss_mb

    if not 0 <= index < run.shards:
        raise DataError(f"--shard must be in 0..{run.shards - 1}, got {index}")
    if run.done(index):
        return None
    report = preprocess(run.files[index], run.tokenizer, shard_prefix(run.prefix, index, run.shards), workers=1,
                        text_key=run.text_key, on_error=run.on_error, force=True, suffixes=run.suffixes)
    return dict(shard=index, documents=report.documents, tokens=report.tokens, text_bytes=report.text_bytes,
                skipped=report.skipped, seconds=report.seconds, peak_rss_mb=_peak_rss_mb())


def _task(args) -> Optional[dict]:
    run, index = args
    return run_shard(run, index)


def run_all(run: ShardedRun, workers: int = 1, executor: str = "local", ray_address: Optional[str] = None) -> list:
    """Every shard without its pair: in this process, a pool of ``workers`` processes, or Ray tasks.
    The other shards finish (and commit) when one fails; the first failure is then raised."""
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if executor not in EXECUTORS:
        raise DataError(f"--executor must be one of {', '.join(EXECUTORS)}, got '{executor}'")
    jobs = [(run, i) for i in run.missing()]
    if executor == "ray":
        from megallama.data.shards import _ray

        ray = _ray(ray_address)
        try:
            remote = ray.remote(num_cpus=1, max_retries=0)(_task)
            try:
                return [r for r in ray.get([remote.remote(job) for job in jobs]) if r]
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, UserError):
                    raise cause from None
                raise
        finally:
            if ray_address is None:
                ray.shutdown()
    if workers == 1 or len(jobs) <= 1:
        return [r for r in map(_task, jobs) if r]
    import multiprocessing as mp

    pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers, maxtasksperchild=1)
    errors, reports = [], []
    try:
        results = pool.imap_unordered(_task, jobs)
        while True:
            try:
                got = next(results)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                continue
            if got:
                reports.append(got)
    finally:
        pool.terminate()
    if errors:
        raise errors[0]
    return sorted(reports, key=lambda r: r["shard"])
