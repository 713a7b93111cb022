"""`megallama carbon`: energy and CO2 of a training run, the paper's way (Touvron et al. 2023, sec. 5).

    Wh     = GPU-hours x GPU power (W) x PUE          (PUE 1.1, A100-80GB at 400 W)
    tCO2eq = MWh x carbon intensity (t/MWh = kg/kWh)  (0.385, the US national average)

With ``--run DIR`` it prints the energy measured during training (the run's
``energy.json``, written by :class:`megallama.energy.EnergyMeter`) next to the
estimate for the same GPU-hours, so the two can be compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megallama.errors import UserError

PAPER_PUE = 1.1
PAPER_INTENSITY = 0.385  # kg CO2eq / kWh, US national average (the paper's choice)
PAPER_POWER_W = 400.0  # A100-80GB board power used by the paper

# Approximate yearly-average grid intensities (kg CO2eq per kWh) for a quick what-if;
# grids change year to year, so pass --intensity with your provider's figure when you have it.
REGIONS: dict[str, float] = {
    "us": PAPER_INTENSITY,  # the paper's figure
    "eu": 0.25,
    "france": 0.056,
    "germany": 0.38,
    "uk": 0.20,
    "sweden": 0.013,
    "quebec": 0.002,
    "poland": 0.75,
    "india": 0.71,
    "china": 0.58,
}

# The paper's Table 15: GPU-hours, MWh and tCO2eq for each LLaMA model (A100-80GB, 400 W).
PAPER_TABLE15 = {
    "llama-7b": (82_432, 36, 14),
    "llama-13b": (135_168, 59, 23),
    "llama-33b": (530_432, 233, 90),
    "llama-65b": (1_022_362, 449, 173),
}


@dataclass(frozen=True)
class CarbonEstimate:
    gpu_hours: float
    power_w: float
    pue: float
    intensity_kg_per_kwh: float
    mwh: float
    tco2eq: float


def estimate(gpu_hours: float, power_w: float = PAPER_POWER_W, pue: float = PAPER_PUE,
             intensity_kg_per_kwh: float = PAPER_INTENSITY) -> CarbonEstimate:
    """The paper's formula; every input must be a finite non-negative number (PUE >= 1)."""
    for name, value in (("gpu-hours", gpu_hours), ("power-w", power_w), ("intensity", intensity_kg_per_kwh)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name} must be a non-negative number, got {value}")
    if not (math.isfinite(pue) and pue >= 1):
        raise UserError(f"--pue must be >= 1 (1.0 = no datacenter overhead), got {pue}")
    mwh = gpu_hours * power_w * pue / 1e6
    return CarbonEstimate(gpu_hours, power_w, pue, intensity_kg_per_kwh, mwh, emissions_t(mwh, intensity_kg_per_kwh))


def emissions_t(mwh: float, intensity_kg_per_kwh: float) -> float:
    """Tonnes CO2eq: kg/kWh is the same number as t/MWh."""
    return mwh * intensity_kg_per_kwh


def resolve_intensity(intensity: Optional[float], region: Optional[str]) -> float:
    if intensity is not None and region is not None:
        raise UserError("give either --intensity or --region, not both")
    if region is not None:
        if region.lower() not in REGIONS:
            raise UserError(f"unknown region '{region}'; choose one of: {', '.join(REGIONS)} "
                            "(or pass --intensity KG_PER_KWH)")
        return REGIONS[region.lower()]
    return PAPER_INTENSITY if intensity is None else intensity
