"""Paired intervals for a study whose models are all scored on the same held-out rows.

The data-constrained study trains one seed per configuration, so the noise it can measure is which
validation rows score the models. Every margin is recomputed on the same resamples of those rows (drawn
once, seed 0): a difference between two models is paired row by row, and a margin that goes through fits
(an asymptote, a data efficiency) is refitted on each resample. The interval is the 2.5th-97.5th
percentile of the resampled margins. It leaves out the variation between training seeds, which the
report says beside the rule.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

RESAMPLES = 1000
FIT_RESAMPLES = 300  # a margin through fits refits on every resample (~5 ms a fit): fewer of them
SCOPE = ("intervals: 2.5th-97.5th percentiles over resamples of the validation rows, every model on the same "
         "resample; one training seed per configuration, so seed-to-seed variation is not in them")


class RowResamples:
    """Losses of every scored model on all rows and on each resample of the rows."""

    def __init__(self, per_row: dict[str, tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES,
                 seed: int = 0):
        counts = {len(nll) for nll, _ in per_row.values()}
        if len(counts) != 1:
            raise ValueError(f"every model must be scored on the same rows, got row counts {sorted(counts)}")
        rows = counts.pop()
        self.per_row = per_row
        self.index = np.random.default_rng(seed).integers(0, rows, size=(resamples, rows))
        self._draws: dict[str, np.ndarray] = {}

    def full(self, key: str) -> float:
        """The model's loss on all rows (what the report's tables print)."""
        nll, tokens = self.per_row[key]
        return float(nll.sum() / tokens.sum())

    def draws(self, key: str) -> np.ndarray:
        """The model's loss on each resample."""
        if key not in self._draws:
            nll, tokens = self.per_row[key]
            self._draws[key] = nll[self.index].sum(axis=1) / tokens[self.index].sum(axis=1)
        return self._draws[key]

    def paired(self, of: Callable[[Callable[[str], object]], object]) -> dict[str, float]:
        """A margin `of(loss)` built from models' losses with + - min max (numpy's, elementwise): on all rows,
        and on every resample at once, where `loss(key)` is that model's array of resampled losses."""
        return interval(float(of(self.full)), np.asarray(of(self.draws), dtype=float))

    def refitted(self, fn: Callable[[Callable[[str], float]], dict[str, float]]
                 ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """`fn(loss)` -> named numbers that go through fits, on all rows and on each of the first FIT_RESAMPLES
        resamples (NaN where a fit fails there)."""
        full = fn(self.full)
        rows = [fn(lambda key, i=i: float(self.draws(key)[i])) for i in range(min(FIT_RESAMPLES, len(self.index)))]
        return full, {name: np.array([r[name] for r in rows], dtype=float) for name in full}


def interval(value: float, draws: np.ndarray) -> dict[str, float]:
    """A margin with the percentile interval of its draws (actual draws, so an infinite one stays infinite).
    Draws that are NaN (a failed fit) are dropped; with over a tenth dropped the interval is NaN, which the
    verdict rule reads as inconclusive."""
    kept = draws[~np.isnan(draws)]
    if kept.size < 0.9 * draws.size or kept.size == 0:
        low = high = math.nan
    else:
        low, high = np.quantile(kept, [0.025, 0.975], method="inverted_cdf")
    return {"value": float(value), "ci_low": float(low), "ci_high": float(high)}
