"""Reproduces an ablation table: every row of ``experiments/tables/<table>.py`` at several seeds, then a markdown
page (mean +- std over seeds, the paper's numbers beside them, paired differences with 95% t-intervals and one
verdict per paper claim), a JSON file of every run's values, and plots.

    python -m experiments.reproduce deepseekmoe_table1 [--seeds N] [--workdir runs/deepseekmoe_table1] [--jobs 1]
        [--budget full|smoke] [--rows dense,gshard] [--dry-run] [--results-dir experiments/results]
        [--set train.steps=600 ...]                                   # a pilot budget: see below
    python -m experiments.reproduce deepseekmoe_table1 --render-only   # <table>.md again from <table>.json
    python -m experiments.reproduce --summary                          # README.md's results block

Each run is ``python -m moejax.main --config=<row config> --workdir=<workdir>/<row>/seed<k> --config.seed=<k>
--config.<field>=<value> ...`` with the table's BUDGET and then the row's overrides (experiments/runner.py runs
them). Rerunning the same command skips finished runs and resumes interrupted ones from their checkpoints, so a
table can be stopped (Ctrl-C: the running runs save a checkpoint) and continued at any time.

``--budget smoke`` applies SMOKE_BUDGET (a few steps of a small batch) after the row's overrides, to check a
table's whole pipeline in a few minutes; its runs go to ``runs/<table>_smoke`` and its results beside them unless
--workdir / --results-dir say otherwise, so a smoke run never replaces real results.

``--set <field>=<value>`` (repeatable) changes the table's BUDGET for a pilot study, e.g. ``--set train.steps=600``
to see whether a longer budget resolves a claim: the overrides apply after BUDGET and before the row's own; the
runs go to ``runs/<table>_<field>=<value>...`` and the results beside them unless --workdir / --results-dir say
otherwise, and the page says which budget fields were changed. The table file's BUDGET stays what the committed
results use.

Statistics (on every results page and in <table>.json):

* per row and metric, the mean and std (ddof=1) over the finished seeds;
* paired differences: for every row against the table's REFERENCE, and for every claim of the table's CLAIMS
  (experiments.tables.Claim) between its two rows, the differences (row - reference) at each seed both finished.
  The seed fixes the initialisation and the data order, so these are less noisy than the rows' own spreads. Of
  the n paired differences: mean, std and the 95% t-interval mean +- t_{0.975, n-1} * sd / sqrt(n)
  (``t_interval``; scipy.stats.t.ppf; none for n < 2);
* one verdict per claim (``verdict``): 'reproduced' when the interval excludes 0 on the side the paper claims
  (Claim.better), 'contradicted' when it excludes 0 on the other side, 'not resolved' when it contains 0 or fewer
  than 2 seeds are paired;
* the tokens per run (train.steps x train.batch_size x train.seq_len) and the corpus fingerprint of the runs
  (summary.json's ``corpus``: the corpus and its tokenizer); results made under settings that differ from the table
  file's current ones (e.g. before the tables' BPE default) say so and list the differing fields.

Outputs, in --results-dir (default experiments/results for the full budget):

    <table>.md              per row: mean +- std over the seeds of each metric of METRICS, the paper's numbers,
                            parameters; the observed order of the rows (by mean and per seed); the verdicts; the
                            text of <table>.findings.md if present (hand-written analysis that reruns keep); the
                            paired differences against REFERENCE with their t-intervals; rows, budget, corpus
    <table>.json            every run's metrics, the per-row means and stds, the differences, the claims
    <table>_loss.png        train and eval loss of every row (mean over seeds, min-max band)
    <table>_maxvio.png      train MaxVio of the MoE rows, mean over layers (tables with MoE rows)
    <table>_experts_per_token.png   for tables where the number of experts per token varies (dynamic routers)
    <table>_load_<row>.png  expert-load heatmap of each MoE row's seed 0 (when the runs log expert loads)

``--render-only`` writes <table>.md again from the <table>.json of --results-dir (the statistics and verdicts
recomputed from its per-seed values and the table's current CLAIMS, the plots that exist linked), running and
drawing nothing and leaving the JSON as it is.

README.md's block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is generated from the verdicts
(``summary_block``): per table its claims, verdicts, intervals, seeds, tokens per run and a link to the results
page, or that it has no results. ``--summary`` rewrites it from experiments/results/*.json; so does every run or
``--render-only`` whose results go to experiments/results.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import textwrap
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from scipy import stats

from experiments import runner
from experiments.tables import Claim, Row
from moejax import analysis

TABLES_DIR = pathlib.Path(__file__).resolve().parent / "tables"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"  # README.md's generated results block
CONFIDENCE = 0.95  # of the t-intervals of paired differences
# The README summary lists these tables first, in this order, then any other table alphabetically.
SUMMARY_ORDER = ("deepseekmoe_table1", "deepseekmoe_fig3", "switch_capacity", "loss_free_vs_aux", "top_p_vs_top2")
REPRODUCED, NOT_RESOLVED, CONTRADICTED = "reproduced", "not resolved", "contradicted"
DIRECTIONS = ("lower", "higher")
REQUIRED = ("TITLE", "PAPER", "ROWS", "BUDGET", "METRICS", "EXPECTED")
BUDGETS = ("full", "smoke")
# Seeds per row when neither the command line (--seeds) nor the table (SEEDS) says.
DEFAULT_SEEDS = 3
# A few steps of a small batch, evaluated once on one batch: the pipeline in seconds per run, not a result.
SMOKE_BUDGET = {"train.steps": 4, "train.batch_size": 8, "train.seq_len": 32, "train.warmup_steps": 1,
                "train.log_every": 2, "train.eval_every": 0, "data.eval_batches": 1, "checkpoint.every_steps": 0}
_ROW_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def available_tables(tables_dir: pathlib.Path) -> list[str]:
    return sorted(p.stem for p in tables_dir.glob("*.py") if not p.name.startswith("_"))


def load_table(name: str, tables_dir: pathlib.Path = TABLES_DIR) -> ModuleType:
    """The table module ``<tables_dir>/<name>.py``, checked: its attributes, rows, metrics and every override
    against its config. Raises runner.UsageError naming what is wrong and what is allowed."""
    path = tables_dir / f"{name}.py"
    if not path.is_file():
        raise runner.UsageError(f"table {name!r} does not exist in {tables_dir}; allowed tables: "
                                f"{', '.join(available_tables(tables_dir)) or '(none)'}")
    spec = importlib.util.spec_from_file_location(f"_moejax_table_{name}", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    missing = [attr for attr in REQUIRED if not hasattr(table, attr)]
    if missing:
        raise runner.UsageError(f"table file {path} lacks {', '.join(missing)} (a table defines {', '.join(REQUIRED)}"
                                ", see experiments/tables/__init__.py)")
    table.SEEDS = getattr(table, "SEEDS", DEFAULT_SEEDS)
    if not isinstance(table.SEEDS, int) or isinstance(table.SEEDS, bool) or table.SEEDS < 1:
        raise runner.UsageError(f"table file {path}: SEEDS={table.SEEDS!r} is invalid: must be an integer >= 1")
    table.ROWS = [row if isinstance(row, Row) else Row(**row) for row in table.ROWS]
    names = [row.name for row in table.ROWS]
    for row in table.ROWS:
        if not _ROW_NAME.match(row.name) or names.count(row.name) > 1:
            raise runner.UsageError(f"table {name}: row name {row.name!r} must be unique and made of letters, digits, "
                                    "'_', '-' and '.' (it names the row's run directory)")
        config = runner.load_config(row.config)
        for field, value in {**table.BUDGET, **row.overrides}.items():
            runner.typed_value(config, field, value, f"table {name}, row {row.name!r} ({row.config})")
    for metric in table.METRICS:
        runner.check_metric(metric, f"table {name}, METRICS")
    reference = getattr(table, "REFERENCE", None)
    if reference is not None and reference not in names:
        raise runner.UsageError(f"table {name}: REFERENCE={reference!r} is not a row; rows: {', '.join(names)}")
    table.CLAIMS = [claim if isinstance(claim, Claim) else Claim(**claim) for claim in getattr(table, "CLAIMS", [])]
    for claim in table.CLAIMS:
        where = f"table {name}, claim {claim.text!r}"
        for row in (claim.row, claim.reference):
            if row not in names:
                raise runner.UsageError(f"{where}: {row!r} is not a row; rows: {', '.join(names)}")
        if claim.row == claim.reference:
            raise runner.UsageError(f"{where}: row and reference are both {claim.row!r}; a claim compares two rows")
        runner.check_metric(claim.metric, where)
        if claim.better not in DIRECTIONS:
            raise runner.UsageError(f"{where}: better={claim.better!r} is invalid: allowed {', '.join(DIRECTIONS)}")
    return table


def select_rows(table: ModuleType, rows: str | None) -> list[Row]:
    """The rows named in ``rows`` ('a,b'), in the table's order; all of them when None."""
    if rows is None:
        return list(table.ROWS)
    names = [row.name for row in table.ROWS]
    wanted = [r.strip() for r in rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in names]
    if unknown or not wanted:
        raise runner.UsageError(f"--rows={rows!r}: unknown row {', '.join(map(repr, unknown)) or '(none given)'}; "
                                f"the rows of table {table.__name__.removeprefix('_moejax_table_')} are "
                                f"{', '.join(names)}")
    return [row for row in table.ROWS if row.name in wanted]


def pilot_budget(table: ModuleType, sets: list[str], budget: str) -> dict[str, Any]:
    """--set FIELD=VALUE ...: {field: typed value}; table.BUDGET becomes BUDGET with them (a pilot budget) and
    table.BUDGET_STATUS says so. Fields are typed against the first row's config."""
    if not sets:
        return {}
    if budget != "full":
        raise runner.UsageError(f"--set changes the full budget; it cannot be combined with --budget={budget}")
    config = runner.load_config(table.ROWS[0].config)
    parsed = {}
    for item in sets:
        field, eq, value = item.partition("=")
        if not eq or not field:
            raise runner.UsageError(f"--set {item!r} is invalid: expected FIELD=VALUE, e.g. train.steps=600")
        parsed[field] = runner.typed_value(config, field, value, f"--set {item!r}")
    table.BUDGET = {**table.BUDGET, **parsed}
    table.BUDGET_STATUS = ("pilot budget: the table's BUDGET with "
                           + ", ".join(f"`{f}={runner.format_value(v)}`" for f, v in parsed.items())
                           + " (experiments.reproduce --set), not the budget of the committed results")
    return parsed


def plan(table: ModuleType, rows: list[Row], seeds: int, workdir: pathlib.Path, budget: str) -> dict[str, list[Any]]:
    """{row name: [Run per seed]}: overrides are BUDGET then the row's (full), or the row's then SMOKE_BUDGET."""
    runs = {}
    for row in rows:
        overrides = {**table.BUDGET, **row.overrides} if budget == "full" else {**row.overrides, **SMOKE_BUDGET}
        config = runner.load_config(row.config)
        runs[row.name] = [
            runner.Run(f"{row.name} seed{seed}", row.config, workdir / row.name / f"seed{seed}",
                       {field: runner.typed_value(config, field, value, f"row {row.name!r}")
                        for field, value in {"seed": seed, **overrides}.items()})
            for seed in range(seeds)]
    return runs


# ----------------------------------------------------------------------------------------------- statistics


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The t-interval of the mean of ``values`` (paired differences): mean +- t_{(1+confidence)/2, n-1} * sd /
    sqrt(n), with sd the std with ddof=1. Returns {'n', 'mean', 'std', 't', 'low', 'high'}; std, t, low and high
    are None for fewer than 2 values (mean too for none)."""
    n = len(values)
    mean, std = _mean_std(list(values))
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


def collect(table: ModuleType, rows: list[Row], runs: dict[str, list[runner.Run]]) -> dict[str, Any]:
    """The results as JSON: per row its runs' metrics (finished runs only; with each run's corpus fingerprint,
    tokenizer and tokens), mean and std (ddof=1) per metric; then ``statistics``."""
    result_rows = []
    for row in rows:
        entries = []
        for seed, run in enumerate(runs[row.name]):
            if run.summary_path.exists():
                config = json.loads((run.workdir / "config.json").read_text())
                summary = json.loads(run.summary_path.read_text())
                train = config["train"]
                entries.append({"seed": seed, "workdir": str(run.workdir), "metrics": runner.run_metrics(run.workdir),
                                "steps": train["steps"], "batch_size": train["batch_size"],
                                "seq_len": train["seq_len"],
                                "tokens": train["steps"] * train["batch_size"] * train["seq_len"],
                                "tokenizer": config.get("data", {}).get("tokenizer"),
                                "vocab_size": config.get("model", {}).get("vocab_size"),
                                "corpus": summary.get("corpus")})
        stats_ = {m: _mean_std([e["metrics"][m] for e in entries if e["metrics"][m] is not None])
                  for m in runner.METRICS}
        result_rows.append({"name": row.name, "config": row.config, "overrides": row.overrides, "paper": row.paper,
                            "note": row.note, "runs": entries, "seeds_finished": len(entries),
                            "mean": {m: s[0] for m, s in stats_.items()}, "std": {m: s[1] for m, s in stats_.items()}})
    results = {"rows": result_rows}
    results.update(statistics(table, results))
    return results


# ----------------------------------------------------------------------------------------------- provenance


def tokens_per_run(results: dict[str, Any]) -> str:
    """The training tokens per run ('150 steps × 32 × 128 = 614,400 tokens'), per group of rows if they differ;
    runs recorded before batch and sequence were kept give steps × tokens per step."""
    groups: dict[str, list[str]] = {}
    for row in results["rows"]:
        for entry in row["runs"]:
            if entry.get("batch_size") and entry.get("seq_len"):
                text = f"{entry['steps']:,} steps × {entry['batch_size']} × {entry['seq_len']}"
            else:
                text = f"{entry['steps']:,} steps × {entry['tokens'] // max(entry['steps'], 1):,} tokens per step"
            text += f" = {entry['tokens']:,} tokens"
            names = groups.setdefault(text, [])
            if row["name"] not in names:
                names.append(row["name"])
    if not groups:
        return "no finished run"
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{text} ({', '.join(names)})" for text, names in groups.items())


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    from moejax.data.corpora import fingerprint_id as corpus_id  # imports the tokenizers package: only when needed

    return corpus_id(fingerprint)


def describe_corpus(fingerprint: dict[str, Any]) -> str:
    """One line naming a corpus fingerprint (summary.json's 'corpus'): corpus, tokenizer, sizes, fingerprint id."""
    details = [f"Python {fingerprint['python']}" if "python" in fingerprint else None,
               f"{fingerprint['files']:,} files" if "files" in fingerprint else None,
               f"dataset {fingerprint['dataset']}" if "dataset" in fingerprint else None,
               f"sha256 {fingerprint['sha256'][:12]}…" if "sha256" in fingerprint else None]
    text = f"`{fingerprint.get('name', '?')}` ({', '.join(d for d in details if d)})"
    tokenizer = fingerprint.get("tokenizer")
    if tokenizer:
        text += (f", tokenizer `{tokenizer.get('spec')}` (vocabulary {tokenizer.get('vocab_size', 0):,}, sha256 "
                 f"{str(tokenizer.get('sha256', '?'))[:12]}…)")
    else:
        text += ", tokenizer `bytes` (byte-level, 256 ids)"
    if "train_tokens" in fingerprint:
        text += f", {fingerprint['train_tokens']:,} training / {fingerprint.get('val_tokens', 0):,} validation tokens"
    elif "train_bytes" in fingerprint:
        text += f", {fingerprint['train_bytes']:,} training / {fingerprint.get('val_bytes', 0):,} validation bytes"
    return text + f"; fingerprint id `{fingerprint_id(fingerprint)}`"


def corpora(results: dict[str, Any]) -> list[tuple[dict[str, Any] | None, list[str]]]:
    """The distinct corpus fingerprints of the finished runs with the rows that used them (None: not recorded)."""
    groups: dict[str, tuple[dict[str, Any] | None, list[str]]] = {}
    for row in results["rows"]:
        for entry in row["runs"]:
            fingerprint = entry.get("corpus")
            _, names = groups.setdefault(json.dumps(fingerprint, sort_keys=True), (fingerprint, []))
            if row["name"] not in names:
                names.append(row["name"])
    return list(groups.values())


def _config_default(config: str, field: str) -> Any:
    try:
        return runner.config_value(runner.load_config(config), field)
    except (KeyError, runner.UsageError):
        return None


def _recorded_tokenizers(results: dict[str, Any]) -> list[str]:
    """The tokenizers of the finished runs, as text: recorded per run, else the row's data.tokenizer override, else
    not set (with today's config default)."""
    found = []
    for row in results["rows"]:
        for entry in row["runs"]:
            tokenizer = entry.get("tokenizer") or row["overrides"].get("data.tokenizer")
            text = (f"`{tokenizer}`" if tokenizer else "not set by the rows (today's config default: "
                    f"`{_config_default(row['config'], 'data.tokenizer')}`)")
            if text not in found:
                found.append(text)
    return found


def corpus_text(results: dict[str, Any], short: bool = False) -> str:
    """The corpus of the results: its fingerprint, or how the runs were tokenized when none was recorded."""
    groups = corpora(results)
    if not groups:
        return "no finished run"
    parts = []
    for fingerprint, names in groups:
        if fingerprint is None:
            tokenizers = ", ".join(_recorded_tokenizers(results))
            text = (f"not recorded (runs made before the results kept summary.json's corpus fingerprint); "
                    f"`data.tokenizer`: {tokenizers}" if not short
                    else f"fingerprint not recorded, `data.tokenizer` {tokenizers}")
        elif short:
            tokenizer = (fingerprint.get("tokenizer") or {}).get("spec", "bytes")
            text = (f"`{fingerprint.get('name', '?')}` in `{tokenizer}` tokens, fingerprint "
                    f"`{fingerprint_id(fingerprint)}`")
        else:
            text = describe_corpus(fingerprint)
        parts.append(text + (f" (rows {', '.join(names)})" if len(groups) > 1 else ""))
    warning = "**the runs used different corpora**: " if len(groups) > 1 else ""
    return warning + "; ".join(parts)


_UNSET = object()


def definition_changes(table: ModuleType, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Where the settings the results recorded (their rows' config and overrides, and the budget) differ from the
    table file now: [{'field', 'then', 'now', 'then_text', 'now_text', 'rows'}], 'then' / 'now' the values in effect
    (today's config default where nothing overrides the field), the texts saying which; a row no longer in the
    table has field None. Empty when the results match the table. Only overrides are compared: a field that no
    override sets took its config's default at the time, and a config default that changed since is not seen."""
    now_rows = {row.name: row for row in table.ROWS}
    full = results.get("budget", "full") == "full"
    budget_then = results.get("budget_overrides") or {}
    budget_now = table.BUDGET if full else SMOKE_BUDGET
    changes: dict[str, dict[str, Any]] = {}

    def effective(overrides: dict[str, Any], config: str, field: str) -> tuple[Any, str]:
        if field in overrides:
            value = overrides[field]
            return (list(value) if isinstance(value, tuple) else value), f"`{runner.format_value(value)}`"
        value = _config_default(config, field)
        return value, f"not set (today's config default: `{runner.format_value(value)}`)"

    def add(field: str | None, then: Any, now: Any, then_text: str, now_text: str, row: str) -> None:
        key = json.dumps([field, then_text, now_text], default=str)
        changes.setdefault(key, {"field": field, "then": then, "now": now, "then_text": then_text,
                                 "now_text": now_text, "rows": []})["rows"].append(row)

    for row in results["rows"]:
        if not row["runs"]:
            continue
        now = now_rows.get(row["name"])
        if now is None:
            add(None, row["name"], None, f"`{row['name']}`", "no longer a row of the table", row["name"])
            continue
        if now.config != row["config"]:
            add("config", row["config"], now.config, f"`{row['config']}`", f"`{now.config}`", row["name"])
        then_overrides = {**budget_then, **row["overrides"]} if full else {**row["overrides"], **budget_then}
        now_overrides = {**budget_now, **now.overrides} if full else {**now.overrides, **budget_now}
        for field in sorted(then_overrides.keys() | now_overrides.keys()):
            then, then_text = effective(then_overrides, row["config"], field)
            current, now_text = effective(now_overrides, now.config, field)
            if then != current:
                add(field, then, current, then_text, now_text, row["name"])
    return list(changes.values())


def changes_text(table: ModuleType, results: dict[str, Any]) -> str | None:
    """The page's statement that results predate the table's current definition, or None if they match it."""
    changes = definition_changes(table, results)
    if not changes:
        return None
    all_rows = [row["name"] for row in results["rows"] if row["runs"]]
    steps = sorted({entry["steps"] for row in results["rows"] for entry in row["runs"]})
    items = []
    for change in changes:
        rows = "every row" if change["rows"] == all_rows else "rows " + ", ".join(change["rows"])
        if change["field"] is None:
            items.append(f"row {change['then_text']} is {change['now_text']}")
        else:
            items.append(f"`{change['field']}` {change['then_text']} then, {change['now_text']} now ({rows})")
    return (f"**Measured under an older definition of this table** ({', '.join(f'{s:,}' for s in steps)} steps per "
            "run). The runs' overrides differ from what the table file now runs: " + "; ".join(items)
            + ". A field a row did not set took its config's default at the time, which may differ from today's. "
            "Rerun the table to measure its current definition; until then these numbers are about the older "
            "setting only.")


# ----------------------------------------------------------------------------------------------- rendering


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return _number(mean) + (f" ± {_number(std)}" if std is not None else "")


def _interval(stat: dict[str, Any]) -> str:
    """'[low, high]' of a t_interval, or why there is none."""
    if stat.get("low") is None:
        return f"no interval (n = {stat.get('n', 0)})"
    return f"[{_number(stat['low'])}, {_number(stat['high'])}]"


def _params(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}M"


def claim_line(claim: dict[str, Any]) -> str:
    """One verdict line of a results page."""
    head = f"**{claim['verdict']}**: {claim['text']}. `{claim['metric']}` {claim['row']} − {claim['reference']}"
    if not claim["n"]:
        return f"{head}: no seed where both rows finished (the paper's direction: {claim['better']})."
    values = ", ".join(f"{v:+.4f}" for v in claim["values"])
    return (f"{head} = {_number(claim['mean'])}, {claim.get('confidence', CONFIDENCE):.0%} t-interval "
            f"{_interval(claim)}, n = {claim['n']} paired seed(s) (the paper's direction: {claim['better']}; per "
            f"seed: {values}).")


def plot_specs(table_name: str, results: dict[str, Any]) -> list[tuple[str, str, Callable[[pathlib.Path], Any]]]:
    """The plots of a results page: [(caption, file name, draw(path))]."""
    finished = {row["name"]: [pathlib.Path(e["workdir"]) for e in row["runs"]] for row in results["rows"]}
    finished = {name: dirs for name, dirs in finished.items() if dirs}
    moe = {name: dirs for name, dirs in finished.items()
           if next(r for r in results["rows"] if r["name"] == name)["mean"].get("maxvio") is not None}
    specs: list[tuple[str, str, Callable[[pathlib.Path], Any]]] = []
    if finished:
        specs.append(("Train loss (solid) and eval loss (dashed), mean over seeds with min-max band",
                      f"{table_name}_loss.png", lambda p: analysis.loss_curves(finished, p)))
    # the table's REFERENCE, else (when it has not run) the reference row of the first claim whose rows both ran
    claims = results.get("claims", [])
    candidates = [results.get("reference")] + [c["reference"] for c in claims if c["row"] in finished]
    reference = next((name for name in candidates if name in finished), None)
    if reference is not None and len(finished) > 1:
        by_seed = {row["name"]: {e["seed"]: pathlib.Path(e["workdir"]) for e in row["runs"]}
                   for row in results["rows"] if row["runs"]}
        specs.append((f"Train loss minus {reference}'s at the same seed (the same batches), over training: each seed "
                      "and the mean", f"{table_name}_paired.png",
                      lambda p: analysis.paired_difference_curves(by_seed, reference, p)))
    if moe:
        specs.append(("MaxVio during training (max load / mean load - 1, mean over MoE layers)",
                      f"{table_name}_maxvio.png", lambda p: analysis.stat_curves(moe, "maxvio", p)))
        epts = [e["metrics"].get("train_experts_per_token") for r in results["rows"] for e in r["runs"]]
        if any(v is not None and abs(v - round(v)) > 1e-6 for v in epts):
            specs.append(("Routed experts per token during training (mean over MoE layers)",
                          f"{table_name}_experts_per_token.png",
                          lambda p: analysis.stat_curves(moe, "experts_per_token", p)))
        for name, dirs in moe.items():
            specs.append((f"Expert load of {name} (seed 0), per MoE layer", f"{table_name}_load_{name}.png",
                          lambda p, d=dirs[0]: analysis.load_heatmap(d, p)))
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
                "the other way; **not resolved**: it contains 0, or n < 2.")


def markdown(table: ModuleType, table_name: str, payload: dict[str, Any], plots: list[tuple[str, str]],
             findings: str | None = None, rendered_by: str | None = None) -> str:
    """The results page of ``payload`` (main()'s <table>.json content): header (tokens per run, corpus, budget
    status, and whether the runs predate the table's current definition), main table, observed order, verdicts,
    findings (hand-written, kept across reruns in <table>.findings.md), paired differences, rows, budget, corpus,
    plots. ``rendered_by``: the --render-only command that rewrites an existing page from its JSON."""
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
            cells = [f"{_cell(diffs[m]['mean'], diffs[m]['std'])} {_interval(diffs[m])}"
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


# ----------------------------------------------------------------------------------------------- README summary


def _wrap(text: str) -> str:
    """A markdown paragraph wrapped at 120 characters (the README's width); words and links are never split."""
    return textwrap.fill(text, width=120, break_long_words=False, break_on_hyphens=False)


def _summary_of_table(name: str, table: ModuleType, results_dir: pathlib.Path, relative_to: pathlib.Path) -> list[str]:
    json_path, page = results_dir / f"{name}.json", results_dir / f"{name}.md"
    title = f"**`{name}`**: {table.TITLE}"
    if not json_path.exists():
        return [_wrap(f"{title}. **No results yet**: `python -m experiments.reproduce {name}` writes them "
                      f"({table.SEEDS} seeds)."),
                ""]
    payload = json.loads(json_path.read_text())
    payload.update(statistics(table, payload))
    link = os.path.relpath(page, relative_to).replace(os.sep, "/") if page.exists() else None
    finished = [row["seeds_finished"] for row in payload["rows"]]
    seeds = f"{min(finished)}" if len(set(finished)) == 1 else f"{min(finished)}-{max(finished)}"
    head = f"[{name}]({link})" if link else f"`{name}`"
    text = (f"**{head}** ({table.TITLE}): {seeds} of {payload['seeds']} seed(s) per row finished; tokens per run: "
            f"{tokens_per_run(payload)}; corpus: {corpus_text(payload, short=True)}.")
    if payload.get("budget", "full") != "full":
        text += " **Smoke budget: these numbers test the pipeline and mean nothing.**"
    changes = definition_changes(table, payload)
    if changes:
        fields = ", ".join(f"`{f}`" for f in dict.fromkeys(c["field"] for c in changes if c["field"])) or "rows"
        text += (f" **Measured under an older definition of the table** (overrides differing: {fields}; see its "
                 "page); rerun it to measure the current one.")
    lines = [_wrap(text), ""]
    if not payload["claims"]:
        return lines + ["No claims declared (`CLAIMS` in the table file).", ""]
    lines += ["| claim | verdict | paired difference (row − reference) | 95% t-interval | seeds |",
              "|---|---|---|---|---|"]
    for claim in payload["claims"]:
        diff = (f"`{claim['metric']}` {claim['row']} − {claim['reference']} = {_number(claim['mean'])}"
                if claim["n"] else f"`{claim['metric']}` {claim['row']} − {claim['reference']}: no paired seed")
        interval = _interval(claim) if claim["n"] else "–"
        lines.append(f"| {claim['text']} | **{claim['verdict']}** | {diff} | {interval} | {claim['n']} |")
    return lines + [""]


def summary_block(results_dir: pathlib.Path = RESULTS_DIR, tables_dir: pathlib.Path = TABLES_DIR,
                  relative_to: pathlib.Path | None = None) -> str:
    """README.md's results block, from BEGIN to END: for every table of tables_dir, from its <table>.json in
    results_dir (statistics and verdicts recomputed from the per-seed values and the table's CLAIMS), its claims
    with verdict, paired difference, interval and seeds, its tokens per run and corpus and a link (relative to
    ``relative_to``, default README.md's directory) to its results page; or that it has no results yet."""
    relative_to = relative_to or README.parent
    lines = [BEGIN, "<!-- Generated by `python -m experiments.reproduce --summary` from experiments/results/*.json and",
             "     the tables' CLAIMS; edits between these markers are overwritten. -->", "",
             _wrap(f"Verdicts per paper claim. {VERDICT_RULE}"), ""]
    names = available_tables(tables_dir)
    order = {name: i for i, name in enumerate(SUMMARY_ORDER)}
    for name in sorted(names, key=lambda n: (order.get(n, len(order)), n)):
        lines += _summary_of_table(name, load_table(name, tables_dir), results_dir, relative_to)
    return "\n".join(lines).rstrip() + "\n" + END


def replace_block(text: str, block: str) -> str:
    """``text`` with its one BEGIN ... END block (markers included) replaced by ``block``; UsageError if the markers
    are missing, repeated or out of order."""
    begin, end = text.find(BEGIN), text.find(END)
    if text.count(BEGIN) != 1 or text.count(END) != 1 or end < begin:
        raise runner.UsageError(f"the README needs exactly one {BEGIN} followed by one {END} (found {text.count(BEGIN)}"
                                f" and {text.count(END)}); add them where the results summary goes")
    return text[:begin] + block + text[end + len(END):]


def write_summary(readme: pathlib.Path = README, results_dir: pathlib.Path = RESULTS_DIR,
                  tables_dir: pathlib.Path = TABLES_DIR) -> bool:
    """Rewrites README's results block from results_dir; True if the file changed."""
    text = readme.read_text()
    new = replace_block(text, summary_block(results_dir, tables_dir, readme.resolve().parent))
    if new != text:
        readme.write_text(new)
    return new != text


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", help="a table of --tables-dir, e.g. deepseekmoe_table1")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds 0..N-1 per row (default: the table's SEEDS, else {DEFAULT_SEEDS})")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="where the runs go (default runs/<table>, runs/<table>_smoke for --budget smoke)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; each run uses every core)")
    parser.add_argument("--budget", default="full", help="full (the table's BUDGET) or smoke (SMOKE_BUDGET)")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: every row)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="sets",
                        help="a pilot budget: change the table's BUDGET field (repeatable), e.g. train.steps=600")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--results-dir", type=pathlib.Path, default=None,
                        help="where <table>.md, .json and the plots go (default experiments/results; the workdir "
                             "for --budget smoke)")
    parser.add_argument("--render-only", action="store_true",
                        help="write <table>.md again from the <table>.json of --results-dir (statistics and verdicts "
                             "recomputed, existing plots linked); runs and draws nothing")
    parser.add_argument("--summary", action="store_true",
                        help="rewrite README.md's results block from experiments/results/*.json (takes no table)")
    parser.add_argument("--tables-dir", type=pathlib.Path, default=TABLES_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--readme", type=pathlib.Path, default=README, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _refresh_readme(args: argparse.Namespace, results_dir: pathlib.Path) -> None:
    """Rewrites the README's results block after results were written to experiments/results (the committed ones);
    a README without the markers is reported, not an error."""
    if results_dir.resolve() != RESULTS_DIR.resolve():
        return
    try:
        changed = write_summary(args.readme, RESULTS_DIR, args.tables_dir)
    except (runner.UsageError, OSError) as e:
        print(f"[reproduce] README results block not updated: {e}", flush=True)
        return
    print(f"[reproduce] README results block {'updated' if changed else 'unchanged'}: {args.readme}", flush=True)


def _command(argv: list[str] | None) -> str:
    return "python -m experiments.reproduce " + " ".join(argv if argv is not None else sys.argv[1:])


# The command and date of a page's runs, as markdown() writes them: 'Generated <date> by `<command>`' or, on a
# rendered page, 'the runs were made by `<command>` on <date>'.
_PAGE_MADE = re.compile(r"^Generated (\S+) by `([^`]+)`|the runs were made by `([^`]+)` on ([\d-]+)", re.M)


def render_only(args: argparse.Namespace, table: ModuleType, results_dir: pathlib.Path, command: str) -> int:
    """--render-only: <table>.md from <table>.json, with the statistics recomputed; the JSON is left as it is."""
    json_path = results_dir / f"{args.table}.json"
    if not json_path.exists():
        raise runner.UsageError(f"--render-only needs {json_path}: run the table first (python -m "
                                f"experiments.reproduce {args.table})")
    payload = json.loads(json_path.read_text())
    payload.update(statistics(table, payload))
    page = results_dir / f"{args.table}.md"
    if not payload.get("command") and page.exists():  # JSON written before it kept them: the old page's header
        made = _PAGE_MADE.search(page.read_text())
        if made:
            payload["command"], payload["generated"] = made[2] or made[3], made[1] or made[4]
    findings_path = results_dir / f"{args.table}.findings.md"
    findings = findings_path.read_text() if findings_path.exists() else None
    plots = existing_plots(args.table, payload, results_dir)
    (results_dir / f"{args.table}.md").write_text(markdown(table, args.table, payload, plots, findings,
                                                           rendered_by=command))
    print(f"[reproduce] rendered {results_dir / (args.table + '.md')} from {json_path.name}"
          + "".join(f"\n  {claim['verdict']}: {claim['text']}" for claim in payload["claims"]), flush=True)
    _refresh_readme(args, results_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the table and writes its results; returns the exit status (1 if a run failed, 2 for bad input)."""
    args = parse_args(argv)
    command = _command(argv)
    try:
        if args.summary:
            if args.table:
                raise runner.UsageError(f"--summary takes no table (got {args.table!r}): it summarises every table")
            results_dir = args.results_dir or RESULTS_DIR
            changed = write_summary(args.readme, results_dir, args.tables_dir)
            print(f"[reproduce] README results block {'updated' if changed else 'unchanged'}: {args.readme}")
            return 0
        if not args.table:
            raise runner.UsageError("name a table (allowed: "
                                    f"{', '.join(available_tables(args.tables_dir))}) or pass --summary")
        if args.budget not in BUDGETS:
            raise runner.UsageError(f"--budget={args.budget!r} is invalid: allowed {', '.join(BUDGETS)}")
        if args.seeds is not None and args.seeds < 1:
            raise runner.UsageError(f"--seeds={args.seeds} is invalid: must be an integer >= 1")
        if args.jobs < 1:
            raise runner.UsageError(f"--jobs={args.jobs} is invalid: must be an integer >= 1")
        table = load_table(args.table, args.tables_dir)
        if args.seeds is None:
            args.seeds = table.SEEDS
        sets = pilot_budget(table, args.sets, args.budget)
        suffix = "" if args.budget == "full" else f"_{args.budget}"
        suffix += "".join(f"_{field}={runner.format_value(value)}" for field, value in sets.items())
        workdir = args.workdir or pathlib.Path("runs") / f"{args.table}{suffix}"
        results_dir = args.results_dir or (RESULTS_DIR if args.budget == "full" and not sets else workdir)
        if args.render_only:
            return render_only(args, table, results_dir, command)
        rows = select_rows(table, args.rows)
        runs = plan(table, rows, args.seeds, workdir, args.budget)
    except runner.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Seed-major: every row's seed 0 first, so the first results cover the whole table (and later seeds of a row
    # load its compiled steps from a persistent compilation cache, when one is set, instead of compiling them).
    all_runs = [runs[row.name][seed] for seed in range(args.seeds) for row in rows]
    if args.dry_run:
        for run in all_runs:
            state = "finished" if run.finished() else "to run"
            print(f"{run.label} [{state}]: {' '.join(run.command())}")
        return 0
    try:
        with runner.sigterm_as_interrupt():
            outcomes = runner.run_all(all_runs, args.jobs, name="reproduce")
    except KeyboardInterrupt:
        return 130
    results = collect(table, rows, runs)
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"table": args.table, "title": table.TITLE, "paper": table.PAPER, "expected": table.EXPECTED,
               "generated": datetime.date.today().isoformat(), "command": command,
               "budget": args.budget, "budget_overrides": table.BUDGET if args.budget == "full" else SMOKE_BUDGET,
               "budget_status": getattr(table, "BUDGET_STATUS", None), "seeds": args.seeds,
               "metrics": list(table.METRICS), "workdir": str(workdir), **results}
    plots = write_plots(args.table, payload, results_dir)
    findings_path = results_dir / f"{args.table}.findings.md"
    findings = findings_path.read_text() if findings_path.exists() else None
    (results_dir / f"{args.table}.md").write_text(markdown(table, args.table, payload, plots, findings))
    (results_dir / f"{args.table}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[reproduce] results: {results_dir / (args.table + '.md')} and {args.table}.json"
          + (f", {len(plots)} plot(s)" if plots else "")
          + "".join(f"\n  {claim['verdict']}: {claim['text']}" for claim in results["claims"]), flush=True)
    if args.budget == "full":
        _refresh_readme(args, results_dir)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
