"""The bootstrap of local routing consistency as its authors compute it (github.com/ljcleo/moe-lrc: documents
resampled with replacement, each replicate a weight per document, and the basic interval 2 * estimate - percentile;
``moejax.posthoc.locality``)."""
from __future__ import annotations

import numpy as np


def _resample_weights(rng: np.random.Generator, size: int, n_boot: int) -> np.ndarray:
    """[n_boot, size] float64: how often each of ``size`` units is drawn in each of n_boot resamples of ``size``
    draws with replacement (the authors' ``bs_weight``)."""
    weights = np.zeros((n_boot, size))
    for start in range(0, n_boot, 64):
        end = min(start + 64, n_boot)
        draws = rng.integers(0, size, size=(end - start, size)) if size else np.zeros((end - start, 0), np.int64)
        keys = (np.arange(end - start)[:, None] * size + draws).ravel()
        weights[start:end] = np.bincount(keys, minlength=(end - start) * size).reshape(end - start, size)
    return weights


def _basic_interval(value: np.ndarray, replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) as the authors compute them: with the n_boot replicates sorted q[0] <= ... <= q[n_boot - 1] and
    lo = round(n_boot (1 - confidence) / 2), hi = n_boot - lo (capped at n_boot - 1),
    lower = 2 value - q[hi] and upper = 2 value - q[lo] (the basic, or reverse-percentile, bootstrap interval)."""
    n_boot = replicates.shape[0]
    if n_boot == 0:
        return np.full(np.shape(value), np.nan), np.full(np.shape(value), np.nan)
    low = round(n_boot * ((1 - confidence) / 2))
    high = min(n_boot - low, n_boot - 1)
    ordered = np.sort(replicates, axis=0)
    return 2 * value - ordered[high], 2 * value - ordered[low]


def _check_bootstrap(n_boot: int, confidence: float) -> int:
    if int(n_boot) < 1 or not 0 < confidence < 1:
        raise ValueError(f"the bootstrap needs n_boot >= 1 and 0 < confidence < 1, got {n_boot} and {confidence}")
    return int(n_boot)
