"""Every uncertainty lmlab prints: intervals for scores and paired comparisons between models.

A score is a ratio of sums over items, value = sum(num) / sum(den): an accuracy has a 0/1
numerator and a denominator of 1 per item; pass@k the unbiased estimate per item; bits per
byte the bits of each held-out document over its bytes. `Estimate` is that value as a float
(so every place that used a number still does) carrying its items, its 95% interval and n:
- accuracies (0/1 items): Wilson's score interval, which stays inside [0, 1] and is sound at
  0/n and n/n where the normal approximation collapses to a point;
- everything else: a percentile bootstrap over items (documents for bits per byte).

Two models scored on the same items are compared item by item (`paired`): the difference
with a paired bootstrap interval, and for accuracies McNemar's exact test on the items where
they disagree. "Distinguishable" means the 95% interval of the difference excludes zero.
Mean/std over seeds, medians and Pearson's r live here too, so there is one place for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
BOOTSTRAP = 2000  # resamples: the 2.5% and 97.5% percentiles move by well under 1% of the width
SEED = 0  # a fixed resampling seed: the same scores always print the same interval


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for k successes in n trials."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n and n/n the bound is exactly 0 or 1 (the formula leaves a rounding error there)
    return (0.0 if k <= 0 else max(0.0, centre - half), 1.0 if k >= n else min(1.0, centre + half))


def _ratio(num: Sequence[float], den: Sequence[float]) -> float:
    total = sum(den)
    return sum(num) / total if total else math.nan


def _resampled_ratios(num, den, rounds: int = BOOTSTRAP, seed: int = SEED):
    """sum(num) / sum(den) over `rounds` resamples of the items with replacement (the same resamples for the
    same n and seed, so two models scored on the same items are resampled alike)."""
    import numpy as np

    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(rounds, len(num)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return num[idx].sum(axis=1) / den[idx].sum(axis=1)


def _percentiles(values, level: float = 0.95) -> tuple[float, float]:
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return (math.nan, math.nan)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return (float(low), float(high))


def bootstrap_ratio(num: Sequence[float], den: Sequence[float] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num) / sum(den), resampling items with replacement."""
    den = den if den is not None else [1.0] * len(num)
    if len(num) < 2:
        return (math.nan, math.nan)
    return _percentiles(_resampled_ratios(num, den))


class Estimate(float):
    """A score (a float) with its per-item numerators and denominators, its 95% interval and n."""

    num: list[float]
    den: list[float]
    low: float
    high: float
    method: str

    def __new__(cls, num: Sequence[float], den: Sequence[float] | None = None, binary: bool | None = None):
        num = [float(x) for x in num]
        den = [float(x) for x in den] if den is not None else [1.0] * len(num)
        value = _ratio(num, den) if num else math.nan
        self = super().__new__(cls, value)
        self.num, self.den = num, den
        binary = binary if binary is not None else all(x in (0.0, 1.0) for x in num) and all(d == 1.0 for d in den)
        if binary:
            self.low, self.high = wilson(sum(num), len(num))
            self.method = "wilson"
        else:
            self.low, self.high = bootstrap_ratio(num, den)
            self.method = "bootstrap"
        return self

    @property
    def n(self) -> int:
        return len(self.num)

    @property
    def binary(self) -> bool:
        return self.method == "wilson"

    def as_dict(self, items: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"value": float(self), "ci_low": self.low, "ci_high": self.high, "n": self.n,
                               "method": self.method}
        if items:
            out["num"] = self.num
            if any(d != 1.0 for d in self.den):
                out["den"] = self.den
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Estimate":
        return cls(record["num"], record.get("den"), binary=record.get("method") == "wilson")

    def text(self, digits: int = 3) -> str:
        """`0.412 [0.369, 0.456] n=500`."""
        return f"{float(self):.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] n={self.n}"

    def __reduce__(self):  # pickles (multi-process gathers) keep the items
        return (Estimate, (self.num, self.den, self.binary))


def estimate(value: Any) -> Estimate | None:
    """`value` as an Estimate when it carries items (a live one, or its JSON record), else None."""
    if isinstance(value, Estimate):
        return value
    if isinstance(value, dict) and "num" in value:
        return Estimate.from_dict(value)
    return None


def plain(value: Any) -> Any:
    """A number as JSON holds it in a metrics table: the value of an Estimate, anything else as it is."""
    return float(value) if isinstance(value, Estimate) else value


@dataclass
class Difference:
    """b - a on the same items, with its paired 95% interval and, for accuracies, McNemar's exact p."""

    delta: float
    low: float
    high: float
    n: int
    p_value: float | None = None  # McNemar (accuracies only)
    better: int = 0  # items b gets right and a wrong (accuracies)
    worse: int = 0  # and the other way round

    @property
    def distinguishable(self) -> bool:
        return not (self.low <= 0.0 <= self.high)

    def text(self, digits: int = 3) -> str:
        verdict = "distinguishable" if self.distinguishable else "within noise"
        p = f", McNemar p={self.p_value:.2g}" if self.p_value is not None else ""
        return f"{self.delta:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] {verdict}{p}"

    def as_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "ci_low": self.low, "ci_high": self.high, "n": self.n,
                "p_value": self.p_value, "distinguishable": self.distinguishable}


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar test: the discordant items are a fair coin under 'no difference'."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: Estimate, b: Estimate) -> Difference:
    """b - a, item by item; both must score the same items in the same order."""
    if a.n != b.n:
        raise ValueError(f"a paired comparison needs the same items: {a.n} against {b.n}")
    delta = float(b) - float(a)
    diffs = _resampled_ratios(b.num, b.den) - _resampled_ratios(a.num, a.den)  # the same resampled items
    low, high = _percentiles(diffs) if a.n > 1 else (math.nan, math.nan)
    if a.binary and b.binary:
        better = sum(y > x for x, y in zip(a.num, b.num))
        worse = sum(x > y for x, y in zip(a.num, b.num))
        return Difference(delta, low, high, a.n, mcnemar_exact(better, worse), better, worse)
    return Difference(delta, low, high, a.n)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% t interval of the mean of a few runs (seeds); (nan, nan) for a single run."""
    from scipy.stats import t as student

    if len(values) < 2:
        return (math.nan, math.nan)
    mean, std = mean_std(values)
    half = student.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
    return (mean - half, mean + half)


def welch_tied(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> bool:
    """Whether two sets of runs (seeds of two configurations) are within noise of each other: Welch's t
    interval of the difference of their means contains zero. One run each cannot be told apart."""
    from scipy.stats import t as student

    if len(a) < 2 or len(b) < 2:
        return True
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0:
        return ma == mb
    dof = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = student.ppf(0.5 + level / 2, dof) * math.sqrt(va + vb)
    return abs(mb - ma) <= half


def quantile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (an element of the list: the upper one between two), 0 for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def median(values: Sequence[float]) -> float:
    """The upper median (an element of the list, never an average of two), 0 for no values."""
    return quantile(values, 0.5)


def pearson_r(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation (its sign says which way a predictor points); None when either side has no spread."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sxx * syy) ** 0.5
