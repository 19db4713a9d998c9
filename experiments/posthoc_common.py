"""What the post-hoc study pages (experiments/posthoc_routing.py, experiments/posthoc_compression.py) share: the
result cache that makes a study resumable, strict JSON, progress lines, number formatting, random expert sets, and
writing a page beside its JSON (and rewriting it from that JSON alone, ``--render_only``); the other result studies
(adapters, upcycling) use them too, with ``finish_study`` as their last step.

A study's page is a function of its JSON: ``write_page`` writes the JSON, reads it back and renders the page from
it, so ``rerender`` (the committed JSON, no checkpoint, nothing computed) writes the same page.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from experiments.runner import kept_findings
from moejax.posthoc.trace_report import jsonable

Render = Callable[[dict[str, Any], str], str]  # (the page's JSON payload, findings) -> the page


def write_json(path: pathlib.Path, value: Any) -> None:
    """``jsonable(value)`` as indented JSON with sorted keys, written to a temporary file that then replaces path
    (an interrupted write leaves the previous file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jsonable(value), indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


class ResultCache:
    """``<checkpoint>/<study>/results.json``: {key: record}, rewritten after every change, so that a rerun of the
    study skips what is done; ``root`` also holds the study's other intermediate files (traces, statistics)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "results.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        """Stores value under key and saves; returns value."""
        self.data[key] = value
        self.save()
        return value

    def section(self, key: str) -> dict[str, Any]:
        """The dict stored under key (created empty); changes to it are saved by the next ``save`` or ``put``."""
        return self.data.setdefault(key, {})

    def save(self) -> None:
        write_json(self.path, self.data)


def speaker(name: str) -> Callable[[str], None]:
    """A progress printer: ``say(message)`` prints '[<name> <seconds since speaker()>s] message'."""
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{name} {time.perf_counter() - started:7.1f}s] {message}", flush=True)

    return say


def fixed(value: float | None, digits: int, missing: str = "–") -> str:
    """value with ``digits`` decimals; ``missing`` for None, 'nan' for a non-finite float."""
    if value is None:
        return missing
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


def splits_text(calibration: str, evaluation: str, note: str = "") -> str:
    """The sentence a page states its data with: which split of the corpus calibrated (importance, traces, chosen
    experts: ``moejax.posthoc.capture.calibration_batches``'s split) and which one every evaluated figure comes
    from, and ``note`` (e.g. how two parts of one split are kept apart)."""
    return f"calibrated on the `{calibration}` split, evaluated on the `{evaluation}` split{note}."


def random_experts(rng: np.random.Generator, layers: Iterable[int], num_experts: int, n: int,
                   exclude: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """n distinct (layer, expert) pairs drawn uniformly (``rng.choice`` without replacement) from the routed experts
    of ``layers`` that are not in ``exclude``, sorted."""
    pool = [(layer, e) for layer in layers for e in range(num_experts) if (layer, e) not in exclude]
    return sorted((int(layer), int(e)) for layer, e in (pool[i] for i in rng.choice(len(pool), size=n,
                                                                                     replace=False)))


def parameter_count(variables: dict[str, Any]) -> int:
    """The number of parameters in variables['params']."""
    import jax

    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(variables["params"])))


def rerender(out_dir: pathlib.Path, name: str, render: Render, placeholder: str) -> pathlib.Path:
    """Rewrites ``<out_dir>/<name>.md`` as render(the payload of ``<name>.json``, findings) and returns its path;
    findings: the hand-written text between the findings markers of the page there (``runner.kept_findings``),
    else a findings section holding placeholder."""
    page = out_dir / f"{name}.md"
    payload = json.loads((out_dir / f"{name}.json").read_text())
    page.write_text(render(payload, kept_findings(page, placeholder)))
    return page


def write_page(out_dir: pathlib.Path, name: str, payload: dict[str, Any], render: Render,
               placeholder: str) -> pathlib.Path:
    """Writes ``<out_dir>/<name>.json`` (``write_json(payload)``) and the page rendered from it (``rerender``);
    returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", payload)
    return rerender(out_dir, name, render, placeholder)


def finish_study(workdir: pathlib.Path, out: pathlib.Path, name: str, payload: dict[str, Any], *, render: Render,
                 placeholder: str, plot: Callable[[dict[str, Any], pathlib.Path], None],
                 say: Callable[[str], None], started: float, argv: list[str] | None) -> dict[str, Any]:
    """A study's last step: adds to payload its seconds (summed over resumed runs in workdir's cache), the machine
    and the command (``python -m experiments.<name>_study`` with argv, default sys.argv), draws ``<name>.png`` and
    writes ``<name>.json`` and its page into out; returns payload."""
    cache = ResultCache(workdir)
    previous = cache.get("seconds") or 0.0
    payload.update(seconds=cache.put("seconds", previous + time.perf_counter() - started),
                   machine=f"{platform.machine()} ({platform.processor() or 'cpu'}, {os.cpu_count()} cores)",
                   command=" ".join([f"python -m experiments.{name}_study",
                                     *(sys.argv[1:] if argv is None else argv)]))
    out.mkdir(parents=True, exist_ok=True)
    plot(payload, out / f"{name}.png")
    write_page(out, name, payload, render, placeholder)
    say(f"wrote {out / name}.md in {time.perf_counter() - started:.0f}s")
    return payload


def parse_fields(text: str, defaults: dict[str, Any], flag: str = "--budget") -> dict[str, Any]:
    """defaults with the comma-separated ``key=value`` overrides of text, each value of its default's type;
    SystemExit naming the flag, the unknown key and the allowed ones."""
    fields = dict(defaults)
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise SystemExit(f"{flag}: unknown field {key!r}; allowed: {', '.join(sorted(defaults))}")
        fields[key] = type(defaults[key])(value)
    return fields
