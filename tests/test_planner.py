"""Planner: paper calibration (65B), DeepSpeed's ZeRO estimators, activation formulas, CLI."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from megallama.config import load_config, preset_config
from megallama.errors import ConfigError, UserError
from megallama.hardware import GiB, gpu_spec, load_gpu_specs
from tools.planner import (Layout, activation_bytes_per_layer, calibrated_efficiency, layer_params,
                           model_state_bytes, plan, search, step_time)

A100 = gpu_spec("A100-80GB")
PAPER_65B = Layout(gpus=2048, tp=8, pp=4, zero_stage=1, micro_batch_size=1, seq_len=2048, global_batch_size=2048,
                   activation_checkpointing="selective", sequence_parallel=True)


def megallama(*args):
    return subprocess.run([sys.executable, "-m", "megallama", *args], capture_output=True, text=True)


@pytest.mark.parametrize("pp", [4, 8])
def test_paper_65b_throughput_and_days(pp):
    """Paper: about 380 tokens/s/GPU on 2048 A100-80GB, about 21 days for 1.4T tokens."""
    est = plan(preset_config("llama-65b"), replace(PAPER_65B, pp=pp), A100)
    assert est.fits
    assert est.tokens_per_sec_per_gpu == pytest.approx(380, rel=0.15)
    assert est.days == pytest.approx(21, rel=0.15)
    assert 0.4 < est.mfu < 0.6


def test_tokens_per_second_and_days_are_consistent():
    est = plan(preset_config("llama-65b"), PAPER_65B, A100, tokens=10**12)
    assert est.tokens_per_sec_per_gpu == pytest.approx(2048 * 2048 / est.step_time_s / 2048)
    assert est.days == pytest.approx(10**12 / (est.tokens_per_sec_per_gpu * 2048) / 86400)
    assert est.gpu_hours == pytest.approx(est.days * 24 * 2048)


def test_a_config_with_train_steps_is_planned_for_its_steps():
    """train.steps wins over train.tokens in training, so it does in the planner (the demo trains 200 steps)."""
    cfg = preset_config("demo")
    lay = Layout(gpus=1, tp=1, pp=1, zero_stage=1, micro_batch_size=8, seq_len=256, global_batch_size=16,
                 activation_checkpointing="none", sequence_parallel=False, precision="fp32")
    est = plan(cfg, lay, A100)
    assert est.days == pytest.approx(200 * 16 * 256 / est.tokens_per_sec_per_gpu / 86400)
    assert cfg.train.total_tokens() == 200 * 16 * 256


def test_mixture_budget_follows_train_steps(tmp_path):
    c = tmp_path / "m.yaml"
    c.write_text("train: {steps: 10, global_batch_size: 4, seq_len: 8}\n"
                 "data:\n  sources:\n    - {name: A, path: nowhere/a, weight: 1.0, tokens: 1000}\n")
    r = megallama("mixture", "--config", str(c))
    assert r.returncode == 0, r.stderr
    assert "for 320 training tokens" in r.stdout, r.stdout


@pytest.mark.parametrize("params,gpus", [(7_000_000_000, 8), (65_285_660_672, 64), (1_000_000, 3)])
def test_zero2_model_states_match_deepspeed(params, gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, ds_gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=False)
    ours = model_state_bytes(params, gpus, zero_stage=2)
    assert sum(ours.values()) == pytest.approx(ds_gpu, abs=1)


@pytest.mark.parametrize("preset,gpus", [("llama-7b", 8), ("llama-65b", 256)])
def test_zero3_model_states_match_deepspeed(preset, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    m = preset_config(preset).model
    total, largest = m.num_parameters(), max(layer_params(m), m.vocab_size * m.dim)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=8,
                                                         num_nodes=gpus // 8, cpu_offload=False)
    ours = model_state_bytes(total, gpus, zero_stage=3, largest_layer_params=largest)
    assert sum(ours.values()) == pytest.approx(ds_gpu, abs=1)


def test_zero_stages_by_hand():
    p, n = 1000, 10
    assert sum(model_state_bytes(p, n, 0).values()) == 20 * p  # 2 + 2 + 4 + 4 + 8
    assert sum(model_state_bytes(p, n, 1).values()) == 4 * p + 16 * p / n
    # fp32: ZeRO-1/2/3 keep DeepSpeed's fp32 partition (4 bytes) beside the moments, ZeRO-3 also a
    # gradient partition (4 bytes); ZeRO-0 steps the parameters themselves
    assert sum(model_state_bytes(p, n, 0, precision="fp32").values()) == 16 * p
    assert sum(model_state_bytes(p, n, 1, precision="fp32").values()) == 8 * p + 12 * p / n
    assert sum(model_state_bytes(p, n, 2, precision="fp32").values()) == 4 * p + 16 * p / n
    assert sum(model_state_bytes(p, n, 3, precision="fp32").values()) == 20 * p / n


def test_activation_formulas_llama_block():
    """The SwiGLU re-derivation of Korthikanti et al. 2022, evaluated by hand for 65B (f = 22016)."""
    m = preset_config("llama-65b").model
    s, b, h, a, f, t = 2048, 1, 8192, 64, 22016, 8
    lay = replace(PAPER_65B, micro_batch_size=b)
    sbh = s * b * h
    lse = 4 * a * s * b
    assert lay.activation_checkpointing == "selective"
    assert activation_bytes_per_layer(m, lay) == pytest.approx((14 * sbh + 4 * s * b * f + lse) / t)
    no_sp = replace(lay, sequence_parallel=False)
    assert activation_bytes_per_layer(m, no_sp) == pytest.approx(6 * sbh + (8 * sbh + 4 * s * b * f + lse) / t)
    kept = replace(lay, activation_checkpointing="none")  # 8sbh + rotated q, k and v 6sbh + attention output 2sbh
    assert activation_bytes_per_layer(m, kept) == pytest.approx((16 * sbh + 6 * s * b * f + lse) / t)
    no_sp = replace(kept, sequence_parallel=False)
    assert activation_bytes_per_layer(m, no_sp) == pytest.approx(8 * sbh + (8 * sbh + 6 * s * b * f + lse) / t)
    eager = replace(lay, flash_attention=False, activation_checkpointing="none")
    assert activation_bytes_per_layer(m, eager) == pytest.approx((16 * sbh + 6 * s * b * f + 2 * a * s * s * b) / t)
    # selective keeps the block input, the 4 linears' and the attention's outputs (no s^2 term)
    selective = replace(eager, activation_checkpointing="selective")
    assert activation_bytes_per_layer(m, selective) == pytest.approx((14 * sbh + 4 * s * b * f) / t)
    assert activation_bytes_per_layer(m, replace(selective, sequence_parallel=False)) == pytest.approx(
        6 * sbh + (8 * sbh + 4 * s * b * f) / t)
    assert activation_bytes_per_layer(m, replace(lay, activation_checkpointing="full")) == pytest.approx(2 * sbh / t)


def test_gqa_shrinks_kv_activations():
    cfg = preset_config("llama-7b")
    gqa = replace(cfg.model, n_kv_heads=8)
    lay = Layout(gpus=8, tp=1, sequence_parallel=False)
    diff = activation_bytes_per_layer(cfg.model, lay) - activation_bytes_per_layer(gqa, lay)
    assert diff == pytest.approx(4 * (1 - 8 / 32) * 2048 * 4096)


def test_calibration_round_trip():
    cfg = preset_config("llama-65b")
    predicted = step_time(cfg.model, PAPER_65B, A100, 0.6)["total"]
    eff = calibrated_efficiency(cfg, PAPER_65B, A100, predicted)
    assert eff == pytest.approx(0.6, rel=1e-6)
    slower = calibrated_efficiency(cfg, PAPER_65B, A100, predicted * 1.5)
    assert slower < 0.6
    assert plan(cfg, PAPER_65B, A100, matmul_efficiency=slower).step_time_s == pytest.approx(predicted * 1.5)
    with pytest.raises(UserError, match="faster than this layout allows"):
        calibrated_efficiency(cfg, PAPER_65B, A100, 0.01)


def test_memory_fit_and_search():
    cfg = preset_config("llama-65b")
    assert not plan(cfg, Layout(gpus=8, global_batch_size=64, zero_stage=1), A100).fits
    found = search(cfg, 512, A100, replace(PAPER_65B, gpus=512))
    assert found and all(e.fits and e.memory_gib_per_gpu * GiB <= A100.memory_bytes for e in found)
    speeds = [e.tokens_per_sec_per_gpu for e in found]
    assert speeds == sorted(speeds, reverse=True)
    assert found[0].tokens_per_sec_per_gpu >= plan(cfg, replace(PAPER_65B, gpus=512), A100).tokens_per_sec_per_gpu


def test_search_pins_the_layout_flags_given():
    """--tp/--pp/--zero/... with --search pin those choices (they were silently ignored)."""
    r = megallama("plan", "--preset", "llama-65b", "--gpus", "512", "--gpu", "A100-80GB", "--search", "--tp", "8",
                  "--zero", "1", "--activation-checkpointing", "full", "--top", "1000", "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found and all(e["layout"]["tp"] == 8 and e["layout"]["zero_stage"] == 1
                         and e["layout"]["activation_checkpointing"] == "full" for e in found), found[:2]
    assert len({e["layout"]["pp"] for e in found}) > 1  # the rest is still searched
    r = megallama("plan", "--preset", "llama-65b", "--gpus", "512", "--gpu", "A100-80GB", "--search", "--tp", "8",
                  "--no-sequence-parallel", "--activation-checkpointing", "none", "--top", "1000", "--json")
    assert r.returncode == 0, r.stderr
    unpinned = json.loads(r.stdout)
    assert unpinned and all(not e["layout"]["sequence_parallel"] and e["layout"]["activation_checkpointing"] == "none"
                            for e in unpinned)


def test_invalid_layout_raises():
    cfg = preset_config("llama-65b")
    with pytest.raises(ConfigError, match="n_heads"):
        plan(cfg, replace(PAPER_65B, tp=3, gpus=3 * 4 * 8), A100)
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp"):
        plan(cfg, replace(PAPER_65B, gpus=100), A100)


def test_cli_json_keys():
    r = megallama("plan", "--preset", "llama-65b", "--gpus", "2048", "--gpu", "A100-80GB", "--tp", "8", "--pp", "4",
                  "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("tokens_per_sec_per_gpu", "mfu", "days", "memory_gib_per_gpu"):
        assert key in out
    assert out["tokens_per_sec_per_gpu"] == pytest.approx(380, rel=0.15)


def test_cli_hardware_file_adds_a_gpu(tmp_path):
    hw = tmp_path / "hw.yaml"
    hw.write_text("MyGPU:\n  peak_bf16_tflops: 624\n  memory_gib: 80\n  hbm_gbps: 2039\n"
                  "  nvlink_gbps: 300\n  network_gbps: 25\n")
    spec = gpu_spec("mygpu", load_gpu_specs(str(hw)))
    assert spec.peak_bf16 == 624e12 and spec.memory_bytes == 80 * GiB
    fast = json.loads(megallama("plan", "--preset", "llama-65b", "--gpus", "2048", "--tp", "8", "--pp", "4",
                                "--gpu", "MyGPU", "--hardware", str(hw), "--json").stdout)
    assert fast["tokens_per_sec_per_gpu"] > 380 * 1.3  # twice the FLOPs, same links


@pytest.mark.parametrize("args,needle", [
    (("--gpus", "8"), "give --preset"),
    (("--preset", "llama-65b", "--gpus", "8", "--gpu", "V100"), "unknown GPU 'V100'"),
    (("--preset", "llama-65b", "--gpus", "48", "--tp", "3"), "n_heads"),
    (("--preset", "llama-65b", "--gpus", "8", "--search"), "no layout"),
    (("--preset", "llama-7b", "--gpus", "8", "--hardware", "/nonexistent.yaml"), "hardware file"),
    (("--preset", "llama-7b", "--gpus", "8", "--calibrate-step-time", "-1"), "must be positive"),
    (("--preset", "llama-7b", "--gpus", "8", "--tp", "0"), "--tp must be >= 1"),
    (("--preset", "llama-7b", "--gpus", "8", "--pp", "0"), "--pp must be >= 1"),
    (("--preset", "llama-7b", "--gpus", "8", "--tp", "0", "--calibrate-step-time", "2"), "--tp must be >= 1"),
    (("--preset", "llama-7b", "--gpus", "8", "--tokens", "-5"), "--tokens must be a positive"),
    (("--preset", "llama-7b", "--gpus", "8", "--search", "--top", "-1"), "--top must be >= 1"),
    (("--preset", "llama-7b", "--gpus", "8", "--fs-bandwidth", "0"), "--fs-bandwidth must be a positive"),
])
def test_cli_errors_exit_2(args, needle):
    r = megallama("plan", *args)
    assert r.returncode == 2, r.stdout
    assert needle in r.stderr and r.stderr.count("\n") == 1


def test_calibrate_from_a_measured_run(tmp_path):
    """A 1B run measured on 8 GPUs calibrates the 65B prediction on 2048."""
    import yaml

    run_cfg = preset_config("llama-1b")
    run_lay = Layout(gpus=8, tp=1, pp=1, zero_stage=1, micro_batch_size=4, seq_len=2048, global_batch_size=512,
                     sequence_parallel=False)
    measured = step_time(run_cfg.model, run_lay, A100, 0.5)["total"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_cfg.to_dict()))
    (tmp_path / "summary.json").write_text(json.dumps(dict(tokens_per_sec=512 * 2048 / measured)))
    r = megallama("plan", "--preset", "llama-65b", "--gpus", "2048", "--tp", "8", "--pp", "4",
                  "--calibrate-from", str(tmp_path), "--calibrate-gpus", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["matmul_efficiency"] == pytest.approx(0.5, rel=1e-6)
    expected = plan(preset_config("llama-65b"), PAPER_65B, A100, matmul_efficiency=0.5)
    assert out["tokens_per_sec_per_gpu"] == pytest.approx(expected.tokens_per_sec_per_gpu)
    r = megallama("plan", "--preset", "llama-7b", "--gpus", "8", "--calibrate-from", str(tmp_path / "nope"))
    assert r.returncode == 2 and "summary.json' does not exist" in r.stderr


def test_fp32_activations_take_twice_the_bytes():
    m = preset_config("llama-7b").model
    lay = Layout(gpus=8, tp=8)
    assert activation_bytes_per_layer(m, replace(lay, precision="fp32")) == \
        pytest.approx(2 * activation_bytes_per_layer(m, lay))


_LOSS_PEAK = """
import sys, torch
from parallel.cross_entropy import linear_cross_entropy
tokens, vocab, chunk = map(int, sys.argv[1:])
dim = 256
gen = torch.Generator().manual_seed(0)
x = (torch.randn(tokens, dim, generator=gen) / 4).requires_grad_()
w = (torch.randn(vocab, dim, generator=gen) / 16).requires_grad_()
target = torch.randint(0, vocab, (tokens,), generator=gen)
linear_cross_entropy(x[:64].detach(), w.detach(), target[:64], chunk=64)  # warm: kernels, thread pools
def status(key):  # kB -> bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the resident high-water mark to the current resident set
before = status("VmRSS:")
linear_cross_entropy(x, w, target, chunk=chunk).backward()
print(status("VmHWM:") - before)
"""


@pytest.mark.parametrize("tokens,vocab,chunk", [(4096, 8192, 512), (8192, 8192, 256), (2048, 16384, 64)])
def test_fused_loss_memory_is_what_the_planner_counts(tokens, vocab, chunk):
    """The planner's loss term against the resident-memory peak of the fused loss (forward and
    backward, fp32) in a fresh process where glibc maps every allocation above 64 KiB, so freed
    memory leaves the resident set at once and its high-water mark is the peak of live tensors.
    MKL adds ~4 MiB of packing buffers here at any of these shapes (allowed: 8; cuBLAS's workspace is in
    the planner's fixed reserve).  Two chunks alive at once (the bug this found) read +16 MiB in the first case.
    bf16 is not compared here: oneDNN's CPU bf16 matmuls reorder their operands into copies."""
    import os

    from tools.planner import fused_loss_bytes

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               MKL_DISABLE_FAST_MM="1")
    r = subprocess.run([sys.executable, "-c", _LOSS_PEAK, str(tokens), str(vocab), str(chunk)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    measured = int(r.stdout)
    expected = fused_loss_bytes(tokens, 256, vocab, 4, 4, chunk)
    # resident pages, not bytes: a few hundred KiB either way between runs (seen: -0.17 to +1.2 MiB)
    assert -0.02 * expected <= measured - expected <= 8 * 2**20, (measured / 2**20, expected / 2**20)


@pytest.mark.parametrize("gpus,needle", [
    ("0", "--calibrate-gpus must be >= 1"),
    ("-1", "--calibrate-gpus must be >= 1"),
    ("3", "--calibrate-gpus"),  # 512 sequences do not split over 3 data-parallel ranks
])
def test_calibrate_gpus_errors_name_calibrate_gpus(tmp_path, gpus, needle):
    """A bad --calibrate-gpus is blamed on --calibrate-gpus (it said '--gpus must be >= 1'), and 0 is no
    longer taken as 'not given' (it silently calibrated on --gpus)."""
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(preset_config("llama-1b").to_dict()))
    (tmp_path / "summary.json").write_text(json.dumps(dict(tokens_per_sec=1e5)))
    r = megallama("plan", "--preset", "llama-7b", "--gpus", "8", "--calibrate-from", str(tmp_path),
                  "--calibrate-gpus", gpus)
    assert r.returncode == 2, r.stdout
    assert needle in r.stderr and "--gpus must" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_calibrate_gpus_without_calibrate_from_is_refused():
    r = megallama("plan", "--preset", "llama-7b", "--gpus", "8", "--calibrate-gpus", "8")
    assert r.returncode == 2 and "--calibrate-gpus only applies with --calibrate-from" in r.stderr


def test_stages_are_trainings_own_partition():
    """The planner's heaviest stage is the one training builds (checkpoint.stage_assignment), for each
    pipeline_partition: 65B (80 blocks) at pp=4 by parameters is 20+20+20+20 blocks with the two
    vocabulary matrices on the end stages; 'uniform' balances the 82 layers (embedding, 80 blocks,
    output) by count, so the second stage holds 21 blocks and no vocabulary matrix."""
    from tools.planner import Layout, layer_params, params_per_gpu, stages

    m = preset_config("llama-65b").model
    lp, vocab = layer_params(m), m.padded_vocab_size(1) * m.dim
    by_params = Layout(gpus=64, pp=4, pipeline_partition="parameters")
    uniform = Layout(gpus=64, pp=4, pipeline_partition="uniform")
    assert stages(m, by_params) == [(20, 1), (20, 0), (20, 0), (20, 1)]
    assert stages(m, uniform) == [(20, 1), (21, 0), (20, 0), (19, 1)]
    assert params_per_gpu(m, by_params) == 20 * lp + vocab + m.dim
    assert params_per_gpu(m, uniform) == 21 * lp + m.dim > params_per_gpu(m, by_params)


def test_checkpoint_size_write_load_and_async_stall():
    """65B at tp=8 pp=4 on 2,048 GPUs: 12 bytes per parameter (fp32 master + 2 moments) = 783 GB; every
    rank writes its 1/2048 share, all sharing the filesystem: 783.4 GB / 100 GB/s = 7.8 s to write and
    the same to load at ZeRO-1; ZeRO-3 still reads whole TP shards (dp = 64 times the bytes); an async
    save stalls for the copy of a rank's 0.38 GB to the host at 25 GB/s."""
    from tools.planner import checkpoint_io

    m = preset_config("llama-65b").model
    size = 12 * m.num_parameters()
    c = checkpoint_io(m, PAPER_65B, fs_bandwidth=100e9, host_bandwidth=25e9)
    assert c["size_gb"] == pytest.approx(size / 1e9) and c["size_gb"] == pytest.approx(783.4, abs=0.1)
    assert c["per_rank_gb"] == pytest.approx(size / 2048 / 1e9)
    assert c["write_s"] == pytest.approx(size / 100e9) == c["load_s"]
    assert c["async_stall_s"] == pytest.approx(size / 2048 / 25e9)
    zero3 = checkpoint_io(m, replace(PAPER_65B, zero_stage=3), fs_bandwidth=100e9)
    assert zero3["load_s"] == pytest.approx(64 * c["load_s"])
    assert checkpoint_io(m, PAPER_65B, fs_bandwidth=50e9)["write_s"] == pytest.approx(2 * c["write_s"])


def test_no_layout_flags_show_the_best_layout_that_fits():
    """`plan` with no layout flags is what `--search` ranks first (it was tp=1 pp=1, DOES NOT FIT),
    and says so; --fs-bandwidth reaches the checkpoint figures."""
    args = ("plan", "--preset", "llama-65b", "--gpus", "2048", "--gpu", "A100-80GB", "--json")
    best, ranked = (megallama(*args, *extra) for extra in ((), ("--search", "--top", "1")))
    assert best.returncode == 0 and ranked.returncode == 0, best.stderr + ranked.stderr
    best, first = json.loads(best.stdout), json.loads(ranked.stdout)[0]
    assert best.pop("chosen").startswith("best layout that fits") and best == first
    assert best["memory_gib_per_gpu"] <= 80 and best["layout"]["tp"] * best["layout"]["pp"] > 1
    text = megallama(*args[:-1], "--fs-bandwidth", "50")
    assert text.returncode == 0 and "the best layout that fits" in text.stdout.splitlines()[0], text.stderr
    assert "at 50 GB/s: write 15.7 s" in text.stdout


def test_layout_is_the_configs_fields():
    """The planner's Layout carries the training config's own names; from_config then apply is the
    identity on a config (one mapping, no restated names), and overrides win over the config."""
    import dataclasses

    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=2",
                             "train.activation_checkpointing=full", "parallel.pipeline_partition=flops"], preset="llama-7b")
    lay = Layout.from_config(cfg, 16)
    assert (lay.tp, lay.pp, lay.micro_batch_size, lay.activation_checkpointing, lay.pipeline_partition) == \
           (2, 2, 2, "full", "flops")
    names = {f.name for f in dataclasses.fields(Layout)} - {"gpus", "flash_attention"}
    config_names = {f.name for section in (cfg.parallel, cfg.train) for f in dataclasses.fields(section)}
    assert names <= config_names, names - config_names
    assert lay.apply(cfg) == cfg
    assert Layout.from_config(cfg, 16, tp=4, micro_batch_size=None).tp == 4
