"""Reproduces an ablation table: every row of ``experiments/tables/<table>.py`` at several seeds, then a markdown
table (mean +- std over seeds, the paper's numbers beside them), a JSON file of every run's values, and plots.

    python -m experiments.reproduce deepseekmoe_table1 --seeds 3 [--workdir runs/deepseekmoe_table1] [--jobs 1]
        [--budget full|smoke] [--rows dense,gshard] [--dry-run] [--results-dir experiments/results]

Each run is ``python -m moejax.main --config=<row config> --workdir=<workdir>/<row>/seed<k> --config.seed=<k>
--config.<field>=<value> ...`` with the table's BUDGET and then the row's overrides (experiments/runner.py runs
them). Rerunning the same command skips finished runs and resumes interrupted ones from their checkpoints, so a
table can be stopped (Ctrl-C: the running runs save a checkpoint) and continued at any time.

``--budget smoke`` applies SMOKE_BUDGET (a few steps of a small batch) after the row's overrides, to check a
table's whole pipeline in a few minutes; its runs go to ``runs/<table>_smoke`` and its results beside them unless
--workdir / --results-dir say otherwise, so a smoke run never replaces real results.

Outputs, in --results-dir (default experiments/results for the full budget):

    <table>.md              per row: mean +- std over the seeds (ddof=1) of each metric of METRICS, the paper's
                            numbers, parameters; the observed order of the rows (by mean and per seed); the
                            text of <table>.findings.md if present (hand-written analysis that reruns keep);
                            within-seed differences against the table's REFERENCE row; budget
    <table>.json            every run's metrics, the per-row means and stds, the differences
    <table>_loss.png        train and eval loss of every row (mean over seeds, min-max band)
    <table>_maxvio.png      train MaxVio of the MoE rows, mean over layers (tables with MoE rows)
    <table>_experts_per_token.png   for tables where the number of experts per token varies (dynamic routers)
    <table>_load_<row>.png  expert-load heatmap of each MoE row's seed 0 (when the runs log expert loads)
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import pathlib
import re
import sys
from types import ModuleType
from typing import Any

import numpy as np

from experiments import runner
from experiments.tables import Row
from moejax import analysis

TABLES_DIR = pathlib.Path(__file__).resolve().parent / "tables"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
REQUIRED = ("TITLE", "PAPER", "ROWS", "BUDGET", "METRICS", "EXPECTED")
BUDGETS = ("full", "smoke")
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


# ----------------------------------------------------------------------------------------------- results


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return _number(mean) + (f" ± {_number(std)}" if std is not None else "")


def _params(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}M"


def collect(table: ModuleType, rows: list[Row], runs: dict[str, list[runner.Run]]) -> dict[str, Any]:
    """The results as JSON: per row its runs' metrics (finished runs only), mean and std (ddof=1) per metric;
    per non-reference row the within-seed differences (row - REFERENCE at the same seed) per metric."""
    result_rows = []
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        entries = []
        for seed, run in enumerate(runs[row.name]):
            if run.summary_path.exists():
                config = json.loads((run.workdir / "config.json").read_text())
                metrics = runner.run_metrics(run.workdir)
                entries.append({"seed": seed, "workdir": str(run.workdir), "metrics": metrics,
                                "steps": config["train"]["steps"],
                                "tokens": config["train"]["steps"] * config["train"]["batch_size"]
                                * config["train"]["seq_len"]})
                per_seed.setdefault(row.name, {})[seed] = metrics
        stats = {m: _mean_std([e["metrics"][m] for e in entries if e["metrics"][m] is not None])
                 for m in runner.METRICS}
        result_rows.append({"name": row.name, "config": row.config, "overrides": row.overrides, "paper": row.paper,
                            "note": row.note, "runs": entries, "seeds_finished": len(entries),
                            "mean": {m: s[0] for m, s in stats.items()}, "std": {m: s[1] for m, s in stats.items()}})
    reference = getattr(table, "REFERENCE", None)
    differences = {}
    if reference in per_seed:
        for row in rows:
            if row.name == reference or row.name not in per_seed:
                continue
            seeds = sorted(per_seed[row.name].keys() & per_seed[reference].keys())
            differences[row.name] = {}
            for metric in table.METRICS:
                values = [per_seed[row.name][s][metric] - per_seed[reference][s][metric] for s in seeds
                          if per_seed[row.name][s][metric] is not None and per_seed[reference][s][metric] is not None]
                mean, std = _mean_std(values)
                differences[row.name][metric] = {"values": values, "mean": mean, "std": std}
    return {"rows": result_rows, "reference": reference, "differences": differences}


def write_plots(table_name: str, rows: list[Row], runs: dict[str, list[runner.Run]], results: dict[str, Any],
                out_dir: pathlib.Path) -> list[tuple[str, str]]:
    """The PNGs beside the markdown; returns [(caption, file name)]. A plot that cannot be drawn is reported and
    left out (e.g. no expert loads in runs logged before moejax recorded them)."""
    finished = {row["name"]: [pathlib.Path(e["workdir"]) for e in row["runs"]] for row in results["rows"]}
    finished = {name: dirs for name, dirs in finished.items() if dirs}
    moe = {name: dirs for name, dirs in finished.items()
           if next(r for r in results["rows"] if r["name"] == name)["mean"]["maxvio"] is not None}
    plots = []

    def save(caption: str, file: str, draw) -> None:
        try:
            draw(out_dir / file)
        except (ValueError, FileNotFoundError) as e:
            print(f"[reproduce] plot {file} left out: {e}", flush=True)
            return
        plots.append((caption, file))

    if finished:
        save("Train loss (solid) and eval loss (dashed), mean over seeds with min-max band", f"{table_name}_loss.png",
             lambda p: analysis.loss_curves(finished, p))
    if moe:
        save("MaxVio during training (max load / mean load - 1, mean over MoE layers)", f"{table_name}_maxvio.png",
             lambda p: analysis.stat_curves(moe, "maxvio", p))
        epts = [e["metrics"]["train_experts_per_token"] for r in results["rows"] for e in r["runs"]
                if e["metrics"]["train_experts_per_token"] is not None]
        dynamic = any(abs(v - round(v)) > 1e-6 for v in epts)
        if dynamic:
            save("Routed experts per token during training (mean over MoE layers)",
                 f"{table_name}_experts_per_token.png", lambda p: analysis.stat_curves(moe, "experts_per_token", p))
        for name, dirs in moe.items():
            save(f"Expert load of {name} (seed 0), per MoE layer", f"{table_name}_load_{name}.png",
                 lambda p, d=dirs[0]: analysis.load_heatmap(d, p))
    return plots


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


def markdown(table: ModuleType, table_name: str, rows: list[Row], results: dict[str, Any], budget: str,
             seeds: int, plots: list[tuple[str, str]], command: str, findings: str | None = None) -> str:
    """The results page: header, main table, observed order, findings (hand-written, kept across reruns in
    <table>.findings.md), within-seed differences, rows, plots, budget."""
    metrics = list(table.METRICS)
    paper_labels = list(dict.fromkeys(label for row in rows for label in row.paper))
    any_run = next((e for r in results["rows"] for e in r["runs"]), None)
    lines = [f"# {table.TITLE}", "", f"**Paper:** {table.PAPER}", "",
             f"**Expected (paper):** {table.EXPECTED}", "",
             f"Generated {datetime.date.today().isoformat()} by `{command}`: {seeds} seed(s) per row, "
             f"budget `{budget}`"
             + (f", {any_run['steps']:,} steps = {any_run['tokens']:,} training tokens per run" if any_run else "")
             + ". Values are mean ± std over the finished seeds (std with ddof=1; none with one seed).", ""]
    if budget != "full":
        lines += ["**SMOKE BUDGET: these numbers test the pipeline and mean nothing.**", ""]
    header = ["row", "seeds", "params total / activated", *metrics, *(f"paper: {label}" for label in paper_labels)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, res in zip(rows, results["rows"], strict=True):
        cells = [f"**{row.name}**", f"{res['seeds_finished']}/{seeds}",
                 f"{_params(res['mean']['params_total'])} / {_params(res['mean']['params_activated'])}",
                 *(_cell(res["mean"][m], res["std"][m]) for m in metrics),
                 *(f"{row.paper[label]:g}" if label in row.paper else "–" for label in paper_labels)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Metrics: " + "; ".join(f"`{m}` = {runner.METRICS[m]}" for m in metrics) + "."]
    by_mean, per_seed = observed_order(results, metrics[0])
    if by_mean:
        lines += ["", f"**Observed order by mean `{metrics[0]}`** (lowest first): {by_mean}. Per seed: "
                  + "; ".join(f"seed {i}: {order}" for i, order in enumerate(per_seed)) + "."]
    if findings:
        lines += ["", "## Findings", "", findings.strip()]
    if results["differences"]:
        ref = results["reference"]
        lines += ["", f"## Within-seed differences vs `{ref}`", "",
                  f"Mean ± std over seeds of (row − {ref}) at the same seed: the seed fixes the initialisation and "
                  "the data order, so these differences are less noisy than the rows' own spreads.", "",
                  "| row | " + " | ".join(f"Δ {m}" for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
        for name, diffs in results["differences"].items():
            cells = [_cell(diffs[m]["mean"], diffs[m]["std"]) if diffs[m]["values"] else "–" for m in metrics]
            lines.append(f"| **{name}** | " + " | ".join(cells) + " |")
    lines += ["", "## Rows", ""]
    for row in rows:
        overrides = " ".join(f"`{f}={runner.format_value(v)}`" for f, v in row.overrides.items()) or "no overrides"
        lines.append(f"* **{row.name}**: `{row.config}` with {overrides}" + (f". {row.note}" if row.note else ""))
    budget_overrides = table.BUDGET if budget == "full" else SMOKE_BUDGET
    wall = sum(e["metrics"]["wall_seconds"] or 0 for r in results["rows"] for e in r["runs"])
    lines += ["", "## Budget", "",
              "Shared overrides: " + " ".join(f"`{f}={runner.format_value(v)}`" for f, v in budget_overrides.items())
              + f". Wall time of the runs' last invocations, summed: {runner.duration(wall)}.", ""]
    missing = [f"{r['name']} ({r['seeds_finished']}/{seeds})" for r in results["rows"] if r["seeds_finished"] < seeds]
    if missing:
        lines += [f"**Incomplete rows:** {', '.join(missing)}.", ""]
    if plots:
        lines += ["## Plots", ""]
        for caption, file in plots:
            lines += [f"{caption}:", "", f"![{caption}]({file})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="a table of --tables-dir, e.g. deepseekmoe_table1")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per row (default 3)")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="where the runs go (default runs/<table>, runs/<table>_smoke for --budget smoke)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; each run uses every core)")
    parser.add_argument("--budget", default="full", help="full (the table's BUDGET) or smoke (SMOKE_BUDGET)")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: every row)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--results-dir", type=pathlib.Path, default=None,
                        help="where <table>.md, .json and the plots go (default experiments/results; the workdir "
                             "for --budget smoke)")
    parser.add_argument("--tables-dir", type=pathlib.Path, default=TABLES_DIR, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the table and writes its results; returns the exit status (1 if a run failed, 2 for bad input)."""
    args = parse_args(argv)
    try:
        if args.budget not in BUDGETS:
            raise runner.UsageError(f"--budget={args.budget!r} is invalid: allowed {', '.join(BUDGETS)}")
        if args.seeds < 1:
            raise runner.UsageError(f"--seeds={args.seeds} is invalid: must be an integer >= 1")
        if args.jobs < 1:
            raise runner.UsageError(f"--jobs={args.jobs} is invalid: must be an integer >= 1")
        table = load_table(args.table, args.tables_dir)
        rows = select_rows(table, args.rows)
        suffix = "" if args.budget == "full" else f"_{args.budget}"
        workdir = args.workdir or pathlib.Path("runs") / f"{args.table}{suffix}"
        results_dir = args.results_dir or (RESULTS_DIR if args.budget == "full" else workdir)
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
    plots = write_plots(args.table, rows, runs, results, results_dir)
    command = "python -m experiments.reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    findings_path = results_dir / f"{args.table}.findings.md"
    findings = findings_path.read_text() if findings_path.exists() else None
    (results_dir / f"{args.table}.md").write_text(
        markdown(table, args.table, rows, results, args.budget, args.seeds, plots, command, findings))
    payload = {"table": args.table, "title": table.TITLE, "paper": table.PAPER, "expected": table.EXPECTED,
               "budget": args.budget, "budget_overrides": table.BUDGET if args.budget == "full" else SMOKE_BUDGET,
               "seeds": args.seeds, "metrics": list(table.METRICS), "workdir": str(workdir), **results}
    (results_dir / f"{args.table}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[reproduce] results: {results_dir / (args.table + '.md')} and {args.table}.json"
          + (f", {len(plots)} plot(s)" if plots else ""))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
