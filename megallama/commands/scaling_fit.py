"""`megallama scaling-fit`: scaling laws from sweep results (Hoffmann et al. 2022; see tools/scaling.py)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from megallama.errors import DataError, UserError
from tools.scaling import HUBER_DELTA, _plot, bootstrap, fit_isoflop, fit_parametric, fit_warnings, read_results


def add_arguments(p):
    p.add_argument("results", help="results.csv written by 'megallama sweep'")
    p.add_argument("--loss", choices=("valid", "train"), default="valid", help="which final loss to fit")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals (0 = none)")
    p.add_argument("--budget", type=float, action="append", default=None,
                   help="FLOP budget(s) for the compute-optimal N* and D* (repeatable)")
    p.add_argument("--plot", default=None, metavar="OUT.svg",
                   help="loss against compute with the fitted frontier (.svg: built in; .png etc.: matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.plot:
        _require_plotter(args.plot)
    res = read_results(args.results, f"final_{args.loss}_loss")
    law = fit_parametric(res)
    if not (law.alpha > 0 and law.beta > 0):  # N*(C) would be complex or divide by zero
        raise DataError(f"the fit gives alpha = {law.alpha:.3g}, beta = {law.beta:.3g}: the loss does not fall with "
                        "both model size and tokens, so there is no compute-optimal allocation; widen the range "
                        "of sizes and budgets, or check the losses")
    ci = bootstrap(res, law, args.bootstrap) if args.bootstrap else {}
    iso = fit_isoflop(res)
    budgets = args.budget or [10.0 ** k for k in range(18, 25)]
    if any(not (math.isfinite(b) and b > 0) for b in budgets):
        raise UserError("--budget must be positive FLOPs, e.g. --budget 1e21")
    optimal = [dict(flops=c, params=law.optimal(c)[0], tokens=law.optimal(c)[1]) for c in budgets]
    out = dict(runs=len(res.n), law=asdict(law), intervals=ci, n_exponent=law.beta / (law.alpha + law.beta),
               isoflop=asdict(iso) if iso else None, optimal=optimal, warnings=fit_warnings(law))
    if args.plot:
        _plot(res, law, args.plot)
    if args.json:
        print(json.dumps(out))
        return 0
    _print_report(out)
    return 0


def _print_report(out: dict) -> None:
    law, ci = out["law"], out["intervals"]
    print(f"L(N, D) = E + A/N^alpha + B/D^beta fitted to {out['runs']} runs (Huber, delta={HUBER_DELTA:g}, log loss)")
    for k in ("E", "A", "B", "alpha", "beta"):
        interval = f"  [{ci[k][0]:.4g}, {ci[k][1]:.4g}] 95% bootstrap" if k in ci else ""
        print(f"  {k:<6}{law[k]:>12.4g}{interval}")
    print(f"approach 3: N* ~ C^{out['n_exponent']:.3f}, D* ~ C^{1 - out['n_exponent']:.3f}")
    iso = out["isoflop"]
    if iso:
        print(f"approach 2 (IsoFLOP, {len(iso['minima'])} profiles): N_opt ~ C^{iso['n_exponent']:.3f}, "
              f"D_opt ~ C^{iso['d_exponent']:.3f}")
    else:
        print("approach 2 (IsoFLOP): fewer than two equal-compute profiles with an interior minimum; skipped")
    for w in out["warnings"]:
        print(f"warning: {w}")
    print(f"{'FLOPs':>10}{'N*':>12}{'D*':>12}{'D*/N*':>12}")
    for o in out["optimal"]:
        print(f"{o['flops']:>10.1e}{o['params']:>12.3e}{o['tokens']:>12.3e}{o['tokens'] / o['params']:>12.4g}")


def _require_plotter(out: str) -> None:
    """SVG is written here with no dependency; other formats need matplotlib."""
    folder = Path(out).resolve().parent
    if not folder.is_dir() or Path(out).is_dir():
        raise UserError(f"--plot {out}: {'is a directory' if Path(out).is_dir() else f'folder {folder} does not exist'}; "
                        "give a file path in an existing folder, e.g. --plot fit.svg")
    if out.lower().endswith(".svg"):
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"--plot {out} needs matplotlib, which is not installed: pip install matplotlib "
                        "(or write an .svg, which needs nothing)") from None
