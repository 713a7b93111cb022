"""`megallama preprocess --shards N`: N independent shards that read back as the one-process dataset.

* a local pool and Ray tasks (a local Ray cluster) both write shards whose documents, in order and
  token for token, are the one-process dataset's;
* the same command again redoes nothing; a shard whose pair is gone (killed) is redone alone;
* bad settings are one line, exit 2, and write nothing.
(The SLURM array script runs in tests/test_slurm.py.)
"""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megallama.data.indexed import open_dataset
from megallama.data.preprocess import preprocess
from megallama.data.tokenizer import train_tokenizer
from tests.launch import ROOT, env

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six .jsonl files of real source files (one empty line of junk-free text per document), a
    tokenizer, and the one-process dataset of all of them."""
    root = tmp_path_factory.mktemp("shards")
    texts = [p.read_text(encoding="utf-8") for p in sorted((STDLIB / "json").glob("*.py"))
             + sorted((STDLIB / "email").glob("*.py"))[:12]]
    tok = train_tokenizer(texts, 600, str(root / "tok"), sample_mb=1.0)
    files = []
    for i in range(6):
        path = root / "raw" / f"part-{i}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i::6]))
        files.append(str(path))
    preprocess(files, str(tok), str(root / "one"))
    return dict(root=root, files=files, tok=str(tok), one=open_dataset(str(root / "one")))


def megallama(*args):
    return subprocess.run([sys.executable, "-m", "megallama", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=240)


def assert_same_dataset(got, want):
    assert (got.num_docs, got.num_tokens) == (want.num_docs, want.num_tokens)
    for i in range(want.num_docs):
        assert np.array_equal(got.document(i), want.document(i)), i


@pytest.mark.timeout(240)
def test_local_shards_are_the_one_process_dataset_and_resume_alone(corpus, tmp_path):
    prefix = tmp_path / "out" / "web"
    args = ["preprocess", "--input", *corpus["files"], "--tokenizer", corpus["tok"], "--output-prefix", prefix,
            "--shards", 3, "--workers", 2]
    r = megallama(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"path: {prefix}-*-of-00003" in r.stdout, r.stdout
    assert_same_dataset(open_dataset(f"{prefix}-*-of-00003"), corpus["one"])
    shards = [Path(f"{prefix}-{i:05d}-of-00003") for i in range(3)]
    stamps = {s: (s.with_suffix(".bin").stat().st_mtime_ns, s.with_suffix(".idx").stat().st_mtime_ns) for s in shards}
    r = megallama(*args)
    assert r.returncode == 0 and "(3 already complete)" in r.stdout, r.stdout + r.stderr[-2000:]
    shards[1].with_suffix(".idx").unlink()  # shard 1 was killed before its .idx committed
    r = megallama(*args)
    assert r.returncode == 0 and "(2 already complete)" in r.stdout, r.stdout + r.stderr[-2000:]
    assert [s for s in shards if (s.with_suffix(".bin").stat().st_mtime_ns,
                                  s.with_suffix(".idx").stat().st_mtime_ns) != stamps[s]] == [shards[1]]
    assert_same_dataset(open_dataset(f"{prefix}-*-of-00003"), corpus["one"])
    # one array task by hand: a complete shard is kept
    r = megallama(*args[:-2], "--shard", 2)
    assert r.returncode == 0 and "already complete, kept" in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_shards_are_the_one_process_dataset(corpus, tmp_path):
    pytest.importorskip("ray")
    prefix = tmp_path / "web"
    r = megallama("preprocess", "--input", *corpus["files"], "--tokenizer", corpus["tok"], "--output-prefix", prefix,
                  "--shards", 2, "--executor", "ray")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_dataset(open_dataset(f"{prefix}-*-of-00002"), corpus["one"])


@pytest.mark.parametrize("extra,message", [
    (["--shards", "7"], "--shards 7 is more than the 6 input file(s)"),
    (["--shards", "0"], "--shards must be >= 1, got 0"),
    (["--shards", "2", "--shard", "2"], "--shard must be in 0..1, got 2"),
    (["--shard", "0"], "--shard and --executor apply to a sharded run; add --shards N"),
    (["--shards", "2", "--shard", "0", "--force"], "--force with --shard would delete"),
], ids=["more-shards-than-files", "zero-shards", "shard-out-of-range", "shard-without-shards", "force-in-a-task"])
def test_bad_sharded_settings_are_one_line(corpus, tmp_path, extra, message):
    prefix = tmp_path / "web"
    r = megallama("preprocess", "--input", *corpus["files"], "--tokenizer", corpus["tok"], "--output-prefix", prefix,
                  *extra)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not list(tmp_path.glob("web-*.idx"))


def test_another_run_on_the_same_prefix_is_refused(corpus, tmp_path):
    prefix = tmp_path / "web"
    base = ["preprocess", "--tokenizer", corpus["tok"], "--output-prefix", prefix, "--shards", 2]
    assert megallama(*base, "--input", *corpus["files"]).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    r = megallama(*base, "--input", *corpus["files"][:4])
    assert r.returncode == 2 and "records another run" in r.stderr and "--force" in r.stderr, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    r = megallama(*base, "--input", *corpus["files"][:4], "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    want = open_dataset(str(tmp_path / "four")) if preprocess(corpus["files"][:4], corpus["tok"],
                                                              str(tmp_path / "four")) else None
    assert_same_dataset(open_dataset(f"{prefix}-*-of-00002"), want)
