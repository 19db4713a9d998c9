"""Hyperparameter sweep: a grid (cartesian product) or random search over config fields, one moejax run per point.

    python -m experiments.sweep --config configs/gshard.py --grid model.moe.num_experts=8,16,32 \
        --grid train.learning_rate=1e-3,3e-3 [--random N --seed S] [--set train.steps=100 ...] \
        [--workdir runs/sweep_gshard] [--metric val_loss] [--descending] [--jobs N] [--dry-run]

``--grid field=v1,v2,...`` gives the values of one field; the points are every combination of the grids, or with
``--random N`` N distinct combinations drawn with ``--seed S`` (the same N and S draw the same points). ``--set
field=value`` applies to every point. Values are typed as ml_collections' ``--config.<field>=<value>`` flags type
them (the field's int, float, bool or string type; see experiments/runner.py) and pass to the runs as written.

Each point runs in ``<workdir>/<field>=<value>_...`` (the last component of each field name). Rerunning the same
command skips finished points and resumes interrupted ones. Each finished point appends one JSON line to
``<workdir>/results.jsonl`` ({"point", "workdir", "overrides", "metric", "value", "metrics"}); at the end the
finished points, sorted by ``--metric`` (ascending unless --descending), are printed and written to
``<workdir>/summary.md``, with plots of the points over training beside it: ``summary_loss.png`` (train and eval
loss) and, when the points have MoE layers, ``summary_maxvio.png`` (train MaxVio, mean over the MoE layers).
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import random
import re
import sys
from typing import Any

from experiments import runner


def parse_grid(config_arg: str, grids: list[str], sets: list[str]) -> tuple[dict[str, list[tuple[str, Any]]],
                                                                             dict[str, Any]]:
    """({field: [(text, typed value), ...]} of the --grid options, {field: typed value} of the --set options),
    checked against the config; UsageError naming the option, field and value otherwise."""
    config = runner.load_config(config_arg)
    grid: dict[str, list[tuple[str, Any]]] = {}
    for option in grids:
        field, text = runner.parse_assignment(option, "--grid")
        texts = [t.strip() for t in text.split(",")]
        if any(not t for t in texts):
            raise runner.UsageError(f"--grid {option!r} is malformed: an empty value in {text!r}; expected "
                                    "<config field>=<v1>,<v2>,..., e.g. train.learning_rate=1e-3,3e-3")
        if field in grid:
            raise runner.UsageError(f"--grid {option!r}: field {field!r} has a --grid already; give all its values "
                                    "in one --grid")
        grid[field] = [(t, runner.typed_value(config, field, t, f"--grid {option!r}")) for t in texts]
    fixed = {}
    for option in sets:
        field, text = runner.parse_assignment(option, "--set")
        if field in grid:
            raise runner.UsageError(f"--set {option!r}: field {field!r} is also swept by --grid")
        fixed[field] = runner.typed_value(config, field, text, f"--set {option!r}")
    if not grid:
        raise runner.UsageError("no --grid given: give at least one --grid <config field>=<v1>,<v2>,...")
    return grid, fixed


def points(grid: dict[str, list[tuple[str, Any]]], sample: int | None, seed: int) -> list[dict[str, tuple[str, Any]]]:
    """Every combination of the grid values ({field: (text, value)}), or ``sample`` distinct ones drawn with
    ``seed`` (all of them when sample >= their number), in grid order."""
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    if sample is not None and sample < len(combos):
        chosen = sorted(random.Random(seed).sample(range(len(combos)), sample))
        combos = [combos[i] for i in chosen]
    return combos


def point_name(point: dict[str, tuple[str, Any]]) -> str:
    """'num_experts=8_learning_rate=1e-3': the last component of each field (the full field where two fields
    share it) and the value as written, with characters unsafe in a directory name replaced by '-'."""
    last = [field.rsplit(".", 1)[-1] for field in point]
    names = [short if last.count(short) == 1 else field for short, field in zip(last, point, strict=True)]
    return "_".join(f"{name}={re.sub(r'[^A-Za-z0-9.+-]', '-', text)}"
                    for name, (text, _) in zip(names, point.values(), strict=True))


def record(run: runner.Run, fields: dict[str, Any], metric: str) -> dict[str, Any]:
    metrics = runner.run_metrics(run.workdir)
    return {"point": run.label, "workdir": str(run.workdir), "overrides": fields, "metric": metric,
            "value": metrics[metric], "metrics": metrics}


def summary_table(records: list[dict[str, Any]], fields: list[str], metric: str, descending: bool) -> str:
    """Markdown table of the records sorted by the metric (points without a value last)."""
    ordered = sorted(records, key=lambda r: (r["value"] is None, -(r["value"] or 0) if descending else r["value"] or 0))
    columns = ["rank", "point", *fields, metric, *(m for m in ("val_loss", "params_activated") if m != metric)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rank, r in enumerate(ordered, 1):
        values = [r["value"], *(r["metrics"][m] for m in ("val_loss", "params_activated") if m != metric)]
        cells = [str(rank), r["point"], *(runner.format_value(r["overrides"][f]) for f in fields),
                 *("–" if v is None else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}" for v in values)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plots(workdir: pathlib.Path, records: list[dict[str, Any]]) -> list[pathlib.Path]:
    """summary_loss.png (every point's train and eval loss over the steps) and, when some point logs MoE layer
    statistics, summary_maxvio.png (train MaxVio, mean over the MoE layers); the paths written."""
    from moejax import plots

    if not records:
        return []
    runs = {r["point"]: r["workdir"] for r in records}
    written = [workdir / "summary_loss.png"]
    plots.loss_curves(runs, written[0])
    moe = {r["point"]: r["workdir"] for r in records if r["metrics"].get("train_maxvio") is not None}
    if moe:
        written.append(workdir / "summary_maxvio.png")
        plots.stat_curves(moe, "maxvio", written[-1])
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file with an optional preset, e.g. configs/gshard.py")
    parser.add_argument("--grid", action="append", default=[], help="<field>=<v1>,<v2>,... (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="<field>=<value> for every point (repeatable)")
    parser.add_argument("--random", type=int, default=None, help="N distinct points drawn from the grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random draw (not the runs' config.seed)")
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="default runs/sweep_<config stem>")
    parser.add_argument("--metric", default="val_loss", help="metric to sort by (experiments.runner.METRICS)")
    parser.add_argument("--descending", action="store_true", help="sort the metric from high to low")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the points' commands, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep; returns the exit status (1 if a point failed, 2 for bad input)."""
    args = parse_args(argv)
    try:
        runner.check_metric(args.metric, "--metric")
        if args.random is not None and args.random < 1:
            raise runner.UsageError(f"--random={args.random} is invalid: must be an integer >= 1")
        if args.jobs < 1:
            raise runner.UsageError(f"--jobs={args.jobs} is invalid: must be an integer >= 1")
        grid, fixed = parse_grid(args.config, args.grid, args.set)
    except runner.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or pathlib.Path("runs") / f"sweep_{pathlib.Path(args.config.partition(':')[0]).stem}"
    chosen = points(grid, args.random, args.seed)
    runs, fields_of = [], {}
    for point in chosen:
        name = point_name(point)
        run = runner.Run(name, args.config, workdir / name, {**fixed, **{f: v for f, (_, v) in point.items()}})
        runs.append(run)
        fields_of[run] = {f: v for f, (_, v) in point.items()}
    if args.dry_run:
        for run in runs:
            print(f"{run.label} [{'finished' if run.finished() else 'to run'}]: {' '.join(run.command())}")
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = workdir / "results.jsonl"

    def logged() -> set[str]:
        if not results_path.exists():
            return set()
        return {json.loads(line)["workdir"] for line in results_path.read_text().splitlines() if line.strip()}

    def append(run: runner.Run) -> None:
        with results_path.open("a") as f:
            f.write(json.dumps(record(run, fields_of[run], args.metric)) + "\n")

    try:
        with runner.sigterm_as_interrupt():
            outcomes = runner.run_all(runs, args.jobs, name="sweep", on_finish=append)
    except KeyboardInterrupt:
        return 130
    already = logged()
    for outcome in outcomes:  # points finished before results.jsonl got their line (e.g. an earlier interruption)
        if outcome.status == "skipped" and str(outcome.run.workdir) not in already:
            append(outcome.run)
    records = [record(o.run, fields_of[o.run], args.metric) for o in outcomes if o.status in ("skipped", "finished")]
    table = summary_table(records, list(grid), args.metric, args.descending)
    header = (f"# Sweep of {args.config}\n\n`{' '.join(['python -m experiments.sweep', *(argv or sys.argv[1:])])}`"
              f"\n\n{len(records)} of {len(runs)} points finished, sorted by {args.metric} "
              f"({'descending' if args.descending else 'ascending'}).\n\n")
    plots = write_plots(workdir, records)
    (workdir / "summary.md").write_text(header + table + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots))
    print(table + f"[sweep] summary: {workdir / 'summary.md'}, one line per point: {results_path}"
          + "".join(f"\n[sweep] plot: {p}" for p in plots))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
