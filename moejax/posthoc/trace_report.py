"""What ``python -m moejax.posthoc analyze`` writes from a routing trace: the headline numbers as strict JSON
(``summary``) and the plots, built on ``analysis.py``'s and ``locality.py``'s arrays. The ``plot_*`` functions return a
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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moejax.posthoc import analysis, locality, locality_coverage
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


def _local_consistency(trace: Trace, lengths: Sequence[int] | None, cache_sizes: Sequence[int] | None,
                       cache_multiples: Sequence[float], n_boot: int, confidence: float, seed: int | None
                       ) -> dict[str, Any]:
    """The local routing consistency part of ``summary`` (arrays, NaN kept)."""
    lengths = analysis.int_list(locality.SEGMENT_LENGTHS if lengths is None else lengths, "segment lengths")
    sizes = [trace.top_k, 2 * trace.top_k] if cache_sizes is None else analysis.int_list(cache_sizes, "cache sizes", 0)
    multiples = [float(rho) for rho in np.atleast_1d(cache_multiples)]
    srp = locality.routing_performance_interval(trace, lengths, n_boot=n_boot, confidence=confidence, seed=seed)
    sch = locality.cache_hit_rate_interval(trace, lengths, multiples, n_boot=n_boot, confidence=confidence,
                                           seed=seed)
    srp_coverage = locality_coverage.segment_routing_coverage(trace, lengths)
    sch_coverage = locality_coverage.segment_cache_coverage(trace, lengths, sizes)
    return {
        "segment_lengths": lengths, "cache_multiples": multiples,
        "bootstrap": {"n_boot": n_boot, "confidence": confidence, "seed": seed, "unit": "document",
                      "interval": "basic: 2 estimate - percentile"},
        "srp": srp.layers.value, "srp_low": srp.layers.lower, "srp_high": srp.layers.upper,
        "srp_mean": _nanmean(srp.layers.value), "srp_model": srp.model.value, "srp_model_low": srp.model.lower,
        "srp_model_high": srp.model.upper, "srp_ratio": srp.ratio[0], "srp_ratio_model": srp.ratio[1],
        "sch": sch.layers.value, "sch_low": sch.layers.lower, "sch_high": sch.layers.upper,
        "sch_mean": _nanmean(sch.layers.value), "sch_model": sch.model.value, "sch_model_low": sch.model.lower,
        "sch_model_high": sch.model.upper,
        "cache_sizes": sizes, "srp_coverage": srp_coverage, "srp_coverage_mean": _nanmean(srp_coverage),
        "sch_coverage": sch_coverage, "sch_coverage_mean": _nanmean(sch_coverage),
    }


def summary(trace: Trace, lengths: Sequence[int] | None = None, cache_sizes: Sequence[int] | None = None,
            cache_multiples: Sequence[float] = locality.CACHE_MULTIPLES, *, n_boot: int = locality.NUM_BOOTSTRAP,
            confidence: float = locality.CONFIDENCE, seed: int | None = 0) -> dict[str, Any]:
    """The headline numbers of a trace, JSON-serialisable (``json.dumps(..., allow_nan=False)``; NaN is None).

    Lists ``[L]`` follow the layer positions; ``*_mean`` average over the layers. Keys: num_tokens, num_documents,
    layers, num_experts, top_k, with_scores; experts_per_token [L] (routed slots per token); null_slot_fraction [L];
    max_expert_fraction [L] (the largest entry of ``expert_frequency``); max_over_mean_load, load_cv [L]
    (``load_imbalance``); router_entropy [L] (nats, None without scores) and router_entropy_max (log E);
    affinity_top1 [L - 1] (mean over the experts selected at layer l of max_j A[l, i, j]: how predictable the next
    layer's expert is; ``inter_layer_affinity``).

    Local routing consistency (``locality``) over the segment lengths ``segment_lengths`` [M] (``lengths``; default
    the authors' 4, 16, 64, 256), as arXiv 2505.16056's code computes it: srp [L][M] (``segment_routing_performance``)
    with srp_low, srp_high (bootstrap interval), srp_mean [M], srp_model [M] (``model_routing_performance``, the
    headline) with srp_model_low, srp_model_high, and rho-hat srp_ratio [L][M], srp_ratio_model [M]; sch [L][M][C]
    (``segment_cache_hit_rate`` at the cache multiples ``cache_multiples`` [C], default 1 and 2) with sch_low,
    sch_high, sch_mean [M][C], sch_model [M][C] (``model_cache_hit_rate``, the headline) with sch_model_low,
    sch_model_high; bootstrap (n_boot, confidence, seed: ``routing_performance_interval``,
    ``cache_hit_rate_interval``). Beside them, the hindsight coverage variants: srp_coverage [L][M] and
    srp_coverage_mean (``segment_routing_coverage``), sch_coverage [L][M][C'] and sch_coverage_mean at the absolute
    ``cache_sizes`` [C'] (default k and 2k; ``segment_cache_coverage``). SCH simulates the caches token by token,
    every document at once: its time grows with the longest document times L k, and with the number of documents;
    pass fewer ``lengths`` for a large corpus."""
    counts = analysis.expert_counts(trace)
    slots = counts.sum(-1)
    max_over_mean, cv = analysis.load_imbalance(trace)
    affinity = analysis.inter_layer_affinity(trace)
    selected = analysis.inter_layer_counts(trace).sum(-1) > 0
    top1 = np.array([affinity[layer].max(-1)[selected[layer]].mean() if selected[layer].any() else np.nan
                     for layer in range(len(affinity))])
    tokens = max(trace.num_tokens, 1)
    return jsonable({
        "num_tokens": trace.num_tokens, "num_documents": len(trace.doc_starts), "layers": trace.layers.tolist(),
        "num_experts": trace.num_experts, "top_k": trace.top_k, "with_scores": trace.scores is not None,
        "experts_per_token": slots / tokens, "null_slot_fraction": 1 - slots / (tokens * trace.top_k),
        "max_expert_fraction": analysis.expert_frequency(trace).max(-1), "max_over_mean_load": max_over_mean,
        "load_cv": cv,
        "router_entropy": None if trace.scores is None else analysis.router_entropy(trace),
        "router_entropy_max": math.log(trace.num_experts), "affinity_top1": top1,
        **_local_consistency(trace, lengths, cache_sizes, cache_multiples, n_boot, confidence, seed),
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


def plot_local_consistency(trace: Trace, lengths: Sequence[int] | None = None,
                           cache_sizes: Sequence[int] | None = None, path: str | os.PathLike | None = None,
                           cache_multiples: Sequence[float] = locality.CACHE_MULTIPLES, *,
                           n_boot: int = locality.NUM_BOOTSTRAP, confidence: float = locality.CONFIDENCE,
                           seed: int | None = 0, summary: dict[str, Any] | None = None) -> Figure:
    """Local routing consistency against the segment length m (log2 axis). Left: SRP of the whole model as the
    authors compute it (``model_routing_performance``, solid, its bootstrap interval shaded) and the hindsight
    coverage variant averaged over the layers (``segment_routing_coverage``, dashed). Right: SCH of the whole model
    (``model_cache_hit_rate``), one solid line per cache multiple rho (default 1 and 2) with its interval, and the
    coverage variant (``segment_cache_coverage``, dashed) per cache size (default k and 2k). ``summary``: a
    ``summary(trace, ...)`` of the same arguments, whose numbers are drawn instead of computed again."""
    from matplotlib.figure import Figure

    if summary is None:
        summary = jsonable(_local_consistency(trace, lengths, cache_sizes, cache_multiples, n_boot, confidence, seed))

    def array(key: str) -> np.ndarray:
        return np.array(summary[key], dtype=np.float64)  # None (JSON's NaN) back to NaN

    lengths = summary["segment_lengths"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.plot(lengths, array("srp_model"), "-", color="C0", marker="o", label="SRP, model (F1)")
    left.fill_between(lengths, array("srp_model_low"), array("srp_model_high"), color="C0", alpha=0.2, linewidth=0)
    left.plot(lengths, array("srp_coverage_mean"), "--", color="C1", marker="s",
              label="coverage: best fixed k-set, layer mean")
    sch, low, high = array("sch_model"), array("sch_model_low"), array("sch_model_high")
    active = trace.num_layers * trace.top_k
    for i, rho in enumerate(summary["cache_multiples"]):
        right.plot(lengths, sch[:, i], "-", color=f"C{i % 10}", marker="o",
                   label=f"SCH, model, rho = {rho:g} ({rho * active:g} of {trace.num_layers * trace.num_experts})")
        right.fill_between(lengths, low[:, i], high[:, i], color=f"C{i % 10}", alpha=0.2, linewidth=0)
    coverage = array("sch_coverage_mean")
    for i, c in enumerate(summary["cache_sizes"]):
        color = f"C{(i + len(summary['cache_multiples'])) % 10}"
        right.plot(lengths, coverage[:, i], "--", color=color, marker="s",
                   label=f"coverage: best fixed {c} experts, layer mean")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="segment length m (tokens)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    level = summary["bootstrap"]["confidence"]
    left.set(ylabel="segment routing best performance", title=f"SRP (k = {trace.top_k})")
    right.set(ylabel="segment cache best hit rate", title=f"SCH ({trace.num_experts} experts per layer)")
    fig.suptitle(f"local routing consistency (arXiv 2505.16056): whole model, {level:.0%} bootstrap intervals "
                 f"over {len(trace.doc_starts)} documents")
    return _finish(fig, path)
