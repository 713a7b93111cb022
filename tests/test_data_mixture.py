"""`megallama mixture` reproduces the paper's Table 1 epochs; built datasets report their real size."""

import subprocess
import sys

import pytest

from megallama.config import load_config
from megallama.data.pipeline import SourcePlan
from tools.mixture import DEFAULT_CONFIG, plan_mixture

# Touvron et al. 2023, Table 1: sampling proportion (%) and epochs at 1.4T tokens.
TABLE1 = {"CommonCrawl": (67.0, 1.10), "C4": (15.0, 1.06), "Github": (4.5, 0.64), "Wikipedia": (4.5, 2.45),
          "Books": (4.5, 2.23), "ArXiv": (2.5, 1.06), "StackExchange": (2.0, 1.03)}


def test_shipped_config_is_table1():
    cfg = load_config(str(DEFAULT_CONFIG))
    plan = plan_mixture(cfg.data.sources, cfg.train.tokens)
    assert cfg.train.tokens == 1_400_000_000_000
    assert {p.name: (round(100 * p.weight, 1), round(p.epochs, 2)) for p in plan} == TABLE1


def test_cli_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "megallama", "mixture"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[3:]}
    assert {name: (float(row[1].rstrip("%")), float(row[-1])) for name, row in rows.items()} == TABLE1


def test_epochs_scale_with_budget():
    assert SourcePlan("x", 0.5, 100, 250).epochs == pytest.approx(2.5)
    cfg = load_config(str(DEFAULT_CONFIG))
    half = plan_mixture(cfg.data.sources, 700_000_000_000)
    assert [round(p.epochs, 3) for p in half] == [round(p.sampled_tokens / p.tokens, 3) for p in half]
    assert half[0].sampled_tokens == 469_000_000_000


def test_missing_size_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"data:\n  sources:\n    - {{name: web, path: {tmp_path / 'nothing'}, weight: 1}}\n")
    r = subprocess.run([sys.executable, "-m", "megallama", "mixture", "--config", str(cfg), "--tokens", "1e9"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == (f"megallama mixture: error: source 'web' has no built dataset at '{tmp_path / 'nothing'}.idx' "
                        "and no 'tokens' size; preprocess it or give its size in tokens\n")


@pytest.mark.parametrize("weights", [(0, 0), (-1, 2), (1, float("nan"))])
def test_non_positive_weight_is_a_one_line_error(tmp_path, weights):
    cfg = tmp_path / "m.yaml"
    rows = "".join(f"    - {{name: s{i}, path: {tmp_path / f's{i}'}, weight: {w if w == w else '.nan'}, tokens: 1000}}\n"
                   for i, w in enumerate(weights))
    cfg.write_text("data:\n  sources:\n" + rows)
    r = subprocess.run([sys.executable, "-m", "megallama", "mixture", "--config", str(cfg), "--tokens", "1e6"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert "weight must be positive, got" in r.stderr and f"fix it in '{cfg}'" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("tokens", ["nan", "inf", "0", "-5"])
def test_bad_token_budget_is_a_one_line_error(tokens):
    r = subprocess.run([sys.executable, "-m", "megallama", "mixture", "--tokens", tokens], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("megallama mixture: error: --tokens must be a positive number of tokens, got ")
    assert len(r.stderr.splitlines()) == 1
