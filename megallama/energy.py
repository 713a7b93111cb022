"""Measured energy of a training process: NVML on GPUs, RAPL on CPUs, nominal power otherwise.

The trainer creates one :class:`EnergyMeter` per process, calls :meth:`start`
before the first step, :meth:`sample` at each log interval (the cumulative
joules go to TensorBoard via :meth:`tensorboard_scalars`) and
:func:`write_summary` at the end, which leaves ``energy.json`` (kWh, tCO2eq,
source) in the run directory.  ``megallama carbon --run DIR`` puts that figure
next to the paper-way estimate.

Sources, best first:

* ``nvml``: the GPU's cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  Volta and newer), else its power reading integrated over time (trapezoid rule).
  Used only when ``pynvml`` is importable; it is not a dependency.
* ``rapl``: Intel/AMD RAPL package counters in ``/sys/class/powercap/intel-rapl:N/energy_uj``
  (all packages of the machine, wraparound handled with ``max_energy_range_uj``).
  Usually unreadable inside containers, hence the fallback.
* ``nominal (<W> W, not measured)``: elapsed time x the device's nominal power
  (the GPU table's board power, or 10 W per CPU core), and said so.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

from megallama.atomic import write_text
from megallama.hardware import detect_gpu_spec

CPU_WATTS_PER_CORE = 10.0  # rough nominal figure for a server core when nothing is measurable
DEFAULT_GPU_WATTS = 400.0
POWERCAP = Path("/sys/class/powercap")


class _RaplCounter:
    """Sum of the package-level RAPL energy counters, in joules, with wraparound."""

    def __init__(self, root: Path):
        self.zones = [z for z in sorted(root.glob("intel-rapl:*")) if re.fullmatch(r"intel-rapl:\d+", z.name)]
        if not self.zones:
            raise OSError("no RAPL package zones")
        self.max_uj = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self.last = self._read()
        self.total_uj = 0

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def joules(self) -> float:
        now = self._read()
        for i, (prev, cur) in enumerate(zip(self.last, now)):
            self.total_uj += cur - prev if cur >= prev else cur + self.max_uj[i] - prev
        self.last = now
        return self.total_uj / 1e6


class _NvmlCounter:
    """One GPU's energy via NVML: the hardware counter if present, else integrated power."""

    def __init__(self, index: int, clock: Callable[[], float]):
        import pynvml  # optional; ImportError means "not available"

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.clock = clock
        try:
            self.start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter = True
        except pynvml.NVMLError:
            self.counter = False
            self.last_t, self.last_w = clock(), self._watts()
            self.total_j = 0.0

    def _watts(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def joules(self) -> float:
        if self.counter:
            return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.start_mj) / 1000.0
        t, w = self.clock(), self._watts()
        self.total_j += (t - self.last_t) * (w + self.last_w) / 2
        self.last_t, self.last_w = t, w
        return self.total_j


class EnergyMeter:
    """Cumulative energy of ``device`` ("cpu", "cuda" or "cuda:N") since :meth:`start`."""

    def __init__(self, device: str = "cpu", nominal_power_w: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, powercap_root: Path = POWERCAP):
        self.device = str(device)
        self.clock = clock
        self.powercap_root = Path(powercap_root)
        self.nominal_power_w = nominal_power_w if nominal_power_w is not None else self._nominal_power()
        self._counter = None
        self.source = f"nominal ({self.nominal_power_w:g} W, not measured)"
        self._t0: Optional[float] = None
        self._joules = 0.0

    def _is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def _nominal_power(self) -> float:
        if self._is_gpu():
            spec = detect_gpu_spec()
            return spec.power_w if spec else DEFAULT_GPU_WATTS
        return CPU_WATTS_PER_CORE * (os.cpu_count() or 1)

    def start(self) -> "EnergyMeter":
        """Pick the best readable source and zero the count."""
        self._counter = None
        try:
            if self._is_gpu():
                index = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
                self._counter = _NvmlCounter(index, self.clock)
                self.source = "nvml"
            else:
                self._counter = _RaplCounter(self.powercap_root)
                self.source = "rapl"
        except Exception:  # unreadable counters (containers, no pynvml, old GPU): fall back, and say so
            self._counter = None
            self.source = f"nominal ({self.nominal_power_w:g} W, not measured)"
        self._t0 = self.clock()
        self._joules = 0.0
        return self

    def sample(self) -> float:
        """Joules since :meth:`start` (cumulative)."""
        if self._t0 is None:
            self.start()
        if self._counter is not None:
            self._joules = self._counter.joules()
        else:
            self._joules = (self.clock() - self._t0) * self.nominal_power_w
        return self._joules

    def elapsed_s(self) -> float:
        return 0.0 if self._t0 is None else self.clock() - self._t0

    def tensorboard_scalars(self) -> dict[str, float]:
        """Scalars for the trainer to log: cumulative kWh and the average power so far."""
        j = self.sample()
        t = self.elapsed_s()
        return {"energy/kwh": j / 3.6e6, "energy/avg_power_w": j / t if t > 0 else 0.0}

    def summary(self, intensity_kg_per_kwh: float = 0.385, pue: float = 1.1) -> dict:
        """Device energy x PUE = facility kWh, and its emissions (the paper's formula)."""
        device_kwh = self.sample() / 3.6e6
        kwh = device_kwh * pue
        return dict(kwh=kwh, tco2eq=kwh / 1000 * intensity_kg_per_kwh, source=self.source,
                    device_kwh=device_kwh, pue=pue, intensity_kg_per_kwh=intensity_kg_per_kwh,
                    seconds=self.elapsed_s(), device_hours=self.elapsed_s() / 3600,
                    nominal_power_w=self.nominal_power_w, device=self.device)


def write_summary(run_dir, meter: EnergyMeter, intensity_kg_per_kwh: float = 0.385, pue: float = 1.1,
                  world_size: int = 1, hosts: Optional[int] = None) -> dict:
    """Write ``energy.json`` atomically: rank 0's figure scaled to the whole job.

    Called on rank 0.  Every rank runs the same work on the same kind of device, so a GPU job's
    energy is rank 0's (its own GPU) times ``world_size``.  A CPU meter reads the whole host (RAPL's
    package counters, or all its cores at nominal power), which every rank on that host shares:
    the job's energy is then rank 0's times the number of ``hosts`` (``None``: one rank per host).
    """
    s = meter.summary(intensity_kg_per_kwh, pue)
    scale = world_size if meter._is_gpu() or hosts is None else hosts
    for key in ("kwh", "tco2eq", "device_kwh", "device_hours"):
        s[key] *= scale
    s["world_size"] = world_size
    s["scaled_by"] = scale
    path = Path(run_dir) / "energy.json"
    write_text(path, json.dumps(s, indent=1) + "\n")
    return s

