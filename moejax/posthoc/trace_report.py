"""What ``python -m moejax.posthoc analyze`` writes from a routing trace: the headline numbers as strict JSON
(``summary``) and the plots, built on ``py``'s arrays. The ``plot_*`` functions return a
``matplotlib.figure.Figure`` built without pyplot (a notebook shows it inline; no GUI backend needed) and, given
``path``, also save it as a PNG.

    from moejax.posthoc import read_trace, trace_report
    trace = read_trace("traces/run1")
    trace_report.summary(trace)                   # headline numbers, JSON-serialisable
    trace_report.plot_local_consistency(trace, path="lrc.png")
"""
from __future__ import annotations

import math
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moejax.posthoc import analysis
from moejax.posthoc.trace import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def jsonable(values: Any) -> Any:
    """Arrays and numpy scalars as (nested lists of) Python numbers, NaN as None (strict JSON)."""
    if isinstance(values, dict):
        return {key: jsonable(value) for key, value in values.items()}
    if isinstance(values, np.ndarray | np.generic):
        return jsonable(values.tolist())
    if isinstance(values, list | tuple):
        return [jsonable(v) for v in values]
    if isinstance(values, float) and not math.isfinite(values):
        return None
    return values


def _nanmean(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """np.nanmean without its all-NaN warning (all NaN -> NaN)."""
    counts = (~np.isnan(values)).sum(axis)
    sums = np.nansum(values, axis)
    return np.divide(sums, counts, out=np.full(np.shape(sums), np.nan), where=counts > 0)


def summary(trace: Trace, lengths: Sequence[int] = analysis.DEFAULT_LENGTHS,
            cache_sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """The headline numbers of a trace, JSON-serialisable (``json.dumps(..., allow_nan=False)``; NaN is None).

    Lists ``[L]`` follow the layer positions; ``*_mean`` average over the layers. Keys: num_tokens, num_documents,
    layers, num_experts, top_k, with_scores; experts_per_token [L] (routed slots per token); null_slot_fraction [L];
    max_expert_fraction [L] (the largest entry of ``expert_frequency``); max_over_mean_load, load_cv [L]
    (``load_imbalance``); router_entropy [L] (nats, None without scores) and router_entropy_max (log E);
    affinity_top1 [L - 1] (mean over the experts selected at layer l of max_j A[l, i, j]: how predictable the next
    layer's expert is; ``inter_layer_affinity``); segment_lengths, cache_sizes; srp [L][M] and srp_mean [M]
    (``segment_routing_best_performance``); srp_f1, srp_f1_mean (``segment_routing_f1``); sch [L][M][C] and sch_mean
    [M][C] (``segment_cache_best_hit_rate``). The time grows as L * N * E per segment length (srp_f1 over every
    overlapping window dominates): pass fewer ``lengths`` for a large corpus."""
    lengths = analysis.int_list(lengths, "segment lengths")
    sizes = [trace.top_k, 2 * trace.top_k] if cache_sizes is None else analysis.int_list(cache_sizes, "cache sizes", 0)
    counts = analysis.expert_counts(trace)
    slots = counts.sum(-1)
    max_over_mean, cv = analysis.load_imbalance(trace)
    affinity = analysis.inter_layer_affinity(trace)
    selected = analysis.inter_layer_counts(trace).sum(-1) > 0
    top1 = np.array([affinity[layer].max(-1)[selected[layer]].mean() if selected[layer].any() else np.nan
                     for layer in range(len(affinity))])
    sch = analysis.segment_cache_best_hit_rate(trace, lengths, sizes)
    srp = analysis.segment_routing_best_performance(trace, lengths)
    srp_f1 = analysis.segment_routing_f1(trace, lengths)
    tokens = max(trace.num_tokens, 1)
    return jsonable({
        "num_tokens": trace.num_tokens, "num_documents": len(trace.doc_starts), "layers": trace.layers.tolist(),
        "num_experts": trace.num_experts, "top_k": trace.top_k, "with_scores": trace.scores is not None,
        "experts_per_token": slots / tokens, "null_slot_fraction": 1 - slots / (tokens * trace.top_k),
        "max_expert_fraction": analysis.expert_frequency(trace).max(-1), "max_over_mean_load": max_over_mean,
        "load_cv": cv,
        "router_entropy": None if trace.scores is None else analysis.router_entropy(trace),
        "router_entropy_max": math.log(trace.num_experts), "affinity_top1": top1,
        "segment_lengths": lengths, "cache_sizes": sizes,
        "srp": srp, "srp_mean": _nanmean(srp), "srp_f1": srp_f1, "srp_f1_mean": _nanmean(srp_f1),
        "sch": sch, "sch_mean": _nanmean(sch),
    })


# --------------------------------------------------------------------------------------------------------- plots

def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_frequency(trace: Trace, path: str | os.PathLike | None = None) -> Figure:
    """Heatmap of ``expert_frequency`` [L, E]: MoE layers (y, labelled with the model's layer index) x experts (x),
    colour = the fraction of the layer's routed slots (a balanced layer is 1/E everywhere)."""
    from matplotlib.figure import Figure

    frequency = analysis.expert_frequency(trace)
    fig = Figure(figsize=(min(3 + 0.25 * trace.num_experts, 16), 1.5 + 0.35 * trace.num_layers), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(frequency, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="fraction of routed slots")
    ax.set_yticks(range(trace.num_layers), [str(layer) for layer in trace.layers])
    ax.set(xlabel="expert", ylabel="layer",
           title=f"expert frequency ({trace.num_tokens} tokens, uniform = {1 / trace.num_experts:.3g})")
    return _finish(fig, path)


def plot_affinity(trace: Trace, pairs: Sequence[int] | None = None, path: str | os.PathLike | None = None,
                  max_panels: int = 4) -> Figure:
    """Heatmaps of ``inter_layer_affinity``, one panel per consecutive pair of MoE layers (l, l + 1): expert at layer
    l (y) x expert at layer l + 1 (x), colour = P(j | i). ``pairs``: the positions l to show (default: at most
    ``max_panels`` spread evenly over the depth). Raises ValueError for a trace of one MoE layer."""
    from matplotlib.figure import Figure

    if trace.num_layers < 2:
        raise ValueError("inter-layer affinity needs at least two MoE layers; the trace has one")
    affinity = analysis.inter_layer_affinity(trace)
    if pairs is None:
        pairs = np.unique(np.round(np.linspace(0, len(affinity) - 1, min(max_panels, len(affinity))))).astype(int)
    pairs = [int(p) for p in pairs][:max_panels]
    fig = Figure(figsize=(4.2 * len(pairs), 3.6), layout="constrained")
    vmax = max(float(affinity[pairs].max()), 1e-12)
    for i, pair in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), i + 1)
        image = ax.imshow(affinity[pair], origin="lower", interpolation="nearest", cmap="magma", vmin=0.0, vmax=vmax)
        ax.set(title=f"layer {trace.layers[pair]} -> {trace.layers[pair + 1]}",
               xlabel=f"expert at layer {trace.layers[pair + 1]}", ylabel=f"expert at layer {trace.layers[pair]}")
    fig.colorbar(image, ax=fig.axes, label="P(next-layer expert | expert)")
    fig.suptitle(f"inter-layer expert affinity (uniform = {1 / trace.num_experts:.3g})")
    return _finish(fig, path)


def plot_local_consistency(trace: Trace, lengths: Sequence[int] = analysis.DEFAULT_LENGTHS,
                           cache_sizes: Sequence[int] | None = None,
                           path: str | os.PathLike | None = None) -> Figure:
    """Local routing consistency against the segment length m (log2 axis), averaged over the MoE layers with a
    min-max band over the layers. Left: SRP as coverage (``segment_routing_best_performance``, solid) and as F1
    (``segment_routing_f1``, dashed). Right: SCH (``segment_cache_best_hit_rate``), one line per cache size
    (default k and 2k)."""
    from matplotlib.figure import Figure

    lengths = analysis.int_list(lengths, "segment lengths")
    sizes = [trace.top_k, 2 * trace.top_k] if cache_sizes is None else analysis.int_list(cache_sizes, "cache sizes", 0)
    curves = {"SRP (coverage)": (analysis.segment_routing_best_performance(trace, lengths), "-"),
              "SRP (F1)": (analysis.segment_routing_f1(trace, lengths), "--")}
    sch = analysis.segment_cache_best_hit_rate(trace, lengths, sizes)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for ax, lines in ((left, [(label, values, style) for label, (values, style) in curves.items()]),
                      (right, [(f"cache of {c} experts", sch[..., i], "-") for i, c in enumerate(sizes)])):
        for i, (label, values, style) in enumerate(lines):
            ax.plot(lengths, _nanmean(values), style, color=f"C{i % 10}", marker="o", label=label)
            if trace.num_layers > 1:
                with warnings.catch_warnings():  # a length longer than every document is NaN at every layer
                    warnings.simplefilter("ignore", RuntimeWarning)
                    low, high = np.nanmin(values, 0), np.nanmax(values, 0)
                ax.fill_between(lengths, low, high, color=f"C{i % 10}", alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="segment length m (tokens)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    left.set(ylabel="segment routing best performance", title=f"SRP (k = {trace.top_k})")
    right.set(ylabel="segment cache best hit rate", title=f"SCH ({trace.num_experts} experts)")
    fig.suptitle(f"local routing consistency: mean over {trace.num_layers} MoE layers, band = min-max over layers")
    return _finish(fig, path)
