"""Offline checkpoint tools: reshard, Hugging Face export/import, Meta import/export.

Independent references: the source checkpoint's own tensors (round trips must be exact),
transformers' LlamaForCausalLM (logits), the source layout's training losses (resumed
training at another layout), and Meta's concatenation rules written out by hand.
"""

import json
from dataclasses import replace

import pytest
import torch

from megallama.checkpoint import MOMENTS, CheckpointReader, write_run_checkpoint
from megallama.config import load_config, preset_config, validate
from megallama.convert import ours_to_meta
from megallama.model import Transformer, build_model
from tests.ckpt_helpers import megallama, snapshot
from tests.distributed import run_ranks

BASE = ["train.tensorboard=false", "train.precision=fp32", "train.global_batch_size=8", "train.steps=6",
        "train.save_interval=3"]


def _train_case(rank, world, overrides, run_dir):
    from megallama.train import train
    from tests.synthetic import bundle

    cfg = validate(load_config(None, BASE + [f"train.run_dir={run_dir}"] + overrides, preset="tiny"), world)
    return train(cfg, data=bundle(cfg)).losses


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained 1x1 run (synthetic data): its run dir and its 6 losses; step 3 is kept."""
    run_dir = tmp_path_factory.mktemp("src") / "run"
    losses = run_ranks(_train_case, 1, [], str(run_dir), timeout=240)[0]
    return run_dir, losses


def _logits(reader, tokens):
    model = Transformer(reader.config.model)
    model.load_state_dict(reader.state_dict())
    with torch.no_grad():
        return model.eval()(tokens)


def _assert_same_tensors(a, b, moments=True):
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert torch.equal(a.full(n), b.full(n)), n
        for k in MOMENTS if moments else ():
            assert torch.equal(a.full(n, k), b.full(n, k)), f"{n}/{k}"


def _assert_tp2_shards_by_hand(src, step_dir):
    """What each tp=2 rank's files hold, spelled out by hand rather than through the shard specs
    that reshard and the reader share (round trips and logits cannot see a cut both agree on):
    its half of the q, of the k and of the v heads, of w1 and of w3, of wo's columns and of the
    vocabulary rows, for the weights and both Adam moments; norm weights whole (in TP rank 0's file).
    Format v2 stores each TP shard flattened (one part, ``_dp000``, when written offline)."""
    from safetensors import safe_open

    for t in range(2):
        f = safe_open(str(step_dir / f"model_tp{t:02d}_pp00_dp000.safetensors"), framework="pt")
        o = safe_open(str(step_dir / f"optim_tp{t:02d}_pp00_dp000.safetensors"), framework="pt")
        for key in (None, *MOMENTS):
            flat = (lambda n: f.get_tensor(n)) if key is None else (lambda n: o.get_tensor(f"{n}/{key}"))
            get = lambda n: flat(n).reshape(-1)
            full = lambda n: src.full(n, key)
            half = lambda x, dim=0: x.chunk(2, dim)[t]
            q, k, v = full("layers.0.attention.wqkv.weight").split([64, 64, 64])  # tiny: 4 heads of 16, MHA
            assert torch.equal(get("layers.0.attention.wqkv.weight"),
                               torch.cat([half(q), half(k), half(v)]).reshape(-1)), key
            w1, w3 = full("layers.0.feed_forward.w13.weight").chunk(2)
            assert torch.equal(get("layers.0.feed_forward.w13.weight"), torch.cat([half(w1), half(w3)]).reshape(-1))
            assert torch.equal(get("layers.0.attention.wo.weight"),
                               half(full("layers.0.attention.wo.weight"), 1).reshape(-1))
            assert torch.equal(get("layers.0.feed_forward.w2.weight"),
                               half(full("layers.0.feed_forward.w2.weight"), 1).reshape(-1))
            assert torch.equal(get("tok_embeddings.weight"), half(full("tok_embeddings.weight")).reshape(-1))
            if t == 0:
                assert torch.equal(get("layers.0.attention_norm.weight"), full("layers.0.attention_norm.weight"))


def test_reshard_round_trips_are_exact(source, tmp_path):
    from tools.reshard import reshard

    src = CheckpointReader(source[0] / "checkpoints" / "step_00000003")
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    want = _logits(src, tokens)
    prev = src.path
    for tp, pp in [(2, 2), (1, 1), (2, 1), (1, 2)]:
        out = tmp_path / f"r{tp}x{pp}"
        reshard(prev, out, tp, pp)
        r = CheckpointReader(out)
        assert (r.tp, r.pp) == (tp, pp) and len(list(r.path.glob("model_*.safetensors"))) == tp * pp
        assert {k: r.meta[k] for k in ("step", "consumed_samples", "lr_scheduler_last_epoch", "optimizer_lrs")} == \
               {k: src.meta[k] for k in ("step", "consumed_samples", "lr_scheduler_last_epoch", "optimizer_lrs")}
        assert not list(r.path.glob("rng/*"))  # per-rank RNG states are dropped (world size changes)
        _assert_same_tensors(src, r)
        assert torch.equal(_logits(r, tokens), want)
        if tp == 2:
            _assert_tp2_shards_by_hand(src, r.path)
        prev = out
    reshard(prev, tmp_path / "w", 1, 1, weights_only=True)
    assert not CheckpointReader(tmp_path / "w").has_optimizer


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_training_resumed_at_new_layout_matches_source(source, tmp_path, tp, pp):
    from tools.reshard import reshard

    run_dir, losses = source
    out = tmp_path / "run"
    reshard(run_dir / "checkpoints" / "step_00000003", out, tp, pp)
    resumed = run_ranks(_train_case, tp * pp, [f"parallel.tp={tp}", f"parallel.pp={pp}"], str(out), timeout=240)[0]
    assert len(resumed) == 3
    for a, b in zip(resumed, losses[3:]):
        assert abs(a - b) <= 1e-4 * abs(b), (resumed, losses[3:])


# ----------------------------------------------------------------------------- Hugging Face

@pytest.fixture(scope="module")
def model_ckpt(tmp_path_factory):
    """A weights-only checkpoint of a GQA model whose vocabulary needs padding, with a tokenizer."""
    from megallama.data.pipeline import default_corpus

    cfg = preset_config("tiny")
    cfg = replace(cfg, model=replace(cfg.model, n_kv_heads=2, vocab_size=500))
    weights = build_model(cfg.model, seed=3).state_dict()
    tok = default_corpus(512)[1]
    return write_run_checkpoint(tmp_path_factory.mktemp("m") / "run", cfg, weights, tokenizer_path=tok), cfg


def test_export_hf_loads_in_transformers_with_equal_logits(model_ckpt, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megallama.data.tokenizer import Tokenizer

    ckpt, cfg = model_ckpt
    r = megallama("export-hf", "--checkpoint", str(ckpt.parent.parent), "--output", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    ours = _logits(CheckpointReader(ckpt), tokens)[..., :500]
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    text = "def f(x):\n    return x  # 123 héllo\n"
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok(text).input_ids == Tokenizer(str(ckpt / "tokenizer.model")).encode(text, bos=True)


def test_export_hf_sharded_then_import_gives_identical_weights(model_ckpt, tmp_path):
    from tools.hf import export_hf, import_hf

    ckpt, cfg = model_ckpt
    export_hf(ckpt, tmp_path / "hf", max_shard_mb=0.05)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    out = import_hf(tmp_path / "hf", tmp_path / "back", tp=2)
    a, b = CheckpointReader(ckpt), CheckpointReader(out)
    # HF stores the FFN width, not LLaMA's rounding recipe: the recipe may differ, the width may not
    assert b.config.model.ffn_hidden == cfg.model.ffn_hidden
    assert b.config.model == replace(cfg.model, max_seq_len=b.config.model.max_seq_len,
                                     multiple_of=b.config.model.multiple_of)
    assert (b.tp, b.meta["step"], b.has_optimizer) == (2, 0, False)
    for n in a.names():
        assert torch.equal(a.full(n)[:500], b.full(n)[:500]), n



def test_import_hf_reads_rope_theta_from_rope_parameters(model_ckpt, tmp_path):
    """transformers >= 5 writes ``"rope_parameters": {"rope_theta": ..., "rope_type": "default"}``
    and no top-level rope_theta: the import used 10000 for every such model (Llama 3's 500000
    gave silently wrong logits); a scaled rope_type there is refused like rope_scaling."""
    from tools.hf import export_hf, import_hf

    ckpt, _ = model_ckpt
    export_hf(ckpt, tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    c.pop("rope_theta")
    c["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    assert CheckpointReader(import_hf(tmp_path / "hf", tmp_path / "back")).config.model.rope_theta == 500000.0
    c["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    r = megallama("import-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "scaled"))
    assert r.returncode == 2 and "rope_type 'llama3'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

# ----------------------------------------------------------------------------- Meta

def test_meta_round_trip_with_two_model_parallel_shards(model_ckpt, tmp_path):
    ckpt, cfg = model_ckpt
    r = megallama("export-meta", "--checkpoint", str(ckpt), "--output", str(tmp_path / "meta"), "--mp", "2")
    assert r.returncode == 0, r.stderr
    full = ours_to_meta(CheckpointReader(ckpt).state_dict(), cfg.model)
    shards = [torch.load(tmp_path / "meta" / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    for i, s in enumerate(shards):  # Meta's release rules, spelled out independently
        assert torch.equal(s["layers.1.attention.wq.weight"], full["layers.1.attention.wq.weight"].chunk(2, 0)[i])
        assert torch.equal(s["layers.1.attention.wk.weight"], full["layers.1.attention.wk.weight"].chunk(2, 0)[i])
        assert torch.equal(s["layers.1.attention.wo.weight"], full["layers.1.attention.wo.weight"].chunk(2, 1)[i])
        assert torch.equal(s["layers.1.feed_forward.w2.weight"], full["layers.1.feed_forward.w2.weight"].chunk(2, 1)[i])
        assert torch.equal(s["tok_embeddings.weight"], full["tok_embeddings.weight"][:, 32 * i:32 * (i + 1)])
        assert torch.equal(s["output.weight"], full["output.weight"][250 * i:250 * (i + 1)])
        assert torch.equal(s["norm.weight"], full["norm.weight"])
    from tools.meta import import_meta

    back = CheckpointReader(import_meta(tmp_path / "meta", tmp_path / "back", tp=2))
    got = ours_to_meta(back.state_dict(), back.config.model)
    assert got.keys() == full.keys() and all(torch.equal(got[k], full[k]) for k in full)
    assert back.config.model == replace(cfg.model, max_seq_len=back.config.model.max_seq_len)
    assert (back.path / "tokenizer.model").is_file()


@pytest.mark.slow
def test_imported_checkpoint_trains_from_its_weights(model_ckpt, tmp_path):
    """`train` on an imported (weights-only) run dir starts at step 0 from those weights: its first
    loss is the imported model's loss on the first global batch."""
    from tools.meta import export_meta, import_meta
    from tests.synthetic import bundle

    ckpt, cfg = model_ckpt
    export_meta(ckpt, tmp_path / "meta", mp=2)
    run_dir = import_meta(tmp_path / "meta", tmp_path / "run").parent.parent
    over = ["model.n_kv_heads=2", "model.vocab_size=500", "model.max_seq_len=2048", "train.steps=2"]
    losses = run_ranks(_train_case, 1, over, str(run_dir), timeout=240)[0]
    tcfg = validate(load_config(None, BASE + over, preset="tiny"), 1)
    batch = torch.from_numpy(bundle(tcfg).train.data[:8])
    model = Transformer(tcfg.model)
    model.load_state_dict(CheckpointReader(ckpt).state_dict())
    with torch.no_grad():
        want = model(batch[:, :-1], batch[:, 1:]).item()
    assert abs(losses[0] - want) <= 1e-5 * abs(want) and len(losses) == 2


# ----------------------------------------------------------------------------- bad input

def _hf_rope_scaling(d):
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    return ["import-hf", str(d)], "rope_scaling"


def _hf_corrupt(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return ["import-hf", str(d)], "model.safetensors' is truncated or corrupt"


def _hf_no_hidden_size(d):
    c = json.loads((d / "config.json").read_text())
    del c["hidden_size"]
    (d / "config.json").write_text(json.dumps(c))
    return ["import-hf", str(d)], "config.json' has no integer 'hidden_size'"


def _meta_no_dim(d):
    p = json.loads((d / "params.json").read_text())
    del p["dim"]
    (d / "params.json").write_text(json.dumps(p))
    return ["import-meta", str(d)], "params.json' has no integer 'dim'"


def _hf_vocab_mismatch(d):  # config.json smaller than the embedding: a traceback (negative padding)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "vocab_size": c["vocab_size"] - 4}))
    return ["import-hf", str(d)], "has 500 rows but the model's vocab_size is 496"


def _meta_vocab_mismatch(d):  # params.json larger than the embedding: zero rows were silently made tokens
    p = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**p, "vocab_size": p["vocab_size"] + 4}))
    return ["import-meta", str(d)], "has 500 rows but the model's vocab_size is 504"


def _hf_non_numeric(d):  # a string where a number belongs: validation raised a TypeError traceback
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "rms_norm_eps": "1e-5"}))
    return ["import-hf", str(d)], "config.json': 'rms_norm_eps' must be a number, got '1e-5'"


def _meta_non_numeric(d):
    p = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**p, "multiple_of": "256"}))
    return ["import-meta", str(d)], "params.json': 'multiple_of' must be an integer, got '256'"


def _edit_hf_weights(d, edit):
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    save_file(edit(load_file(str(f))), str(f), metadata={"format": "pt"})


def _hf_missing_k_proj(d):  # was "holds tensor ... that a LLaMA model does not have": it lacks one
    _edit_hf_weights(d, lambda t: {k: v for k, v in t.items() if k != "model.layers.0.self_attn.k_proj.weight"})
    return ["import-hf", str(d)], "but not 'layers.0.attention.wk.weight'; the model files are incomplete"


def _hf_extra_top_tensor(d):  # a top-level tensor LLaMA lacks (a classification head) was silently dropped
    _edit_hf_weights(d, lambda t: {**t, "score.weight": t["lm_head.weight"][:2].clone()})
    return ["import-hf", str(d)], "holds tensor 'score.weight' that a LLaMA model does not have"


def _meta_missing_shard(d):
    (d / "consolidated.00.pth").unlink()
    return ["import-meta", str(d)], "consolidated.00.pth' is missing"


def _meta_other_shape(d):
    p = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**p, "n_layers": 2}))
    return ["import-meta", str(d)], "another model shape"


def _meta_pickle_code(d):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "consolidated.00.pth").write_bytes(pickle.dumps({"x": Evil()}))
    return ["import-meta", str(d)], "consolidated.00.pth' is truncated, corrupt or not a plain tensor file"


def _hf_zip_bin(d):  # a pytorch_model.bin that is a zip of something else: a traceback from torch.load
    import zipfile

    (d / "model.safetensors").unlink()
    with zipfile.ZipFile(d / "pytorch_model.bin", "w") as z:
        z.writestr("archive/readme.txt", "not weights")
    return ["import-hf", str(d)], "pytorch_model.bin' is not PyTorch weights that load without running pickled code"


@pytest.mark.parametrize("damage", [pytest.param(_hf_rope_scaling, marks=pytest.mark.slow), _hf_corrupt, _hf_zip_bin,
                                    pytest.param(_meta_missing_shard, marks=pytest.mark.slow), _meta_other_shape,
                                    _meta_pickle_code, _hf_no_hidden_size, _meta_no_dim, _hf_vocab_mismatch,
                                    _meta_vocab_mismatch, _hf_non_numeric, _meta_non_numeric, _hf_missing_k_proj,
                                    _hf_extra_top_tensor],
                         ids=["hf-rope-scaling", "hf-corrupt", "hf-zip-bin", "meta-missing-shard", "meta-shape", "meta-pickle",
                              "hf-no-hidden-size", "meta-no-dim", "hf-vocab-mismatch", "meta-vocab-mismatch",
                              "hf-non-numeric", "meta-non-numeric", "hf-missing-k-proj", "hf-extra-top-tensor"])
def test_bad_sources_are_one_line_errors(model_ckpt, tmp_path, damage):
    from tools.hf import export_hf
    from tools.meta import export_meta

    ckpt, _ = model_ckpt
    src = tmp_path / "src"
    (export_hf if "hf" in damage.__name__ else lambda c, o: export_meta(c, o, mp=2))(ckpt, src)
    args, expect = damage(src)
    before = snapshot(tmp_path)
    r = megallama(*args, "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "pwned" not in r.stdout and snapshot(tmp_path) == before


def test_reshard_refuses_bad_layout_and_existing_output(model_ckpt, tmp_path):
    ckpt, _ = model_ckpt
    r = megallama("reshard", "--checkpoint", str(ckpt), "--tp", "3", "--pp", "1", "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "divisible by parallel.tp (3)" in r.stderr and not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    r = megallama("reshard", "--checkpoint", str(ckpt), "--tp", "1", "--pp", "1", "--output", str(tmp_path / "o"))
    # reshard has no --force: the fix it names must be one the user can apply
    assert r.returncode == 2 and "already exists; choose a new path or remove it" in r.stderr, r.stderr
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep"]


@pytest.mark.parametrize("edit", [lambda m: [], lambda m: {k: v for k, v in m.items() if k != "files"},
                                  lambda m: {**m, "stage_of": None}], ids=["not-an-object", "no-files", "bad-stage-of"])
def test_malformed_meta_json_is_a_one_line_error(model_ckpt, tmp_path, edit):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(model_ckpt[0].parent.parent, src)
    meta = src / "checkpoints" / model_ckpt[0].name / "meta.json"
    meta.write_text(json.dumps(edit(json.loads(meta.read_text()))))
    r = megallama("reshard", "--checkpoint", str(src), "--tp", "1", "--pp", "1", "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "meta.json' is corrupt" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_offline_tools_never_touch_a_users_dot_tmp_directory(model_ckpt, tmp_path):
    """Outputs are built under a unique temporary name: a directory of the user's called
    OUT.tmp next to the output used to be deleted (reshard, import-*, export-*)."""
    ckpt, _ = model_ckpt
    tools = ("reshard", "export-hf", "export-meta")
    for tool in tools:
        out = tmp_path / tool
        mine = tmp_path / f"{tool}.tmp"
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
        extra = ["--tp", "1", "--pp", "1"] if tool == "reshard" else []
        r = megallama(tool, "--checkpoint", str(ckpt), *extra, "--output", str(out))
        assert r.returncode == 0, r.stderr
        assert (mine / "notes.txt").read_text() == "mine" and out.is_dir(), tool
    # nothing else is left behind (the temporary directories were renamed into the outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for t in tools for n in (t, f"{t}.tmp"))


@pytest.mark.parametrize("tool", ["export-hf", "export-meta"])
def test_export_with_force_refuses_to_replace_its_own_source(model_ckpt, tmp_path, tool):
    import shutil

    src = tmp_path / "run"
    shutil.copytree(model_ckpt[0].parent.parent, src)
    before = snapshot(src)
    for out in (src, src / "checkpoints" / model_ckpt[0].name):
        r = megallama(tool, "--checkpoint", str(src), "--output", str(out), "--force")
        assert r.returncode == 2 and "holds the source checkpoint" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert snapshot(src) == before


def test_export_hf_refuses_a_non_positive_or_non_finite_shard_size(model_ckpt, tmp_path, capsys):
    """--max-shard-mb 0 (or negative) wrote one shard per tensor, nan one shard of everything."""
    from megallama.cli import main

    ckpt, _ = model_ckpt
    for value in ("0", "-5", "nan", "inf"):
        out = tmp_path / f"hf{value}"
        status = main(["export-hf", "--checkpoint", str(ckpt), "--output", str(out), "--max-shard-mb", value])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1, (value, err)
        assert "--max-shard-mb must be a positive number of megabytes" in err[0], err[0]
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def _fail_on_call(n, real):
    """``real``, except that its n-th call raises ENOSPC (a disk filling up mid-write)."""
    import errno

    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("tool", ["export-hf", "export-meta", "reshard", "import-hf"])
def test_a_write_failing_partway_leaves_no_temporary_directory(model_ckpt, tmp_path, monkeypatch, capsys, tool):
    """export-hf/export-meta left their `.OUT.<pid>-0.tmp` directory (and a traceback) behind when a
    write failed after the first file; with --force the existing output is kept as it was."""
    import megallama.checkpoint.stream
    from megallama.cli import main
    from tools.hf import export_hf

    ckpt, _ = model_ckpt
    hf = tmp_path / "hf"
    if tool == "import-hf":
        export_hf(ckpt, hf)
    work = tmp_path / "work"
    out = work / "out"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("the previous export")
    args = {"export-hf": ["--checkpoint", str(ckpt), "--max-shard-mb", "0.05", "--force"],
            "export-meta": ["--checkpoint", str(ckpt), "--mp", "2", "--force"],
            "reshard": ["--checkpoint", str(ckpt), "--tp", "2", "--pp", "1"],
            "import-hf": [str(hf), "--tp", "2"]}[tool]
    if tool == "export-meta":
        monkeypatch.setattr(torch, "save", _fail_on_call(2, torch.save))
    else:  # the tools stream their safetensors files (megallama.checkpoint.stream): the second one fails
        monkeypatch.setattr(megallama.checkpoint.stream, "_open", _fail_on_call(2, megallama.checkpoint.stream._open))
    if tool in ("reshard", "import-hf"):  # they need a new output
        (out / "old.txt").unlink()
        out.rmdir()
    capsys.readouterr()
    status = main([tool, *args, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].endswith(
        f"writing '{out}' failed (No space left on device); nothing was written and an existing output is kept: "
        "free space or choose another --output"), err
    left = sorted(p.name for p in work.iterdir())
    assert left == (["out"] if tool.startswith("export") else []), left
    if tool.startswith("export"):
        assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_write_checkpoint_refusing_a_tensor_partway_leaves_nothing(tmp_path):
    from megallama.checkpoint import write_checkpoint
    from megallama.errors import CheckpointError

    cfg = validate(replace(preset_config("tiny"), parallel=replace(preset_config("tiny").parallel, tp=2)), 2)
    weights = build_model(cfg.model, seed=0).state_dict()
    weights["norm.weight"] = torch.ones(3)  # wrong shape, found once the temporary directory exists
    with pytest.raises(CheckpointError, match="norm.weight"):
        write_checkpoint(tmp_path / "ckpt", cfg, weights)
    assert list(tmp_path.iterdir()) == []
