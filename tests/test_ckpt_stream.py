"""Streaming checkpoint writing (megallama/checkpoint/stream.py): its safetensors files equal
``safetensors.torch.save``'s byte for byte, and a checkpoint written tensor by tensor equals the one
``write_checkpoint`` writes from whole state dicts (files, sha256s and meta.json)."""

import json
from dataclasses import replace

import pytest
import torch

from megallama.checkpoint import MOMENTS, CheckpointReader, write_checkpoint
from megallama.checkpoint.stream import SafetensorsWriter, dict_source, write_checkpoint_from
from megallama.config import preset_config, validate
from megallama.model import build_model


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_streamed_safetensors_equal_safetensors_save(tmp_path, metadata):
    from safetensors import safe_open
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {"layers.10.w": torch.randn(3, 5, generator=g), "layers.2.w": torch.randn(7, generator=g),
               "b": torch.randn(2, 2, generator=g).half(), "a": torch.randn(4, generator=g).bfloat16(),
               "empty": torch.zeros(0, 3), "ids": torch.arange(5), "héllo": torch.ones(1)}
    w = SafetensorsWriter(tmp_path / "x.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()], metadata)
    for name, _, _ in w.order:  # the order safetensors stores them in
        w.write(name, tensors[name])
    info = w.close()
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == save(tensors, metadata=metadata)
    import hashlib
    assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_streamed_safetensors_refuse_a_wrong_order_or_shape(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    with pytest.raises(ValueError, match="wrote 'b', expected 'a'"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="declared"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'b' was never written"):
        w.close()


@pytest.mark.parametrize("tp,pp,moments", [(1, 1, False), (2, 2, True)])
def test_streamed_checkpoint_equals_write_checkpoint(tmp_path, tp, pp, moments):
    cfg = preset_config("tiny")
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=500),
                  parallel=replace(cfg.parallel, tp=tp, pp=pp, zero_stage=0 if pp > 1 else 1))
    cfg = validate(cfg, tp * pp)
    weights = build_model(cfg.model, seed=1).state_dict()
    weights = {k: v[:500] if k in ("tok_embeddings.weight", "output.weight") else v for k, v in weights.items()}
    mom = {f"{n}/{k}": torch.rand_like(v) for n, v in weights.items() for k in MOMENTS} if moments else None
    a = write_checkpoint(tmp_path / "a", cfg, weights, mom, step=3, consumed_samples=24)
    b = write_checkpoint_from(tmp_path / "b", cfg, dict_source(weights, mom), step=3, consumed_samples=24)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 1 + tp * pp * (2 if moments else 1)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert json.loads((b / "meta.json").read_text())["files"] == json.loads((a / "meta.json").read_text())["files"]
    r = CheckpointReader(b)
    assert torch.equal(r.full("tok_embeddings.weight")[:500], weights["tok_embeddings.weight"])


@pytest.mark.parametrize("max_mb", [5000.0, 0.05])
def test_streamed_hf_export_equals_the_whole_model_export(tmp_path, max_mb):
    """export-hf writes tensor by tensor what the whole-state-dict export wrote: the same shards,
    byte for byte (safetensors.torch.save of ours_to_hf(state_dict), cut by _shards)."""
    from safetensors.torch import save

    from megallama.checkpoint import write_run_checkpoint
    from megallama.convert import ours_to_hf
    from tools.hf import _shards, export_hf

    cfg = preset_config("tiny")
    cfg = replace(cfg, model=replace(cfg.model, n_kv_heads=2, vocab_size=500))
    ckpt = write_run_checkpoint(tmp_path / "run", cfg, build_model(cfg.model, seed=2).state_dict())
    export_hf(ckpt, tmp_path / "hf", max_shard_mb=max_mb)
    shards = _shards(ours_to_hf(CheckpointReader(ckpt).state_dict(), cfg.model), max_mb * 2**20)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == names
    for name, part in zip(names, shards):
        assert (tmp_path / "hf" / name).read_bytes() == save(part, metadata={"format": "pt"}), name


def _same_run(a, b):
    """Two run directories' checkpoints hold the same files byte for byte; meta.json differs only in
    the paths it names."""
    a, b = CheckpointReader(a).path, CheckpointReader(b).path
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n != "meta.json":
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m["config"]["train"].pop("run_dir")
        m.get("imported_from", {}).pop("path", None)
    assert ma == mb


def test_streamed_imports_and_meta_export_equal_the_whole_model_path(tmp_path):
    """import-hf (a tied .bin model), import-meta (2 shards, to tp 2 x pp 2) and export-meta (mp 2)
    write what the whole-state-dict path wrote: hf_to_ours/meta_to_ours of the whole model through
    write_run_checkpoint, and torch.save of each mp shard."""
    from safetensors.torch import load_file

    from megallama.checkpoint import write_run_checkpoint
    from megallama.convert import hf_to_ours, meta_to_ours, ours_to_meta
    from tools.checkpoint_io import imported_config
    from tools.hf import export_hf, import_hf, model_config_from_hf
    from tools.meta import export_meta, import_meta

    cfg = preset_config("tiny")
    cfg = replace(cfg, model=replace(cfg.model, n_kv_heads=2, vocab_size=500))
    ckpt = write_run_checkpoint(tmp_path / "run", cfg, build_model(cfg.model, seed=4).state_dict())
    export_hf(ckpt, tmp_path / "hf")
    tied = {k: v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items() if k != "lm_head.weight"}
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(tied, d / "pytorch_model.bin")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "tie_word_embeddings": True}))
    new = import_hf(d, tmp_path / "new", tp=2)
    model_cfg = model_config_from_hf(d / "config.json")
    old = write_run_checkpoint(tmp_path / "old", imported_config(model_cfg, 2, 1), hf_to_ours(tied, model_cfg),
                               extra_meta={"imported_from": {"format": "huggingface", "path": str(d)}})
    _same_run(old, new)

    export_meta(ckpt, tmp_path / "meta", mp=2)
    full = ours_to_meta(CheckpointReader(ckpt).state_dict(), cfg.model)
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    for i in range(2):
        shard = {k: (v if dims.get(k.split(".")[-2]) is None else v.chunk(2, dims[k.split(".")[-2]])[i]).clone()
                 for k, v in full.items()}
        want = tmp_path / "want" / f"consolidated.0{i}.pth"  # the zip's records are named after the file
        want.parent.mkdir(exist_ok=True)
        torch.save(shard, want)
        assert (tmp_path / "meta" / want.name).read_bytes() == want.read_bytes()
    new = import_meta(tmp_path / "meta", tmp_path / "mnew", tp=2, pp=2)
    model_cfg = CheckpointReader(new).config.model
    old = write_run_checkpoint(tmp_path / "mold", imported_config(model_cfg, 2, 2), meta_to_ours(full, model_cfg),
                               tokenizer_path=None,
                               extra_meta={"imported_from": {"format": "meta", "path": str(tmp_path / "meta")}})
    _same_run(old, new)
