"""The provenance of an ablation table's results: tokens per run, the corpus and tokenizer fingerprint, and whether
the runs predate the table's current definition (overrides that changed since)."""
from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from experiments import runner
from experiments.tables import SMOKE_BUDGET


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


def config_default(config: str, field: str) -> Any:
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
                    f"`{config_default(row['config'], 'data.tokenizer')}`)")
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
        value = config_default(config, field)
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
