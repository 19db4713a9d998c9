"""experiments/posthoc_seeds.py's pooling over training seeds against plain numpy on made-up numbers."""
import math

import numpy as np
import pytest
from scipy import stats

from experiments import posthoc_seeds


def test_pool_averages_calibration_sets_then_spreads_over_training_seeds():
    values = {0: [2.0, 2.2], 1: [2.5, 2.1], 2: [1.9, 2.3]}
    out = posthoc_seeds.pool(values)
    means = np.array([np.mean(values[s]) for s in (0, 1, 2)])
    assert out["n"] == 3
    assert out["per_seed"] == pytest.approx({0: 2.1, 1: 2.3, 2: 2.1})
    assert out["mean"] == pytest.approx(means.mean())
    assert out["std"] == pytest.approx(means.std(ddof=1))
    assert out["calib_std"] == pytest.approx(np.mean([np.std(values[s], ddof=1) for s in (0, 1, 2)]))


def test_pool_of_one_seed_has_no_spread():
    out = posthoc_seeds.pool({4: [1.0]})
    assert out["n"] == 1 and out["mean"] == 1.0 and out["std"] is None and out["calib_std"] is None


def test_paired_over_seeds_matches_numpy_t_interval_and_p():
    a = {0: {0: 3.0, 1: 3.4}, 1: {0: 2.9, 1: 3.1}, 2: {0: 3.3, 1: 3.2}, 3: {0: 9.0}}  # seed 3 has no b
    b = {0: {0: 2.5, 1: 2.6}, 1: {0: 2.8, 1: 2.7}, 2: {0: 3.0, 1: 2.6}}
    out = posthoc_seeds.paired_over_seeds(a, b)
    diffs = np.array([np.mean([a[s][c] - b[s][c] for c in (0, 1)]) for s in (0, 1, 2)])
    n = len(diffs)
    half = stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n)
    t = diffs.mean() / (diffs.std(ddof=1) / math.sqrt(n))
    assert list(out["per_seed"]) == [0, 1, 2]
    assert out["n"] == 3
    assert out["mean"] == pytest.approx(diffs.mean())
    assert out["low"] == pytest.approx(diffs.mean() - half)
    assert out["high"] == pytest.approx(diffs.mean() + half)
    assert out["p"] == pytest.approx(2 * stats.t.sf(abs(t), n - 1))
    within = [np.std([a[s][c] - b[s][c] for c in (0, 1)], ddof=1) for s in (0, 1, 2)]
    assert out["calib_std"] == pytest.approx(np.mean(within))


def test_paired_over_seeds_pairs_only_common_calibration_sets():
    a = {0: {0: 1.0, 1: 5.0}, 1: {0: 2.0}}
    b = {0: {0: 0.5}, 1: {0: 1.0, 1: 7.0}}
    out = posthoc_seeds.paired_over_seeds(a, b)
    assert out["per_seed"] == pytest.approx({0: 0.5, 1: 1.0})


def test_decide_uses_holm_and_words_only_where_rejected():
    claims = [{"p": 0.001, "mean": -0.2, "n": 3, "lower": "a better", "higher": "a worse"},
              {"p": 0.03, "mean": 0.1, "n": 3, "lower": "a better", "higher": "a worse"},
              {"p": 0.011, "mean": 0.3, "n": 3, "lower": "a better", "higher": "a worse"},
              {"p": None, "mean": None, "n": 1, "lower": "a better", "higher": "a worse"}]
    posthoc_seeds.decide(claims)
    # Holm over m = 4: 0.001 < 0.05/4 rejected; 0.011 < 0.05/3 rejected; 0.03 >= 0.05/2 stops.
    assert [c["rejected"] for c in claims] == [True, False, True, False]
    assert [c["verdict"] for c in claims] == ["a better", "not resolved at n=3", "a worse", "not resolved at n=1"]
    assert claims[0]["p_holm"] == pytest.approx(0.004)
    assert claims[2]["p_holm"] == pytest.approx(0.033)
    assert claims[1]["p_holm"] == pytest.approx(0.06)
    assert all(c["family_size"] == 4 for c in claims)
