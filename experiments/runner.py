"""Many moejax training runs as subprocesses, N at a time, with progress and a summary of each; shared by
``experiments.reproduce`` (ablation tables) and ``experiments.sweep`` (hyperparameter sweeps).

A ``Run`` is one ``python -m moejax.main --config=<config> --workdir=<workdir> --config.<field>=<value> ...``
command. ``run_all`` skips runs that already finished (their ``summary.json`` exists and their ``config.json`` holds
the requested overrides), starts the others (an interrupted one resumes from its newest checkpoint, which is what
moejax.main does when the same command runs again), appends each run's console output to ``<workdir>/log.txt``,
prints a line when a run starts or ends (done / total, elapsed time, ETA from the mean duration of the runs
finished so far) and the tail of the log of a run that fails, and goes on with the others.

Overrides are checked against the config before anything starts: the field must exist, and its value must parse
as the field's type the way ml_collections' ``--config.<field>=<value>`` flags parse it (absl's int, float and bool
parsers, strings as they are, Python literals for fields whose default is None).

``METRICS`` names the numbers a finished run reports (``run_metrics``): the summary's validation loss and
throughput, the final evaluation's per-layer MoE statistics averaged over the MoE layers, and the same statistics
over training (``train_<stat>``: the mean over the log records of metrics.jsonl and over the MoE layers).
"""
from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import ml_collections
from absl import flags

from moejax.training import metrics


class UsageError(ValueError):
    """Bad input on the command line or in a table file; the message names the field, the value and what is allowed."""


# ----------------------------------------------------------------------------------------------- configs and overrides


def load_config(config_arg: str) -> ml_collections.ConfigDict:
    """The config of 'configs/<file>.py[:preset]', built as moejax.main builds it (get_config(preset)). A fresh copy
    each call: callers may change it without changing what later callers read."""
    return copy.deepcopy(_load_config(config_arg))


@functools.cache
def _load_config(config_arg: str) -> ml_collections.ConfigDict:
    path, _, preset = config_arg.partition(":")
    if not pathlib.Path(path).is_file():
        raise UsageError(f"config file {path!r} (from {config_arg!r}) does not exist (relative to {os.getcwd()})")
    spec = importlib.util.spec_from_file_location(f"_moejax_config_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def _parser(kind: type) -> Callable[[str], Any]:
    """How ml_collections parses a --config.<field>=<text> flag for a field whose value has type ``kind``."""
    if kind is bool:
        return flags.BooleanParser().parse
    if kind is int:
        return flags.IntegerParser().parse
    if kind is float:
        return flags.FloatParser().parse
    if kind is str:
        return str
    if kind is tuple:
        def parse_tuple(text: str) -> tuple:
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"{text!r} is not a tuple such as '(0.8, 0.9)'")
            return tuple(value)
        return parse_tuple

    def parse_literal(text: str) -> Any:
        try:
            return ast.literal_eval({"true": "True", "false": "False"}.get(text, text))
        except (SyntaxError, ValueError):
            return text
    return parse_literal


def field_type(config: ml_collections.ConfigDict, field: str, where: str) -> type:
    """The type of ``field`` ('model.moe.top_k') in config; UsageError listing the allowed fields if it is not one."""
    node: Any = config
    parts = field.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            parent = ".".join(parts[:i])
            allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise UsageError(f"{where}: unknown config field {field!r}; the fields of "
                             f"{parent or 'the config'} are {', '.join(allowed)}")
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise UsageError(f"{where}: {field!r} is a section, not a field; its fields are {', '.join(sorted(node))}")
    return type(node)


def typed_value(config: ml_collections.ConfigDict, field: str, value: Any, where: str) -> Any:
    """``value`` as the type of config's ``field``: a string is parsed as ml_collections parses the flag, a Python
    value (from a table file) must already have that type (an int is fine for a float field)."""
    kind = field_type(config, field, where)
    if isinstance(value, str):
        try:
            return _parser(kind)(value)
        except ValueError as e:
            raise UsageError(f"{where}: {field}={value!r} is not a valid {kind.__name__} ({e}); the config's value "
                             f"is {config_value(config, field)!r}") from None
    allowed = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (tuple, list)}.get(kind)
    if allowed and (not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool))):
        raise UsageError(f"{where}: {field}={value!r} must be of type {kind.__name__} (the config's value is "
                         f"{config_value(config, field)!r})")
    return tuple(value) if kind is tuple else value


def config_value(config: ml_collections.ConfigDict, field: str) -> Any:
    node: Any = config
    for part in field.split("."):
        node = node[part]
    return node


def format_value(value: Any) -> str:
    """The command-line text of an override value ('true' for True, '0.006' for 6e-3, '(0.8, 0.9)' for a tuple)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    """'field=value' -> ('field', 'value'); UsageError naming the option otherwise."""
    field, sep, value = text.partition("=")
    if not sep or not field.strip() or not value.strip():
        raise UsageError(f"{option} {text!r} is malformed: expected <config field>=<value>, "
                         "e.g. model.moe.top_k=2")
    return field.strip(), value.strip()


# ----------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(eq=False)  # hashed by identity: a dict key while it runs
class Run:
    """One training run: ``python -m moejax.main --config=<config> --workdir=<workdir> --config.<f>=<v> ...``.

    label: what progress lines call it (e.g. 'gshard seed1').
    overrides: {config field: value}, already typed (see ``typed_value``).
    """

    label: str
    config: str
    workdir: pathlib.Path
    overrides: dict[str, Any]

    @property
    def log(self) -> pathlib.Path:
        return self.workdir / "log.txt"

    @property
    def summary_path(self) -> pathlib.Path:
        return self.workdir / "summary.json"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moejax.main", f"--config={self.config}", f"--workdir={self.workdir}",
                *(f"--config.{field}={format_value(value)}" for field, value in self.overrides.items())]

    def finished(self) -> bool:
        """summary.json exists, config.json holds every requested override, and the summary is of all its steps."""
        config_path = self.workdir / "config.json"
        if not (self.summary_path.exists() and config_path.exists()):
            return False
        try:
            summary, config = json.loads(self.summary_path.read_text()), json.loads(config_path.read_text())
        except json.JSONDecodeError:
            return False
        for field, value in self.overrides.items():
            node = config
            for part in field.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if (list(value) if isinstance(value, tuple) else value) != node:
                return False
        return summary.get("steps") == config.get("train", {}).get("steps")


@dataclasses.dataclass
class Outcome:
    """How a run went: status 'skipped' (had finished before), 'finished', 'failed' (non-zero exit, or exit 0 with
    no summary.json) or 'stopped' (interrupted; its checkpoint resumes it)."""

    run: Run
    status: str
    seconds: float = 0.0
    returncode: int | None = None


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log_tail(path: pathlib.Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else ["(no log)"]
    return "\n".join("    " + line for line in text[-lines:])


def _latest_step(path: pathlib.Path) -> str:
    """'step 120/150' from the newest progress line of a run's log, or ''."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    steps = [line.split("|")[0].strip() for line in tail.splitlines() if line.startswith("step ")]
    return steps[-1] if steps else ""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt in the main thread, so that run_all stops its runs
    cleanly; the previous handler is restored after it."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Progress:
    """done / total, elapsed and ETA lines; the ETA is the mean duration of the runs finished in this invocation
    times the work left (queued runs, and what remains of the running ones), divided by the parallel jobs."""

    def __init__(self, name: str, total: int, skipped: int, jobs: int, out: TextIO):
        self.name, self.total, self.done, self.failed, self.jobs, self.out = name, total, skipped, 0, jobs, out
        self.start = time.monotonic()
        self.durations: list[float] = []

    def line(self, text: str, running: dict[Run, float], queued: int) -> None:
        now = time.monotonic()
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            left = queued * mean + sum(max(0.0, mean - (now - started)) for started in running.values())
            eta = duration(left / max(1, min(self.jobs, queued + len(running))) if (queued or running) else 0)
        else:
            eta = "after the first run" if (queued or running) else duration(0)
        failed = f", failed {self.failed}" if self.failed else ""
        print(f"[{self.name}] {text} | done {self.done}/{self.total}{failed}, running {len(running)} | "
              f"elapsed {duration(now - self.start)} | ETA {eta}", file=self.out, flush=True)


def run_all(runs: list[Run], jobs: int = 1, *, name: str = "runs", out: TextIO | None = None,
            on_finish: Callable[[Run], None] | None = None, heartbeat_seconds: float = 60.0) -> list[Outcome]:
    """Runs ``runs`` (``jobs`` at a time) as described in the module docstring; returns one Outcome per run, in
    order. ``on_finish(run)`` is called after each run that finishes in this invocation. On KeyboardInterrupt (or
    SIGTERM within ``sigterm_as_interrupt``) the running runs get SIGTERM (moejax saves a checkpoint and exits), are
    waited for, and the KeyboardInterrupt propagates."""
    if jobs < 1:
        raise UsageError(f"--jobs={jobs} is invalid: must be an integer >= 1")
    out = out or sys.stdout
    outcomes = {run: Outcome(run, "skipped") for run in runs if run.finished()}
    queue = [run for run in runs if run not in outcomes]
    progress = _Progress(name, len(runs), len(outcomes), jobs, out)
    print(f"[{name}] {len(runs)} runs: {len(outcomes)} already finished (skipped), {len(queue)} to run, "
          f"{jobs} at a time", file=out, flush=True)
    running: dict[Run, float] = {}
    processes: dict[Run, tuple[subprocess.Popen, TextIO]] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    last_heartbeat = time.monotonic()
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run = queue.pop(0)
                run.workdir.mkdir(parents=True, exist_ok=True)
                log = run.log.open("a")
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(run.command())}\n")
                log.flush()
                processes[run] = (subprocess.Popen(run.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   start_new_session=True), log)
                running[run] = time.monotonic()
                progress.line(f"start {run.label} (log {run.log})", running, len(queue))
            time.sleep(0.2)
            for run in [r for r, (p, _) in processes.items() if p.poll() is not None]:
                process, log = processes.pop(run)
                log.close()
                seconds = time.monotonic() - running.pop(run)
                ok = process.returncode == 0 and run.summary_path.exists()
                outcomes[run] = Outcome(run, "finished" if ok else "failed", seconds, process.returncode)
                if ok:
                    progress.done += 1
                    progress.durations.append(seconds)
                    progress.line(f"finished {run.label} in {duration(seconds)}", running, len(queue))
                    if on_finish:
                        on_finish(run)
                else:
                    progress.failed += 1
                    why = f"exit status {process.returncode}" if process.returncode else "exit 0 without summary.json"
                    progress.line(f"FAILED {run.label} ({why}) after {duration(seconds)}", running, len(queue))
                    print(f"  last lines of {run.log}:\n{log_tail(run.log)}", file=out, flush=True)
            if running and time.monotonic() - last_heartbeat >= heartbeat_seconds:
                last_heartbeat = time.monotonic()
                states = ", ".join(f"{r.label} {_latest_step(r.log) or 'starting'}" for r in running)
                progress.line(f"running: {states}", running, len(queue))
    except KeyboardInterrupt:
        print(f"[{name}] interrupted: stopping {len(processes)} running run(s); each saves a checkpoint, and "
              "running the same command again resumes them", file=out, flush=True)
        for process, _ in processes.values():
            process.send_signal(signal.SIGTERM)
        for run, (process, log) in processes.items():
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
            outcomes[run] = Outcome(run, "stopped", time.monotonic() - running[run], process.returncode)
        raise
    result = [outcomes[run] for run in runs]
    failed = [o for o in result if o.status == "failed"]
    print(f"[{name}] done in {duration(time.monotonic() - progress.start)}: "
          f"{sum(o.status == 'finished' for o in result)} finished, {sum(o.status == 'skipped' for o in result)} "
          f"skipped, {len(failed)} failed" + "".join(f"\n  failed: {o.run.label} (log {o.run.log})" for o in failed),
          file=out, flush=True)
    return result


# ----------------------------------------------------------------------------------------------- metrics

LAYER_STATS = ("max_over_mean_load", "maxvio", "drop_fraction", "experts_per_token")
SUMMARY_METRICS = {
    "val_loss": "validation loss, nats per token (per byte with the bytes tokenizer; final evaluation)",
    "val_bits_per_byte": "validation loss in bits per token (summary.json's val_bits_per_byte: per byte only with "
                         "the bytes tokenizer)",
    "val_perplexity": "validation perplexity per token",
    "train_tokens_per_s": "train tokens per second (excluding compilation and evaluation)",
    "wall_seconds": "wall time of the run's last invocation, seconds",
    "params_total": "total parameters",
    "params_activated": "parameters activated per token",
}
EVAL_ONLY_STATS = {"maxvio_global": "maxvio of the final evaluation's expert load summed over all its batches "
                                    "(Loss-Free Balancing's MaxVio_global), mean over MoE layers"}
METRICS = {
    **SUMMARY_METRICS,
    **{stat: f"{stat} of the final evaluation, mean over MoE layers" for stat in LAYER_STATS},
    **EVAL_ONLY_STATS,
    **{f"train_{stat}": f"{stat} over training (mean over the log records and MoE layers)" for stat in LAYER_STATS},
}


def check_metric(name: str, where: str) -> None:
    if name not in METRICS:
        raise UsageError(f"{where}: unknown metric {name!r}; allowed: {', '.join(METRICS)}")


def run_metrics(workdir: pathlib.Path) -> dict[str, float | None]:
    """Every metric of METRICS for a finished run (from summary.json and metrics.jsonl); None where it does not
    apply (the MoE statistics of a dense model)."""
    summary = json.loads((workdir / "summary.json").read_text())
    values: dict[str, float | None] = {name: summary.get(name) for name in SUMMARY_METRICS}
    layers = summary.get("moe_layers") or {}
    for stat in (*LAYER_STATS, *EVAL_ONLY_STATS):  # runs made before maxvio_global have None there
        per_layer = [stats[stat] for stats in layers.values() if stats.get(stat) is not None]
        values[stat] = sum(per_layer) / len(per_layer) if per_layer else None
    records = [r for r in metrics.read_metrics(workdir) if r.get("kind") == "train"] if layers else []
    for stat in LAYER_STATS:
        per_record = [r[f"{layer}_{stat}"] for r in records for layer in layers if f"{layer}_{stat}" in r]
        values[f"train_{stat}"] = sum(per_record) / len(per_record) if per_record else None
    return values


# Results pages whose hand-written findings sit between these markers keep them when a script rewrites the page.
FINDINGS_BEGIN, FINDINGS_END = "<!-- findings:begin -->", "<!-- findings:end -->"


def kept_findings(page, placeholder: str) -> str:
    """The text between the findings markers of an existing results page, else a '## Findings' section holding
    placeholder."""
    if page.exists():
        text = page.read_text()
        if FINDINGS_BEGIN in text and FINDINGS_END in text:
            return text.split(FINDINGS_BEGIN, 1)[1].split(FINDINGS_END, 1)[0]
    return f"\n## Findings\n\n{placeholder}\n"
