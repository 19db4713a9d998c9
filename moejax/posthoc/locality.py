"""Local routing consistency of a routing trace (``moejax.posthoc.trace.Trace``): how well the experts of a few
consecutive tokens predict each other's, the property that expert offloading and expert caches rely on.

The headline metrics are those of Liang et al., "Not All Models Suit Expert Offloading: On Local Routing Consistency
of Mixture-of-Expert Models" (arXiv 2505.16056), as the authors' code computes them (github.com/ljcleo/moe-lrc,
commit 7b3ca46, ``src/30_srp_calc.py``, ``31_srp_refine.py``, ``41_sch_calc.py``, ``42_sch_refine.py``):

* ``segment_routing_performance``, SRP(m): the best F1, over one threshold per layer, of routing every window of m
  consecutive tokens to the experts that at least t of its tokens use, against the tokens' own routing;
* ``segment_cache_hit_rate``, SCH(m, rho): the hit rate of an expert cache of rho * k experts that, on a miss, evicts
  the cached expert used least often in the next m tokens (the least recently used among equals);
* ``model_routing_performance`` and ``model_cache_hit_rate``: one figure for the whole model, pooled as the authors
  pool it (SRP: the F1 counts summed over the layers under one threshold; SCH: one cache over every (layer, expert)
  pair, of rho * L * k entries, fed each token's experts of every layer);
* ``routing_performance_interval`` and ``cache_hit_rate_interval``: those numbers with the authors' bootstrap
  intervals (documents resampled with replacement, 1000 resamples, the basic interval 2 * estimate - percentile at
  95%).

The earlier hindsight-optimal variants are ``moejax.posthoc.locality_coverage``.

Every metric reads the trace a layer at a time, takes each token's *set* of real experts (null slots, ids outside
``[0, E)``, left out; an expert in two slots of one token counts once, as the authors' top-k mask) and never lets a
window or a cache cross a document boundary (``trace.doc_starts``). Arrays are indexed by the layer *position* ``l``
(the model's layer index is ``trace.layers[l]``).

    from moejax.posthoc import locality, read_trace
    trace = read_trace("traces/run1")
    locality.segment_cache_hit_rate(trace)           # [L, 4, 2]: m = 4, 16, 64, 256; rho = 1, 2
    srp = locality.routing_performance_interval(trace, seed=0)
    srp.model.value, srp.model.lower, srp.model.upper
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from moejax.posthoc.analysis import _block_tokens, _distinct, _valid, int_list
from moejax.posthoc.bootstrap import _basic_interval, _check_bootstrap, _resample_weights
from moejax.posthoc.trace import Trace

SEGMENT_LENGTHS = (4, 16, 64, 256)  # the authors' config.json "seg_lengths"
CACHE_MULTIPLES = (1, 2)  # rho = cache size / active experts: the authors' per-layer plots; 2 their headline
NUM_BOOTSTRAP = 1000  # config.json "num_bootstrap"
CONFIDENCE = 0.95  # config.json "ci_confidence"
_SIMULATION_ELEMENTS = 1 << 22  # rows x experts of the cache simulations held at once
_STAMP_BITS = 32  # a cache priority is (look-ahead uses) << 32 | (access stamp), the authors' prop
_NEVER = np.iinfo(np.int64).max

__all__ = ["CACHE_MULTIPLES", "CONFIDENCE", "NUM_BOOTSTRAP", "SEGMENT_LENGTHS", "Estimate", "Pooled",
           "cache_hit_rate_interval", "model_cache_hit_rate", "model_routing_performance",
           "routing_performance_interval", "segment_cache_hit_rate", "segment_routing_performance"]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval [lower, upper], arrays of one shape (NaN where undefined)."""

    value: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


@dataclasses.dataclass(frozen=True)
class Pooled:
    """A metric per layer (``layers``: [L, ...]) and for the whole model (``model``: [...]), each with its interval.
    ``ratio`` (SRP only, else None): the authors' rho-hat, predicted experts per activated one at the best threshold,
    as (per layer [L, M], model [M])."""

    layers: Estimate
    model: Estimate
    ratio: tuple[np.ndarray, np.ndarray] | None = None


# --------------------------------------------------------------------------------------------- windows and blocks

def _windows(trace: Trace, length: int, stride: int) -> np.ndarray:
    """[W] int64: the start positions of the windows of ``length`` consecutive tokens inside each document, at
    ``stride`` from the document's start; a window that would cross the document's end is dropped."""
    docs = trace.documents
    per_doc = np.maximum((docs[:, 1] - docs[:, 0] - length) // stride + 1, 0)
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    return np.repeat(docs[:, 0], per_doc) + stride * (np.arange(per_doc.sum()) - first)


def _window_counts(trace: Trace, layer: int, starts: np.ndarray, length: int,
                   distinct: bool = False) -> Iterator[np.ndarray]:
    """Blocks of [w, E] int64: the routed slots of each expert inside each window [s, s + length) at one layer, the
    windows of ``starts`` (sorted) in order; ``distinct``: the tokens using each expert (each token's set). Disjoint
    windows count their tokens' slots directly; overlapping ones difference prefix sums over the block's tokens."""
    span, num_experts = _block_tokens(trace), trace.num_experts
    disjoint = bool(np.all(np.diff(starts) >= length))
    i = 0
    while i < len(starts):
        first = int(starts[i])
        j = int(np.searchsorted(starts, first + span, side="left"))
        local = starts[i:j] - first
        experts = np.asarray(trace.experts[layer, first:int(starts[j - 1]) + length])
        if distinct:
            experts = _distinct(experts)
        if disjoint:
            inside = experts[(local[:, None] + np.arange(length)).ravel()]  # [w * length, k]
            valid = _valid(inside, num_experts)
            window = np.broadcast_to(np.repeat(np.arange(j - i), length)[:, None], inside.shape)
            keys = window[valid].astype(np.int64) * num_experts + inside[valid]
            yield np.bincount(keys, minlength=(j - i) * num_experts).reshape(j - i, num_experts)
        else:  # prefix sums along the tokens, laid out [E, tokens] so that the sums run over contiguous memory
            rows = experts.shape[0]
            valid = _valid(experts, num_experts)
            token = np.broadcast_to(np.arange(rows)[:, None], experts.shape)
            keys = experts[valid].astype(np.int64) * (rows + 1) + token[valid] + 1
            prefix = np.bincount(keys, minlength=num_experts * (rows + 1)).reshape(num_experts, rows + 1)
            np.cumsum(prefix, axis=1, out=prefix)
            yield (prefix[:, local + length] - prefix[:, local]).T
        i = j


def _first_uses(experts: np.ndarray) -> np.ndarray:
    """experts [n, k] with every repeat of an id within a row replaced by -1 (a null slot), the slot order kept (the
    order in which a cache serves a token's experts)."""
    experts = np.array(experts)
    for j in range(1, experts.shape[1]):
        experts[(experts[:, j:j + 1] == experts[:, :j]).any(1), j] = -1
    return experts


# -------------------------------------------------------------------------------------------------------- SRP

def _routing_histograms(trace: Trace, layer: int, length: int, stride: int) -> np.ndarray:
    """[D, length + 1] int64: h[d, c] = the (window, expert) pairs of document d's windows (``length`` tokens, every
    ``stride``) at one layer in which c tokens use the expert (the authors' ``cnt``, c = 0 .. length)."""
    docs = len(trace.doc_starts)
    histogram = np.zeros(docs * (length + 1), np.int64)
    starts = _windows(trace, length, stride)
    owner = np.searchsorted(trace.doc_starts, starts, side="right") - 1
    i = 0
    for counts in _window_counts(trace, layer, starts, length, distinct=True):
        keys = owner[i:i + len(counts), None] * (length + 1) + counts
        histogram += np.bincount(keys.ravel(), minlength=histogram.size)
        i += len(counts)
    return histogram.reshape(docs, length + 1)


def _best_f1(histogram: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best F1, rho-hat, activations) of histograms [..., length + 1] (``_routing_histograms`` summed): for each
    threshold t = 0 .. length, matches M(t) = sum_{c >= t} c h[c], predictions P(t) = length sum_{c >= t} h[c],
    activations A = M(0), F1(t) = 2 M(t) / max(P(t) + A, 1) (31_srp_refine.py); the best over t, and
    rho-hat = P(t*) / A at the best t* (the first of equals)."""
    histogram = np.asarray(histogram, np.float64)
    uses = np.arange(length + 1)
    matches = np.cumsum((histogram * uses)[..., ::-1], axis=-1)[..., ::-1]
    predictions = length * np.cumsum(histogram[..., ::-1], axis=-1)[..., ::-1]
    activations = matches[..., 0]
    f1 = 2 * matches / np.maximum(predictions + activations[..., None], 1)
    best = np.argmax(f1, axis=-1)
    chosen = np.take_along_axis(predictions, best[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(activations > 0, chosen / activations, np.nan)
    return np.take_along_axis(f1, best[..., None], axis=-1)[..., 0], ratio, activations


def _routing_performance(trace: Trace, lengths: Sequence[int], stride: int, n_boot: int, confidence: float,
                         seed: int | None) -> Pooled:
    lengths = int_list(lengths, "segment lengths")
    stride = int_list([stride], "stride")[0]
    shape = (trace.num_layers, len(lengths))
    value, ratio = np.full(shape, np.nan), np.full(shape, np.nan)
    model_value, model_ratio = np.full(len(lengths), np.nan), np.full(len(lengths), np.nan)
    bounds = {name: np.full(s, np.nan) for name, s in (("low", shape), ("high", shape), ("model_low", len(lengths)),
                                                        ("model_high", len(lengths)))}
    docs = len(trace.doc_starts)
    # one set of resampled documents for every layer and length, as the authors' bs_w
    weights = _resample_weights(np.random.default_rng(seed), docs, n_boot) if n_boot else None
    for mi, length in enumerate(lengths):
        pooled = np.zeros((docs, length + 1), np.int64)
        for layer in range(trace.num_layers):
            histogram = _routing_histograms(trace, layer, length, stride)
            pooled += histogram
            best, rho, activations = _best_f1(histogram.sum(0), length)
            if activations > 0:
                value[layer, mi], ratio[layer, mi] = best, rho
                if weights is not None:
                    replicates = _best_f1(weights @ histogram, length)[0]
                    bounds["low"][layer, mi], bounds["high"][layer, mi] = _basic_interval(best, replicates,
                                                                                          confidence)
        best, rho, activations = _best_f1(pooled.sum(0), length)
        if activations > 0:
            model_value[mi], model_ratio[mi] = best, rho
            if weights is not None:
                replicates = _best_f1(weights @ pooled, length)[0]
                bounds["model_low"][mi], bounds["model_high"][mi] = _basic_interval(best, replicates, confidence)
    return Pooled(layers=Estimate(value, bounds["low"], bounds["high"]),
                  model=Estimate(model_value, bounds["model_low"], bounds["model_high"]),
                  ratio=(ratio, model_ratio))


def segment_routing_performance(trace: Trace, lengths: Sequence[int] = SEGMENT_LENGTHS, stride: int = 1
                                ) -> np.ndarray:
    """[L, len(lengths)] float64: SRP(m), the segment routing best performance, per layer, as the authors compute it
    (30_srp_calc.py, 31_srp_refine.py).

    Windows w of m consecutive tokens start every ``stride`` tokens from each document's start (stride 1: every
    overlapping window, as the authors; none crosses a document boundary). With n_w(e) = the tokens of w whose
    experts include e, the segment routing of threshold t gives each of the m tokens of w the experts
    S_w(t) = {e : n_w(e) >= t}. Summed over the layer's windows,
        M(t) = sum_w sum_{e in S_w(t)} n_w(e)   (matches),     P(t) = sum_w m |S_w(t)|   (predictions),
        A = sum_w sum_e n_w(e)                  (activations), F1(t) = 2 M(t) / (P(t) + A),
    and SRP(m) = max over t = 0 .. m of F1(t): one threshold for the whole layer. SRP(1) = 1. NaN when no window
    has a routed slot (m longer than every document)."""
    return _routing_performance(trace, lengths, stride, 0, CONFIDENCE, None).layers.value


def model_routing_performance(trace: Trace, lengths: Sequence[int] = SEGMENT_LENGTHS, stride: int = 1
                              ) -> np.ndarray:
    """[len(lengths)] float64: SRP(m) of the whole model as the authors pool it (31_srp_refine.py, level 'm'):
    M(t), P(t) and A of ``segment_routing_performance`` summed over the layers, then the best F1 over one threshold
    t shared by every layer."""
    return _routing_performance(trace, lengths, stride, 0, CONFIDENCE, None).model.value


def routing_performance_interval(trace: Trace, lengths: Sequence[int] = SEGMENT_LENGTHS, stride: int = 1, *,
                                 n_boot: int = NUM_BOOTSTRAP, confidence: float = CONFIDENCE,
                                 seed: int | None = 0) -> Pooled:
    """SRP per layer [L, M] and for the model [M] (``segment_routing_performance``, ``model_routing_performance``)
    with the authors' bootstrap intervals (30_srp_calc.py, 31_srp_refine.py): the D documents are resampled with
    replacement ``n_boot`` times (one set of resamples, drawn from ``numpy.random.default_rng(seed)``, for every
    layer, length and the model); each resample's M, P, A are the documents' sums weighted by how often each was
    drawn, its SRP the best F1 over the thresholds found anew; the interval is the basic bootstrap one,
    [2 SRP - q_hi, 2 SRP - q_lo] with q the sorted resampled SRPs at lo = round(n_boot (1 - confidence) / 2),
    hi = n_boot - lo. Also rho-hat (``Pooled.ratio``): P(t*) / A at the best threshold t*."""
    return _routing_performance(trace, lengths, stride, _check_bootstrap(n_boot, confidence), confidence, seed)


# -------------------------------------------------------------------------------------------------------- SCH

def _simulate(sequences: np.ndarray, starts: np.ndarray, sizes: np.ndarray, lengths: Sequence[int],
              capacities: Sequence[int], num_ids: int) -> np.ndarray:
    """[D, G, M, C] int64: cache hits of every (document, stream, look-ahead m, capacity c).

    sequences [G, n, S]: G streams over n tokens (ids in [0, num_ids), num_ids = none; distinct within a token);
    document d is the tokens [starts[d], starts[d] + sizes[d]), the documents ordered by size, longest first. Each
    row (d, g, m, c) is its own cache of c entries over its own stream; the rows of the documents still running at a
    token are a prefix of the rows, so that every step works on views.

    41_sch_calc.py (``calc_fsf``) keeps one stack of experts for every cache size at once (Mattson's stack algorithm
    for a priority policy); this runs one cache per size, which gives the same hits: a token's experts hit when they
    are cached at the token's start (the authors' ranks are taken before the token's updates), or, on their first
    use in the document, while fewer than c experts have been used (the authors' ``stat[uni]``: the cache is filled
    in advance with the first c experts the document uses). Then each expert in slot order is cached: on a miss with
    c experts cached, the one of lowest priority leaves, the priority of e being (uses of e in the next m tokens
    counting the current one, less its uses already served; the stamp of its last use): fewest upcoming uses first,
    least recently used among equals. After the token, the token m ahead enters the look-ahead counts."""
    streams, _, slots = sequences.shape
    lengths, capacities = np.asarray(lengths, np.int64), np.asarray(capacities, np.int64)
    shape = (len(starts), streams, len(lengths), len(capacities))
    rows = int(np.prod(shape))
    index = np.indices(shape).reshape(len(shape), rows)
    base = index[1] * sequences.shape[1] + starts[index[0]]  # the row's first token in the flattened streams
    size, look, capacity = sizes[index[0]], lengths[index[2]], capacities[index[3]]
    flat = sequences.reshape(-1, slots)
    none = num_ids
    width = int(min(capacities.max(), num_ids))
    priority = np.zeros((rows, num_ids + 1), np.int64)  # column num_ids: where the empty slots' updates go
    cached = np.zeros((rows, num_ids + 1), bool)
    seen = np.zeros((rows, num_ids + 1), bool)
    held = np.full((rows, width), none, np.int64)  # the cache's entries; slots >= capacity stay empty
    filled, used, hits = (np.zeros(rows, np.int64) for _ in range(3))
    running = np.searchsorted(-size, -np.arange(int(size.max()) + 1), side="left")  # rows with size > t
    one = np.int64(1) << _STAMP_BITS
    for offset in range(int(min(look.max(), size.max()))):  # the look-ahead of the first token
        r = running[offset]
        ids = np.where((offset < look[:r])[:, None], flat[base[:r] + offset], none)
        priority[np.arange(r)[:, None], ids] += one
    stamp = 0
    for t in range(int(size.max())):
        r = running[t]
        row = np.arange(r)
        ids = flat[base[:r] + t]  # [r, S]
        valid = ids < none
        new = valid & ~seen[row[:, None], ids]
        before = used[:r, None] + np.cumsum(new, axis=1) - new  # distinct experts used before each slot
        hits[:r] += (cached[row[:, None], ids] | (new & (before < capacity[:r, None]))).sum(1)
        seen[row[:, None], ids] = True
        used[:r] += new.sum(1)
        for j in range(slots):
            x = ids[:, j]
            miss = np.flatnonzero(valid[:, j] & ~cached[row, x])
            if miss.size:
                full = filled[miss] >= capacity[miss]
                grow = miss[~full]
                held[grow, filled[grow]] = x[grow]
                filled[grow] += 1
                evict = miss[full]
                if evict.size:
                    entries = held[evict]
                    keys = np.where(np.arange(width) < capacity[evict, None], priority[evict[:, None], entries],
                                    _NEVER)
                    slot = np.argmin(keys, axis=1)
                    cached[evict, entries[np.arange(len(evict)), slot]] = False
                    held[evict, slot] = x[evict]
                cached[miss, x[miss]] = True
            stamp += 1
            hit = np.flatnonzero(valid[:, j])
            accessed = x[hit]
            priority[hit, accessed] = ((priority[hit, accessed] >> _STAMP_BITS) - 1 << _STAMP_BITS) | stamp
        ahead = t + look[:r]
        inside = ahead < size[:r]
        ids = np.where(inside[:, None], flat[base[:r] + np.minimum(ahead, size[:r] - 1)], none)
        priority[row[:, None], ids] += one
    if stamp >= one:
        raise ValueError(f"a document of {stamp} expert uses overflows the cache's 32-bit access stamps")
    return hits.reshape(shape)


def _check_multiples(multiples: Sequence[float], active: int) -> list[int]:
    """The cache sizes rho * active of the multiples rho; each must be a whole number >= 1."""
    sizes = []
    for rho in np.atleast_1d(np.asarray(multiples, np.float64)):
        size = rho * active
        if not (size >= 1 and abs(size - round(size)) < 1e-9):
            raise ValueError(f"cache multiple {rho} of {active} active experts is not a whole cache size >= 1")
        sizes.append(int(round(size)))
    if not sizes:
        raise ValueError("no cache multiple given")
    return sizes


def _cache_rates(trace: Trace, lengths: Sequence[int], multiples: Sequence[float], pooled: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(rates [D, G, M, C] float64, uses [D, G] int64): each document's hit rate (hits / its expert uses; NaN for
    a document without one) per stream: G = L layers (cache sizes rho k over E experts), or one stream when
    ``pooled`` (the model: every layer's experts, ids offset by l E, cache sizes rho L k over L E experts)."""
    lengths = int_list(lengths, "segment lengths")
    layers, experts, k = trace.num_layers, trace.num_experts, trace.top_k
    streams, num_ids, slots = (1, layers * experts, layers * k) if pooled else (layers, experts, k)
    capacities = _check_multiples(multiples, slots)
    docs = trace.documents
    hits = np.zeros((len(docs), streams, len(lengths), len(capacities)), np.int64)
    uses = np.zeros((len(docs), streams), np.int64)
    order = np.argsort(docs[:, 0] - docs[:, 1], kind="stable")  # longest first
    per_doc = streams * len(lengths) * len(capacities) * (num_ids + 1)
    step = max(1, _SIMULATION_ELEMENTS // per_doc)
    for first in range(0, len(order), step):
        chunk = order[first:first + step]
        sizes = docs[chunk, 1] - docs[chunk, 0]
        blocks = []
        for d in chunk:
            block = np.stack([_first_uses(trace.experts[layer, docs[d, 0]:docs[d, 1]]) for layer in range(layers)])
            real = _valid(block, experts)
            if pooled:
                block = block + (np.arange(layers) * experts)[:, None, None]
            block = np.where(real, block, num_ids)
            blocks.append(block.transpose(1, 0, 2).reshape(1, -1, slots) if pooled else block)
        sequences = np.concatenate(blocks, axis=1).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        hits[chunk] = _simulate(sequences, starts, sizes, lengths, capacities, num_ids)
        uses[chunk] = np.stack([(block < num_ids).sum((1, 2)) for block in blocks])
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = np.where(uses[:, :, None, None] > 0, hits / uses[:, :, None, None], np.nan)
    return rates, uses


def _mean_over_documents(rates: np.ndarray) -> np.ndarray:
    """[G, M, C]: the mean over the documents with an expert use (NaN where none has one)."""
    counted = ~np.isnan(rates)
    total = np.where(counted, rates, 0).sum(0)
    number = counted.sum(0)
    return np.divide(total, number, out=np.full(total.shape, np.nan), where=number > 0)


def segment_cache_hit_rate(trace: Trace, lengths: Sequence[int] = SEGMENT_LENGTHS,
                           cache_multiples: Sequence[float] = CACHE_MULTIPLES) -> np.ndarray:
    """[L, len(lengths), len(cache_multiples)] float64: SCH(m, rho), the segment cache best hit rate, per layer, as
    the authors' code computes it (41_sch_calc.py, ``calc_fsf``; 42_sch_refine.py).

    Each document is a stream of expert uses: token after token, its set of real experts (k at most) in slot order.
    A cache of c = rho k experts (k = trace.top_k) serves it with a look-ahead of m tokens: the experts of a token
    hit when they are cached at the token's start, or, the first time the document uses an expert, while fewer than
    c distinct experts have been used before it (the cache starts filled with the document's first c experts). Each
    use then enters the cache; on a miss with c experts cached, the one with the fewest uses in the next m tokens
    (the current token's not yet served uses included) leaves, the least recently used among equals. The document's
    hit rate is hits / uses, and SCH(m, rho) the mean over the documents with a use (each document weighs the same,
    as the authors' equal-length samples). SCH = 1 when c >= E. NaN when no document has a routed slot.
    ``cache_multiples``: rho, with rho k a whole number (the authors' grid is c = 1 .. E, reported as c / k)."""
    return _mean_over_documents(_cache_rates(trace, lengths, cache_multiples, False)[0])


def model_cache_hit_rate(trace: Trace, lengths: Sequence[int] = SEGMENT_LENGTHS,
                         cache_multiples: Sequence[float] = CACHE_MULTIPLES) -> np.ndarray:
    """[len(lengths), len(cache_multiples)] float64: SCH(m, rho) of the whole model as the authors pool it
    (41_sch_calc.py, the ``buf`` of every layer's top-k, ids offset by the layer's position times E): one cache of
    c = rho L k entries over the L E (layer, expert) pairs, fed each token's experts of layer 0, then layer 1, ...
    (``segment_cache_hit_rate`` otherwise)."""
    return _mean_over_documents(_cache_rates(trace, lengths, cache_multiples, True)[0])[0]


def _rate_interval(rng: np.random.Generator, rates: np.ndarray, n_boot: int, confidence: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, lower, upper) [M, C] of one stream's document rates [D, M, C]: the mean over the documents with a
    use, resampled with replacement n_boot times (41_sch_calc.py ``stat``)."""
    rates = rates[~np.isnan(rates).any((1, 2))]
    value = _mean_over_documents(rates[:, None])[0]
    if not len(rates):
        return value, np.full(value.shape, np.nan), np.full(value.shape, np.nan)
    weights = _resample_weights(rng, len(rates), n_boot)
    replicates = (weights @ rates.reshape(len(rates), -1) / len(rates)).reshape(n_boot, *value.shape)
    return (value, *_basic_interval(value, replicates, confidence))


def cache_hit_rate_interval(trace: Trace, lengths: Sequence[int] = SEGMENT_LENGTHS,
                            cache_multiples: Sequence[float] = CACHE_MULTIPLES, *, n_boot: int = NUM_BOOTSTRAP,
                            confidence: float = CONFIDENCE, seed: int | None = 0) -> Pooled:
    """SCH per layer [L, M, C] and for the model [M, C] (``segment_cache_hit_rate``, ``model_cache_hit_rate``) with
    the authors' bootstrap intervals (41_sch_calc.py ``stat``): the documents' hit rates are resampled with
    replacement ``n_boot`` times, fresh draws for each layer in order and then for the model, from
    ``numpy.random.default_rng(seed)``; a resample's SCH is the mean of its documents' rates, and the interval the
    basic one, [2 SCH - q_hi, 2 SCH - q_lo] (q as in ``routing_performance_interval``)."""
    n_boot = _check_bootstrap(n_boot, confidence)
    rng = np.random.default_rng(seed)
    estimates = []
    for pooled in (False, True):
        rates = _cache_rates(trace, lengths, cache_multiples, pooled)[0]
        estimates.append(Estimate(*(np.stack(parts) for parts in zip(
            *(_rate_interval(rng, rates[:, g], n_boot, confidence) for g in range(rates.shape[1])), strict=True))))
    layers, model = estimates
    return Pooled(layers=layers, model=Estimate(model.value[0], model.lower[0], model.upper[0]))
