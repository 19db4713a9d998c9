"""README.md's results block, generated from the tables' verdicts (experiments/results/*.json and each table's
CLAIMS): ``python -m experiments.reproduce --summary`` rewrites it, and so does every table run whose results go to
experiments/results.
"""
from __future__ import annotations

import json
import os
import pathlib
import textwrap
from types import ModuleType

from experiments import report, runner
from experiments.provenance import corpus_text, definition_changes, tokens_per_run
from experiments.report import VERDICT_RULE, interval_text, number
from experiments.stats import statistics
from experiments.tables import TABLES_DIR, available_tables, load_table

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"  # README.md's generated results block
# The README summary lists these tables first, in this order, then any other table alphabetically.
SUMMARY_ORDER = ("deepseekmoe_table1", "deepseekmoe_fig3", "switch_capacity", "loss_free_vs_aux", "top_p_vs_top2")


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
    early = payload.get("seeds_preregistered")
    extended = bool(early) and any(claim["n"] > (claim.get("preregistered") or {}).get("n", claim["n"])
                                   for claim in payload["claims"])
    if extended:
        text += (f" **Seeds extended after a result was seen** (from {early} to {payload['seeds']}): the last column "
                 f"gives the pre-registered verdicts, at {report.seeds_text(early)}.")
    lines = [_wrap(text), ""]
    if not payload["claims"]:
        return lines + ["No claims declared (`CLAIMS` in the table file).", ""]
    header = ["claim", "verdict", "p", "Holm-adjusted verdict", "paired difference (row − reference)",
              "95% t-interval", "seeds"]
    if extended:
        header.append(f"verdict / Holm-adjusted at {report.seeds_text(early)} (pre-registered)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for claim in payload["claims"]:
        diff = (f"`{claim['metric']}` {claim['row']} − {claim['reference']} = {number(claim['mean'])}"
                if claim["n"] else f"`{claim['metric']}` {claim['row']} − {claim['reference']}: no paired seed")
        interval = interval_text(claim) if claim["n"] else "–"
        cells = [claim["text"], f"**{claim['verdict']}**", report.p_text(claim.get("p")),
                 f"**{claim.get('verdict_holm', '–')}**", diff, interval, str(claim["n"])]
        if extended:
            pre = claim.get("preregistered")
            cells.append(f"**{pre['verdict']}** / **{pre['verdict_holm']}** (p {report.p_text(pre['p'])})"
                         if pre else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def summary_block(results_dir: pathlib.Path = RESULTS_DIR, tables_dir: pathlib.Path = TABLES_DIR,
                  relative_to: pathlib.Path | None = None) -> str:
    """README.md's results block, from BEGIN to END: for every table of tables_dir, from its <table>.json in
    results_dir (statistics and verdicts recomputed from the per-seed values and the table's CLAIMS), its claims
    with verdict, p-value, Holm-adjusted verdict, paired difference, interval and seeds (and the verdicts at the
    pre-registered seeds when the table's seeds were extended after a result), its tokens per run and corpus and a
    link (relative to ``relative_to``, default README.md's directory) to its results page; or that it has no
    results yet."""
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


