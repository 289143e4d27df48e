"""Seeded bootstrap confidence intervals for benchmark means.

Questions are resampled with replacement `n_boot` times and the interval is the
percentile interval of the resampled statistic. The resampling depends only on the seed
and the number of questions, so two metrics over the same questions see the same
resamples (their intervals are paired), and a rerun gives identical intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_CHUNK = 250  # resamples drawn at once; bounds memory at chunk x n indices


def bootstrap_ci(values: Sequence[float | None], *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the mean of `values`, or None when there are none.

    A None value marks a question that is resampled but left out of the mean (the
    LLaVA-Med gated closed accuracy drops some questions from its denominator), so the
    statistic is sum(kept values) / number kept in each resample.
    """
    if not values or n_boot <= 0:
        return None
    kept = np.array([v is not None for v in values], dtype=np.float64)
    vals = np.array([0.0 if v is None else float(v) for v in values], dtype=np.float64)
    if not kept.any():
        return None
    rng = np.random.default_rng(seed)
    n = len(vals)
    stats = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        size = min(_CHUNK, n_boot - start)
        idx = rng.integers(0, n, size=(size, n))
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[start:start + size] = vals[idx].sum(axis=1) / kept[idx].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.nanpercentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
