"""EnergyMeter: RAPL with wraparound, NVML (counter and integrated power), nominal fallback."""

import json
import sys
import types

import pytest

from megallama.energy import EnergyMeter, write_summary
from megallama.hardware import match_gpu_name


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make_rapl(root, zones):
    for name, (energy, max_range) in zones.items():
        z = root / name
        z.mkdir(parents=True)
        (z / "energy_uj").write_text(str(energy))
        (z / "max_energy_range_uj").write_text(str(max_range))


def test_rapl_sums_packages_and_handles_wraparound(tmp_path):
    make_rapl(tmp_path, {"intel-rapl:0": (900_000_000, 1_000_000_000), "intel-rapl:1": (5, 1_000_000_000),
                         "intel-rapl:0:0": (123, 1_000_000_000)})  # a subzone: must not be counted
    m = EnergyMeter("cpu", powercap_root=tmp_path).start()
    assert m.source == "rapl"
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("950000000")  # +50 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("2000005")  # +2 J
    assert m.sample() == pytest.approx(52.0)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("10000000")  # wrapped: +50 J + 10 J
    assert m.sample() == pytest.approx(112.0)


def test_unreadable_rapl_falls_back_to_nominal_and_says_so(tmp_path):
    clock = Clock()
    m = EnergyMeter("cpu", nominal_power_w=50.0, clock=clock, powercap_root=tmp_path).start()
    assert m.source == "nominal (50 W, not measured)"
    clock.t += 7200  # two hours at 50 W = 0.1 kWh
    s = m.summary(intensity_kg_per_kwh=0.5, pue=1.2)
    assert s["device_kwh"] == pytest.approx(0.1)
    assert s["kwh"] == pytest.approx(0.12)
    assert s["tco2eq"] == pytest.approx(0.12 / 1000 * 0.5)
    assert s["source"].startswith("nominal")


def fake_pynvml(counter: bool, power_mw: list):
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    state = {"mj": 1_000_000}
    mod.NVMLError = NVMLError
    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetHandleByIndex = lambda i: i

    def total(h):
        if not counter:
            raise NVMLError("not supported")
        return state["mj"]

    mod.nvmlDeviceGetTotalEnergyConsumption = total
    mod.nvmlDeviceGetPowerUsage = lambda h: power_mw.pop(0)
    return mod, state


def test_nvml_energy_counter(monkeypatch):
    mod, state = fake_pynvml(counter=True, power_mw=[])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    m = EnergyMeter("cuda:1", nominal_power_w=400).start()
    assert m.source == "nvml"
    state["mj"] += 3_600_000  # 3600 J
    assert m.sample() == pytest.approx(3600.0)


def test_nvml_power_is_integrated_by_trapezoid(monkeypatch):
    mod, _ = fake_pynvml(counter=False, power_mw=[100_000, 300_000, 300_000])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    clock = Clock()
    m = EnergyMeter("cuda", nominal_power_w=400, clock=clock).start()
    clock.t += 10
    assert m.sample() == pytest.approx(10 * (100 + 300) / 2)
    clock.t += 5
    assert m.sample() == pytest.approx(2000 + 5 * 300)


def test_gpu_without_pynvml_is_nominal(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    m = EnergyMeter("cuda", nominal_power_w=400).start()
    assert m.source == "nominal (400 W, not measured)"


def test_write_summary_scales_by_world_size(tmp_path):
    clock = Clock()
    m = EnergyMeter("cpu", nominal_power_w=100.0, clock=clock, powercap_root=tmp_path / "none").start()
    clock.t += 3600
    s = write_summary(tmp_path, m, 0.385, 1.1, world_size=4)
    on_disk = json.loads((tmp_path / "energy.json").read_text())
    assert on_disk == s
    assert s["device_kwh"] == pytest.approx(0.4) and s["kwh"] == pytest.approx(0.44)
    assert s["device_hours"] == pytest.approx(4.0)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_cpu_meter_is_scaled_by_hosts_not_ranks(tmp_path, monkeypatch):
    """A CPU meter reads the whole host (RAPL, or all its cores at nominal power): 4 ranks on 1 host
    used the host's energy once, not 4 times; on 2 hosts twice.  A GPU meter is per rank."""
    clock = Clock()
    m = EnergyMeter("cpu", nominal_power_w=100.0, clock=clock, powercap_root=tmp_path / "none").start()
    clock.t += 3600
    assert write_summary(tmp_path, m, 0.385, 1.0, world_size=4, hosts=1)["device_kwh"] == pytest.approx(0.1)
    assert write_summary(tmp_path, m, 0.385, 1.0, world_size=4, hosts=2)["device_kwh"] == pytest.approx(0.2)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    g = EnergyMeter("cuda", nominal_power_w=100.0, clock=clock).start()
    clock.t += 3600
    assert write_summary(tmp_path, g, 0.385, 1.0, world_size=4, hosts=1)["device_kwh"] == pytest.approx(0.4)


@pytest.mark.parametrize("name,spec", [
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100-PCIE-40GB", "A100-40GB"), ("NVIDIA H100 80GB HBM3", "H100-80GB"),
    ("NVIDIA H200", "H200"), ("Tesla T4", None),
    ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None)])  # not the SXM5 peak the table holds
def test_match_gpu_name(name, spec):
    got = match_gpu_name(name)
    assert (got.name if got else None) == spec
