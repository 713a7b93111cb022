"""Carbon accounting: the paper's Table 15, options, and one-line errors (exit 2)."""

import json
import subprocess
import sys

import pytest

from tools.carbon import PAPER_TABLE15, REGIONS, estimate


def megallama(*args):
    return subprocess.run([sys.executable, "-m", "megallama", *args], capture_output=True, text=True)


@pytest.mark.parametrize("model", list(PAPER_TABLE15))
def test_reproduces_paper_table15(model):
    hours, mwh, tco2 = PAPER_TABLE15[model]
    est = estimate(hours)  # 400 W, PUE 1.1, 0.385 kg/kWh
    # The paper's MWh column is truncated (65B: 449.8 -> 449); its tCO2eq is rounded.
    assert int(est.mwh) == mwh
    assert round(est.tco2eq) == tco2


def test_formula_by_hand():
    est = estimate(1000, power_w=300, pue=1.2, intensity_kg_per_kwh=0.5)
    assert est.mwh == pytest.approx(1000 * 300 * 1.2 / 1e6)
    assert est.tco2eq == pytest.approx(0.36 * 0.5)


def test_cli_json_65b():
    r = megallama("carbon", "--gpu-hours", "1022362", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mwh"] == pytest.approx(449.83928)
    assert out["tco2eq"] == pytest.approx(449.83928 * 0.385)


def test_cli_region_and_paper_table():
    r = megallama("carbon", "--gpu-hours", "1000", "--region", "france", "--json")
    assert json.loads(r.stdout)["intensity_kg_per_kwh"] == REGIONS["france"]
    r = megallama("carbon", "--paper-table", "--json")
    rows = json.loads(r.stdout)
    assert [int(x["mwh"]) for x in rows] == [36, 59, 233, 449]


@pytest.mark.parametrize("args,needle", [
    ((), "give --gpu-hours"),
    (("--gpu-hours", "-5"), "--gpu-hours must be a non-negative number"),
    (("--gpu-hours", "5", "--pue", "0.9"), "--pue must be >= 1"),
    (("--gpu-hours", "5", "--region", "mars"), "unknown region 'mars'"),
    (("--gpu-hours", "5", "--gpu", "V100"), "unknown GPU 'V100'"),
    (("--run", "/nonexistent/run"), "energy.json' does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    r = megallama("carbon", *args)
    assert r.returncode == 2
    assert needle in r.stderr and r.stderr.count("\n") == 1


def test_run_dir_measured_next_to_estimate(tmp_path):
    (tmp_path / "energy.json").write_text(json.dumps(dict(
        device_kwh=2.0, device_hours=5.0, nominal_power_w=400.0, source="nvml")))
    r = megallama("carbon", "--run", str(tmp_path), "--json")
    out = json.loads(r.stdout)
    assert out["measured_mwh"] == pytest.approx(2.0 * 1.1 / 1000)
    assert out["estimated_mwh"] == pytest.approx(5.0 * 400 * 1.1 / 1e6)
    assert out["source"] == "nvml"
