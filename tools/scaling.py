"""`megallama scaling-fit`: scaling laws from sweep results (Hoffmann et al. 2022).

Approach 3 (parametric): fit L(N, D) = E + A/N^alpha + B/D^beta by minimising the
Huber loss (delta = 1e-3) of log L_hat - log L, with L_hat written as
LSE(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b, E = e^e), from a grid
of initialisations (alpha, beta in {0, .5, .., 2}, e in {-1, -.5, .., 1},
a, b in {0, 5, .., 25}); the grid is scored in one vectorised pass and L-BFGS is
run from the best starts.  Confidence intervals: bootstrap over runs.

Approach 2 (IsoFLOP): runs with (nearly) the same compute C form a profile; a
parabola in log N gives each profile's loss-minimising N; N_opt = k C^a is fitted
to the minima by least squares in log-log space.

Compute-optimal allocation from approach 3 (C = 6ND):
N*(C) = G (C/6)^(beta/(alpha+beta)), D*(C) = (C/6) / N*(C), G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megallama.errors import DataError

HUBER_DELTA = 1e-3
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """Compute-optimal (N*, D*) for a budget of ``flops`` = 6ND."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (flops / 6) ** (b / (a + b))
        return n, flops / 6 / n


@dataclass
class SweepResults:
    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray


# ----------------------------------------------------------------------------- input

def read_results(path: str, loss_column: str = "final_valid_loss") -> SweepResults:
    """Read a sweep's results.csv (params, tokens, [flops], and the loss column).

    Runs with the same params and tokens (the learning rates of a sweep's ``lr:`` grid) are one
    point of L(N, D), at the lowest loss among them: the law is that of the best learning rate."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"results file '{path}' does not exist; run 'megallama sweep' first or pass its results.csv")
    try:
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            records = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"'{path}' is not a readable CSV file ({exc}); pass a sweep's results.csv") from None
    missing = [c for c in ("params", "tokens", loss_column) if c not in cols]
    if missing:
        raise DataError(f"'{path}' lacks column(s) {', '.join(missing)}; expected the columns of a sweep's "
                        "results.csv (params, tokens, flops, final_train_loss, final_valid_loss)")
    best = {}  # (params, tokens) -> the run with the lowest loss there (a learning-rate grid's best)
    diverged = {}  # (params, tokens) -> first line whose loss is not a positive finite number
    for i, row in enumerate(records, start=2):
        try:  # a blank loss is a run whose loss was not finite (written as null by the trainer)
            n, d = float(row["params"]), float(row["tokens"])
            loss = float(row[loss_column]) if (row[loss_column] or "").strip() else math.nan
            c = float(row["flops"]) if row.get("flops") else 6 * n * d
        except (TypeError, ValueError):
            raise DataError(f"'{path}' line {i}: params, tokens, flops and {loss_column} must be numbers") from None
        if not all(math.isfinite(v) and v > 0 for v in (n, d, c)):
            raise DataError(f"'{path}' line {i}: params, tokens and flops must be positive and finite")
        if not (math.isfinite(loss) and loss > 0):  # a diverged run: fine if another lr at its point trained
            diverged.setdefault((n, d), i)
            continue
        if (n, d) not in best or loss < best[n, d][3]:
            best[n, d] = (n, d, c, loss)
    lost = sorted(line for point, line in diverged.items() if point not in best)
    if lost:
        raise DataError(f"'{path}' line {lost[0]}: {loss_column} must be positive and finite and no other run "
                        "at its params and tokens has one (a diverged run? re-run it at a lower lr, or drop that line)")
    if len(best) < 5:
        seen = f"{len(records)} runs" + (f" at {len(best)} distinct (params, tokens) points" if len(best) < len(records) else "")
        raise DataError(f"'{path}' has {seen}; a five-parameter fit needs at least 5 (more is better)")
    n, d, c, loss = (np.array(col) for col in zip(*best.values()))
    return SweepResults(n, d, c, loss)


# ----------------------------------------------------------------------------- approach 3

def _objective(theta, log_n, log_d, log_l, delta: float):
    """Huber loss of the log-space residuals; ``theta`` = (a, b, e, alpha, beta), batched or not."""
    import torch

    a, b, e, alpha, beta = (theta[..., i:i + 1] for i in range(5))
    pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand_as(a - alpha * log_n)]), 0)
    return torch.nn.functional.huber_loss(pred, log_l.expand_as(pred), delta=delta, reduction="none").sum(-1)


def _init_grid():
    alphas = [0.0, 0.5, 1.0, 1.5, 2.0]
    es = [-1.0, -0.5, 0.0, 0.5, 1.0]
    abs_ = [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    return [(a, b, e, al, be) for a, b, e, al, be in itertools.product(abs_, abs_, es, alphas, alphas)]


def fit_parametric(res: SweepResults, delta: float = HUBER_DELTA, starts: int = 8,
                   init: Optional[ScalingLaw] = None) -> ScalingLaw:
    """Approach 3: best of L-BFGS runs started from the best points of the initialisation grid."""
    import torch

    log_n, log_d, log_l = (torch.tensor(np.log(x), dtype=torch.float64) for x in (res.n, res.d, res.loss))
    if init is not None:
        # warm start from a previous fit; an unconstrained fit can leave E, A or B at 0 or inf after exp()
        def log(x: float) -> float:
            return math.log(min(max(x, 1e-300), 1e300))

        candidates = torch.tensor([[log(init.A), log(init.B), log(init.E), init.alpha, init.beta]],
                                  dtype=torch.float64)
    else:
        grid = torch.tensor(_init_grid(), dtype=torch.float64)
        scores = _objective(grid, log_n, log_d, log_l, delta)
        candidates = grid[torch.argsort(scores)[:starts]]
    best, best_val = None, math.inf
    for start in candidates:
        theta = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            val = _objective(theta, log_n, log_d, log_l, delta)
            val.backward()
            return val

        opt.step(closure)
        val = float(_objective(theta.detach(), log_n, log_d, log_l, delta))
        if math.isfinite(val) and val < best_val:
            best, best_val = theta.detach().clone(), val
    if best is None:
        raise DataError("the scaling-law fit did not converge from any initialisation; check the losses")
    a, b, e, alpha, beta = best.tolist()
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def bootstrap(res: SweepResults, law: ScalingLaw, samples: int = 100, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of E, A, B, alpha, beta and the N* exponent, resampling runs."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):
        idx = rng.integers(0, len(res.n), len(res.n))
        sub = SweepResults(res.n[idx], res.d[idx], res.c[idx], res.loss[idx])
        fit = fit_parametric(sub, init=law)
        draws.append([fit.E, fit.A, fit.B, fit.alpha, fit.beta, fit.beta / (fit.alpha + fit.beta)])
    arr = np.array(draws)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    names = ["E", "A", "B", "alpha", "beta", "n_exponent"]
    return {k: (float(np.percentile(arr[:, i], lo)), float(np.percentile(arr[:, i], hi))) for i, k in enumerate(names)}


def fit_warnings(law: ScalingLaw) -> list[str]:
    """Signs that the runs do not pin the law down (a fit always returns numbers)."""
    out = []
    if law.E < 0.05:
        out.append(f"E = {law.E:.3g} ~ 0: the runs show no irreducible loss; train larger or longer runs")
    for name in ("alpha", "beta"):
        value = getattr(law, name)
        if not 0.05 <= value <= 2.0:
            out.append(f"{name} = {value:.3g} is outside [0.05, 2]: the runs do not constrain it; "
                       "widen the range of sizes and budgets")
    return out


# ----------------------------------------------------------------------------- approach 2

@dataclass
class IsoFlopFit:
    minima: list  # (C, N_opt, loss at the minimum) per profile
    n_exponent: float  # N_opt ~ C^a
    n_coefficient: float
    d_exponent: float  # D_opt = C / (6 N_opt) ~ C^(1-a)


def isoflop_groups(c: np.ndarray, rel_tol: float = 0.15) -> list[np.ndarray]:
    """Indices of runs whose compute agrees within ``rel_tol`` (sorted by compute)."""
    order = np.argsort(c)
    groups, current = [], [order[0]]
    for i in order[1:]:
        if c[i] <= c[current[0]] * (1 + rel_tol):
            current.append(i)
        else:
            groups.append(np.array(current))
            current = [i]
    groups.append(np.array(current))
    return groups


def fit_isoflop(res: SweepResults) -> Optional[IsoFlopFit]:
    """Approach 2, or None when fewer than two profiles have an interior minimum."""
    minima = []
    for g in isoflop_groups(res.c):
        log_n = np.log(res.n[g])
        if len(np.unique(log_n)) < 3:
            continue
        c2, c1, c0 = np.polyfit(log_n, res.loss[g], 2)
        if c2 <= 0:
            continue
        x = -c1 / (2 * c2)
        if not log_n.min() <= x <= log_n.max():
            continue  # the minimum lies outside the sizes tried: extrapolating it would be a guess
        minima.append((float(np.exp(np.mean(np.log(res.c[g])))), float(np.exp(x)), float(c0 + c1 * x + c2 * x * x)))
    if len(minima) < 2:
        return None
    cs, ns = np.log([m[0] for m in minima]), np.log([m[1] for m in minima])
    slope, intercept = np.polyfit(cs, ns, 1)
    return IsoFlopFit(minima=minima, n_exponent=float(slope), n_coefficient=float(np.exp(intercept)),
                      d_exponent=float(1 - slope))


# ----------------------------------------------------------------------------- CLI


def _frontier(res: SweepResults, law: ScalingLaw):
    """Compute budgets from the smallest run to 10x the largest, and the loss at N*(C), D*(C)."""
    cs = np.logspace(np.log10(res.c.min()), np.log10(res.c.max()) + 1, 100)
    ns, ds = (np.array(v) for v in zip(*(law.optimal(c) for c in cs)))
    return cs, law.loss(ns, ds)


def _plot(res: SweepResults, law: ScalingLaw, out: str) -> None:
    """Loss against compute (log-log), runs coloured by size, and the compute-optimal frontier."""
    cs, frontier = _frontier(res, law)
    text = _svg(res, cs, frontier) if out.lower().endswith(".svg") else None
    tmp = Path(out).with_name(Path(out).name + ".tmp" + Path(out).suffix)
    if text is not None:
        tmp.write_text(text)
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        sc = ax.scatter(res.c, res.loss, c=np.log10(res.n), cmap="viridis", s=18)
        fig.colorbar(sc, label="log10 parameters")
        ax.plot(cs, frontier, "k--", label="compute-optimal frontier")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="final loss")
        ax.legend()
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        plt.close(fig)
    tmp.replace(out)


def _svg(res: SweepResults, cs: np.ndarray, frontier: np.ndarray, w: int = 640, h: int = 420) -> str:
    """A dependency-free SVG of the same plot (log-log axes, decade ticks on compute)."""
    lx, ly = np.log10(np.concatenate([res.c, cs])), np.log10(np.concatenate([res.loss, frontier]))
    x0, x1, y0, y1 = lx.min(), lx.max(), ly.min() - 0.02, ly.max() + 0.02
    px = lambda c: 60 + (np.log10(c) - x0) / (x1 - x0) * (w - 80)  # noqa: E731
    py = lambda v: h - 50 - (np.log10(v) - y0) / (y1 - y0) * (h - 80)  # noqa: E731
    size = (np.log10(res.n) - np.log10(res.n).min()) / max(np.ptp(np.log10(res.n)), 1e-9)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             'font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="60" y1="{h - 50}" x2="{w - 20}" y2="{h - 50}" stroke="black"/>',
             f'<line x1="60" y1="30" x2="60" y2="{h - 50}" stroke="black"/>']
    for k in range(int(np.ceil(x0)), int(np.floor(x1)) + 1):
        parts.append(f'<text x="{px(10.0 ** k):.1f}" y="{h - 35}" text-anchor="middle">1e{k}</text>')
    for v in np.linspace(10 ** y0, 10 ** y1, 5):
        parts.append(f'<text x="55" y="{py(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">training FLOPs</text>')
    parts.append(f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">final loss</text>')
    for c, v, f in zip(res.c, res.loss, size):
        parts.append(f'<circle class="run" cx="{px(c):.1f}" cy="{py(v):.1f}" r="4" '
                     f'fill="rgb({int(255 * f)},60,{int(255 * (1 - f))})"/>')
    points = " ".join(f"{px(c):.1f},{py(v):.1f}" for c, v in zip(cs, frontier))
    parts.append(f'<polyline class="frontier" points="{points}" fill="none" stroke="black" stroke-dasharray="5,3"/>')
    parts.append(f'<text x="{w - 20}" y="24" text-anchor="end">dashed: compute-optimal frontier; '
                 'colour: model size (blue small, red large)</text></svg>')
    return "\n".join(parts) + "\n"
