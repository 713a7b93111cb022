"""`megallama plan`: memory, step time, throughput, MFU and days of a training layout (see tools/planner.py)."""

from __future__ import annotations

import json
import math

from megallama.config import Config, load_config
from megallama.errors import UserError
from megallama.hardware import gpu_spec, load_gpu_specs
from megallama.config import ACTIVATION_CHECKPOINTING
from tools.planner import (FS_BANDWIDTH, Estimate, Layout, calibrated_efficiency, check_layout, measured_run, plan,
                           search)


def add_arguments(p):
    p.add_argument("--preset", default=None, help="model preset (see 'megallama presets')")
    p.add_argument("--config", default=None, help="a training YAML instead of (or on top of) --preset")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", default="A100-80GB", help="GPU kind: A100-40GB, A100-80GB, H100-80GB, H200, ...")
    p.add_argument("--hardware", default=None, metavar="YAML", help="extra GPU kinds (see docs/planning.md)")
    p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the config's)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: the config's)")
    p.add_argument("--zero", type=int, default=None, help="ZeRO stage 0-3 (default: the config's)")
    p.add_argument("--micro-batch-size", "--micro-batch", type=int, default=None, metavar="N",
                   help="sequences per micro-batch (train.micro_batch_size)")
    p.add_argument("--global-batch-size", "--global-batch", type=int, default=None, metavar="N",
                   help="sequences per optimizer step (train.global_batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length")
    p.add_argument("--activation-checkpointing", "--checkpointing", default=None, choices=ACTIVATION_CHECKPOINTING,
                   help="activation recomputation (train.activation_checkpointing)")
    p.add_argument("--no-sequence-parallel", action="store_true", help="replicate norm/dropout activations over tp")
    p.add_argument("--eager-attention", action="store_true",
                   help="attention stores its s x s probabilities (default: memory-efficient attention)")
    p.add_argument("--tokens", type=float, default=None, help="token budget for 'days' (default: the config's, train.tokens "
                   "or train.steps x global batch x seq_len)")
    p.add_argument("--calibrate-step-time", type=float, default=None, metavar="SECONDS",
                   help="a step time measured with this layout on this machine: fit the matmul efficiency to it")
    p.add_argument("--calibrate-from", default=None, metavar="RUN_DIR",
                   help="a finished run measured on this GPU kind: fit the matmul efficiency to its step time")
    p.add_argument("--calibrate-gpus", type=int, default=None,
                   help="GPUs the --calibrate-from run used (default: --gpus)")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit by predicted throughput")
    p.add_argument("--top", type=int, default=10, help="how many layouts --search prints")
    p.add_argument("--fs-bandwidth", type=float, default=FS_BANDWIDTH / 1e9, metavar="GB/S",
                   help=f"aggregate filesystem bandwidth for checkpoint write/load times (default {FS_BANDWIDTH / 1e9:g}: "
                        "a mid-size parallel filesystem; docs/planning.md)")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")


def _layout_from_args(cfg: Config, args) -> Layout:
    return Layout.from_config(cfg, args.gpus, tp=args.tp, pp=args.pp, zero_stage=args.zero,
                              micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                              global_batch_size=args.global_batch_size,
                              activation_checkpointing=args.activation_checkpointing,
                              sequence_parallel=not args.no_sequence_parallel, flash_attention=not args.eager_attention)


def run(args) -> int:
    if not args.preset and not args.config:
        raise UserError("give --preset NAME (see 'megallama presets') or --config FILE")
    cfg = load_config(args.config, preset=args.preset)
    gpu = gpu_spec(args.gpu, load_gpu_specs(args.hardware))
    lay = _layout_from_args(cfg, args)
    if args.tokens is not None and not (args.tokens >= 1 and math.isfinite(args.tokens)):
        raise UserError(f"--tokens must be a positive token budget (e.g. 1.4e12), got {args.tokens:g}")
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    if not (args.fs_bandwidth > 0 and math.isfinite(args.fs_bandwidth)):
        raise UserError(f"--fs-bandwidth must be a positive GB/s figure (e.g. 100), got {args.fs_bandwidth:g}")
    fs = args.fs_bandwidth * 1e9
    tokens = None if args.tokens is None else int(args.tokens)
    eff = None
    if args.calibrate_step_time is not None and args.calibrate_from:
        raise UserError("give either --calibrate-step-time or --calibrate-from, not both")
    if args.calibrate_step_time is not None:
        check_layout(cfg, lay)
        eff = calibrated_efficiency(cfg, lay, gpu, args.calibrate_step_time)
    if args.calibrate_gpus is not None and not args.calibrate_from:
        raise UserError("--calibrate-gpus only applies with --calibrate-from RUN_DIR; add it or drop --calibrate-gpus")
    if args.calibrate_gpus is not None and args.calibrate_gpus < 1:
        raise UserError(f"--calibrate-gpus must be >= 1 (the GPUs the --calibrate-from run used), got {args.calibrate_gpus}")
    if args.calibrate_from:
        run_cfg, run_lay, step_s = measured_run(args.calibrate_from,
                                                args.gpus if args.calibrate_gpus is None else args.calibrate_gpus)
        eff = calibrated_efficiency(run_cfg, run_lay, gpu, step_s)
    pinned = {"tp": args.tp, "pp": args.pp, "zero_stage": args.zero, "micro_batch_size": args.micro_batch_size,
              "activation_checkpointing": args.activation_checkpointing,
              "sequence_parallel": False if args.no_sequence_parallel else None}
    no_layout = not args.config and args.calibrate_step_time is None and all(v is None for v in pinned.values())
    if args.search or no_layout:
        found = search(cfg, args.gpus, gpu, lay, tokens, eff, {k: v for k, v in pinned.items() if v is not None}, fs)
        if not found:
            raise UserError(f"no layout of {cfg.preset or 'this model'} fits {args.gpus} x {gpu.name}; "
                            "add GPUs, pick a larger GPU or lower --seq-len")
        if not args.search:  # no layout given: the best one that fits, as --search ranks it first
            if args.json:
                print(json.dumps(dict(found[0].to_dict(), chosen="best layout that fits (--search ranks it first)")))
            else:
                print("no layout given (--tp/--pp/--zero/--micro-batch-size/--activation-checkpointing): the best layout that fits, "
                      "as 'megallama plan --search' ranks it first")
                _print_estimate(found[0])
            return 0
        if args.json:
            print(json.dumps([e.to_dict() for e in found[:args.top]]))
        else:
            _print_table(found[:args.top])
        return 0
    est = plan(cfg, lay, gpu, tokens, eff, fs)
    if args.json:
        print(json.dumps(est.to_dict()))
    else:
        _print_estimate(est)
    return 0


def _print_estimate(e: Estimate) -> None:
    lay = e.layout
    size = f"{e.params / 1e9:.2f}B" if e.params >= 1e9 else f"{e.params / 1e6:.2f}M"
    print(f"{size} parameters on {lay.gpus} x {e.gpu}: tp={lay.tp} pp={lay.pp} dp={lay.dp} "
          f"zero={lay.zero_stage} micro-batch={lay.micro_batch_size} x {lay.micro_batches} "
          f"seq={lay.seq_len} checkpointing={lay.activation_checkpointing} sp={lay.sp}")
    print(f"memory per GPU  {e.memory_gib_per_gpu:8.2f} GiB  ({'fits' if e.fits else 'DOES NOT FIT'})")
    for k, v in e.memory_breakdown_gib.items():
        print(f"  {k:<14}{v:10.2f} GiB")
    print(f"step time       {e.step_time_s:8.3f} s  (pipeline bubble {100 * e.bubble_fraction:.1f}%, "
          f"matmul efficiency {e.matmul_efficiency:.2f})")
    for k, v in e.time_breakdown_s.items():
        if k != "total":
            print(f"  {k:<14}{v:10.3f} s")
    print(f"tokens/s/GPU    {e.tokens_per_sec_per_gpu:8.1f}   MFU {100 * e.mfu:.1f}%")
    print(f"{e.tokens / 1e9:,.0f}B tokens: {e.days:.1f} days, {e.gpu_hours:,.0f} GPU-hours, "
          f"{e.mwh:,.1f} MWh, {e.tco2eq:,.1f} tCO2eq (PUE 1.1, 0.385 kg/kWh)")
    c = e.checkpoint
    print(f"checkpoint      {c['size_gb']:8.1f} GB  ({c['per_rank_gb']:.2f} GB written per rank); at "
          f"{c['fs_bandwidth_gb_s']:g} GB/s: write {c['write_s']:.1f} s, load {c['load_s']:.1f} s, "
          f"async-save stall {c['async_stall_s']:.2f} s")


def _print_table(found: list[Estimate]) -> None:
    head = f"{'tp':>3}{'pp':>4}{'dp':>6}{'zero':>5}{'mb':>4}{'ckpt':>10}{'mem GiB':>9}{'tok/s/GPU':>11}{'MFU':>7}{'days':>8}"
    print(head)
    for e in found:
        lay = e.layout
        print(f"{lay.tp:>3}{lay.pp:>4}{lay.dp:>6}{lay.zero_stage:>5}{lay.micro_batch_size:>4}{lay.activation_checkpointing:>10}"
              f"{e.memory_gib_per_gpu:>9.1f}{e.tokens_per_sec_per_gpu:>11.1f}{100 * e.mfu:>6.1f}%{e.days:>8.1f}")
