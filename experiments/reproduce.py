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

``--budget smoke`` applies experiments.tables.SMOKE_BUDGET (a few steps of a small batch) after the row's
overrides, to check a table's whole pipeline in a few minutes; its runs go to ``runs/<table>_smoke`` and its results
beside them unless --workdir / --results-dir say otherwise, so a smoke run never replaces real results.

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
  (``experiments.stats.t_interval``; scipy.stats.t.ppf; none for n < 2);
* one verdict per claim (``experiments.stats.verdict``): 'reproduced' when the interval excludes 0 on the side the
  paper claims (Claim.better), 'contradicted' when it excludes 0 on the other side, 'not resolved' when it contains
  0 or fewer than 2 seeds are paired;
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
(``experiments.summary.summary_block``): per table its claims, verdicts, intervals, seeds, tokens per run and a link
to the results page, or that it has no results. ``--summary`` rewrites it from experiments/results/*.json; so does
every run or ``--render-only`` whose results go to experiments/results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys
from types import ModuleType
from typing import Any

from experiments import runner
from experiments.report import existing_plots, markdown, write_plots
from experiments.stats import mean_std, statistics
from experiments.summary import README, RESULTS_DIR, write_summary
from experiments.tables import DEFAULT_SEEDS, SMOKE_BUDGET, TABLES_DIR, Row, available_tables, load_table

BUDGETS = ("full", "smoke")


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


def runs_by_row(table: ModuleType, rows: list[Row], seeds: int, workdir: pathlib.Path,
                budget: str) -> dict[str, list[Any]]:
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
        stats_ = {m: mean_std([e["metrics"][m] for e in entries if e["metrics"][m] is not None])
                  for m in runner.METRICS}
        result_rows.append({"name": row.name, "config": row.config, "overrides": row.overrides, "paper": row.paper,
                            "note": row.note, "runs": entries, "seeds_finished": len(entries),
                            "mean": {m: s[0] for m, s in stats_.items()}, "std": {m: s[1] for m, s in stats_.items()}})
    results = {"rows": result_rows}
    results.update(statistics(table, results))
    return results


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
        runs = runs_by_row(table, rows, args.seeds, workdir, args.budget)
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
