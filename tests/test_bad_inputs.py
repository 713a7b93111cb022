"""A catalogue of bad inputs to ``megallama train``: each is answered by ONE line that names the
field or file and the fix, exit status 2, before any process group, directory or file exists.

The catalogue runs in-process through ``megallama.cli.main`` (the function behind
``python -m megallama``) to stay fast; two cases go through a real subprocess, one of them
with a 2-rank launcher, to pin the exit status end to end.
"""

import dataclasses
import subprocess
import sys

import pytest
import torch.distributed as dist

from megallama.cli import main
from megallama.config import TrainConfig
from tests.launch import ROOT, env, megallama


def _tokenizer() -> str:
    from megallama.data.pipeline import default_corpus

    return default_corpus(512)[1]  # the tiny preset's cached default-corpus tokenizer


def _write(path, text):
    path.write_text(text)
    return str(path)


# (id, extra arguments (a callable of tmp_path), expected fragment of the one-line message)
CATALOGUE = [
    ("typo-key", lambda d: ["--set", "train.stpes=5"],
     "unknown config key 'train.stpes' (did you mean 'steps'?)"),
    ("typo-section", lambda d: ["--set", "trian.steps=5"],
     "unknown config key 'trian' (did you mean 'train'?)"),
    ("typo-in-yaml", lambda d: ["--config", _write(d / "c.yaml", "preset: tiny\nmodel:\n  n_layer: 2\n")],
     "unknown config key 'model.n_layer' (did you mean 'n_layers'?)"),
    ("wrong-type-int", lambda d: ["--set", "train.steps=ten"], "train.steps: expected an integer, got 'ten'"),
    ("wrong-type-bool", lambda d: ["--set", "train.tensorboard=maybe"],
     "train.tensorboard: expected true or false, got 'maybe'"),
    ("wrong-type-section", lambda d: ["--set", "optim=3"], "optim: expected a mapping of OptimConfig fields"),
    ("heads-vs-tp", lambda d: ["--set", "parallel.tp=3"],
     "model.n_heads (4) must be divisible by parallel.tp (3); choose tp among its divisors"),
    ("layers-vs-pp", lambda d: ["--set", "parallel.pp=3"],
     "model.n_layers (4) must be divisible by parallel.pp (3)"),
    ("world-vs-layout", lambda d: ["--set", "parallel.dp=4"], "world size 1 != tp*pp*dp = 1*1*4"),
    ("zero3-with-pp", lambda d: ["--set", "parallel.pp=2", "--set", "parallel.zero_stage=3"],
     "parallel.zero_stage=3 is not supported with pipeline parallelism"),
    ("batch-not-divisible", lambda d: ["--set", "train.global_batch_size=9"],
     "train.global_batch_size (9) must be divisible by micro_batch_size*dp = 2*1; adjust the batch sizes"),
    ("seq-too-long", lambda d: ["--set", "train.seq_len=128"],
     "train.seq_len (128) exceeds model.max_seq_len (64)"),
    ("bad-max-bad-steps", lambda d: ["--set", "train.max_bad_steps=0"], "train.max_bad_steps must be >= 1, got 0"),
    ("unknown-preset", lambda d: ["--preset", "tinny"], "unknown preset 'tinny' (did you mean 'tiny'?)"),
    ("missing-config", lambda d: ["--config", str(d / "nope.yaml")], "config file"),
    ("invalid-yaml", lambda d: ["--config", _write(d / "bad.yaml", "model: [1,\n")], "is not valid YAML"),
    ("missing-tokenizer", lambda d: ["--config", _write(d / "t.yaml", f"""preset: tiny
data: {{tokenizer: {d}/missing.model, sources: [{{path: {d}/corpus}}]}}
""")], "missing.model' not found"),
    ("missing-dataset", lambda d: ["--config", _write(d / "s.yaml", f"""preset: tiny
data: {{tokenizer: {_tokenizer()}, sources: [{{path: {d}/nowhere/corpus}}]}}
""")], "nowhere/corpus.idx' not found; build it with `megallama preprocess"),
    ("sources-without-tokenizer", lambda d: ["--config", _write(d / "n.yaml", f"""preset: tiny
data: {{sources: [{{path: {d}/corpus}}]}}
""")], "data.tokenizer is empty but data.sources is set"),
]


@pytest.mark.parametrize("case,extra,message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(case, extra, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--set", f"train.run_dir={run_dir}", *extra(tmp_path)]
    if "--preset" not in args and "--config" not in args:
        args[1:1] = ["--preset", "tiny"]
    capsys.readouterr()  # building the inputs may print (the default corpus on a cold cache); judge only `main`
    status = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("megallama train: error: ") and message in err[0], err[0]
    assert not run_dir.exists() and not dist.is_initialized()


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--set", f"train.run_dir={run_dir}", "--set", "train.steps=1",
            "--set", "train.tensorboard=false"]
    r = subprocess.run(megallama(*base), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    before = sorted(p.name for p in run_dir.rglob("*"))
    status = main(base + ["--set", "model.dim=128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "model.dim" in err[0], err
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_exit_status_2_through_the_real_cli(tmp_path):
    r = subprocess.run(megallama("train", "--preset", "tiny", "--set", "train.stpes=5"), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (
        "megallama train: error: unknown config key 'train.stpes' (did you mean 'steps'?); valid keys here: "
        + ", ".join(f.name for f in dataclasses.fields(TrainConfig))), r.stderr


def test_the_error_line_is_one_write(tmp_path, monkeypatch):
    """The ranks of a job share one stderr pipe; a line written in two pieces (``print`` writes the
    newline apart) can be split by another rank's line, so each error line is a single ``write``."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    status = main(["train", "--preset", "tiny", "--set", f"train.run_dir={tmp_path / 'run'}",
                   "--set", "train.stpes=5"])
    errors = [w for w in writes if "error:" in w]
    assert status == 2 and len(errors) == 1 and errors[0].startswith("megallama train: error: ") \
        and errors[0].endswith("\n") and errors[0].count("\n") == 1, writes


@pytest.mark.slow
def test_bad_layout_under_torchrun_fails_on_every_rank_before_rendezvous(tmp_path):
    from megallama.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megallama", "train", "--preset", "tiny", "--set", f"train.run_dir={tmp_path / 'run'}",
           "--set", "train.global_batch_size=6"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    lines = [x for x in r.stderr.splitlines() if x.startswith("megallama train: error:")]
    assert len(lines) == 2 and all("train.global_batch_size (6) must be divisible by micro_batch_size*dp = 2*2"
                                   in x for x in lines), r.stderr[-2000:]
    assert r.returncode != 0 and not (tmp_path / "run").exists()


def test_resuming_at_another_seq_len_is_refused(tmp_path, capsys):
    """The checkpoint's data position counts samples of its own seq_len: resumed at another one, the
    run silently trained on other (re-read or skipped) data.  Refused, pointing at --init-from."""
    from megallama.checkpoint import MOMENTS, write_run_checkpoint
    from megallama.config import preset_config
    from megallama.model import build_model
    from tests.ckpt_helpers import snapshot

    cfg = preset_config("tiny")  # train.seq_len=32
    weights = build_model(cfg.model, seed=0).state_dict()
    moments = {f"{n}/{k}": w.new_zeros(w.shape) for n, w in weights.items() for k in MOMENTS}
    run_dir = tmp_path / "run"
    ckpt = write_run_checkpoint(run_dir, cfg, weights, moments, step=2, consumed_samples=16)
    before = snapshot(tmp_path)
    status = main(["train", "--preset", "tiny", "--set", f"train.run_dir={run_dir}", "--set", "train.seq_len=16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert f"checkpoint '{ckpt}' was trained with train.seq_len=32 but the config says 16" in err[0], err[0]
    assert "--set train.seq_len=32" in err[0] and f"--init-from {ckpt}" in err[0], err[0]
    assert snapshot(tmp_path) == before and not dist.is_initialized()


def test_bad_fault_spec_is_one_line_exit_2_before_any_process_group(tmp_path, capsys, monkeypatch):
    """MEGALLAMA_FAULT is read before the process group (it crashed rank 0 with a traceback, exit 1)."""
    monkeypatch.setenv("MEGALLAMA_FAULT", "boom@2")
    run_dir = tmp_path / "run"
    status = main(["train", "--preset", "tiny", "--set", f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0] == ("megallama train: error: MEGALLAMA_FAULT: bad item 'boom@2'; "
                      "expected nan|die|hang|diskfull|kill-during-save|latestfull@STEP[:RANK]"), err[0]
    assert not run_dir.exists() and not dist.is_initialized()


def test_a_model_that_cannot_fit_a_rank_is_one_line_before_anything(tmp_path, capsys, monkeypatch):
    """65B on one CPU process: the fp32 masters alone (243 GiB) exceed the host's memory; refused
    before any process group or file, not an allocation failure minutes later."""
    monkeypatch.setattr("megallama.preflight.memory_per_rank", lambda: (64 * 2 ** 30, "this host's available memory"))
    run_dir = tmp_path / "run"
    status = main(["train", "--preset", "llama-65b", "--set", f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "fp32 master weights alone need 243.2 GiB" in err[0] and "is 64.0 GiB" in err[0] and "megallama plan" in err[0], err
    assert not run_dir.exists() and not dist.is_initialized()


@pytest.mark.parametrize("args, message", [
    (["--set", "model.dim=1e9"], "model.dim: expected an integer, got '1e9'"),
    (["--set", "model.dim=1000000000"], "model.dim is 1,000,000,000, above the limit of 65,536; check the value"),
    (["--set", "train.steps=" + "9" * 30], "train.steps: an integer of 30 digits is out of range; use an integer of at most"),
    (["--set", "train.steps=" + "9" * 5000], "--set 'train.steps': the value is a number of 5000 characters, out of range"),
    (["--config", "LIST"], "train: expected a mapping of fields, got [1, 2]; write it as 'train:' followed by indented"),
])
def test_absurd_sizes_and_misshapen_sections_are_one_line_exit_2(tmp_path, capsys, args, message):
    """A typo'd size (it ran into an allocation traceback or never ended), an integer too long for a C
    long (an OverflowError traceback) or Python's int parser (a ValueError traceback), and a section
    written as a list (it silently vanished under --set) are each one line, exit 2, nothing written."""
    run_dir = tmp_path / "run"
    if args[0] == "--config":
        args = ["--config", str(_write(tmp_path / "c.yaml", "train: [1, 2]\n")), "--set", "train.steps=3"]
    else:
        args = ["--preset", "tiny", *args]
    status = main(["train", *args, "--set", f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert message in err[0], err[0]
    assert not run_dir.exists() and not dist.is_initialized()
