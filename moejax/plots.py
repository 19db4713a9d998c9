"""Plots of a run's training history: expert-load heatmaps, MaxVio and experts-per-token curves, loss curves.

Every function reads ``<workdir>/metrics.jsonl`` (one JSON object per log step, ``{"kind": "train" | "eval",
"step": ..., "loss": ..., "layers_<i>_maxvio": ..., "expert_load": {"layers_<i>": [fraction per expert]}}``,
written by ``moejax.training.metrics.MetricWriter`` and read by its ``read_metrics``), returns a
``matplotlib.figure.Figure`` and, given ``path``, also saves it as a PNG. The figures are built without pyplot, so
no display and no GUI backend is needed (PNGs are rendered by Agg) and a notebook shows the returned figure inline.
matplotlib is imported inside the functions: ``import moejax`` never needs it (``pip install -e ".[notebooks]"``
installs it).

    from moejax import plots
    plots.load_heatmap("runs/deepseekmoe")
    plots.loss_curves({"GShard": ["runs/gshard/seed0", "runs/gshard/seed1"], "DeepSeekMoE": "runs/dsmoe"})
"""
from __future__ import annotations

import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moejax.training import metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Workdir = str | os.PathLike
# One curve of loss_curves / stat_curves: a workdir, or several (the seeds of one row: mean line, min-max band).
Runs = Mapping[str, Workdir | Sequence[Workdir]] | Sequence[Workdir]

_LAYER_KEY = re.compile(r"^layers_(\d+)_(.+)$")


def _by_step(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of one kind sorted by step, the last one kept where a step repeats."""
    latest = {r["step"]: r for r in records if r.get("kind") == kind and "step" in r}
    return [latest[step] for step in sorted(latest)]


def _layer_names(records: list[dict[str, Any]], stat: str) -> list[str]:
    """['layers_0', 'layers_1', ...]: the MoE layers with a ``layers_<i>_<stat>`` scalar, in layer order."""
    indices = {int(m.group(1)) for r in records for key in r if (m := _LAYER_KEY.match(key)) and m.group(2) == stat}
    return [f"layers_{i}" for i in sorted(indices)]


def _finish(fig: Figure, path: Workdir | None) -> Figure:
    if path is not None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _grid(count: int, width: float = 4.2, height: float = 3.0) -> tuple[Figure, list[Any]]:
    """A figure of ``count`` subplots in rows of at most 4; returns (figure, axes in order), extra axes hidden."""
    from matplotlib.figure import Figure

    columns = min(count, 4)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = [fig.add_subplot(rows, columns, i + 1) for i in range(rows * columns)]
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def load_heatmap(workdir: Workdir, path: Workdir | None = None) -> Figure:
    """Expert-load heatmap, one subplot per MoE layer: experts (y) x training step (x), colour = the fraction of the
    layer's routed slots each expert received over the log interval ending at that step (a column sums to 1; a
    balanced layer is 1/E everywhere). The image of layer ``l`` holds ``[E, steps]`` = the train records'
    ``expert_load['layers_<l>']`` as columns. Records without ``expert_load`` are skipped; a run with none (a dense
    model, or a run from before the loads were logged) raises ValueError saying so."""
    records = [r for r in _by_step(metrics.read_metrics(workdir), "train") if "expert_load" in r]
    if not records:
        raise ValueError(f"{pathlib.Path(workdir) / 'metrics.jsonl'} has no train record with 'expert_load': the "
                         "run is dense (no MoE layer) or was logged before moejax recorded expert loads")
    layers = sorted({layer for r in records for layer in r["expert_load"]}, key=lambda name: int(name.split("_")[1]))
    fig, axes = _grid(len(layers), height=3.4)
    for ax, layer in zip(axes, layers, strict=True):
        rows = [r for r in records if layer in r["expert_load"]]
        steps = np.array([r["step"] for r in rows], dtype=float)
        loads = np.array([r["expert_load"][layer] for r in rows], dtype=float).T  # [E, steps]
        half = (np.median(np.diff(steps)) if len(steps) > 1 else 1.0) / 2
        image = ax.imshow(loads, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", vmin=0.0,
                          extent=(steps[0] - half, steps[-1] + half, -0.5, loads.shape[0] - 0.5))
        fig.colorbar(image, ax=ax, label="fraction of routed slots")
        ax.set(title=f"{layer} ({loads.shape[0]} experts, uniform = {1 / loads.shape[0]:.3g})", xlabel="step",
               ylabel="expert")
    fig.suptitle(f"expert load: {workdir}")
    return _finish(fig, path)


def _layer_curves(workdir: Workdir, stat: str, ylabel: str, path: Workdir | None) -> Figure:
    """One line per MoE layer of the train records' ``layers_<i>_<stat>`` over the step."""
    from matplotlib.figure import Figure

    records = _by_step(metrics.read_metrics(workdir), "train")
    layers = _layer_names(records, stat)
    if not layers:
        raise ValueError(f"{pathlib.Path(workdir) / 'metrics.jsonl'} has no train record with 'layers_<i>_{stat}': "
                         "the run has no MoE layer")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for layer in layers:
        rows = [r for r in records if f"{layer}_{stat}" in r]
        ax.plot([r["step"] for r in rows], [r[f"{layer}_{stat}"] for r in rows], label=layer)
    ax.set(xlabel="step", ylabel=ylabel, title=f"{ylabel}: {workdir}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, path)


def maxvio_curves(workdir: Workdir, path: Workdir | None = None) -> Figure:
    """MaxVio = max_e load_e / mean_e load_e - 1 of each MoE layer over the training steps (one line per layer, the
    value of each log interval; Loss-Free Balancing's MaxVio_batch). Raises ValueError for a run without MoE layers."""
    return _layer_curves(workdir, "maxvio", "MaxVio (train)", path)


def experts_per_token_curves(workdir: Workdir, path: Workdir | None = None) -> Figure:
    """Mean routed experts per token of each MoE layer over the training steps (one line per layer): constant k for
    top-k routers, varying for dynamic ones (top-p, AdaMoE null experts, expert choice)."""
    return _layer_curves(workdir, "experts_per_token", "experts per token (train)", path)


def _as_groups(runs: Runs) -> dict[str, list[Workdir]]:
    """{label: [workdir, ...]}: a mapping's values may be one workdir or a list (seeds); a plain list of workdirs
    becomes one group per workdir labelled by its path."""
    if isinstance(runs, Mapping):
        return {label: [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs) for label, dirs in runs.items()}
    return {str(workdir): [workdir] for workdir in runs}


def _band(series: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps present in every series, and the mean, min and max over the series at those steps."""
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = np.array([[s[step] for step in steps] for s in series], dtype=float).reshape(len(series), len(steps))
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def _plot_band(ax: Any, series: list[dict[int, float]], color: str, label: str | None, **style: Any) -> None:
    """The mean over the series (the seeds of one row) as a line, with a min-max band when there are several."""
    steps, mean, low, high = _band(series)
    if not len(steps):
        return
    ax.plot(steps, mean, color=color, label=label, marker="o" if len(steps) == 1 else None, **style)
    if len(series) > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)


def _series(workdir: Workdir, kind: str, value: Any) -> dict[int, float]:
    """{step: value(record)} over one run's records of ``kind`` where value(record) is not None."""
    points = {}
    for record in _by_step(metrics.read_metrics(workdir), kind):
        y = value(record)
        if y is not None:
            points[record["step"]] = y
    return points


def loss_curves(runs: Runs, path: Workdir | None = None) -> Figure:
    """Train loss (solid, records of kind 'train', key 'loss') and evaluation loss (dashed with markers, kind 'eval')
    of several runs on one plot. ``runs``: {label: workdir or [workdirs]} or [workdirs]; several workdirs under one
    label (the seeds of one row) give their mean with a min-max band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, dirs) in enumerate(_as_groups(runs).items()):
        color = f"C{i % 10}"
        seeds = f" ({len(dirs)} seeds)" if len(dirs) > 1 else ""
        _plot_band(ax, [_series(d, "train", lambda r: r.get("loss")) for d in dirs], color, f"{label}{seeds}")
        _plot_band(ax, [_series(d, "eval", lambda r: r.get("loss")) for d in dirs], color, None, linestyle="--")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="train loss (solid) and eval loss (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _finish(fig, path)


def _mean_over_layers(record: dict[str, Any], stat: str) -> float | None:
    values = [v for key, v in record.items() if (m := _LAYER_KEY.match(key)) and m.group(2) == stat]
    return float(np.mean(values)) if values else None


def stat_curves(runs: Runs, stat: str, path: Workdir | None = None) -> Figure:
    """A per-layer train statistic (``maxvio``, ``experts_per_token``, ``drop_fraction``, ``max_over_mean_load``)
    averaged over the MoE layers, of several runs on one plot, over the training steps; several workdirs under one
    label give their mean with a min-max band. Runs without the statistic (dense) are left out."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, dirs) in enumerate(_as_groups(runs).items()):
        series = [_series(d, "train", lambda r: _mean_over_layers(r, stat)) for d in dirs]
        if all(series):
            _plot_band(ax, series, f"C{i % 10}", f"{label} ({len(dirs)} seeds)" if len(dirs) > 1 else label)
    ax.set(xlabel="step", ylabel=f"{stat} (train, mean over MoE layers)", title=stat)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _finish(fig, path)


def paired_train_differences(rows: Mapping[str, Mapping[int, Workdir]], reference: str
                             ) -> dict[str, tuple[np.ndarray, np.ndarray, list[int]]]:
    """Within-seed differences of the train loss over training: for each row other than ``reference``,
    (steps, differences [seeds, steps] of row - reference, seeds) at the seeds both rows have and the logged steps
    all those runs share. ``rows``: {row: {seed: workdir}}. Rows that share no seed with the reference are left out.
    The seed fixes the data order, so both runs of a pair saw the same batches at every step."""
    ref = {seed: _series(d, "train", lambda r: r.get("loss")) for seed, d in rows[reference].items()}
    out = {}
    for name, runs in rows.items():
        seeds = sorted(set(runs) & set(ref))
        if name == reference or not seeds:
            continue
        mine = {seed: _series(runs[seed], "train", lambda r: r.get("loss")) for seed in seeds}
        steps = sorted(set.intersection(*(set(mine[k]) & set(ref[k]) for k in seeds)))
        diffs = np.array([[mine[k][t] - ref[k][t] for t in steps] for k in seeds], dtype=float)
        out[name] = (np.array(steps), diffs.reshape(len(seeds), len(steps)), seeds)
    return out


def paired_difference_curves(rows: Mapping[str, Mapping[int, Workdir]], reference: str,
                             path: Workdir | None = None) -> Figure:
    """paired_train_differences as a plot: per row, the mean over seeds (thick) and each seed (thin), against a zero
    line; below zero the row's train loss is lower than the reference's on the same batches."""
    from matplotlib.figure import Figure

    differences = paired_train_differences(rows, reference)
    if not differences:
        raise ValueError(f"no row shares a seed with the reference row {reference!r}")
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0.0, color="black", linewidth=0.8)
    for i, (name, (steps, diffs, seeds)) in enumerate(differences.items()):
        color = f"C{i % 10}"
        for row in diffs:
            ax.plot(steps, row, color=color, linewidth=0.6, alpha=0.5)
        ax.plot(steps, diffs.mean(0), color=color, linewidth=2.0, label=f"{name} - {reference} ({len(seeds)} seeds)")
    ax.set(xlabel="step", ylabel="train loss difference (nats per token)",
           title=f"train loss minus {reference}'s at the same seed (thin: each seed, thick: mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _finish(fig, path)
