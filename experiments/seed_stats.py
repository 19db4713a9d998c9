"""Statistics over training seeds for results pages: a cell pooled over seeds (``pool``), a paired comparison over
seeds (``paired_over_seeds``), Holm-decided verdicts over a page's family of claims (``decide``) and the text helpers
the pages share. tests/experiments/test_posthoc_seeds.py checks them against numpy; ``experiments.posthoc_seeds``
describes the procedure.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import posthoc_common as common
from experiments.stats import FAMILY_ALPHA, holm, mean_std, t_interval, t_test_p


def pool(values: Mapping[int, Sequence[float]]) -> dict[str, Any]:
    """One cell over training seeds: values {training seed: [value per calibration set]}. Returns 'per_seed'
    {seed: mean over its calibration sets}, 'n' (seeds with a value), 'mean' and 'std' (ddof 1) over the per-seed
    means, and 'calib_std' (the std, ddof 1, over calibration sets within a seed, averaged over the seeds with at
    least two; None if none)."""
    per_seed = {int(s): float(np.mean(v)) for s, v in sorted(values.items()) if len(v)}
    mean, std = mean_std(list(per_seed.values()))
    within = [float(np.std(v, ddof=1)) for v in values.values() if len(v) > 1]
    return {"per_seed": per_seed, "n": len(per_seed), "mean": mean, "std": std,
            "calib_std": float(np.mean(within)) if within else None}


def paired_over_seeds(a: Mapping[int, Mapping[Any, float]], b: Mapping[int, Mapping[Any, float]]) -> dict[str, Any]:
    """a − b paired within each training seed at the same calibration sets: a, b {training seed: {calibration set:
    value}}. Per seed present in both with at least one common calibration set: the mean over those sets of a − b
    ('per_seed'); over the seeds: the t-interval of those means (``stats.t_interval``: 'n', 'mean', 'std', 't',
    'low', 'high'), 'p' (``stats.t_test_p``) and 'calib_std' (the std over calibration sets of a − b within a seed,
    averaged over the seeds with two or more)."""
    per_seed, within = {}, []
    for seed in sorted(set(a) & set(b)):
        common_sets = sorted(set(a[seed]) & set(b[seed]), key=str)
        if not common_sets:
            continue
        diffs = [a[seed][c] - b[seed][c] for c in common_sets]
        per_seed[int(seed)] = float(np.mean(diffs))
        if len(diffs) > 1:
            within.append(float(np.std(diffs, ddof=1)))
    values = list(per_seed.values())
    return {"per_seed": per_seed, **t_interval(values), "p": t_test_p(values),
            "calib_std": float(np.mean(within)) if within else None}


def decide(claims: list[dict[str, Any]], alpha: float = FAMILY_ALPHA) -> list[dict[str, Any]]:
    """Holm over the family ``claims`` (each with 'p', 'mean', 'n' and the words 'lower' / 'higher' for a mean below
    / above 0): adds 'p_holm', 'rejected' and 'verdict' (the word of the mean's side where Holm rejects, else 'not
    resolved at n=<n>'), 'family_size' and 'alpha'."""
    rejected, adjusted = holm([c.get("p") for c in claims], alpha)
    for claim, r, p_holm in zip(claims, rejected, adjusted, strict=True):
        mean = claim.get("mean")
        if r and mean is not None and mean != 0:
            word = claim["lower"] if mean < 0 else claim["higher"]
        else:
            word = f"not resolved at n={claim.get('n', 0)}"
        claim.update(p_holm=p_holm, rejected=bool(r), verdict=word, family_size=len(claims), alpha=alpha)
    return claims


def _interval(c: Mapping[str, Any], digits: int = 4) -> str:
    if c.get("low") is None:
        return "–"
    return f"[{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"


def _p(value: float | None) -> str:
    return "–" if value is None else (f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}")


def n_sentence(n: int, family: int) -> str:
    """What n training seeds can and cannot show (the same sentence on both pages); family: the page's claims."""
    from scipy import stats

    t = float(stats.t.ppf(0.975, n - 1)) if n >= 2 else None
    t_holm = float(stats.t.isf(FAMILY_ALPHA / (2 * family), n - 1)) if n >= 2 and family else None
    return (f"**What {n} training seeds can and cannot show.** With n = {n} the t-interval uses t = "
            f"{fixed(t, 2)} on {n - 1} degrees of freedom, so an effect is resolved only when it is large against "
            f"how much it varies between training seeds; Holm over the page's {family} claims then needs p < "
            f"{FAMILY_ALPHA / max(family, 1):.2g} for the first claim it rejects, i.e. |mean| / (sd / sqrt(n)) above "
            f"{fixed(t_holm, 1)}: the per-seed differences must agree almost exactly. A resolved verdict says "
            "that the effect has the same sign on these small models across "
            "training seeds and calibration sets; it says nothing about larger models, other corpora, longer "
            "training or fine-tuning after compression. 'Not resolved' is not evidence of no effect: at n = "
            f"{n} a real difference of moderate size is usually not resolved. The spread over training seeds "
            "also includes the calibration sets' spread (each seed's value averages them).")


def fixed(value: Any, digits: int) -> str:
    return common.fixed(value, digits)


interval = _interval  # public names for other pages
p_text = _p
