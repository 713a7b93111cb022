"""Planner predictions against the LLaMA paper: GPU-hours of Table 15 and the 65B throughput.

    python benchmarks/planner_vs_paper.py

Each model on 2048 A100-80GB with the paper's 4M-token batch and a Megatron-style
layout (tensor parallel inside a node, sequence parallelism, selective recompute,
ZeRO-1); the token budgets are the paper's (1T for 7B/13B, 1.4T for 33B/65B).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an installed copy

from megallama.config import preset_config  # noqa: E402
from megallama.hardware import gpu_spec  # noqa: E402
from tools.carbon import PAPER_TABLE15  # noqa: E402
from tools.planner import Layout, plan  # noqa: E402

LAYOUTS = {"llama-7b": (8, 1), "llama-13b": (8, 2), "llama-33b": (4, 4), "llama-65b": (8, 4)}


def main() -> None:
    gpu = gpu_spec("A100-80GB")
    print(f"{'model':<11}{'tp':>3}{'pp':>3}{'tok/s/GPU':>11}{'MFU':>7}{'days':>7}{'GPU-hours':>12}"
          f"{'paper':>12}{'ratio':>7}{'MWh':>7}{'tCO2eq':>8}")
    for name, (tp, pp) in LAYOUTS.items():
        cfg = preset_config(name)
        est = plan(cfg, Layout(gpus=2048, tp=tp, pp=pp), gpu)
        paper_hours = PAPER_TABLE15[name][0]
        print(f"{name:<11}{tp:>3}{pp:>3}{est.tokens_per_sec_per_gpu:>11.0f}{100 * est.mfu:>6.1f}%{est.days:>7.1f}"
              f"{est.gpu_hours:>12,.0f}{paper_hours:>12,}{est.gpu_hours / paper_hours:>7.2f}"
              f"{est.mwh:>7.0f}{est.tco2eq:>8.0f}")


if __name__ == "__main__":
    main()
