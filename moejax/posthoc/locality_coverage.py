"""Local routing consistency in hindsight (moejax's earlier reading, kept so that old results can be reproduced; the
authors' SRP and SCH are ``moejax.posthoc.locality``): the share of a disjoint segment's routed slots that its c (or
k) most frequent experts cover, averaged over segments."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moejax.posthoc.analysis import DEFAULT_LENGTHS as COVERAGE_LENGTHS
from moejax.posthoc.analysis import int_list
from moejax.posthoc.locality import _window_counts, _windows
from moejax.posthoc.trace import Trace


def segment_cache_coverage(trace: Trace, lengths: Sequence[int] = COVERAGE_LENGTHS,
                           cache_sizes: Sequence[int] | None = None) -> np.ndarray:
    """[L, len(lengths), len(cache_sizes)] float64: the share of a segment's routed slots that the best fixed set of
    c experts in hindsight covers (moejax's earlier reading of SCH; ``analysis.segment_cache_best_hit_rate``).

    Each document is cut into segments of m consecutive tokens from its start (the last incomplete segment of a
    document is dropped; segments never cross a document boundary). For a segment s and layer l let
    c_s[e] = the routed slots of expert e in s (sum over its m tokens) and R_s = sum_e c_s[e]. A cache holding c
    experts for the whole segment, chosen optimally in hindsight (the c most frequent experts of the segment), hits
    H_s(c) = sum of the c largest c_s[e] slots; then
        coverage_l(m, c) = mean over segments s with R_s > 0 of H_s(c) / R_s
    (NaN when no segment has a routed slot, e.g. m longer than every document). 1 for c >= E, and for m = 1 whenever
    c >= the experts of one token. ``cache_sizes`` default: (k, 2k) with k = trace.top_k. Unlike
    ``segment_cache_hit_rate`` (the authors' SCH) the set is static within a segment and slots are counted (an expert
    in two slots of one token twice)."""
    lengths = int_list(lengths, "segment lengths")
    sizes = int_list((trace.top_k, 2 * trace.top_k) if cache_sizes is None else cache_sizes, "cache sizes", 0)
    columns = np.clip(np.asarray(sizes), 0, trace.num_experts)
    out = np.full((trace.num_layers, len(lengths), len(sizes)), np.nan)
    for mi, length in enumerate(lengths):
        starts = _windows(trace, length, length)
        for layer in range(trace.num_layers):
            total, segments = np.zeros(len(sizes)), 0
            for counts in _window_counts(trace, layer, starts, length):
                slots = counts.sum(-1)
                counts = counts[slots > 0]
                cumulative = np.zeros((counts.shape[0], trace.num_experts + 1))
                cumulative[:, 1:] = np.cumsum(-np.sort(-counts, axis=-1), axis=-1)  # hits of the c largest, c = 0..E
                total += (cumulative[:, columns] / slots[slots > 0, None]).sum(0)
                segments += counts.shape[0]
            if segments:
                out[layer, mi] = total / segments
    return out


def segment_routing_coverage(trace: Trace, lengths: Sequence[int] = COVERAGE_LENGTHS) -> np.ndarray:
    """[L, len(lengths)] float64: ``segment_cache_coverage`` with c = k (k = trace.top_k): the share of a disjoint
    segment's routed slots that its k most frequent experts cover, averaged over the segments (moejax's earlier
    reading of SRP; ``analysis.segment_routing_best_performance``). 1 for m = 1. The authors' SRP is an F1 over
    every window: ``segment_routing_performance``."""
    return segment_cache_coverage(trace, lengths, [trace.top_k])[..., 0]
