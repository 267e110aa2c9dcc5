"""Sample-based metrics: unbiased pass@k and majority vote (maj@k)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-empty answer; ties go to the answer seen first (deterministic)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == best)


def maj_at_k(answers: Sequence[Hashable | None], gold: Hashable, k: int) -> float:
    """1.0 when the majority of the first k sampled answers is the gold answer."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"k={k} needs 1..{len(answers)} samples")
    return float(majority(answers[:k]) == gold)
