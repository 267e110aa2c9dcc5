"""Power-law fits L(x) = A / x**alpha + E, and what Kotha et al. (2025) build on them.

With fixed data and unlimited compute, one run says little about a recipe: its
loss keeps falling as parameters N or ensemble members K grow. Kotha, Kim, Liang
and Hashimoto ("Pre-training under infinite compute") judge a recipe instead by
the asymptote E of its scaling law, take a joint N, K -> infinity limit in two
steps, and compare recipes by how much more data the baseline needs to reach the
same loss. Fits are bounded least squares (A >= 0, 0 < alpha <= 3, E >= 0) on x
divided by its geometric mean, searched over a grid of alphas so a poor start cannot
trap them, and come with bootstrap intervals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError

MAX_ALPHA = 3.0  # no sane loss curve decays faster than 1/x^3
_NAN_CI = (math.nan, math.nan)


@dataclass(frozen=True)
class PowerLawFit:
    """L(x) = A / x**alpha + E, with its RMSE and bootstrap 95% intervals (nan when none)."""

    A: float
    alpha: float
    E: float
    rmse: float
    n_points: int
    A_ci: tuple[float, float] = _NAN_CI
    alpha_ci: tuple[float, float] = _NAN_CI
    E_ci: tuple[float, float] = _NAN_CI
    n_bootstrap: int = 0  # refits that succeeded

    def predict(self, x):
        return self.A / np.asarray(x, dtype=float) ** self.alpha + self.E

    def to_dict(self) -> dict:
        """JSON-ready: intervals become lists, nan becomes None."""
        def clean(v):
            if isinstance(v, tuple):
                return [clean(u) for u in v]
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {k: clean(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class JointAsymptote:
    """Step 1: per model size N, a fit over ensemble size K; step 2: their E_N fitted over N."""

    per_n: dict[float, PowerLawFit]
    over_n: PowerLawFit

    @property
    def E(self) -> float:
        return self.over_n.E


def _as_points(x, loss, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    pre = f"{what}: " if what else ""
    if x.size != y.size:
        raise LmlabError(f"{pre}x has {x.size} values but loss has {y.size}; they must pair up")
    for name, v in (("x", x), ("loss", y)):
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            raise LmlabError(f"{pre}{name}[{bad[0]}] is {v[bad[0]]}; every {name} must be a finite number")
    if (x <= 0).any():
        i = int(np.flatnonzero(x <= 0)[0])
        raise LmlabError(f"{pre}x[{i}] = {x[i]:g} must be > 0 for a power law in x")
    return x, y


def _linear_part(alphas: np.ndarray, u: np.ndarray, y: np.ndarray):
    """For each alpha, the least-squares a >= 0, E >= 0 of y = a * u**-alpha + E, and its SSE.

    Fixing alpha makes the model linear, so (a, E) is exact; the convex problem's
    optimum is the unconstrained one when feasible, else the best on a boundary.
    """
    f = u[None, :] ** -alphas[:, None]
    fm, ym = f.mean(1), y.mean()
    var = ((f - fm[:, None]) ** 2).sum(1)
    a_free = ((f - fm[:, None]) * (y - ym)).sum(1) / np.maximum(var, 1e-300)
    cands = [(a_free, ym - a_free * fm),  # unconstrained
             (np.zeros_like(fm), np.full_like(fm, max(ym, 0.0))),  # a = 0
             (np.maximum((f * y).sum(1) / (f * f).sum(1), 0.0), np.zeros_like(fm))]  # E = 0
    best_a, best_E, best_sse = None, None, np.full_like(fm, np.inf)
    for a, E in cands:
        sse = (((a[:, None] * f + E[:, None]) - y) ** 2).sum(1)
        sse = np.where((a >= 0) & (E >= 0), sse, np.inf)
        take = sse < best_sse
        best_a = a if best_a is None else np.where(take, a, best_a)
        best_E = E if best_E is None else np.where(take, E, best_E)
        best_sse = np.minimum(sse, best_sse)
    return best_a, best_E, best_sse


def _fit_normalised(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a, alpha, E) minimising the SSE of y = a * u**-alpha + E under the bounds.

    Variable projection: (a, E) are solved exactly for every alpha, a grid over
    (0, MAX_ALPHA] serves as the many starting points, and Brent's method refines
    the best one, so the fit cannot stall in a poor local minimum.
    """
    from scipy.optimize import minimize_scalar

    grid = np.linspace(1e-3, MAX_ALPHA, 300)
    i = int(np.argmin(_linear_part(grid, u, y)[2]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = minimize_scalar(lambda t: float(_linear_part(np.array([t]), u, y)[2][0]),
                          bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    alpha = float(res.x) if res.fun <= _linear_part(grid[i:i + 1], u, y)[2][0] else float(grid[i])
    a, E, _ = _linear_part(np.array([alpha]), u, y)
    return float(a[0]), alpha, float(E[0])


def fit_power_law(x, loss, bootstrap: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit L(x) = A / x**alpha + E; `bootstrap` refits on resampled points give 95% intervals."""
    x, y = _as_points(x, loss)
    if np.unique(x).size < 3:
        raise LmlabError(f"need at least 3 points (at distinct x) to fit A, alpha and E, got {np.unique(x).size}",
                         hint="add runs at more sizes")
    g = float(np.exp(np.log(x).mean()))  # x / g is O(1), so A and alpha decouple

    def fit(xs, ys):
        a, alpha, E = _fit_normalised(xs / g, ys)
        return a * g ** alpha, alpha, E

    A, alpha, E = fit(x, y)
    rmse = float(np.sqrt(np.mean((A / x ** alpha + E - y) ** 2)))
    rng, samples = np.random.default_rng(seed), []
    for _ in range(bootstrap):
        idx = rng.integers(0, x.size, x.size)
        if np.unique(x[idx]).size < 3:  # three parameters need three distinct sizes
            continue
        q = fit(x[idx], y[idx])
        if all(math.isfinite(v) for v in q):
            samples.append(q)
    cis = [_NAN_CI] * 3
    if samples:
        s = np.array(samples)
        cis = [tuple(float(v) for v in np.percentile(s[:, j], [2.5, 97.5])) for j in range(3)]
    return PowerLawFit(A, alpha, E, rmse, int(x.size), *cis, n_bootstrap=len(samples))


def joint_asymptote(losses: dict[float, dict[int, float]], bootstrap: int = 0, seed: int = 0) -> JointAsymptote:
    """Kotha et al.'s two-step limit: per N, E_N = lim over K; then E = lim over N of E_N.

    `losses[N][K]` is the loss of an ensemble of K models of size N; needs >= 3 N and
    >= 3 K per N. Intervals (if `bootstrap`) resample points within each step only.
    """
    if len(losses) < 3:
        raise LmlabError(f"need at least 3 model sizes N for the joint asymptote, got {len(losses)}")
    per_n = {}
    for n, by_k in sorted(losses.items()):
        if len(by_k) < 3:
            raise LmlabError(f"model size N={n:g} has {len(by_k)} ensemble sizes K; need at least 3",
                             hint="train more ensemble members for this size")
        ks = sorted(by_k)
        per_n[n] = fit_power_law(ks, [by_k[k] for k in ks], bootstrap=bootstrap, seed=seed)
    ns = list(per_n)
    over_n = fit_power_law(ns, [per_n[n].E for n in ns], bootstrap=bootstrap, seed=seed)
    return JointAsymptote(per_n, over_n)


def data_efficiency(tokens_a, loss_a, tokens_b, loss_b) -> float:
    """How many times more data baseline recipe A needs to match recipe B's loss.

    Fits L_A(D) = A / D**alpha + E_A over A's data sizes, inverts it at each of B's
    losses, D_A = (A / (L_B - E_A))**(1 / alpha), and returns the geometric mean of
    D_A / D_B over B's points (the paper finds the gain a near-constant multiplier
    across D, so the log-space mean is the natural summary). If any B loss is at or
    below E_A, no amount of A's data reaches it and the result is float('inf').
    """
    da, la = _as_points(tokens_a, loss_a, "recipe A")
    db, lb = _as_points(tokens_b, loss_b, "recipe B")
    if db.size == 0:
        raise LmlabError("recipe B has no points; need at least 1")
    fit = fit_power_law(da, la, bootstrap=0)
    gap = lb - fit.E
    if (gap <= 0).any():
        return float("inf")
    needed = (fit.A / gap) ** (1.0 / fit.alpha)
    return float(np.exp(np.mean(np.log(needed / db))))


def plot_fits(series: dict[str, tuple[list[float], list[float], PowerLawFit]], out_png,
              xlabel: str = "x", title: str = "", ylabel: str = "loss") -> Path:
    """Write a PNG: each series' points, its fitted curve on a log-x axis, its asymptote dashed."""
    from lmlab.plots import new_figure, save_figure

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    plt, fig, ax = new_figure()
    for i, (name, (xs, ys, fit)) in enumerate(series.items()):
        color = f"C{i % 10}"
        xs = np.asarray(xs, dtype=float)
        grid = np.geomspace(xs.min() / 1.5, xs.max() * 3, 200)
        ax.scatter(xs, ys, color=color, s=18, zorder=3)
        ax.plot(grid, fit.predict(grid), color=color,
                label=f"{name}: {fit.A:.3g}/x^{fit.alpha:.3f} + {fit.E:.3f}")
        ax.axhline(fit.E, color=color, linestyle="--", linewidth=1, alpha=0.8)
    ax.set_xscale("log")
    return save_figure(plt, fig, ax, out, xlabel, ylabel, title)


def fit_points(points, x: str, y: str, group: str | None = None, efficiency: str | None = None,
               bootstrap: int = 200, out=None) -> list[str]:
    """`lmlab fit`: a power law per group of a points file, the data efficiency of one group over another
    (BASELINE,OTHER), and a plot; returns the lines to print."""
    from lmlab.errors import LmlabError
    from lmlab.scaling.points import read_points

    series = read_points(points, x, y, group)
    fits = {name: fit_power_law(xs, ys, bootstrap=bootstrap) for name, (xs, ys) in series.items()}
    lines = [f"{name}: L = {f.A:.4g} / {x}^{f.alpha:.3f} + {f.E:.4f}   asymptote E = {f.E:.4f} "
             f"[{f.E_ci[0]:.4f}, {f.E_ci[1]:.4f}], alpha [{f.alpha_ci[0]:.3f}, {f.alpha_ci[1]:.3f}], "
             f"{f.n_points} points, rmse {f.rmse:.4g}" for name, f in fits.items()]
    if efficiency:
        base, other = (s.strip() for s in efficiency.split(",", 1)) if "," in efficiency else (efficiency, "")
        if base not in series or other not in series:
            raise LmlabError(f"--efficiency names unknown groups; known: {', '.join(series)}", field="--efficiency")
        ratio = data_efficiency(*series[base], *series[other])
        lines.append(f"data efficiency of {other} over {base}: " + (
            f"unbounded ({other} reaches a loss of {min(series[other][1]):.4f}, below {base}'s fitted asymptote "
            f"E = {fits[base].E:.4f}: no amount of {base}'s data matches it)" if ratio == float("inf")
            else f"{ratio:.2f}x"))
    if out:
        plot_fits({name: (*series[name], f) for name, f in fits.items()}, out, xlabel=x)
        lines.append(f"plot: {out}")
    return lines

