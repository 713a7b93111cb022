"""Preprocessing, indexed datasets, samples, blending, micro-batches and build_datasets."""

import gzip
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megallama.config import load_config
from megallama.data.gpt_dataset import BlendedDataset, GPTDataset
from megallama.data.indexed import HEADER, IndexedDataset
from megallama.data.pipeline import build_datasets, micro_batches, validation_note
from megallama.data.preprocess import preprocess
from megallama.data.tokenizer import Tokenizer, train_tokenizer
from megallama.errors import ConfigError, DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = sorted(STDLIB.glob("[c-p]*.py"))[:60]


def megallama(*args):
    return subprocess.run([sys.executable, "-m", "megallama", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer, a .jsonl corpus of real source files (one gzipped), and its preprocessed dataset."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [p.read_text(encoding="utf-8") for p in FILES]
    tok_path = train_tokenizer(texts, 600, str(root / "tok"), sample_mb=1.0)
    half = len(texts) // 2
    with open(root / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:half])
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[half:])
    prefix = root / "ds"
    preprocess([str(root / "a.jsonl"), str(root / "b.jsonl.gz")], str(tok_path), str(prefix))
    return dict(root=root, texts=texts, tok=str(tok_path), prefix=str(prefix))


def test_preprocess_round_trip_and_header(corpus):
    tok, ds = Tokenizer(corpus["tok"]), IndexedDataset(corpus["prefix"])
    assert (ds.num_docs, ds.vocab_size, ds.fingerprint, ds.dtype) == (len(corpus["texts"]), 600, tok.fingerprint, np.uint16)
    for i, text in enumerate(corpus["texts"]):
        doc = ds.document(i)
        assert doc[-1] == tok.eos_id and tok.decode(doc[:-1]) == text
    assert ds.num_tokens == sum(len(tok.encode(t)) + 1 for t in corpus["texts"])


def test_multi_worker_output_is_identical(corpus, tmp_path):
    inputs = [corpus["root"] / "a.jsonl", corpus["root"] / "b.jsonl.gz"]
    r = megallama("preprocess", "--input", *inputs, "--tokenizer", corpus["tok"], "--output-prefix", tmp_path / "w2",
                  "--workers", "2")
    assert r.returncode == 0, r.stderr
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w2{ext}").read_bytes() == Path(corpus["prefix"] + ext).read_bytes()


def test_malformed_lines_skip_or_fail(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n{"body": "x"}\n{"text": "also fine"}\n')
    out = tmp_path / "out"
    r = megallama("preprocess", "--input", bad, "--tokenizer", corpus["tok"], "--output-prefix", out)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"megallama preprocess: error: {bad}:2: not valid JSON; "
                                             "fix that line or pass --on-error skip to skip and count it"]
    assert not list(tmp_path.glob("out*"))  # nothing that looks complete, no temporaries
    report = preprocess([str(bad)], corpus["tok"], str(out), on_error="skip")
    assert (report.documents, report.skipped) == (2, 2)


def test_interrupted_run_leaves_nothing(corpus, tmp_path):
    truncated = tmp_path / "t.jsonl.gz"
    data = gzip.compress((corpus["root"] / "a.jsonl").read_bytes())
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read"):
        preprocess([str(truncated)], corpus["tok"], str(tmp_path / "out"), workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl.gz"]


def _mixture_cfg(tmp_path, prefix):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(f"data:\n  sources:\n    - {{name: s, path: {prefix}, weight: 1.0}}\n")
    return cfg


@pytest.mark.parametrize("damage, message", [
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-8]), "is truncated or corrupt"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:20]), "is truncated"),
    (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), "is truncated or corrupt"),
    (lambda idx, bin_: idx.write_bytes(b"X" + idx.read_bytes()[1:]), "bad magic"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:HEADER.size + 8] + b"\xff" * 8
                                       + idx.read_bytes()[HEADER.size + 16:]), "corrupt document offsets"),
    (lambda idx, bin_: bin_.unlink(), "not found"),
])
def test_damaged_datasets_are_refused_with_exit_2(corpus, tmp_path, damage, message):
    prefix = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        (tmp_path / f"copy{ext}").write_bytes(Path(corpus["prefix"] + ext).read_bytes())
    damage(tmp_path / "copy.idx", tmp_path / "copy.bin")
    with pytest.raises(DataError, match=message):
        IndexedDataset(str(prefix))
    r = megallama("mixture", "--config", _mixture_cfg(tmp_path, prefix), "--tokens", 1000)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
    assert "megallama preprocess" in r.stderr  # names the fix


def _reference_samples(ds: GPTDataset) -> np.ndarray:
    """Independent reference: concatenate documents in doc_idx order, cut every seq_len tokens."""
    stream = np.concatenate([np.asarray(ds.indexed.document(int(d)), np.int64) for d in ds.doc_idx])
    s = ds.seq_len
    return np.stack([stream[j * s: j * s + s + 1] for j in range(ds.num_samples)])


def test_samples_match_reference_over_several_epochs(corpus, tmp_path):
    ixd = IndexedDataset(corpus["prefix"])
    ids = np.arange(0, ixd.num_docs, 2)
    n = 3 * int(ixd.lengths[ids].sum()) // 64  # ~3 epochs
    ds = GPTDataset(ixd, ids, 64, n, seed=(5,), cache_dir=tmp_path)
    assert ds.epochs > 2.9 and sorted(ds.shuffle.tolist()) == list(range(n))
    per_epoch = len(ids)
    for e in range(int(np.ceil(ds.epochs))):  # each epoch is a permutation of the split's documents
        assert sorted(ds.doc_idx[e * per_epoch:(e + 1) * per_epoch].tolist()) == ids.tolist()
    ref = _reference_samples(ds)
    got = np.stack([ds[i] for i in range(n)])
    assert got.dtype == np.int64 and np.array_equal(got, ref[ds.shuffle])
    cached = GPTDataset(ixd, ids, 64, n, seed=(5,), cache_dir=tmp_path)  # reloaded from the memory-mapped cache
    assert isinstance(cached.shuffle, np.memmap) and np.array_equal(cached[7], ds[7])
    assert not np.array_equal(GPTDataset(ixd, ids, 64, n, seed=(6,)).shuffle, ds.shuffle)


def test_detokenized_samples_reproduce_source_text(corpus):
    tok, ixd = Tokenizer(corpus["tok"]), IndexedDataset(corpus["prefix"])
    ds = GPTDataset(ixd, np.arange(ixd.num_docs), 256, 50, seed=(1,))
    source = "\0".join(corpus["texts"])
    for i in range(50):
        ids = ds[i].tolist()
        pieces, cur = [], []
        for t in ids:
            if t == tok.eos_id:
                pieces.append(cur)
                cur = []
            else:
                cur.append(t)
        pieces.append(cur)
        inner = pieces[1:-1] if len(pieces) > 2 else []
        for p in inner:  # whole documents inside a sample decode to a whole source text
            assert tok.decode(p) in corpus["texts"]
        # fragments at the edges decode to a piece of source (bytes of split characters aside)
        assert tok.decode(pieces[0][2:-2]) in source


def test_blend_follows_weights_in_every_window():
    weights = [67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0]

    class Tagged:  # dataset d returns (d, its own sample index)
        def __init__(self, d):
            self.d = d

        def __getitem__(self, k):
            return (self.d, k)

    n = 200_000
    blend = BlendedDataset([Tagged(d) for d in range(len(weights))], weights, n, period=1 << 14)
    got = [blend[i] for i in range(n)]
    ds = np.array([d for d, _ in got])
    w = np.array(weights) / sum(weights)
    for window in (64, 2048):  # any window: within 2 samples of its exact share (two prefixes, each within 1)
        counts = np.stack([np.bincount(ds[s:s + window], minlength=len(w)) for s in range(0, n - window + 1, window)])
        assert np.all(np.abs(counts - w * window) <= 2.5), window
    # the whole run: the pattern's rounding to 1/period adds at most one sample per period
    assert np.all(np.abs(np.bincount(ds, minlength=len(w)) - w * n) <= n / (1 << 14) + 2)
    need = BlendedDataset.samples_needed(weights, n, period=1 << 14)
    for d in range(len(weights)):  # each dataset's samples are used once each, in order
        assert [k for dd, k in got if dd == d] == list(range(need[d]))


@pytest.mark.parametrize("seed", range(4))
def test_blend_prefix_bound_and_smallest_share(seed):
    """Every prefix of one period is within 0.5 + D*w_d/2 samples of source d's share (the bound
    docs/data.md states; Table 1's weights reach 1.64), and a share below half of 1/period is
    never sampled while one above it is."""
    from megallama.data.gpt_dataset import blend_pattern

    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(int(rng.integers(2, 9)), 0.5))
    ds, _ = blend_pattern(w, 4096)
    counts = np.cumsum(np.eye(len(w))[ds], axis=0)
    dev = np.abs(counts - np.arange(1, len(ds) + 1)[:, None] * w).max(axis=0)
    assert np.all(dev <= 0.5 + len(w) * w / 2 + 1e-9), (w, dev)
    table1 = np.array([67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0]) / 100
    ds1, _ = blend_pattern(table1)
    dev1 = np.abs(np.cumsum(np.eye(7)[ds1], axis=0) - np.arange(1, len(ds1) + 1)[:, None] * table1).max()
    assert 1.5 < dev1 < 1.7  # "at most 1.64 samples" in docs/data.md
    period = 1 << 12
    for share, slots in ((0.4 / period, 0), (0.6 / period, 1)):
        ds2, _ = blend_pattern([1 - share, share], period)
        assert int((ds2 == 1).sum()) == slots, share


class Recording:
    """A dataset whose samples are their own index; records which indices were read."""

    def __init__(self, n, seq=4):
        self.n, self.seq, self.read = n, seq, set()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.add(i)
        return np.full(self.seq + 1, i, np.int64)


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_micro_batches_contract_resume_and_ranks():
    G, mbs, dp = 12, 2, 3
    single = Recording(50)
    whole = _take(micro_batches(single, 0, G, mbs, 0, 1), 5 * G // mbs)
    flat = np.concatenate([b[:, 0].numpy() for b in whole])
    assert flat.tolist() == [i % 50 for i in range(5 * G)]  # global batch k = samples [kG, (k+1)G), wrapped
    for step in range(5):  # resuming at any step yields the identical next samples
        resumed = _take(micro_batches(Recording(50), step * G, G, mbs, 0, 1), G // mbs)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, whole[step * G // mbs:(step + 1) * G // mbs]))
    per_rank = []
    for r in range(dp):
        ds = Recording(50)
        batches = _take(micro_batches(ds, G, G, mbs, r, dp), G // (mbs * dp))  # one global batch from step 1
        assert ds.read == set(range(G + r * G // dp, G + (r + 1) * G // dp))  # touches only its own samples
        per_rank.extend(batches)
    assert np.array_equal(np.concatenate([b.numpy() for b in per_rank]), np.concatenate([b.numpy() for b in whole[6:12]]))
    with pytest.raises(Exception, match="not a multiple"):
        next(micro_batches(single, 5, G, mbs, 0, 1))


def _cfg(tmp_path, *overrides, preset="tiny"):
    return load_config(preset=preset, overrides=[f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def test_build_datasets_from_sources(corpus, tmp_path):
    src = [f"data.sources=[{{path: {corpus['prefix']}, weight: 3, name: a}}, {{path: {corpus['prefix']}, weight: 1}}]",
           f"data.tokenizer={corpus['tok']}", "data.valid_fraction=0.1", "model.vocab_size=640"]
    cfg = _cfg(tmp_path, *src)
    b = build_datasets(cfg)
    t = cfg.train
    assert len(b.train) == t.total_steps() * t.global_batch_size and len(b.valid) == t.eval_iters * t.global_batch_size
    assert b.train[3].shape == (t.seq_len + 1,) and b.train[3].dtype == np.int64
    assert [p.name for p in b.plan] == ["a", "ds"] and [p.weight for p in b.plan] == [0.75, 0.25]
    again = build_datasets(cfg)
    assert all(np.array_equal(b.train[i], again.train[i]) for i in range(len(b.train)))
    G, mbs = t.global_batch_size, t.micro_batch_size
    run = _take(micro_batches(b.train, 0, G, mbs, 0, 1), 4 * G // mbs)
    resumed = _take(micro_batches(again.train, 2 * G, G, mbs, 0, 1), 2 * G // mbs)  # a fresh process resuming
    assert all(np.array_equal(x, y) for x, y in zip(resumed, run[2 * G // mbs:]))
    train_docs = set(b.train.datasets[0].doc_idx.tolist())
    valid_docs = set(b.valid.datasets[0].doc_idx.tolist())
    assert train_docs.isdisjoint(valid_docs) and len(valid_docs) == 6


def test_evaluation_rereading_its_split_is_noted(corpus, tmp_path):
    src = [f"data.sources=[{{path: {corpus['prefix']}, weight: 1}}]", f"data.tokenizer={corpus['tok']}",
           "data.valid_fraction=0.1", "model.vocab_size=640"]
    cfg = _cfg(tmp_path, *src, "train.eval_iters=1")
    t = cfg.train
    tokens = build_datasets(cfg).valid.tokens_per_epoch  # the split's tokens
    assert t.global_batch_size * t.seq_len < tokens and validation_note(build_datasets(cfg), cfg) is None
    iters = tokens // (t.global_batch_size * t.seq_len) + 2  # more samples than the split holds
    cfg = _cfg(tmp_path, *src, f"train.eval_iters={iters}")
    note = validation_note(build_datasets(cfg), cfg)
    n = iters * t.global_batch_size
    assert f"{(n * t.seq_len + 1) / tokens:.1f} times over" in note and f"= {n:,} samples" in note
    assert "lower train.eval_iters or raise data.valid_fraction" in note


def test_build_datasets_errors(corpus, tmp_path):
    other = train_tokenizer(corpus["texts"][:20], 600, str(tmp_path / "other"), sample_mb=0.2)
    src = f"data.sources=[{{path: {corpus['prefix']}}}]"
    with pytest.raises(DataError, match="made with another tokenizer"):
        build_datasets(_cfg(tmp_path, src, f"data.tokenizer={other}", "model.vocab_size=600"))
    with pytest.raises(ConfigError, match=r"model.vocab_size \(512\) is smaller"):
        build_datasets(_cfg(tmp_path, src, f"data.tokenizer={corpus['tok']}"))
    with pytest.raises(DataError, match="fewer than train.seq_len"):
        build_datasets(_cfg(tmp_path, src, f"data.tokenizer={corpus['tok']}", "model.vocab_size=600",
                            "train.seq_len=10000000", "model.max_seq_len=10000000"))
    with pytest.raises(ConfigError, match="data.tokenizer is empty"):
        build_datasets(_cfg(tmp_path, src))
    with pytest.raises(ConfigError, match="data.sources is empty"):
        build_datasets(_cfg(tmp_path, f"data.tokenizer={corpus['tok']}"))
    for name in ("tokenizer_sample_mb", "default_corpus_mb"):  # the default corpus's sizes, not the vocabulary
        with pytest.raises(ConfigError, match=rf"data.{name} must be a positive number"):
            build_datasets(_cfg(tmp_path, f"data.{name}=0"))


@pytest.mark.slow
def test_default_corpus_built_once_under_concurrency(tmp_path):
    code = ("import sys; from megallama.config import load_config; from megallama.data.pipeline import build_datasets;"
            f"b = build_datasets(load_config(preset='tiny', overrides=['data.cache_dir={tmp_path}']));"
            "print(b.tokenizer.fingerprint, b.train[5].sum(), b.tokenizer_path)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o for o, _ in outs}) == 1  # same tokenizer, same samples
    assert sum("building the default corpus" in e for _, e in outs) == 1  # one builder, the others reused it
    entries = list((tmp_path / "default-corpus").iterdir())
    assert [e.name for e in entries if not e.name.startswith(".")] and not [e for e in entries if ".tmp-" in e.name]
    tok = Tokenizer(outs[0][0].split()[2])
    files = (Path(outs[0][0].split()[2]).parent / "files.txt").read_text().split()
    text = Path(files[0]).read_text(encoding="utf-8")
    assert tok.vocab_size == 512 and tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jsonl", "input '{p}' does not exist; pass existing files or directories to --input"),
    (lambda d: (d / "empty.jsonl").write_text("\n") and d / "empty.jsonl",
     "the inputs {p} hold no documents; pass non-empty files (and the right --text-key for .jsonl)"),
    (lambda d: (d / "empty.txt").write_text("") or d / "empty.txt",
     "the inputs {p} hold no documents; pass non-empty files (and the right --text-key for .jsonl)"),
    (lambda d: (d / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n') and d / "blank.jsonl",
     "the inputs {p} hold no documents; pass non-empty files (and the right --text-key for .jsonl)"),
])
def test_missing_or_empty_inputs_exit_2(corpus, tmp_path, make, message):
    p = make(tmp_path)
    r = megallama("preprocess", "--input", p, "--tokenizer", corpus["tok"], "--output-prefix", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr == f"megallama preprocess: error: {message.format(p=p)}\n"
    assert not list(tmp_path.glob("o*"))


def test_parallel_tokenization_reads_ahead_only_a_bounded_window():
    import multiprocessing

    from megallama.data.preprocess import _bounded_imap

    consumed = []

    def items():
        for i in range(1000):
            consumed.append(i)
            yield -i

    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = _bounded_imap(pool, abs, items(), window=3)
        assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
        assert len(consumed) <= 8  # not the whole input (Pool.imap would drain it)
        assert list(results) == list(range(5, 1000))


@pytest.mark.parametrize("command, option", [
    ("tokenizer", "--output"), ("curate", "--output"), ("preprocess", "--output-prefix"),
    ("preprocess-instruct", "--output-prefix"), ("curate", "--report")])
def test_output_under_a_file_is_a_one_line_error(corpus, tmp_path, capsys, command, option):
    from megallama.cli import main

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": corpus["texts"][0], "prompt": "p", "response": "r"}) + "\n")
    args = {"tokenizer": ["--vocab-size", "400"], "curate": ["--source", "books"],
            "preprocess": ["--tokenizer", corpus["tok"]],
            "preprocess-instruct": ["--tokenizer", corpus["tok"], "--seq-len", "4096"]}[command]
    outputs = {o: str(tmp_path / "out" / "o") for o in ("--output", "--output-prefix")}
    outputs = {o: v for o, v in outputs.items() if o in ("--output" if command in ("tokenizer", "curate")
                                                          else "--output-prefix",)}
    outputs[option] = str(blocker / "o")
    argv = [command, "--input", str(src), *args, *[x for kv in outputs.items() for x in kv]]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"megallama {command}: error: cannot write {option} "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.jsonl"]


def test_empty_documents_are_left_out_and_counted(corpus, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", corpus["texts"][0], "", "x"]))
    report = preprocess([str(src)], corpus["tok"], str(tmp_path / "o"))
    ds, tok = IndexedDataset(str(tmp_path / "o")), Tokenizer(corpus["tok"])
    assert (report.documents, report.empty, ds.num_docs) == (2, 2, 2) and "left out 2 empty documents" in report.line()
    assert tok.decode(ds.document(0)[:-1]) == corpus["texts"][0] and ds.lengths.min() > 1


@pytest.mark.parametrize("instruction", [False, True])
@pytest.mark.parametrize("weight", ["0", "-1", ".inf", ".nan"])
def test_non_positive_or_infinite_weight_is_refused(corpus, tmp_path, weight, instruction):
    cfg = _cfg(tmp_path, f"data.sources=[{{path: {corpus['prefix']}, weight: {weight}}}, {{path: {corpus['prefix']}}}]",
               f"data.tokenizer={corpus['tok']}", "model.vocab_size=640", f"data.instruction={str(instruction).lower()}")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight must be positive"):
        build_datasets(cfg)


@pytest.mark.parametrize("command", ["preprocess", "curate", "tokenizer"])
def test_lone_surrogate_escape_is_a_malformed_line(corpus, tmp_path, capsys, command):
    from megallama.cli import main

    bad = tmp_path / "bad.jsonl"  # valid JSON, but "\ud800" is half an emoji: no UTF-8, no tokenizer takes it
    bad.write_text('{"text": "fine \\ud83e\\udd99"}\n{"text": "cut \\ud800 off"}\n')
    out = {"preprocess": ["--tokenizer", corpus["tok"], "--output-prefix"], "curate": ["--source", "books", "--output"],
           "tokenizer": ["--vocab-size", "300", "--output"]}[command] + [str(tmp_path / "out")]
    capsys.readouterr()
    assert main([command, "--input", str(bad), *out]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"megallama {command}: error: {bad}:2: field 'text' holds a lone surrogate \\ud800 at character 4, "
        "not valid Unicode; fix that line or pass --on-error skip to skip and count it"]
    # no output; curate keeps its work directory, so a rerun after the fix resumes the tasks already done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"] + (["out.work"] if command == "curate" else [])
    if command == "preprocess":
        report = preprocess([str(bad)], corpus["tok"], str(tmp_path / "out"), on_error="skip")
        assert (report.documents, report.skipped) == (1, 1)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
@pytest.mark.parametrize("command", ["preprocess", "preprocess-instruct"])
def test_damaged_gzip_input_is_a_one_line_error(corpus, tmp_path, capsys, damage, command):
    from megallama.cli import main

    rows = "".join(json.dumps({"text": f"row {i} " * 40, "prompt": "p", "response": "r"}) + "\n" for i in range(500))
    blob = bytearray(gzip.compress(rows.encode()))
    if damage == "truncated":
        blob = blob[:len(blob) // 2]
    else:
        blob[12:30] = bytes(range(200, 218))  # the first deflate block header: zlib.error
    src = tmp_path / "d.jsonl.gz"
    src.write_bytes(bytes(blob))
    extra = ["--seq-len", "512"] if command == "preprocess-instruct" else []
    capsys.readouterr()
    status = main([command, "--input", str(src), "--tokenizer", corpus["tok"], "--output-prefix",
                   str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(f"megallama {command}: error: cannot read '{src}'"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl.gz"]


def test_a_source_of_shards_reads_as_the_one_process_dataset(corpus, tmp_path):
    """A source's path may be a glob or a list of PREFIXes (the shards of a sharded preprocess): read in
    order as one dataset, its samples are the samples of the same documents preprocessed as one."""
    root = corpus["root"]
    for i, name in enumerate(("a.jsonl", "b.jsonl.gz")):
        preprocess([str(root / name)], corpus["tok"], str(tmp_path / f"web-{i:05d}-of-00002"))
    common = [f"data.tokenizer={corpus['tok']}", "data.valid_fraction=0.1", "model.vocab_size=640"]
    one = build_datasets(_cfg(tmp_path / "one", f"data.sources=[{{path: {corpus['prefix']}}}]", *common))
    shards = [str(tmp_path / f"web-{i:05d}-of-00002") for i in range(2)]
    for path in (str(tmp_path / "web-*-of-00002"), "[" + ", ".join(shards) + "]"):
        got = build_datasets(_cfg(tmp_path / "sharded", f"data.sources=[{{path: {path}, name: web}}]", *common))
        assert len(got.train) == len(one.train) and len(got.valid) == len(one.valid)
        assert all(np.array_equal(got.train[i], one.train[i]) for i in range(len(one.train)))
        assert all(np.array_equal(got.valid[i], one.valid[i]) for i in range(len(one.valid)))
    with pytest.raises(DataError, match="matches no PREFIX.idx files"):
        build_datasets(_cfg(tmp_path / "none", f"data.sources=[{{path: {tmp_path / 'nope-*'}}}]", *common))
