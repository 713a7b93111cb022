"""The offline tools (reshard, export-hf, export-meta, import-hf, import-meta) stream tensor by tensor:
their peak RSS grows by a small multiple of the largest tensor plus a fixed allowance, however large
the model (benchmarks/offline_tools_memory.py measures a bigger one).  The whole-model tools they
replace held every weight (reshard: and both Adam moments), more than the bound allows here."""

from dataclasses import replace

import pytest
import torch

from megallama.checkpoint import MOMENTS, write_run_checkpoint
from megallama.config import preset_config
from megallama.model import build_model
from tests.ckpt_helpers import peak_rss_growth

MB = 2**20
FIXED = 24 * MB  # the allocator, safetensors' and torch's buffers: measured 4-6 MB on a 0.7 MB model


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """16 layers of dim 256: 50 MB of fp32 weights (150 MB with the moments), 36x its largest tensor."""
    cfg = preset_config("tiny")
    cfg = replace(cfg, model=replace(cfg.model, dim=256, n_layers=16, n_heads=4, vocab_size=512))
    weights = build_model(cfg.model, seed=0).state_dict()
    moments = {f"{n}/{k}": torch.rand_like(v) for n, v in weights.items() for k in MOMENTS}
    d = tmp_path_factory.mktemp("big")
    ckpt = write_run_checkpoint(d / "run", cfg, weights, moments, step=1)
    largest = max(v.numel() * 4 for v in weights.values())
    model = sum(v.numel() * 4 for v in weights.values())
    assert model >= 30 * largest
    return d, ckpt, largest, model


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_offline_tools_peak_memory_is_bounded_by_the_largest_tensor(big):
    d, ckpt, largest, model = big
    runs = [("reshard", 0, ["reshard", "--checkpoint", str(ckpt), "--tp", "2", "--pp", "2", "--output", str(d / "rs")]),
            ("export-hf", 0, ["export-hf", "--checkpoint", str(ckpt), "--output", str(d / "hf"),
                              "--max-shard-mb", "20"]),
            ("import-hf", 0, ["import-hf", str(d / "hf"), "--tp", "2", "--output", str(d / "ih")]),
            # a consolidated.NN.pth is one torch.save: one model-parallel shard is in memory, made of
            # many tensors whose frees glibc's heap keeps (measured: up to ~2.5x the shard)
            ("export-meta", 2 * model // 8, ["export-meta", "--checkpoint", str(ckpt), "--mp", "8",
                                         "--output", str(d / "meta")]),
            ("import-meta", 0, ["import-meta", str(d / "meta"), "--output", str(d / "im")])]
    for tool, shard, args in runs:
        grew = peak_rss_growth(*args)
        bound = (3 if tool in ("reshard", "export-hf") else 4) * largest + shard + FIXED  # issue #22: reshard and
        # export-hf within 3x the largest tensor + a stated fixed overhead
        assert grew < bound < model, (f"{tool}: peak RSS grew {grew / MB:.1f} MB, bound {bound / MB:.1f} MB "
                                      f"(largest tensor {largest / MB:.2f} MB, model {model / MB:.1f} MB)")
