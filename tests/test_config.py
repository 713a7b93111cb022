"""Config loading, overrides and validation: bad input -> one-line error, exit status 2."""

import subprocess
import sys

import pytest

from megallama.config import load_config, validate
from megallama.errors import ConfigError


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "megallama", *args], capture_output=True, text=True, cwd=cwd)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nparallel:\n  tp: 2\ntrain:\n  steps: 7\n")
    cfg = load_config(str(f), ["train.seq_len=16", "optim.lr=1e-4", "parallel.sequence_parallel=true"])
    assert (cfg.model.dim, cfg.parallel.tp, cfg.train.steps, cfg.train.seq_len) == (64, 2, 7, 16)
    assert cfg.optim.lr == 1e-4 and cfg.parallel.sequence_parallel is True
    validate(cfg, world_size=4)


BAD = [
    (["--preset", "tiny", "--set", "parallel.tp=3"], "model.n_heads (4) must be divisible by parallel.tp (3)"),
    (["--preset", "tiny", "--set", "parallel.pp=3"], "model.n_layers (4) must be divisible by parallel.pp (3)"),
    (["--preset", "tiny", "--set", "parallel.tp=2", "--world-size", "3"], "world size 3 is not divisible by tp*pp"),
    (["--preset", "tiny", "--set", "parallel.dp=2", "--world-size", "4"], "world size 4 != tp*pp*dp"),
    (["--preset", "tiny", "--set", "parallel.pp=2", "--set", "parallel.zero_stage=3", "--world-size", "2"],
     "parallel.zero_stage=3 is not supported with pipeline parallelism"),
    (["--preset", "tiny", "--set", "train.global_batch_size=7"], "train.global_batch_size (7) must be divisible"),
    (["--preset", "tiny", "--set", "train.lr=1"], "unknown config key 'train.lr'"),
    (["--preset", "tiny", "--set", "modle.dim=1"], "unknown config key 'modle' (did you mean 'model'?)"),
    (["--preset", "tiny", "--set", "model.dim=abc"], "model.dim: expected an integer, got 'abc'"),
    (["--preset", "tiny", "--set", "train.precision=fp8"], "train.precision must be fp32, bf16 or fp16"),
    (["--preset", "tiny", "--set", "parallel.sequence_parallel=true"], "sequence_parallel needs parallel.tp > 1"),
    (["--preset", "tiny", "--set", "train.seq_len=100"], "train.seq_len (100) exceeds model.max_seq_len (64)"),
    (["--preset", "tiny", "--set", "model.n_kv_heads=3"], "must be divisible by model.n_kv_heads (3)"),
    (["--preset", "tiny", "--set", "train.precision=bf16", "--set", "parallel.zero_stage=0"],
     "train.precision=bf16 needs parallel.zero_stage >= 1"),
    (["--preset", "llama-7c"], "unknown preset 'llama-7c' (did you mean 'llama-7b'?)"),
    (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_is_one_line_exit_2(args, message):
    r = _cli("show-model", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_bad_yaml_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  dim: [1,\n")
    r = _cli("show-model", "--config", str(f))
    assert r.returncode == 2 and f"{f}:" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_validation_function_raises_config_error():
    cfg = load_config(None, ["parallel.tp=8"], preset="tiny")
    with pytest.raises(ConfigError, match="parallel.tp"):
        validate(cfg, 8)


def test_cli_lists_subcommands_and_strips_local_rank():
    r = _cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "presets" in r.stdout
    r = _cli("--local_rank=0", "show-model", "--preset", "tiny")
    assert r.returncode == 0 and '"parameters": 279104' in r.stdout


# Values that used to pass validation and then crashed the run with a traceback (or, like
# eval_iters=0 and eval_interval<0, silently logged nan / validated at every step).
NON_POSITIVE = [
    ("train.global_batch_size=0", "train.global_batch_size must be positive"),
    ("train.global_batch_size=-8", "train.global_batch_size must be positive"),
    ("model.n_kv_heads=-2", "model.n_kv_heads must be positive"),
    ("model.ffn_dim_multiplier=-1", "model.ffn_dim_multiplier must be positive"),
    ("model.norm_eps=-1", "model.norm_eps must be positive"),
    ("model.rope_theta=0", "model.rope_theta must be positive"),
    ("model.init_std=-0.02", "model.init_std must be positive"),
    ("train.log_interval=0", "train.log_interval must be >= 1"),
    ("train.eval_interval=-1", "train.eval_interval must be >= 0"),
    ("train.eval_iters=0", "train.eval_iters must be >= 1"),
    ("optim.eps=0", "optim.eps must be positive"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("train.device_peak_flops=-1", "train.device_peak_flops must be >= 0"),
]


@pytest.mark.parametrize("override,message", NON_POSITIVE, ids=[o for o, _ in NON_POSITIVE])
def test_non_positive_sizes_and_intervals_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(load_config(None, [override], preset="tiny"), 1)


# inf passed every `> 0` / `>= 0` check (optim.lr=inf trained on nan weights; grad_clip=inf and
# weight_decay=inf were taken as set), nan failed them with a misleading "must be positive", and an
# inf/nan for an integer field (or model.ffn_dim_multiplier) crashed with OverflowError/ValueError.
NON_FINITE = [
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=-inf", "optim.lr must be a finite number, got -inf"),
    ("optim.min_lr_ratio=nan", "optim.min_lr_ratio must be a finite number, got nan"),
    ("optim.grad_clip=inf", "optim.grad_clip must be a finite number, got inf"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number, got inf"),
    ("optim.eps=inf", "optim.eps must be a finite number, got inf"),
    ("model.norm_eps=nan", "model.norm_eps must be a finite number, got nan"),
    ("model.ffn_dim_multiplier=inf", "model.ffn_dim_multiplier must be a finite number, got inf"),
    ("train.collective_timeout_s=inf", "train.collective_timeout_s must be a finite number, got inf"),
    ("train.device_peak_flops=nan", "train.device_peak_flops must be a finite number, got nan"),
    ("data.valid_fraction=nan", "data.valid_fraction must be a finite number, got nan"),
    ("train.steps=.inf", "train.steps: expected an integer, got inf"),
    ("train.steps=.nan", "train.steps: expected an integer, got nan"),
]


@pytest.mark.parametrize("override,message", NON_FINITE, ids=[o for o, _ in NON_FINITE])
def test_non_finite_numbers_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, [override], preset="tiny"), 1)
    assert message in str(err.value), str(err.value)


def test_non_finite_lr_is_one_line_exit_2_through_the_cli():
    r = _cli("show-model", "--preset", "tiny", "--set", "optim.lr=inf")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "megallama show-model: error: optim.lr must be a finite number, got inf"], r.stderr


@pytest.mark.parametrize("world", ["0", "-2"])
def test_show_model_refuses_a_non_positive_world_size(world):
    # it was accepted: dp was derived as 1 and the layout "checked" against no processes at all
    r = _cli("show-model", "--preset", "tiny", "--world-size", world)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"megallama show-model: error: --world-size must be >= 1 (the number of processes to check the "
        f"layout against), got {world}"], r.stderr
    assert r.stdout == ""
