"""Expert offloading simulated over a routing trace: per-layer (or global) expert caches on the device, experts
loaded from host memory on a miss, prefetching and low-precision loads, and a latency estimate from a device spec.
Trace-driven: nothing runs the model; ``python -m moejax.posthoc offload`` is the command line (docs/serving.md).

    from moejax.posthoc import offload, read_trace
    trace = read_trace("traces/run1")
    result = offload.simulate(trace, "lru", cache_experts=16, prefetch="oracle")
    costs = offload.Costs(offload.parse_device("h100-sxm"), expert_bytes=2 * 3 * 2048 * 1408)
    offload.summary(result, costs)                 # hit rates, bytes per token, latency: JSON-serialisable

The tokens are served one at a time in corpus order (batch 1 decoding), each through the MoE layers in order; with
``stream='document'`` (default) every cache starts empty at each document start (``trace.doc_starts``), with
``'corpus'`` the caches carry over. The caches and policies are ``offload_policies``'s (LRU, LFU with aging,
accumulated gate weight or router score, Belady's offline MIN). Prefetching, after layer l of a token, loads
predicted experts of layer l + 1 into its cache:

* ``affinity``: ExFlow's inter-layer affinity (arXiv 2401.08383), A[l, i, j] = P(expert j at l + 1 | expert i at
  l) estimated on a calibration trace (``analysis.inter_layer_affinity``); the p experts j of highest
  sum_{i in S} A[l, i, j] over the token's experts S at layer l (zero-probability ones left out);
* ``pregated``: Pre-gated MoE (arXiv 2308.12066), the next layer's router applied to the current layer's hidden
  state; given as ``predictions`` [L, N, q] (row l: experts of layer l + 1 in order of preference; [L - 1, N, q]
  accepted), computed from ``capture`` (docs/serving.md shows how); the first p are prefetched;
* ``oracle``: the token's actual experts at layer l + 1 (the first p of its slots): an upper bound.

Costs (``Costs``, per token t and MoE layer l, an expert's weights of B bytes at ``expert_bits`` bits):

    compute[l, t]  = a[l, t] * max(F / device FLOP/s, B / device memory bandwidth)
    transfer[l, t] = (m[l, t] + f[l, t]) * B / host-device bandwidth
    step[l, t]     = max(compute, transfer)   (overlap=True: transfers run during the layer's compute)
                   = compute + transfer       (overlap=False: nothing overlaps)
    latency[t]     = sum_l step[l, t]

with a the distinct experts the token demands at layer l, m the experts loaded for them (a low-precision copy counts
low_bits / expert_bits), f the experts prefetched after layer l (for layer l + 1) and F the expert's FLOPs per token
(default 2 B * 8 / expert_bits: two per weight). Only the routed experts are costed (attention, dense and shared
layers are left out), and overlap=True is optimistic (a missed expert's compute waits for its own load), overlap=False
pessimistic. The device numbers of the presets (``DEVICES``) are nominal datasheet figures, not measurements.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moejax.posthoc import analysis
from moejax.posthoc import offload_policies as policies
from moejax.posthoc.offload_costs import (  # noqa: F401  (offload.Costs, ... as before)
    _DEVICE_HELP,
    DEVICES,
    EXPERT_FIELDS,
    ArgumentError,
    Costs,
    Device,
    costs_json,
    expert_size,
    parse_device,
)
from moejax.posthoc.trace import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

POLICIES = policies.POLICIES
PREFETCH = ("none", "affinity", "pregated", "oracle")
STREAMS = ("document", "corpus")


# ------------------------------------------------------------------------------------------------ trace inputs

def _first(predictions: np.ndarray, p: int) -> np.ndarray:
    """The first p valid ids of each row (-1 padded), order kept."""
    order = np.argsort(predictions < 0, axis=-1, kind="stable")
    out = np.take_along_axis(predictions, order, -1)[..., :p]
    pad = p - out.shape[-1]
    return np.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, pad)], constant_values=-1) if pad > 0 else out


def part(trace: Trace, start: int, end: int) -> Trace:
    """The tokens [start, end) of trace as a trace (views of its arrays; the document starts inside, shifted)."""
    starts = trace.doc_starts[(trace.doc_starts >= start) & (trace.doc_starts < end)] - start
    return Trace(experts=trace.experts[:, start:end], weights=trace.weights[:, start:end],
                 scores=None if trace.scores is None else trace.scores[:, start:end],
                 token_ids=trace.token_ids[start:end], layers=trace.layers, num_experts=trace.num_experts,
                 doc_starts=starts, metadata=trace.metadata)


def split_calibration(trace: Trace, fraction: float) -> tuple[Trace, Trace, int]:
    """(calibration part, the rest, the token where the rest starts): the first ``fraction`` of the tokens, cut at
    the first document start at or after fraction * N (at fraction * N itself when no document starts there)."""
    if not 0 <= fraction < 1:
        raise ArgumentError("calibration_fraction", fraction, "must be a number in [0, 1)")
    target = int(round(fraction * trace.num_tokens))
    later = trace.doc_starts[trace.doc_starts >= target]
    cut = int(later[0]) if target and len(later) else target
    if fraction > 0 and not 0 < cut < trace.num_tokens:
        raise ArgumentError("calibration_fraction", fraction, f"leaves no tokens on one side of the cut in a trace "
                                                              f"of {trace.num_tokens} tokens")
    return part(trace, 0, cut), part(trace, cut, trace.num_tokens), cut


def affinity_predictions(trace: Trace, affinity: np.ndarray, p: int, block: int = 1 << 14) -> np.ndarray:
    """[L, N, p] int64: after layer l, the p experts j of layer l + 1 of highest sum_{i in S} affinity[l, i, j]
    over the token's experts S at layer l (ties to the lower id; score 0 and the last layer's row: -1)."""
    num_experts = trace.num_experts
    affinity = np.asarray(affinity, np.float64)
    if affinity.shape != (max(trace.num_layers - 1, 0), num_experts, num_experts):
        raise ArgumentError("affinity", list(affinity.shape), f"must be [L - 1, E, E] = "
                                                              f"{[trace.num_layers - 1, num_experts, num_experts]}")
    out = np.full((trace.num_layers, trace.num_tokens, p), -1, np.int64)
    for layer in range(trace.num_layers - 1):
        for start in range(0, trace.num_tokens, block):
            ids = policies.clean(np.asarray(trace.experts[layer, start:start + block]), num_experts)
            onehot = np.zeros((len(ids), num_experts + 1))
            onehot[np.arange(len(ids))[:, None], np.where(ids < 0, num_experts, ids)] = 1.0  # ids distinct per row
            score = onehot[:, :num_experts] @ affinity[layer]
            best = np.argsort(-score, axis=1, kind="stable")[:, :p]
            out[layer, start:start + block] = np.where(np.take_along_axis(score, best, 1) > 0, best, -1)
    return out


def oracle_predictions(trace: Trace, p: int) -> np.ndarray:
    """[L, N, p]: after layer l, the token's actual experts at layer l + 1 (the first p of its slots)."""
    out = np.full((trace.num_layers, trace.num_tokens, p), -1, np.int64)
    for layer in range(trace.num_layers - 1):
        out[layer] = _first(policies.clean(np.asarray(trace.experts[layer + 1]), trace.num_experts), p)
    return out


def check_predictions(predictions: np.ndarray, trace: Trace, p: int) -> np.ndarray:
    """Pre-gated predictions [L, N, q] or [L - 1, N, q] (row l: experts of layer l + 1, best first) as [L, N, p]."""
    predictions = np.asarray(predictions)
    layers, tokens = trace.num_layers, trace.num_tokens
    if (predictions.ndim != 3 or predictions.shape[0] not in (layers, layers - 1) or predictions.shape[1] != tokens
            or not np.issubdtype(predictions.dtype, np.integer)):
        raise ArgumentError("predictions", f"{predictions.dtype}{list(predictions.shape)}",
                            f"must be integer [L, N, q] or [L - 1, N, q] with L = {layers}, N = {tokens}")
    out = np.full((layers, tokens, p), -1, np.int64)
    out[:layers - 1] = _first(policies.clean(predictions[:layers - 1], trace.num_experts), p)
    return out


# -------------------------------------------------------------------------------------------------- simulation

@dataclasses.dataclass
class Result:
    """One simulation: ``options`` (its arguments), per layer [L] the demand ``accesses`` (distinct experts per
    token), ``hits``, ``compulsory`` misses (first demand since the reset), ``low_slots`` (served by a
    low-precision copy), ``prefetch_loads`` and ``prefetch_useful`` (by the layer prefetched for), and per step
    [L, n] ``demand`` and ``prefetched`` (experts moved; prefetches by the layer that issued them) and ``active``."""

    options: dict[str, Any]
    layers: list[int]
    num_tokens: int
    accesses: np.ndarray
    hits: np.ndarray
    compulsory: np.ndarray
    low_slots: np.ndarray
    prefetch_loads: np.ndarray
    prefetch_useful: np.ndarray
    demand: np.ndarray
    prefetched: np.ndarray
    active: np.ndarray


def check_options(trace: Trace, policy: str, cache_experts: int, prefetch: str, prefetch_experts: int,
                  stream: str, decay: float, score_source: str, low_precision_threshold: float,
                  low_precision_bits: int, expert_bits: int) -> None:
    """ArgumentError naming the first bad argument, its value and what is allowed."""
    top_k, num_experts = min(trace.top_k, trace.num_experts), trace.num_experts
    choices = {"policy": (policy, POLICIES), "prefetch": (prefetch, PREFETCH), "stream": (stream, STREAMS),
               "score_source": (score_source, policies.SCORE_SOURCES)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ArgumentError(name, value, f"allowed are {', '.join(allowed)}")
    if not (isinstance(cache_experts, int | np.integer) and top_k <= cache_experts <= num_experts):
        raise ArgumentError("cache_experts", cache_experts, f"experts cached per MoE layer: an integer in [top_k, E] "
                                                            f"= [{top_k}, {num_experts}]")
    if not (isinstance(prefetch_experts, int | np.integer) and 1 <= prefetch_experts <= cache_experts):
        raise ArgumentError("prefetch_experts", prefetch_experts, f"an integer in [1, cache_experts] = "
                                                                  f"[1, {cache_experts}]")
    if not 0 < decay <= 1:
        raise ArgumentError("decay", decay, "the aging factor per token: a number in (0, 1] (1: no aging)")
    if policy == "score" and score_source == "score" and trace.scores is None:
        raise ArgumentError("score_source", score_source, "the trace has no router scores (record it with "
                                                          "--with_scores), use 'weight'")
    if not low_precision_threshold >= 0:
        raise ArgumentError("low_precision_threshold", low_precision_threshold, "a gate weight >= 0 (0: off)")
    if not (isinstance(expert_bits, int | np.integer) and expert_bits >= 1):
        raise ArgumentError("expert_bits", expert_bits, "bits per expert weight: an integer >= 1")
    if not (isinstance(low_precision_bits, int | np.integer) and 1 <= low_precision_bits <= expert_bits):
        raise ArgumentError("low_precision_bits", low_precision_bits, f"an integer in [1, expert_bits] = "
                                                                      f"[1, {expert_bits}]")


def simulate(trace: Trace, policy: str = "lru", cache_experts: int | None = None, *, prefetch: str = "none",
             prefetch_experts: int | None = None, predictions: np.ndarray | None = None,
             affinity: np.ndarray | None = None, stream: str = "document", global_cache: bool = False,
             decay: float = 1.0, score_source: str = "weight", low_precision_threshold: float = 0.0,
             low_precision_bits: int = 4, expert_bits: int = 16, progress: Callable[[int], None] | None = None
             ) -> Result:
    """Simulates the expert caches over ``trace`` (module docstring, ``offload_policies``).

    policy: lru | lfu | score | belady; cache_experts: experts per MoE layer's cache (default 2 top_k, at most E),
    with ``global_cache`` a budget of cache_experts * L shared by all layers; prefetch: none | affinity | pregated
    | oracle, of ``prefetch_experts`` experts (default top_k); predictions: pregated's [L, N, q]; affinity:
    [L - 1, E, E] for 'affinity' (default: estimated on ``trace`` itself, in-sample: pass one from a calibration
    trace, ``split_calibration``); stream: document | corpus; decay: lfu/score aging per token; score_source:
    weight | score; low_precision_threshold: a miss of gate weight below it loads ``low_precision_bits`` /
    ``expert_bits`` of the expert (0: off). ``progress(tokens done)``."""
    top_k = min(trace.top_k, trace.num_experts)
    cache_experts = min(2 * top_k, trace.num_experts) if cache_experts is None else cache_experts
    prefetch_experts = top_k if prefetch_experts is None else prefetch_experts
    check_options(trace, policy, cache_experts, prefetch, prefetch_experts, stream, decay, score_source,
                  low_precision_threshold, low_precision_bits, expert_bits)
    num_experts = trace.num_experts
    pre = None
    if prefetch == "oracle":
        pre = oracle_predictions(trace, prefetch_experts)
    elif prefetch == "affinity":
        pre = affinity_predictions(trace, analysis.inter_layer_affinity(trace) if affinity is None else affinity,
                                   prefetch_experts)
    elif prefetch == "pregated":
        if predictions is None:
            raise ArgumentError("predictions", None, "prefetch='pregated' needs the predicted experts [L, N, q]")
        pre = check_predictions(predictions, trace, prefetch_experts)
    engine = policies.make_policy(
        policy, trace.num_layers, num_experts, decay=decay,
        scores=trace.scores if policy == "score" and score_source == "score" else None,
        occurrences=policies.occurrences(trace.experts, num_experts) if policy == "belady" else None)
    segments = [tuple(int(v) for v in d) for d in trace.documents] if stream == "document" else [
        (0, trace.num_tokens)]
    counts = policies.run(trace.experts, trace.weights, segments, num_experts, cache_experts, engine,
                          global_cache=global_cache, prefetch=pre, low_threshold=low_precision_threshold,
                          low_units=low_precision_bits / expert_bits, progress=progress)
    options = {"policy": policy, "cache_experts": int(cache_experts), "prefetch": prefetch,
               "prefetch_experts": int(prefetch_experts) if prefetch != "none" else 0, "stream": stream,
               "global_cache": bool(global_cache), "decay": float(decay),
               "score_source": score_source if policy == "score" else None,
               "low_precision_threshold": float(low_precision_threshold),
               "low_precision_bits": int(low_precision_bits), "expert_bits": int(expert_bits)}
    arrays = {key: np.asarray(counts[key], np.int64) for key in
              ("accesses", "hits", "compulsory", "low_slots", "prefetch_loads", "prefetch_useful")}
    steps = {key: np.asarray(counts[key], np.float32).reshape(trace.num_layers, -1)
             for key in ("demand", "prefetched", "active")}
    return Result(options=options, layers=trace.layers.tolist(), num_tokens=trace.num_tokens, **arrays, **steps)


def summary(result: Result, costs: Costs | None = None) -> dict[str, Any]:
    """The JSON-serialisable numbers of a simulation: hit_rate [L] and hit_rate_overall (hits / demand accesses);
    warm_hit_rate (the same without compulsory misses: 1 when the cache holds every expert); misses; bytes and
    experts moved per token (demand and prefetch); prefetch loads, useful and useless; low-precision slots; with
    ``costs``: the cache's bytes, whether it fits the device memory, and the latency per token (mean, p50, p90,
    p99 seconds, tokens/s) beside two references: every expert resident (compute only) and no cache (every demanded
    expert loaded, full precision)."""
    tokens = max(result.num_tokens, 1)
    accesses, hits = result.accesses, result.hits
    moved = result.demand + result.prefetched

    def ratio(a, b):
        return float(a / b) if b else None

    out = {**result.options, "layers": result.layers, "num_tokens": result.num_tokens,
           "hit_rate": [ratio(h, a) for h, a in zip(hits, accesses, strict=True)],
           "hit_rate_overall": ratio(hits.sum(), accesses.sum()),
           "warm_hit_rate": ratio(hits.sum(), accesses.sum() - result.compulsory.sum()),
           "accesses": accesses.tolist(), "misses": (accesses - hits).tolist(),
           "compulsory_misses": result.compulsory.tolist(),
           "experts_moved_per_token": float(moved.sum() / tokens),
           "demand_experts_per_token": float(result.demand.sum() / tokens),
           "prefetch_loads": result.prefetch_loads.tolist(), "prefetch_useful": result.prefetch_useful.tolist(),
           "prefetch_useless": (result.prefetch_loads - result.prefetch_useful).tolist(),
           "low_precision_slots": result.low_slots.tolist(), "low_precision_slots_total": int(result.low_slots.sum())}
    if costs is not None:
        slots = result.options["cache_experts"] * len(result.layers)
        latency = costs.latency(result.active, moved)
        resident = costs.latency(result.active, np.zeros_like(moved))
        no_cache = costs.latency(result.active, result.active)

        def stats(values: np.ndarray) -> dict[str, float | None]:
            if not len(values):
                return {"mean_s": None, "p50_s": None, "p90_s": None, "p99_s": None, "tokens_per_s": None}
            mean = float(values.mean())
            p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
            return {"mean_s": mean, "p50_s": p50, "p90_s": p90, "p99_s": p99,
                    "tokens_per_s": 1 / mean if mean > 0 else None}

        out.update({"bytes_moved_per_token": float(moved.sum() / tokens * costs.expert_bytes),
                    "demand_bytes_per_token": float(result.demand.sum() / tokens * costs.expert_bytes),
                    "prefetch_bytes_per_token": float(result.prefetched.sum() / tokens * costs.expert_bytes),
                    "cache_bytes": slots * costs.expert_bytes,
                    "fits_device_memory": slots * costs.expert_bytes <= costs.device.memory_gb * 1e9,
                    "latency": stats(latency), "latency_resident": stats(resident),
                    "latency_no_cache": stats(no_cache)})
    return out


# ------------------------------------------------------------------------------------------------------- plot

def plot_hit_rate(summaries: Sequence[Mapping[str, Any]], path: str | os.PathLike | None = None) -> Figure:
    """Hit rate (overall) against the cache size, one line per (policy, prefetch) of ``summaries`` (``summary``
    dicts); a ``matplotlib.figure.Figure`` built without pyplot, saved as a PNG when ``path`` is given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for s in summaries:
        if s["hit_rate_overall"] is not None:
            lines.setdefault((s["policy"], s["prefetch"]), []).append((s["cache_experts"], s["hit_rate_overall"]))
    for i, ((policy, prefetch), points) in enumerate(sorted(lines.items())):
        x, y = zip(*sorted(points), strict=True)
        style = "--" if policy == "belady" else "-"
        ax.plot(x, y, style, marker="o", color=f"C{i % 10}",
                label=policy + ("" if prefetch == "none" else f" + {prefetch} prefetch"))
    scope = "global budget / L" if summaries and summaries[0].get("global_cache") else "per MoE layer"
    ax.set(xlabel=f"cached experts ({scope})", ylabel="hit rate", ylim=(0, 1.02),
           title="expert cache hit rate (simulated from a routing trace)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if path is not None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
