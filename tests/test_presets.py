"""Preset shapes and exact parameter counts of the paper (Table 2), built on the meta device."""

import subprocess
import sys

import pytest
import torch

from megallama.config import PRESETS, preset_config
from megallama.model import Transformer

PAPER = {
    "llama-7b": (6_738_415_616, 4096, 32, 32, 3.0e-4, 1.0e12),
    "llama-13b": (13_015_864_320, 5120, 40, 40, 3.0e-4, 1.0e12),
    "llama-33b": (32_528_943_616, 6656, 52, 60, 1.5e-4, 1.4e12),
    "llama-65b": (65_285_660_672, 8192, 64, 80, 1.5e-4, 1.4e12),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets(name):
    params, dim, heads, layers, lr, tokens = PAPER[name]
    cfg = preset_config(name)
    m = cfg.model
    assert (m.dim, m.n_heads, m.n_layers, m.vocab_size, cfg.train.seq_len) == (dim, heads, layers, 32000, 2048)
    assert cfg.optim.lr == lr and cfg.train.tokens == tokens
    assert cfg.train.global_batch_size * cfg.train.seq_len == 4 * 1024 * 1024  # "4M" tokens
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.optim.warmup_steps == 2000 and cfg.optim.min_lr_ratio == 0.1
    with torch.device("meta"):
        model = Transformer(m)
    assert sum(p.numel() for p in model.parameters()) == params
    assert m.num_parameters() == params


def test_small_presets_build_and_count():
    for name in PRESETS:
        m = preset_config(name).model
        if m.num_parameters() > 2e9:
            continue
        with torch.device("meta"):
            model = Transformer(m)
        assert sum(p.numel() for p in model.parameters()) == m.num_parameters(), name


def test_presets_command_prints_exact_counts():
    out = subprocess.run([sys.executable, "-m", "megallama", "presets"], capture_output=True, text=True, check=True)
    for params, *_ in PAPER.values():
        assert f"{params:,}" in out.stdout
