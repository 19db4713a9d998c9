"""Statistics of the ablation tables (experiments/reproduce.py): per-row mean and std over seeds, paired
differences between two rows at the same seeds with their t-interval, and one verdict per paper claim.

A claim compares two rows within seeds: the differences (row - reference) at every seed both finished. The seed
fixes the initialisation and the data order, so these are less noisy than the rows' own spreads. Of the n paired
differences: mean, std (ddof=1) and the 95% t-interval mean +- t_{0.975, n-1} * sd / sqrt(n) (scipy.stats.t.ppf;
none for n < 2). The verdict is 'reproduced' when the interval excludes 0 on the side the paper claims,
'contradicted' when it excludes 0 on the other side, 'not resolved' when it contains 0 or fewer than 2 seeds are
paired.
"""
from __future__ import annotations

import dataclasses
import math
from types import ModuleType
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # of the t-intervals of paired differences
REPRODUCED, NOT_RESOLVED, CONTRADICTED = "reproduced", "not resolved", "contradicted"
DIRECTIONS = ("lower", "higher")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, std with ddof=1) of ``values``; std is None for one value, both for none."""
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The t-interval of the mean of ``values`` (paired differences): mean +- t_{(1+confidence)/2, n-1} * sd /
    sqrt(n), with sd the std with ddof=1. Returns {'n', 'mean', 'std', 't', 'low', 'high'}; std, t, low and high
    are None for fewer than 2 values (mean too for none)."""
    n = len(values)
    mean, std = mean_std(list(values))
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "t": None, "low": None, "high": None}
    t = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    half = t * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "t": t, "low": mean - half, "high": mean + half}


def verdict(interval: dict[str, Any], better: str) -> str:
    """REPRODUCED when the interval of (row - reference) excludes 0 on the claimed side (``better``='lower': it
    lies below 0), CONTRADICTED when it excludes 0 on the other side, NOT_RESOLVED when it contains 0 or there is
    none (fewer than 2 paired seeds)."""
    if better not in DIRECTIONS:
        raise ValueError(f"better={better!r} is invalid: allowed {', '.join(DIRECTIONS)}")
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None or low <= 0 <= high:
        return NOT_RESOLVED
    return REPRODUCED if (high < 0) == (better == "lower") else CONTRADICTED


def seed_metrics(results: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """{row: {seed: metrics}} of the finished runs of ``results`` (collect's, or a <table>.json's)."""
    return {row["name"]: {entry["seed"]: entry["metrics"] for entry in row["runs"]} for row in results["rows"]}


def paired(per_seed: dict[str, dict[int, dict[str, Any]]], row: str, reference: str,
           metric: str) -> tuple[list[int], list[float]]:
    """(seeds, row - reference at each of them): the seeds where both rows finished and have the metric."""
    a, b = per_seed.get(row, {}), per_seed.get(reference, {})
    seeds = [s for s in sorted(a.keys() & b.keys()) if a[s].get(metric) is not None and b[s].get(metric) is not None]
    return seeds, [a[s][metric] - b[s][metric] for s in seeds]


def statistics(table: ModuleType, results: dict[str, Any]) -> dict[str, Any]:
    """{'reference', 'differences', 'claims'} from the per-seed values of results['rows']: per row other than the
    table's REFERENCE and per metric of METRICS the paired differences against REFERENCE with their t-interval;
    per claim of CLAIMS the same for its two rows and metric, and its verdict."""
    per_seed = seed_metrics(results)
    reference = getattr(table, "REFERENCE", None)
    differences: dict[str, dict[str, Any]] = {}
    if reference in per_seed and per_seed[reference]:
        for row in results["rows"]:
            if row["name"] == reference or not row["runs"]:
                continue
            differences[row["name"]] = {}
            for metric in table.METRICS:
                seeds, values = paired(per_seed, row["name"], reference, metric)
                differences[row["name"]][metric] = {"seeds": seeds, "values": values, **t_interval(values)}
    claims = []
    for claim in getattr(table, "CLAIMS", []):
        seeds, values = paired(per_seed, claim.row, claim.reference, claim.metric)
        interval = t_interval(values)
        claims.append({**dataclasses.asdict(claim), "seeds": seeds, "values": values, **interval,
                       "confidence": CONFIDENCE, "verdict": verdict(interval, claim.better)})
    return {"reference": reference, "differences": differences, "claims": claims}

