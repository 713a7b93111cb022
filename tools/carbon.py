"""`megallama carbon`: energy and CO2 of a training run, the paper's way (Touvron et al. 2023, sec. 5).

    Wh     = GPU-hours x GPU power (W) x PUE          (PUE 1.1, A100-80GB at 400 W)
    tCO2eq = MWh x carbon intensity (t/MWh = kg/kWh)  (0.385, the US national average)

With ``--run DIR`` it prints the energy measured during training (the run's
``energy.json``, written by :class:`megallama.energy.EnergyMeter`) next to the
estimate for the same GPU-hours, so the two can be compared.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megallama.errors import UserError
from megallama.hardware import gpu_spec

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


def add_arguments(p):
    p.add_argument("--gpu-hours", type=float, help="GPU-hours of the run (e.g. 1022362 for LLaMA-65B)")
    p.add_argument("--gpu", default=None, help="GPU kind whose board power to use (default: 400 W, the paper's A100)")
    p.add_argument("--power-w", type=float, default=None, help="average power per GPU in watts (overrides --gpu)")
    p.add_argument("--pue", type=float, default=PAPER_PUE, help="datacenter power usage effectiveness (default 1.1)")
    p.add_argument("--intensity", type=float, default=None,
                   help="grid carbon intensity in kg CO2eq per kWh (default 0.385, US average)")
    p.add_argument("--region", default=None, help=f"use a region's approximate intensity: {', '.join(REGIONS)}")
    p.add_argument("--paper-table", action="store_true", help="reproduce the paper's Table 15")
    p.add_argument("--run", default=None, metavar="DIR",
                   help="a run directory: measured energy (energy.json) next to the estimate")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys mwh, tco2eq, ...)")


def run(args) -> int:
    intensity = resolve_intensity(args.intensity, args.region)
    power = args.power_w if args.power_w is not None else (
        gpu_spec(args.gpu).power_w if args.gpu else PAPER_POWER_W)
    if args.paper_table:
        return _print_paper_table(power, args.pue, intensity, args.json)
    if args.run:
        return _print_run(Path(args.run), args, intensity)
    if args.gpu_hours is None:
        raise UserError("give --gpu-hours H (or --paper-table, or --run DIR); e.g. --gpu-hours 1022362")
    est = estimate(args.gpu_hours, power, args.pue, intensity)
    if args.json:
        print(json.dumps(asdict(est)))
    else:
        print(f"{est.gpu_hours:,.0f} GPU-hours x {est.power_w:g} W x PUE {est.pue:g} = {est.mwh:,.1f} MWh; "
              f"x {est.intensity_kg_per_kwh:g} kg/kWh = {est.tco2eq:,.1f} tCO2eq")
    return 0


def _print_paper_table(power, pue, intensity, as_json) -> int:
    rows = []
    for name, (hours, paper_mwh, paper_t) in PAPER_TABLE15.items():
        est = estimate(hours, power, pue, intensity)
        rows.append(dict(model=name, gpu_hours=hours, mwh=est.mwh, tco2eq=est.tco2eq,
                         paper_mwh=paper_mwh, paper_tco2eq=paper_t))
    if as_json:
        print(json.dumps(rows))
        return 0
    print(f"{'model':<11}{'GPU-hours':>12}{'MWh':>9}{'paper':>7}{'tCO2eq':>9}{'paper':>7}")
    for r in rows:
        print(f"{r['model']:<11}{r['gpu_hours']:>12,}{r['mwh']:>9.1f}{r['paper_mwh']:>7}"
              f"{r['tco2eq']:>9.1f}{r['paper_tco2eq']:>7}")
    return 0


def _print_run(run_dir: Path, args, intensity: float) -> int:
    """Measured energy of a run next to the paper-way estimate for its GPU-hours."""
    path = run_dir / "energy.json"
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; train with megallama train (it writes energy.json at the end)")
    try:
        measured = json.loads(path.read_text())
        hours = float(measured["device_hours"])
        kwh = float(measured["device_kwh"])
        nominal = float(measured["nominal_power_w"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"'{path}' is not a megallama energy summary; re-run training to rewrite it") from None
    power = args.power_w if args.power_w is not None else (gpu_spec(args.gpu).power_w if args.gpu else nominal)
    est = estimate(hours, power, args.pue, intensity)
    meas_mwh = kwh * args.pue / 1000
    out = dict(device_hours=hours, source=measured.get("source", "?"),
               measured_mwh=meas_mwh, measured_tco2eq=emissions_t(meas_mwh, intensity),
               estimated_mwh=est.mwh, estimated_tco2eq=est.tco2eq, mwh=meas_mwh,
               tco2eq=emissions_t(meas_mwh, intensity))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{'':<10}{'MWh':>12}{'tCO2eq':>12}")
        print(f"{'measured':<10}{out['measured_mwh']:>12.6f}{out['measured_tco2eq']:>12.6f}  ({out['source']})")
        print(f"{'estimated':<10}{est.mwh:>12.6f}{est.tco2eq:>12.6f}  ({hours:.4f} device-hours x {power:g} W)")
    return 0
