"""`megallama carbon`: energy and CO2 of a training run, the paper's way (see tools/carbon.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from megallama.errors import UserError
from megallama.hardware import gpu_spec
from tools.carbon import PAPER_POWER_W, PAPER_PUE, PAPER_TABLE15, REGIONS, emissions_t, estimate, resolve_intensity


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
