"""Checkpoint I/O: slice reads (each rank reads only the bytes of its shard, any layout -> any layout),
integrity errors that name the file or tensor, and the byte counters the benchmark reports."""

from dataclasses import replace

import pytest
import torch

from megallama import checkpoint as C
from megallama import sharding as S
from megallama.config import preset_config
from megallama.errors import CheckpointError


def _cfg(tp, pp):
    cfg = preset_config("tiny")
    return replace(cfg, parallel=replace(cfg.parallel, tp=tp, pp=pp))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tp=2 x pp=2 checkpoint of the tiny model with random weights and moments."""
    cfg = _cfg(2, 2)
    g = torch.Generator().manual_seed(0)
    specs = S.shard_specs(cfg.model, 1)
    weights = {n: torch.randn(s.shape, generator=g) for n, s in specs.items()}
    moments = {f"{n}/{k}": torch.randn(s.shape, generator=g) for n, s in specs.items() for k in C.MOMENTS}
    out = C.write_checkpoint(tmp_path_factory.mktemp("io") / "ck", cfg, weights, moments)
    return out, weights, moments


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_slice_reads_equal_the_shards_of_the_full_tensor_and_read_only_their_bytes(ckpt, tp):
    path, weights, moments = ckpt
    reader = C.CheckpointReader(path)
    specs = S.shard_specs(reader.config.model, tp)
    for rank in range(tp):
        for name in reader.names():
            for key in (None, *C.MOMENTS):
                want = S.reshard_tensor(reader.full(name, key), specs[name], rank, tp)
                before = C.IO_BYTES["read"]
                got = reader.read_shard(name, key, specs[name], rank, tp)
                read = C.IO_BYTES["read"] - before
                assert torch.equal(got, want), (name, key, rank, tp)
                # only the rows it holds (padded vocabulary rows are zeros, not read)
                assert read <= got.numel() * 4, (name, key, read, got.numel() * 4)
    # a ZeRO partition's flat range of a rank's shard: only the rows that contain it are read
    g = torch.Generator().manual_seed(tp)
    for name in reader.names():
        want = S.reshard_tensor(reader.full(name, "exp_avg"), specs[name], tp - 1, tp).reshape(-1)
        start = int(torch.randint(0, want.numel() - 1, (1,), generator=g))
        numel = int(torch.randint(1, want.numel() - start + 1, (1,), generator=g))
        row = want.numel() // S.reshard_tensor(reader.full(name), specs[name], 0, tp).shape[0]
        before = C.IO_BYTES["read"]
        got = reader.read_flat(name, "exp_avg", specs[name], tp - 1, tp, start, numel)
        assert torch.equal(got, want[start:start + numel]), name
        assert C.IO_BYTES["read"] - before <= (numel + 2 * row) * 4, name
    # rows of one moment along a non-shard dim
    name = "layers.0.attention.wo.weight"
    full = reader.full(name, "exp_avg")
    assert torch.equal(reader.read(name, "exp_avg", 0, 3, 7), full[3:7])


def test_missing_truncated_or_uncovered_is_a_one_line_error_naming_it(ckpt, tmp_path):
    import json
    import shutil

    path = tmp_path / "ck"
    shutil.copytree(ckpt[0], path)
    victim = path / C.part_file("optim", 1, 1, 0)
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="optim_tp01_pp01_dp000.safetensors' is truncated"):
        C.CheckpointReader(path)
    victim.unlink()
    with pytest.raises(CheckpointError, match="optim_tp01_pp01_dp000.safetensors' is missing"):
        C.CheckpointReader(path)
    shutil.copy(ckpt[0] / victim.name, victim)
    good = json.loads((path / "meta.json").read_text())
    meta = json.loads(json.dumps(good))
    del meta["stage_of"]["norm.weight"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not place tensor 'norm.weight'") as err:
        C.CheckpointReader(path)
    assert "\n" not in str(err.value)
    meta = json.loads(json.dumps(good))
    tensor = sorted(meta["parts"][victim.name])[0]
    start, numel = meta["parts"][victim.name][tensor]
    meta["parts"][victim.name][tensor] = [start, numel - 1]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"does not cover tensor '{tensor}' \\(tp 1\\)"):
        C.CheckpointReader(path)


def test_reads_version_1_checkpoints(ckpt, tmp_path):
    """Version 1: one unflattened file per (TP, PP) shard, written by DP rank 0 (built here by hand)."""
    import hashlib
    import json

    from safetensors.torch import save_file

    src = C.CheckpointReader(ckpt[0])
    meta = dict(src.meta, version=1, files={})
    meta.pop("parts")
    out = tmp_path / "v1"
    out.mkdir()
    for t in range(src.tp):
        for s in range(src.pp):
            for kind, keys in (("model", [None]), ("optim", list(C.MOMENTS))):
                tensors = {(n if k is None else f"{n}/{k}"): S.reshard_tensor(src.full(n, k), src.specs[n], t, src.tp)
                           for n in src.names() if src.stage_of[n] == s for k in keys}
                save_file(tensors, out / C.shard_file(kind, t, s))
                data = (out / C.shard_file(kind, t, s)).read_bytes()
                meta["files"][C.shard_file(kind, t, s)] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (out / "meta.json").write_text(json.dumps(meta))
    old = C.CheckpointReader(out)
    specs = S.shard_specs(src.config.model, 4)
    for n in src.names():
        for k in (None, *C.MOMENTS):
            assert torch.equal(old.full(n, k), src.full(n, k))
            assert torch.equal(old.read_shard(n, k, specs[n], 3, 4), src.read_shard(n, k, specs[n], 3, 4))


def _train(rank, world, overrides, run_dir):
    from megallama import checkpoint as C
    from megallama.config import load_config, validate
    from megallama.train import train
    from tests.synthetic import bundle

    cfg = validate(load_config(None, ["train.tensorboard=false", "train.global_batch_size=8", "train.steps=4",
                                      f"train.run_dir={run_dir}"] + overrides, preset="tiny"), world)
    C.IO_BYTES.update(read=0, written=0)
    losses = train(cfg, data=bundle(cfg)).losses
    return losses, dict(C.IO_BYTES)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_dp2_zero_parts_resume_bitwise_reading_only_what_each_rank_holds(tmp_path, stage):
    """dp=2 ZeRO-2 and ZeRO-3 (async saves): each rank writes half the state, and a resume at the same
    layout reads about half (its partition; ZeRO-3 used to read the whole shard) and continues bit for
    bit."""
    import json
    import shutil

    from tests.distributed import run_ranks

    run = tmp_path / "run"
    zero2 = [f"parallel.zero_stage={stage}", "train.micro_batch_size=4"]
    out = run_ranks(_train, 2, zero2 + ["train.save_interval=2", "train.async_save=true"], str(run), timeout=240)
    losses = out[0][0]
    ckpt = run / "checkpoints" / "step_00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert sorted(f for f in meta["parts"] if f.startswith("model_")) == ["model_tp00_pp00_dp000.safetensors",
                                                                           "model_tp00_pp00_dp001.safetensors"]
    state = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    for r in range(2):  # two saves (steps 2 and 4), each rank writing half of each
        assert abs(out[r][1]["written"] - state) / state < 0.1, (out[r][1], state)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    resumed = run_ranks(_train, 2, zero2, str(run), timeout=240)
    assert resumed[0][0] == losses[2:], (resumed[0][0], losses)
    for r in range(2):
        assert abs(resumed[r][1]["read"] - state / 2) / state < 0.05, (resumed[r][1], state)
