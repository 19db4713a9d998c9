"""The results page of an ablation table (experiments/reproduce.py): the markdown page (its provenance from
experiments/provenance.py, its statistics from experiments/stats.py) and its plots.
"""
from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from experiments import runner
from experiments.provenance import changes_text, corpora, corpus_text, tokens_per_run
from experiments.stats import CONFIDENCE
from moejax import plots


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return number(mean) + (f" ± {number(std)}" if std is not None else "")


def interval_text(stat: dict[str, Any]) -> str:
    """'[low, high]' of a t_interval, or why there is none."""
    if stat.get("low") is None:
        return f"no interval (n = {stat.get('n', 0)})"
    return f"[{number(stat['low'])}, {number(stat['high'])}]"


def _params(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}M"


def p_text(p: float | None) -> str:
    """A p-value as the pages write it: 4 decimals, scientific below 0.0001, '–' for none (n < 2)."""
    if p is None:
        return "–"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def seeds_text(seeds: int) -> str:
    """'seeds 0-2' for the first ``seeds`` seeds."""
    return "seed 0" if seeds == 1 else f"seeds 0-{seeds - 1}"


def claim_line(claim: dict[str, Any]) -> str:
    """One verdict line of a results page: the verdict, the paired difference with its t-interval, p-value and
    Holm-adjusted verdict, and (tables whose seeds were extended) the same at the pre-registered seeds."""
    head = f"**{claim['verdict']}**: {claim['text']}. `{claim['metric']}` {claim['row']} − {claim['reference']}"
    if not claim["n"]:
        return f"{head}: no seed where both rows finished (the paper's direction: {claim['better']})."
    values = ", ".join(f"{v:+.4f}" for v in claim["values"])
    line = (f"{head} = {number(claim['mean'])}, {claim.get('confidence', CONFIDENCE):.0%} t-interval "
            f"{interval_text(claim)}, n = {claim['n']} paired seed(s)")
    if "verdict_holm" in claim:
        line += (f", p = {p_text(claim['p'])}, Holm-adjusted p = {p_text(claim['p_holm'])} over the "
                 f"{claim['family_size']} claims: **{claim['verdict_holm']}** after Holm")
    line += f" (the paper's direction: {claim['better']}; per seed: {values})."
    early = claim.get("preregistered")
    if early is not None and early["n"] < claim["n"]:
        line += (f" At the pre-registered seeds ({', '.join(map(str, early['seeds'])) or 'none paired'}): "
                 f"**{early['verdict']}**")
        if early["n"]:
            line += (f", mean {number(early['mean'])}, t-interval {interval_text(early)}, p = {p_text(early['p'])}, "
                     f"**{early['verdict_holm']}** after Holm")
        line += "."
    return line


def verdict_table(claims: list[dict[str, Any]], seeds_preregistered: int | None) -> list[str]:
    """The verdicts of a page as a table: per claim its verdict, p-value and Holm-adjusted verdict, and the same at
    the pre-registered seeds when ``seeds_preregistered`` (the table's seeds were extended after a result)."""
    header = ["claim", "verdict", "p", "Holm-adjusted verdict"]
    if seeds_preregistered:
        first = seeds_text(seeds_preregistered)
        header += [f"verdict at {first} (pre-registered)", f"p at {first}", f"Holm-adjusted at {first}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for claim in claims:
        cells = [claim["text"], f"**{claim['verdict']}**", p_text(claim.get("p")),
                 f"**{claim.get('verdict_holm', '–')}**"]
        early = claim.get("preregistered")
        if seeds_preregistered:
            cells += ([f"**{early['verdict']}**", p_text(early["p"]), f"**{early['verdict_holm']}**"] if early
                      else ["–", "–", "–"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def extension_text(seeds_preregistered: int, seeds: int) -> str:
    """The page's statement that a table's seeds were extended after a result was seen."""
    return (f"**Seeds extended after a result was seen:** the seeds of this table were raised from "
            f"{seeds_preregistered} per row (`SEEDS_PREREGISTERED`) to {seeds} after results at "
            f"{seeds_preregistered} seeds had been seen. Adding seeds because a claim was not resolved makes a "
            f"resolved verdict at the extended seeds likelier by chance than its 5% error rate says, so the "
            f"pre-registered test is the verdict at the first {seeds_preregistered} ({seeds_text(seeds_preregistered)})"
            f", given beside each verdict at all {seeds}.")


def plot_specs(table_name: str, results: dict[str, Any]) -> list[tuple[str, str, Callable[[pathlib.Path], Any]]]:
    """The plots of a results page: [(caption, file name, draw(path))]."""
    finished = {row["name"]: [pathlib.Path(e["workdir"]) for e in row["runs"]] for row in results["rows"]}
    finished = {name: dirs for name, dirs in finished.items() if dirs}
    moe = {name: dirs for name, dirs in finished.items()
           if next(r for r in results["rows"] if r["name"] == name)["mean"].get("maxvio") is not None}
    specs: list[tuple[str, str, Callable[[pathlib.Path], Any]]] = []
    if finished:
        specs.append(("Train loss (solid) and eval loss (dashed), mean over seeds with min-max band",
                      f"{table_name}_loss.png", lambda p: plots.loss_curves(finished, p)))
    # the table's REFERENCE, else (when it has not run) the reference row of the first claim whose rows both ran
    claims = results.get("claims", [])
    candidates = [results.get("reference")] + [c["reference"] for c in claims if c["row"] in finished]
    reference = next((name for name in candidates if name in finished), None)
    if reference is not None and len(finished) > 1:
        by_seed = {row["name"]: {e["seed"]: pathlib.Path(e["workdir"]) for e in row["runs"]}
                   for row in results["rows"] if row["runs"]}
        specs.append((f"Train loss minus {reference}'s at the same seed (the same batches), over training: each seed "
                      "and the mean", f"{table_name}_paired.png",
                      lambda p: plots.paired_difference_curves(by_seed, reference, p)))
    if moe:
        specs.append(("MaxVio during training (max load / mean load - 1, mean over MoE layers)",
                      f"{table_name}_maxvio.png", lambda p: plots.stat_curves(moe, "maxvio", p)))
        epts = [e["metrics"].get("train_experts_per_token") for r in results["rows"] for e in r["runs"]]
        if any(v is not None and abs(v - round(v)) > 1e-6 for v in epts):
            specs.append(("Routed experts per token during training (mean over MoE layers)",
                          f"{table_name}_experts_per_token.png",
                          lambda p: plots.stat_curves(moe, "experts_per_token", p)))
        for name, dirs in moe.items():
            specs.append((f"Expert load of {name} (seed 0), per MoE layer", f"{table_name}_load_{name}.png",
                          lambda p, d=dirs[0]: plots.load_heatmap(d, p)))
    return specs


def write_plots(table_name: str, results: dict[str, Any], out_dir: pathlib.Path) -> list[tuple[str, str]]:
    """The PNGs beside the markdown; returns [(caption, file name)]. A plot that cannot be drawn is reported and
    left out (e.g. no expert loads in runs logged before moejax recorded them)."""
    plots = []
    for caption, file, draw in plot_specs(table_name, results):
        try:
            draw(out_dir / file)
        except (ValueError, FileNotFoundError) as e:
            print(f"[reproduce] plot {file} left out: {e}", flush=True)
            continue
        plots.append((caption, file))
    return plots


def existing_plots(table_name: str, results: dict[str, Any], out_dir: pathlib.Path) -> list[tuple[str, str]]:
    """The plots of plot_specs already in out_dir (for --render-only, which draws nothing)."""
    return [(caption, file) for caption, file, _ in plot_specs(table_name, results) if (out_dir / file).exists()]


def observed_order(results: dict[str, Any], metric: str) -> tuple[str, list[str]]:
    """The rows ordered by mean ``metric`` (lowest first) as 'a < b < c', and per seed the same order."""
    means = [(r["mean"][metric], r["name"]) for r in results["rows"] if r["mean"].get(metric) is not None]
    by_mean = " < ".join(name for _, name in sorted(means))
    seeds = max((len(r["runs"]) for r in results["rows"]), default=0)
    per_seed = []
    for seed in range(seeds):
        values = [(r["runs"][seed]["metrics"].get(metric), r["name"]) for r in results["rows"] if seed < len(r["runs"])]
        per_seed.append(" < ".join(name for value, name in sorted(v for v in values if v[0] is not None)))
    return by_mean, per_seed


VERDICT_RULE = ("Each claim compares two rows within seeds: the differences (row − reference) at every seed both "
                "finished, their mean and 95% t-interval mean ± t_{0.975, n−1} · sd / √n over the n paired seeds. "
                "**reproduced**: the interval excludes 0 in the paper's direction; **contradicted**: it excludes 0 "
                "the other way; **not resolved**: it contains 0, or n < 2. The **Holm-adjusted verdict** corrects "
                "for the table testing several claims: the Holm-Bonferroni step-down over the table's claims at "
                "family-wise α = 0.05, on each claim's two-sided paired t-test p-value (t = mean / (sd / √n), n − 1 "
                "degrees of freedom; p < 0.05 exactly when the interval excludes 0), gives reproduced or "
                "contradicted only where Holm rejects the claim's null, else not resolved.")


def markdown(table: ModuleType, table_name: str, payload: dict[str, Any], plots: list[tuple[str, str]],
             findings: str | None = None, rendered_by: str | None = None) -> str:
    """The results page of ``payload`` (experiments.reproduce.main()'s <table>.json content): header (tokens per
    run, corpus, budget status, and whether the runs predate the table's current definition), main table, observed
    order, verdicts, findings (hand-written, kept across reruns in <table>.findings.md), paired differences, rows,
    budget, corpus, plots. ``rendered_by``: the --render-only command that rewrites an existing page from its JSON."""
    metrics = list(table.METRICS)
    rows = payload["rows"]
    seeds, budget = payload["seeds"], payload["budget"]
    paper_labels = list(dict.fromkeys(label for row in rows for label in row["paper"]))
    lines = [f"# {table.TITLE}", "", f"**Paper:** {table.PAPER}", "", f"**Expected (paper):** {table.EXPECTED}", ""]
    runs_made = f"{seeds} seed(s) per row, budget `{budget}`"
    if rendered_by:
        made = (f"the runs were made by `{payload['command']}` on {payload['generated']}" if payload.get("command")
                else f"the runs (`{payload.get('workdir', '?')}`) were made before the results recorded their "
                     "command and date")
        lines.append(f"Rendered {datetime.date.today().isoformat()} by `{rendered_by}` from `{table_name}.json`, "
                     f"without rerunning anything; {made}: {runs_made}.")
    else:
        lines.append(f"Generated {payload['generated']} by `{payload['command']}`: {runs_made}.")
    lines[-1] += " Values are mean ± std over the finished seeds (std with ddof=1; none with one seed)."
    lines += ["", f"**Tokens per run** (train.steps × train.batch_size × train.seq_len): {tokens_per_run(payload)}.",
              "", f"**Corpus:** {corpus_text(payload)}.", ""]
    status = getattr(table, "BUDGET_STATUS", None)
    if status and budget == "full":
        lines += [f"**Budget status:** {status}.", ""]
    changes = changes_text(table, payload)
    if changes:
        lines += [changes, ""]
    if budget != "full":
        lines += ["**SMOKE BUDGET: these numbers test the pipeline and mean nothing.**", ""]
    header = ["row", "seeds", "params total / activated", *metrics, *(f"paper: {label}" for label in paper_labels)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for res in rows:
        mean, std = res["mean"], res["std"]
        cells = [f"**{res['name']}**", f"{res['seeds_finished']}/{seeds}",
                 f"{_params(mean.get('params_total'))} / {_params(mean.get('params_activated'))}",
                 *(_cell(mean.get(m), std.get(m)) for m in metrics),
                 *(f"{res['paper'][label]:g}" if label in res["paper"] else "–" for label in paper_labels)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Metrics: " + "; ".join(f"`{m}` = {runner.METRICS[m]}" for m in metrics) + "."]
    by_mean, per_seed = observed_order(payload, metrics[0])
    if by_mean:
        lines += ["", f"**Observed order by mean `{metrics[0]}`** (lowest first): {by_mean}. Per seed: "
                  + "; ".join(f"seed {i}: {order}" for i, order in enumerate(per_seed)) + "."]
    if payload.get("claims"):
        lines += ["", "## Verdicts", "", f"One line per claim of the paper (`CLAIMS` in "
                  f"`experiments/tables/{table_name}.py`). {VERDICT_RULE}", ""]
        early = payload.get("seeds_preregistered")
        extended = bool(early) and any(claim["n"] > (claim.get("preregistered") or {}).get("n", claim["n"])
                                       for claim in payload["claims"])
        if extended:
            lines += [extension_text(early, seeds), ""]
        lines += verdict_table(payload["claims"], early if extended else None) + [""]
        lines += [f"* {claim_line(claim)}" for claim in payload["claims"]]
    if findings:
        lines += ["", "## Findings", "", findings.strip()]
    if payload.get("differences"):
        ref = payload["reference"]
        lines += ["", f"## Paired differences vs `{ref}`", "",
                  f"Per row and metric: mean ± std over seeds of (row − {ref}) at the same seed, and its 95% "
                  f"t-interval [mean ± t_{{0.975, n−1}} · sd / √n]. The seed fixes the initialisation and the data "
                  "order, so these differences are less noisy than the rows' own spreads.", "",
                  "| row | paired seeds | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
                  "|" + "---|" * (len(metrics) + 2)]
        for name, diffs in payload["differences"].items():
            n = max((diffs[m]["n"] for m in metrics if m in diffs), default=0)
            cells = [f"{_cell(diffs[m]['mean'], diffs[m]['std'])} {interval_text(diffs[m])}"
                     if m in diffs and diffs[m]["values"] else "–" for m in metrics]
            lines.append(f"| **{name}** | {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Rows", ""]
    for res in rows:
        overrides = " ".join(f"`{f}={runner.format_value(v)}`" for f, v in res["overrides"].items()) or "no overrides"
        lines.append(f"* **{res['name']}**: `{res['config']}` with {overrides}" + (f". {res['note']}" if res["note"]
                                                                                   else ""))
    wall = sum(e["metrics"].get("wall_seconds") or 0 for r in rows for e in r["runs"])
    lines += ["", "## Budget", "",
              "Shared overrides: " + " ".join(f"`{f}={runner.format_value(v)}`"
                                              for f, v in payload["budget_overrides"].items())
              + f". Wall time of the runs' last invocations, summed: {runner.duration(wall)}."
              + (" Provisional (see the budget status above)." if status and budget == "full" else ""), ""]
    missing = [f"{r['name']} ({r['seeds_finished']}/{seeds})" for r in rows if r["seeds_finished"] < seeds]
    if missing:
        lines += [f"**Incomplete rows:** {', '.join(missing)}.", ""]
    fingerprints = [(fp, names) for fp, names in corpora(payload) if fp is not None]
    if fingerprints:
        lines += ["## Corpus", "", "The runs' corpus fingerprint (summary.json's `corpus`):", ""]
        for fingerprint, names in fingerprints:
            lines += ([f"Rows {', '.join(names)}:", ""] if len(fingerprints) > 1 else []) + [
                "```json", json.dumps(fingerprint, indent=1, sort_keys=True), "```", ""]
    if plots:
        lines += ["## Plots", ""]
        for caption, file in plots:
            lines += [f"{caption}:", "", f"![{caption}]({file})", ""]
    return "\n".join(lines).rstrip() + "\n"


