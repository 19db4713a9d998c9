"""Statistics of the ablation tables (experiments/reproduce.py): per-row mean and std over seeds, paired
differences between two rows at the same seeds with their t-interval, and one verdict per paper claim.

A claim compares two rows within seeds: the differences (row - reference) at every seed both finished. The seed
fixes the initialisation and the data order, so these are less noisy than the rows' own spreads. Of the n paired
differences: mean, std (ddof=1) and the 95% t-interval mean +- t_{0.975, n-1} * sd / sqrt(n) (scipy.stats.t.ppf;
none for n < 2). The verdict is 'reproduced' when the interval excludes 0 on the side the paper claims,
'contradicted' when it excludes 0 on the other side, 'not resolved' when it contains 0 or fewer than 2 seeds are
paired.

Multiplicity: a table makes several claims, so each claim also gets the two-sided paired t-test p-value of the same
differences (t = mean / (sd / sqrt(n)), n - 1 degrees of freedom; the interval excludes 0 exactly when p < 0.05) and
a Holm-adjusted verdict: the Holm-Bonferroni step-down over the table's claims at family-wise alpha 0.05 (claims
sorted by p, the i-th smallest of m rejected while p < alpha / (m - i + 1); a claim without a p-value counts in m
and is never rejected). The adjusted verdict is 'reproduced' / 'contradicted' when Holm rejects the claim's null and
the mean lies on the paper's side / the other side, 'not resolved' otherwise.

Pre-registered seeds: a table whose seeds were extended after a result was seen declares the seeds fixed before it
ran (SEEDS_PREREGISTERED < SEEDS, experiments/tables/__init__.py); its claims then also carry both verdicts at the
pre-registered seeds 0..SEEDS_PREREGISTERED-1 (``preregistered``), Holm over the claims at those seeds.
"""
from __future__ import annotations

import dataclasses
import math
from types import ModuleType
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # of the t-intervals of paired differences
FAMILY_ALPHA = 0.05  # family-wise error rate of the Holm-adjusted verdicts over a table's claims
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


def t_test_p(values: list[float]) -> float | None:
    """The two-sided p-value of the paired t-test of ``values`` (differences) against mean 0: t = mean / (sd /
    sqrt(n)), sd with ddof=1, Student's t with n - 1 degrees of freedom. None for fewer than 2 values; with sd = 0,
    0.0 when the mean is not 0 (the interval is one point off 0) and 1.0 when it is."""
    n = len(values)
    if n < 2:
        return None
    mean, std = mean_std(list(values))
    if std == 0:
        return 0.0 if mean != 0 else 1.0
    t = mean / (std / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def holm(p_values: list[float | None], alpha: float = FAMILY_ALPHA) -> tuple[list[bool], list[float | None]]:
    """The Holm-Bonferroni step-down over a family of m = len(p_values) hypotheses: (rejected, adjusted p). Sorted
    by p (ties in the given order), the i-th smallest (i = 1..m) is rejected if it and every smaller one satisfy
    p_(j) < alpha / (m - j + 1) (strict, as the t-interval treats a bound touching 0 as not resolved); the adjusted
    p-value is max over j <= i of min(1, (m - j + 1) p_(j)), so a hypothesis is rejected exactly when its adjusted p
    is below alpha. A None p-value (no test) counts in m, is never rejected and has adjusted p None."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: (p_values[i] is None, p_values[i] or 0.0, i))
    rejected, adjusted = [False] * m, [None] * m
    running, stopped = 0.0, False
    for rank, i in enumerate(order):
        p = p_values[i]
        if p is None:
            break
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
        stopped = stopped or not p < alpha / (m - rank)
        rejected[i] = not stopped
    return rejected, adjusted


def adjusted_verdict(mean: float | None, rejected: bool, better: str) -> str:
    """The Holm-adjusted verdict: REPRODUCED / CONTRADICTED when Holm rejects the claim's null and ``mean`` (row -
    reference) lies on the side ``better`` claims / the other side, NOT_RESOLVED otherwise."""
    if better not in DIRECTIONS:
        raise ValueError(f"better={better!r} is invalid: allowed {', '.join(DIRECTIONS)}")
    if not rejected or mean is None or mean == 0:
        return NOT_RESOLVED
    return REPRODUCED if (mean < 0) == (better == "lower") else CONTRADICTED


def claim_tests(claims: list[dict[str, Any]], alpha: float = FAMILY_ALPHA) -> list[dict[str, Any]]:
    """Per claim ({'values', 'better', ...}, the paired differences of one claim each, all claims of one table):
    {'p', 'p_holm', 'verdict_holm'}: its paired t-test p-value and the Holm-adjusted verdict over the claims."""
    p_values = [t_test_p(claim["values"]) for claim in claims]
    rejected, adjusted = holm(p_values, alpha)
    return [{"p": p, "p_holm": p_holm, "verdict_holm": adjusted_verdict(mean_std(claim["values"])[0], r,
                                                                        claim["better"])}
            for claim, p, p_holm, r in zip(claims, p_values, adjusted, rejected, strict=True)]


def preregistered_seeds(table: ModuleType) -> int | None:
    """The table's SEEDS_PREREGISTERED when it is below its SEEDS (the seeds were extended after a result was
    seen), else None."""
    seeds = getattr(table, "SEEDS", None)
    declared = getattr(table, "SEEDS_PREREGISTERED", seeds)
    return declared if seeds is not None and declared is not None and declared < seeds else None


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
    """{'reference', 'differences', 'claims', 'seeds_preregistered'} from the per-seed values of results['rows']:
    per row other than the table's REFERENCE and per metric of METRICS the paired differences against REFERENCE
    with their t-interval; per claim of CLAIMS the same for its two rows and metric, its verdict, its paired t-test
    p-value and its Holm-adjusted verdict over the table's claims. When the table's seeds were extended after a
    result was seen (SEEDS_PREREGISTERED < SEEDS), 'seeds_preregistered' is that count and every claim has
    'preregistered': the same statistics and both verdicts over its paired seeds below it; else None and no such
    key."""
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
    preregistered = preregistered_seeds(table)

    def tested(claims: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
        out = []
        for claim in claims:
            seeds, values = paired(per_seed, claim["row"], claim["reference"], claim["metric"])
            if limit is not None:
                values = [v for s, v in zip(seeds, values, strict=True) if s < limit]
                seeds = [s for s in seeds if s < limit]
            interval = t_interval(values)
            out.append({**claim, "seeds": seeds, "values": values, **interval, "confidence": CONFIDENCE,
                        "verdict": verdict(interval, claim["better"])})
        for claim, test in zip(out, claim_tests(out), strict=True):
            claim.update(test, family_alpha=FAMILY_ALPHA, family_size=len(out))
        return out

    declared = [dataclasses.asdict(claim) for claim in getattr(table, "CLAIMS", [])]
    claims = tested(declared, None)
    if preregistered is not None:
        keys = ("seeds", "values", "n", "mean", "std", "t", "low", "high", "verdict", "p", "p_holm", "verdict_holm")
        for claim, early in zip(claims, tested(declared, preregistered), strict=True):
            claim["preregistered"] = {key: early[key] for key in keys}
    return {"reference": reference, "differences": differences, "claims": claims,
            "seeds_preregistered": preregistered}

