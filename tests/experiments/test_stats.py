"""Tests of the multiplicity-adjusted verdicts and pre-registered seeds of the ablation tables (experiments/stats.py,
experiments/report.py, experiments/summary.py): p-values against scipy.stats.ttest_1samp and hand-worked numbers,
Holm-Bonferroni against a plain loop written here, and the committed results pages and README block.
"""
import json
import pathlib

import numpy as np
import pytest
from scipy import stats

from experiments import report, runner, summary, tables
from experiments import stats as table_stats
from tests.helpers_configs import REPO

CONFIG = str(REPO / "tests" / "helpers_train.py")
TOY_TABLE = f'''
from experiments.tables import Claim, Row
CONFIG = {CONFIG!r}
TITLE = "toy table"
PAPER = "no paper"
EXPECTED = "b below a"
SMALL = {{"model.num_layers": 1, "model.moe.num_experts": 4}}
ROWS = [Row("a", CONFIG, {{**SMALL, "model.moe.top_k": 1}}), Row("b", CONFIG, {{**SMALL, "model.moe.top_k": 2}})]
REFERENCE = "a"
BUDGET = {{"train.steps": 4, "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 0,
          "data.eval_batches": 1, "checkpoint.every_steps": 0}}
METRICS = ["val_loss", "maxvio", "train_maxvio", "drop_fraction"]
SEEDS = 5
CLAIMS = [Claim("b beats a", "b", "a"), Claim("b balances better", "b", "a", "maxvio"),
          Claim("b balances better in training", "b", "a", "train_maxvio"),
          Claim("b drops fewer", "b", "a", "drop_fraction")]
'''
# b - a per seed, per claim's metric. With 4 claims Holm tests the smallest p at 0.05/4, the next at 0.05/3, ...
DIFFERENCES = {
    "val_loss": [-0.05, -0.02, -0.06, -0.01, -0.02],  # p = 0.0299: reproduced, but Holm's 0.05/2 = 0.025 is not met
    "maxvio": [-1.0, -1.1, -0.9, -1.05, -0.95],  # p = 9.3e-06: reproduced, Holm too
    "train_maxvio": [0.5, 0.6, 0.4, 0.55, 0.45],  # p = 1.5e-04: contradicted, Holm too
    "drop_fraction": [0.2, -0.1, 0.4, 0.3, -0.3],  # p = 0.486: not resolved
}


def holm_by_loop(p_values, alpha=0.05):
    """The reference: Holm's step-down as a plain loop over the p-values in ascending order."""
    m = len(p_values)
    rejected = [False] * m
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        if p_values[i] < alpha / (m - rank):
            rejected[i] = True
        else:
            break
    return rejected


def scipy_verdict(values, rejected, better="lower"):
    mean = float(np.mean(values))
    if not rejected:
        return "not resolved"
    return "reproduced" if (mean < 0) == (better == "lower") else "contradicted"


def make_results(tables_dir: pathlib.Path, preregistered: int | None, seeds: int = 5) -> tuple[object, dict]:
    """The toy table (SEEDS = 5, SEEDS_PREREGISTERED = ``preregistered`` when given) and a payload of ``seeds``
    seeds whose differences b - a are DIFFERENCES."""
    text = TOY_TABLE + (f"SEEDS_PREREGISTERED = {preregistered}\n" if preregistered is not None else "")
    (tables_dir / "toy.py").write_text(text)
    table = tables.load_table("toy", tables_dir)
    rows = []
    for name in ("a", "b"):
        runs = []
        for seed in range(seeds):
            metrics = {m: (1.0 if name == "a" else 1.0 + d[seed]) for m, d in DIFFERENCES.items()}
            runs.append({"seed": seed, "workdir": f"runs/{name}/seed{seed}", "steps": 4, "batch_size": 8,
                         "seq_len": 32, "tokens": 1024, "metrics": metrics, "corpus": {"name": "stdlib"}})
        overrides = next(r.overrides for r in table.ROWS if r.name == name)
        rows.append({"name": name, "config": CONFIG, "overrides": overrides, "paper": {}, "note": "", "runs": runs,
                     "seeds_finished": seeds, "mean": {}, "std": {}})
    payload = {"table": "toy", "title": "toy table", "generated": "2026-12-06", "command": "python -m toy",
               "budget": "full", "budget_overrides": table.BUDGET, "seeds": seeds, "rows": rows}
    return table, payload


# ----------------------------------------------------------------------------------------------- p-values, Holm


def test_t_test_p_equals_scipy_and_hand_computation():
    # [-1, -2, -3]: mean -2, sd 1, t = -2 / (1 / sqrt 3) = -3.4641 on 2 degrees of freedom: p = 0.074180
    assert table_stats.t_test_p([-1.0, -2.0, -3.0]) == pytest.approx(0.0741799, abs=1e-6)
    assert 2 * stats.t.sf(2 * np.sqrt(3), 2) == pytest.approx(0.0741799, abs=1e-6)
    for values in [*DIFFERENCES.values(), [0.3, 0.1], [-0.2604, -0.2901, -0.1727, -0.2290, -0.3012]]:
        assert table_stats.t_test_p(values) == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, rel=1e-9)
    assert table_stats.t_test_p([0.5]) is None and table_stats.t_test_p([]) is None
    assert table_stats.t_test_p([0.2, 0.2]) == 0.0 and table_stats.t_test_p([0.0, 0.0]) == 1.0


@pytest.mark.parametrize("values", [*DIFFERENCES.values(), [-3.0, -2.0, -1.0], [0.1, 0.3], [1.0, 1.1, 0.9]])
def test_p_below_alpha_exactly_when_the_interval_excludes_zero(values):
    excludes = table_stats.verdict(table_stats.t_interval(values), "lower") != "not resolved"
    assert (table_stats.t_test_p(values) < 0.05) == excludes


@pytest.mark.parametrize("p_values", [
    [0.01, 0.04, 0.03, 0.2],
    [0.02, 0.024, 0.5],  # 0.02 fails 0.05/3, so 0.024 is not rejected though it is below 0.05/2 (step-down stops)
    [0.001, 0.001, 0.02, 0.04],  # ties, then 0.02 < 0.05/2 and 0.04 < 0.05/1: all rejected
    [0.049],  # one claim: Holm is the plain test
    [0.3, 0.6],
])
def test_holm_equals_the_plain_loop(p_values):
    rejected, adjusted = table_stats.holm(p_values)
    assert rejected == holm_by_loop(p_values)
    assert [a < 0.05 for a in adjusted] == rejected  # adjusted p below alpha exactly when rejected
    order = np.argsort(p_values, kind="stable")
    running = 0.0
    for rank, i in enumerate(order):  # adjusted p: cumulative max of (m - rank) p, capped at 1
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        assert adjusted[i] == pytest.approx(running)


def test_holm_worked_example():
    # m = 4: 0.01 < 0.0125 rejected; 0.03 is not < 0.05/3 = 0.0167, so it and every larger p stay
    assert table_stats.holm([0.01, 0.04, 0.03, 0.2]) == ([True, False, False, False],
                                                         pytest.approx([0.04, 0.09, 0.09, 0.2]))
    # a claim without a p-value (fewer than 2 paired seeds) counts in m and is never rejected
    assert table_stats.holm([0.03, None]) == ([False, False], [0.06, None])  # 0.03 is not < 0.05/2
    assert table_stats.holm([0.03]) == ([True], [0.03])


def test_adjusted_verdict():
    assert table_stats.adjusted_verdict(-0.1, True, "lower") == "reproduced"
    assert table_stats.adjusted_verdict(-0.1, True, "higher") == "contradicted"
    assert table_stats.adjusted_verdict(0.1, True, "lower") == "contradicted"
    assert table_stats.adjusted_verdict(-0.1, False, "lower") == "not resolved"
    assert table_stats.adjusted_verdict(None, False, "lower") == "not resolved"
    with pytest.raises(ValueError, match="better='down'"):
        table_stats.adjusted_verdict(-0.1, True, "down")


def test_statistics_adjust_over_the_table_claims(tmp_path):
    """Every claim's p is scipy's one-sample t-test of its differences, its Holm verdict the loop's; the val_loss
    claim is reproduced unadjusted and not resolved after Holm."""
    table, payload = make_results(tmp_path, None)
    claims = table_stats.statistics(table, payload)["claims"]
    p_values = [stats.ttest_1samp(DIFFERENCES[c["metric"]], 0.0).pvalue for c in claims]
    rejected = holm_by_loop(p_values)
    assert [c["p"] for c in claims] == pytest.approx(p_values, rel=1e-9)
    assert [c["verdict_holm"] for c in claims] == [scipy_verdict(DIFFERENCES[c["metric"]], r)
                                                   for c, r in zip(claims, rejected, strict=True)]
    assert [(c["verdict"], c["verdict_holm"]) for c in claims] == [
        ("reproduced", "not resolved"), ("reproduced", "reproduced"), ("contradicted", "contradicted"),
        ("not resolved", "not resolved")]
    assert all(c["family_size"] == 4 and c["family_alpha"] == 0.05 for c in claims)
    assert claims[0]["p"] == pytest.approx(0.0299181, abs=1e-6) and claims[0]["p_holm"] == pytest.approx(
        2 * claims[0]["p"])
    assert all("preregistered" not in c for c in claims)


# ----------------------------------------------------------------------------------------------- pre-registered


def test_preregistered_seeds_default_and_checks(tmp_path):
    table, payload = make_results(tmp_path, None)
    assert table.SEEDS_PREREGISTERED == table.SEEDS == 5
    assert table_stats.statistics(table, payload)["seeds_preregistered"] is None
    for bad in (0, 6, "3", True):
        (tmp_path / "bad.py").write_text(TOY_TABLE + f"SEEDS_PREREGISTERED = {bad!r}\n")
        with pytest.raises(runner.UsageError, match="SEEDS_PREREGISTERED=.* is invalid: must be an integer from 1 to"):
            tables.load_table("bad", tmp_path)


def test_verdicts_at_the_preregistered_seeds(tmp_path):
    """SEEDS_PREREGISTERED = 3 < SEEDS = 5: every claim also carries the statistics of seeds 0-2, equal to those of
    a run of 3 seeds, Holm over the claims at those seeds."""
    table, payload = make_results(tmp_path, 3)
    out = table_stats.statistics(table, payload)
    assert out["seeds_preregistered"] == 3
    _, first_three = make_results(tmp_path, 3, seeds=3)
    early = table_stats.statistics(table, first_three)["claims"]
    for claim, reference in zip(out["claims"], early, strict=True):
        pre = claim["preregistered"]
        assert pre["seeds"] == [0, 1, 2] and pre["values"] == pytest.approx(DIFFERENCES[claim["metric"]][:3])
        for key in ("n", "mean", "low", "high", "verdict", "p", "p_holm", "verdict_holm"):
            assert pre[key] == pytest.approx(reference[key]) if isinstance(pre[key], float) else pre[key] == \
                reference[key], key
        assert pre["p"] == pytest.approx(stats.ttest_1samp(DIFFERENCES[claim["metric"]][:3], 0.0).pvalue)
    # at 3 seeds the val_loss claim is not resolved (p 0.069); at 5 it is reproduced (p 0.030)
    assert out["claims"][0]["preregistered"]["verdict"] == "not resolved" and out["claims"][0]["verdict"] == \
        "reproduced"


def test_page_and_readme_show_p_holm_and_the_preregistered_verdicts(tmp_path):
    tables_dir, results = tmp_path / "tables", tmp_path / "results"
    tables_dir.mkdir()
    results.mkdir()
    table, payload = make_results(tables_dir, 3)
    payload.update(table_stats.statistics(table, payload))
    md = report.markdown(table, "toy", payload, [])
    assert "**Seeds extended after a result was seen:** the seeds of this table were raised from 3 per row" in md
    assert ("| claim | verdict | p | Holm-adjusted verdict | verdict at seeds 0-2 (pre-registered) | p at seeds 0-2 | "
            "Holm-adjusted at seeds 0-2 |") in md
    first = payload["claims"][0]
    assert (f"| b beats a | **reproduced** | 0.0299 | **not resolved** | **not resolved** | "
            f"{first['preregistered']['p']:.4f} | **not resolved** |") in md
    assert "| b balances better | **reproduced** | 9.3e-06 | **reproduced** |" in md
    line = next(line for line in md.splitlines() if line.startswith("* **reproduced**: b beats a."))
    assert ", p = 0.0299, Holm-adjusted p = 0.0598 over the 4 claims: **not resolved** after Holm" in line
    assert "At the pre-registered seeds (0, 1, 2): **not resolved**" in line
    assert "The **Holm-adjusted verdict** corrects for the table testing several claims" in md
    # the README block: the same columns, and the pre-registered verdicts
    (results / "toy.json").write_text(json.dumps(payload))
    (results / "toy.md").write_text(md)
    block = summary.summary_block(results, tables_dir, tmp_path)
    assert "**Seeds extended after a result was seen** (from 3 to 5)" in block.replace("\n", " ")
    assert ("| b beats a | **reproduced** | 0.0299 | **not resolved** | `val_loss` b − a = -0.0320 | "
            f"{report.interval_text(first)} | 5 | **not resolved** / **not resolved** (p "
            f"{first['preregistered']['p']:.4f}) |") in block
    # a table run at its pre-registered seeds has neither the statement nor the columns
    table, payload = make_results(tables_dir, None)
    payload.update(table_stats.statistics(table, payload))
    md = report.markdown(table, "toy", payload, [])
    assert "Seeds extended" not in md and "pre-registered" not in md
    assert "| b beats a | **reproduced** | 0.0299 | **not resolved** |\n" in md
    (results / "toy.json").write_text(json.dumps(payload))
    assert "Seeds extended" not in summary.summary_block(results, tables_dir, tmp_path)


# ----------------------------------------------------------------------------------------------- committed results


# The tables whose seeds were raised after results at 3 seeds had been seen (their git history: results committed
# at 3 seeds, then SEEDS = 5); the others ran at their seeds from the start.
EXTENDED = {"deepseekmoe_table1": 3, "loss_free_vs_aux": 3, "switch_capacity": 3}


@pytest.mark.parametrize("name", ["deepseekmoe_table1", "deepseekmoe_fig3", "switch_capacity", "loss_free_vs_aux",
                                  "top_p_vs_top2"])
def test_committed_pages_show_holm_and_preregistered_verdicts(name):
    table = tables.load_table(name)
    assert table.SEEDS_PREREGISTERED == EXTENDED.get(name, table.SEEDS)
    payload = json.loads((summary.RESULTS_DIR / f"{name}.json").read_text())
    md = (summary.RESULTS_DIR / f"{name}.md").read_text()
    out = table_stats.statistics(table, payload)
    assert out["seeds_preregistered"] == EXTENDED.get(name)
    for line in report.verdict_table(out["claims"], out["seeds_preregistered"]):
        assert line in md.splitlines()
    for claim in out["claims"]:
        assert f"* {report.claim_line(claim)}" in md
    assert ("**Seeds extended after a result was seen:**" in md) == (name in EXTENDED)
    readme = summary.README.read_text()
    assert readme[readme.index(summary.BEGIN):readme.index(summary.END) + len(summary.END)] == summary.summary_block()
