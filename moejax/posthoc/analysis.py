"""Analyses of a routing trace (``moejax.posthoc.trace.Trace``): expert load, router entropy, co-activation,
inter-layer affinity and token/expert specialisation (``trace_report.py`` turns them, with the local routing
consistency of ``locality.py``, into the ``analyze`` command's JSON summary and plots).

Every analysis takes a Trace and returns numpy arrays indexed by the trace's layer *position* ``l`` (the model's layer
index is ``trace.layers[l]``). Null slots (expert ids outside ``[0, E)``; the routers' null id is ``>= E``) are left out
everywhere: "routed slots" are the slots with a real expert. The traces may be memory-mapped: each analysis reads one
layer at a time in blocks of tokens, so memory stays bounded by a block, not the corpus.

    from moejax.posthoc import analysis, read_trace
    trace = read_trace("traces/run1")
    analysis.expert_frequency(trace)          # [L, E]

Local routing consistency (SRP, SCH) lives in ``moejax.posthoc.locality`` (the earlier
``segment_cache_best_hit_rate`` and ``segment_routing_best_performance`` are its ``segment_cache_coverage`` and
``segment_routing_coverage``, ``segment_routing_f1`` its ``segment_routing_performance``).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from moejax.posthoc.trace import Trace

if TYPE_CHECKING:
    pass

_BLOCK_ELEMENTS = 1 << 22  # [tokens, E] entries processed at once
DEFAULT_LENGTHS = (1, 2, 4, 8, 16, 32, 64)  # the segment lengths of the coverage variants of SRP/SCH (locality.py)
# --------------------------------------------------------------------------------------------------------- helpers

def _block_tokens(trace: Trace) -> int:
    return max(1, _BLOCK_ELEMENTS // max(trace.num_experts, trace.top_k))


def _blocks(trace: Trace) -> Iterator[tuple[int, int]]:
    """[start, end) token ranges of at most _block_tokens(trace) tokens covering the trace."""
    size = _block_tokens(trace)
    for start in range(0, trace.num_tokens, size):
        yield start, min(start + size, trace.num_tokens)


def _valid(experts: np.ndarray, num_experts: int) -> np.ndarray:
    return (experts >= 0) & (experts < num_experts)


def _pair_counts(first: np.ndarray, second: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] int64: n[i, j] = the number of (slot a of first, slot b of second) pairs of the same token with
    first[n, a] = i and second[n, b] = j, both real; first [n, k], second [n, k'] (a bincount over the k x k' slot
    combinations: exact, O(n k k'), no matmul)."""
    first, second = np.asarray(first), np.asarray(second)
    counts = np.zeros(num_experts * num_experts, np.int64)
    for a in range(first.shape[1]):
        for b in range(second.shape[1]):
            i, j = first[:, a], second[:, b]
            both = _valid(i, num_experts) & _valid(j, num_experts)
            counts += np.bincount(i[both].astype(np.int64) * num_experts + j[both], minlength=counts.size)
    return counts.reshape(num_experts, num_experts)


def _distinct(experts: np.ndarray) -> np.ndarray:
    """experts [n, k] with every repeat of an id within a row replaced by -1 (a null slot): each token's set."""
    experts = np.sort(np.asarray(experts), axis=1)
    repeat = np.zeros(experts.shape, bool)
    repeat[:, 1:] = experts[:, 1:] == experts[:, :-1]
    experts[repeat] = -1
    return experts


def _normalise_rows(counts: np.ndarray) -> np.ndarray:
    """counts [..., E] -> rows divided by their sums; rows summing to 0 stay 0."""
    total = counts.sum(-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros(counts.shape, np.float64), where=total > 0)


def int_list(values: Sequence[int], name: str, minimum: int = 1) -> list[int]:
    """The values as a non-empty list of Python ints >= minimum; ValueError naming ``name`` otherwise."""
    values = [int(v) for v in np.atleast_1d(values)]
    if not values or min(values) < minimum:
        raise ValueError(f"{name} must be integers >= {minimum}, got {values}")
    return values


def _layer(trace: Trace, layer: int) -> int:
    if not -trace.num_layers <= layer < trace.num_layers:
        raise IndexError(f"layer position {layer} is outside the trace's {trace.num_layers} MoE layers (model "
                         f"layers {trace.layers.tolist()}; analyses index layers by position)")
    return layer % trace.num_layers


# ---------------------------------------------------------------------------------------------- load and entropy

def expert_counts(trace: Trace) -> np.ndarray:
    """[L, E] int64: the routed slots each expert received at each layer."""
    counts = np.zeros((trace.num_layers, trace.num_experts), np.int64)
    for layer in range(trace.num_layers):
        for start, end in _blocks(trace):
            experts = np.asarray(trace.experts[layer, start:end])
            counts[layer] += np.bincount(experts[_valid(experts, trace.num_experts)], minlength=trace.num_experts)
    return counts


def expert_frequency(trace: Trace) -> np.ndarray:
    """[L, E] float64: f[l, e] = (routed slots of expert e at layer l) / (routed slots at layer l); a row sums to 1
    (0 for a layer without routed slots); a balanced layer is 1/E everywhere."""
    return _normalise_rows(expert_counts(trace))


def gate_mass(trace: Trace) -> np.ndarray:
    """[L, E] float64: w[l, e] = (sum of the gate weights of expert e's routed slots at layer l) / (sum of the gate
    weights of all routed slots at layer l); a row sums to 1 (0 when the layer's routed weight is 0)."""
    mass = np.zeros((trace.num_layers, trace.num_experts), np.float64)
    for layer in range(trace.num_layers):
        for start, end in _blocks(trace):
            experts = np.asarray(trace.experts[layer, start:end])
            valid = _valid(experts, trace.num_experts)
            weights = np.asarray(trace.weights[layer, start:end], np.float64)[valid]
            mass[layer] += np.bincount(experts[valid], weights=weights, minlength=trace.num_experts)
    return _normalise_rows(mass)


def load_imbalance(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(max_over_mean [L], cv [L]) of each layer's expert load c[l, e] (routed slots per expert):
    max_over_mean = max_e c / mean_e c (1 when balanced, E when one expert takes everything; MaxVio + 1) and the
    coefficient of variation cv = std_e c / mean_e c (population std; 0 balanced, sqrt(E - 1) for one expert).
    NaN for a layer without routed slots."""
    counts = expert_counts(trace).astype(np.float64)
    mean = counts.mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(mean > 0, counts.max(-1) / mean, np.nan),
                np.where(mean > 0, counts.std(-1) / mean, np.nan))


def router_entropy(trace: Trace) -> np.ndarray:
    """[L] float64: mean over tokens of the entropy (nats) of the normalised router scores,
    H[l] = mean_n -sum_e p[n, e] log p[n, e] with p[n, e] = s[l, n, e] / sum_e' s[l, n, e'] (0 log 0 = 0), as
    ``moejax.moe.losses.router_entropy``; between 0 (one expert) and log E (uniform). Tokens whose scores sum to 0
    are left out (NaN for a layer with no other). Needs the scores; raises ValueError without them or when a score is
    negative (logits rather than probabilities)."""
    if trace.scores is None:
        raise ValueError("router_entropy needs the router scores: this trace was recorded without them "
                         "(with_scores=False)")
    entropy = np.zeros(trace.num_layers)
    for layer in range(trace.num_layers):
        total, tokens = 0.0, 0
        for start, end in _blocks(trace):
            scores = np.asarray(trace.scores[layer, start:end], np.float64)
            if (scores < 0).any():
                raise ValueError(f"layer position {layer} has negative router scores: router_entropy needs "
                                 "non-negative scores (probabilities), not logits")
            p = _normalise_rows(scores)
            logs = np.log(p, out=np.zeros_like(p), where=p > 0)
            keep = scores.sum(-1) > 0
            total += float(-(p * logs).sum(-1)[keep].sum())
            tokens += int(keep.sum())
        entropy[layer] = total / tokens if tokens else np.nan
    return entropy


# ------------------------------------------------------------------------------------- co-activation and affinity

def coactivation(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(joint [L, E, E], conditional [L, E, E]) float64. With S_n the set of real experts of token n at layer l:
    joint[l, i, j] = |{n : i in S_n and j in S_n}| / N (the fraction of all N tokens routed to both i and j) and
    conditional[l, i, j] = P(j | i) = |{n : i, j in S_n}| / |{n : i in S_n}| (0 when no token is routed to i).
    Both are 0 on the diagonal (i = j) and joint is symmetric."""
    num_experts = trace.num_experts
    both = np.zeros((trace.num_layers, num_experts, num_experts), np.int64)
    for layer in range(trace.num_layers):
        for start, end in _blocks(trace):
            chosen = _distinct(trace.experts[layer, start:end])
            both[layer] += _pair_counts(chosen, chosen, num_experts)
    both = both.astype(np.float64)
    routed = np.diagonal(both, axis1=1, axis2=2).copy()  # [L, E]: tokens routed to each expert
    off = ~np.eye(num_experts, dtype=bool)
    joint = both * off / max(trace.num_tokens, 1)
    conditional = np.divide(both * off, routed[:, :, None], out=np.zeros_like(both), where=routed[:, :, None] > 0)
    return joint, conditional


def inter_layer_counts(trace: Trace) -> np.ndarray:
    """[L - 1, E, E] int64: n[l, i, j] = the number of (slot at layer l with expert i, slot at layer l + 1 with
    expert j) pairs over all tokens, i.e. sum_n c_l[n, i] c_{l+1}[n, j] with c the slot counts of token n (with top-k
    routing each token contributes its k x k combinations)."""
    num_experts = trace.num_experts
    counts = np.zeros((max(trace.num_layers - 1, 0), num_experts, num_experts), np.int64)
    for layer in range(trace.num_layers - 1):
        for start, end in _blocks(trace):
            counts[layer] += _pair_counts(trace.experts[layer, start:end], trace.experts[layer + 1, start:end],
                                          num_experts)
    return counts


def inter_layer_affinity(trace: Trace) -> np.ndarray:
    """[L - 1, E, E] float64, ExFlow's inter-layer expert affinity (arXiv 2401.08383):
    A[l, i, j] = P(expert j at layer position l + 1 | expert i at layer position l) = n[l, i, j] / sum_j' n[l, i, j']
    with n = ``inter_layer_counts`` (every selected (i, j) combination of the same token counts once). Rows sum to 1,
    or are all 0 for an expert never selected at layer l. Consecutive positions of the trace, i.e. consecutive MoE
    layers (dense layers between them are skipped)."""
    return _normalise_rows(inter_layer_counts(trace))


# ------------------------------------------------------------------------------------- token/expert specialisation

EVENTS = ("token", "slot")  # npmi's events: tokens (RICE's definition, the default) or routed slots


def _check_events(events: str) -> None:
    if events not in EVENTS:
        raise ValueError(f"events={events!r}: allowed are {EVENTS} ('token': RICE's token-level events; 'slot': "
                         "every routed slot an event)")


def _npmi(joint: np.ndarray, expert: np.ndarray, token: np.ndarray, total: int) -> np.ndarray:
    """npmi from counts: joint c(e, t), expert c(e), token c(t) (broadcastable) and the number of events N."""
    joint = np.asarray(joint, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(joint * total / (np.asarray(expert, np.float64) * np.asarray(token, np.float64)))
        value = pmi / np.log(total / joint)
    return np.where(joint <= 0, -1.0, np.where(joint >= total, 1.0, value))


def npmi(trace: Trace, layer: int, token_ids: Sequence[int] | np.ndarray | None = None, *,
         events: str = "token") -> np.ndarray:
    """[E, T] float64: normalised pointwise mutual information between expert e at layer position ``layer`` and token
    id t (RICE, arXiv 2505.14681):
        npmi(e, t) = log(p(e, t) / (p(e) p(t))) / -log p(e, t),
    in [-1, 1]; npmi = -1 when c(e, t) = 0 (also for a token id absent from the trace) and 1 when c(e, t) = N.

    ``events='token'`` (RICE's definition, the default): the events are the trace's N tokens (positions). c(t) = the
    positions holding t, c(e) = the tokens whose selection at the layer includes e, c(e, t) = the positions holding t
    whose selection includes e (an expert twice in one token's slots counts once), each probability divided by N:
    p(e) is the share of tokens routed to e, so the p(e) of the E experts sum to the mean number of distinct real
    experts per token (k), not to 1. ``events='slot'``: the events are the layer's N routed slots (slot (n, j) with a
    real expert e = experts[l, n, j] and the token t = token_ids[n]); c(t) = the routed slots at positions holding
    t. The two share the PMI when every token has k distinct real experts; the slot normaliser -log p(e, t) is larger
    by log k, which changes the npmi and can reorder experts.

    Columns: the ids of ``token_ids`` in their order (marker tokens), or every id 0 .. max(trace.token_ids) when
    None (dense [E, V]: give the ids of interest for a large vocabulary)."""
    _check_events(events)
    layer = _layer(trace, layer)
    num_experts = trace.num_experts
    columns = (np.arange(int(np.max(trace.token_ids, initial=-1)) + 1) if token_ids is None
               else np.asarray(token_ids, np.int64).reshape(-1))
    wanted = np.unique(columns)
    joint = np.zeros((num_experts, len(wanted)), np.int64)
    expert = np.zeros(num_experts, np.int64)
    token = np.zeros(len(wanted), np.int64)  # token events: the positions holding each wanted id
    for start, end in _blocks(trace):
        experts = np.asarray(trace.experts[layer, start:end])
        if events == "token":
            experts = _distinct(experts)
        valid = _valid(experts, num_experts)
        expert += np.bincount(experts[valid], minlength=num_experts)
        ids = np.asarray(trace.token_ids[start:end], np.int64)
        where = np.minimum(np.searchsorted(wanted, ids), max(len(wanted) - 1, 0))
        hit = (wanted[where] == ids) if len(wanted) else np.zeros(len(ids), bool)
        token += np.bincount(where[hit], minlength=len(wanted))
        keep = valid & hit[:, None]
        keys = experts[keep].astype(np.int64) * len(wanted) + np.broadcast_to(where[:, None], experts.shape)[keep]
        joint += np.bincount(keys, minlength=joint.size).reshape(joint.shape)
    if events == "token":
        values = _npmi(joint, expert[:, None], token[None, :], trace.num_tokens)
    else:
        values = _npmi(joint, expert[:, None], joint.sum(0, keepdims=True), int(expert.sum()))
    return values[:, np.searchsorted(wanted, columns)]


def top_experts_for_token(trace: Trace, token_id: int, n: int = 2, *, events: str = "token"
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(experts [L, n] int64, npmi [L, n] float64): at each layer position, the n experts with the highest npmi with
    ``token_id`` (see ``npmi``; ``events`` as there), highest first (ties: the lower expert id first); n is capped at
    E. RICE's "cognitive experts" are these for a reasoning marker token. Raises ValueError for a token id absent
    from the trace."""
    _check_events(events)
    if not np.any(np.asarray(trace.token_ids) == token_id):
        raise ValueError(f"token id {token_id} does not occur in the trace: its npmi is -1 with every expert")
    n = min(int(n), trace.num_experts)
    experts = np.zeros((trace.num_layers, n), np.int64)
    values = np.zeros((trace.num_layers, n))
    for layer in range(trace.num_layers):
        column = npmi(trace, layer, [token_id], events=events)[:, 0]
        order = np.argsort(-column, kind="stable")[:n]
        experts[layer], values[layer] = order, column[order]
    return experts, values


def top_tokens_per_expert(trace: Trace, layer: int, n: int = 10, min_count: int = 1, *, events: str = "token"
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids [E, n] int64, npmi [E, n] float64): for each expert at layer position ``layer``, the n token ids of
    highest npmi with it (see ``npmi``; ``events`` as there), highest first (ties: the lower token id first), among
    the token ids occurring at least ``min_count`` times in the trace (a rare token's npmi is noisy: raise
    min_count). Only tokens routed to the expert at least once are listed; a row with fewer is padded with id -1 and
    npmi -1. Counts only the (expert, token) pairs that occur (memory O(N k), not O(E V))."""
    _check_events(events)
    layer = _layer(trace, layer)
    num_experts, n = trace.num_experts, int(n)
    ids, inverse, occurrences = np.unique(np.asarray(trace.token_ids), return_inverse=True, return_counts=True)
    experts = np.asarray(trace.experts[layer])
    if events == "token":
        experts = _distinct(experts)
    valid = _valid(experts, num_experts)
    keys = experts[valid].astype(np.int64) * len(ids) + np.broadcast_to(inverse.reshape(-1, 1), experts.shape)[valid]
    pairs, joint = np.unique(keys, return_counts=True)
    pair_expert, pair_token = pairs // max(len(ids), 1), pairs % max(len(ids), 1)
    expert = np.bincount(pair_expert, weights=joint, minlength=num_experts)
    if events == "token":
        values = _npmi(joint, expert[pair_expert], occurrences[pair_token], trace.num_tokens)
    else:
        token = np.bincount(pair_token, weights=joint, minlength=len(ids))
        values = _npmi(joint, expert[pair_expert], token[pair_token], int(joint.sum()))
    eligible = occurrences[pair_token] >= min_count
    pair_expert, pair_token, values = pair_expert[eligible], pair_token[eligible], values[eligible]
    order = np.lexsort((ids[pair_token], -values, pair_expert))
    pair_expert, pair_token, values = pair_expert[order], pair_token[order], values[order]
    rank = np.arange(len(order)) - np.searchsorted(pair_expert, pair_expert, side="left")
    top = rank < n
    out_ids = np.full((num_experts, n), -1, np.int64)
    out_values = np.full((num_experts, n), -1.0)
    out_ids[pair_expert[top], rank[top]] = ids[pair_token[top]]
    out_values[pair_expert[top], rank[top]] = values[top]
    return out_ids, out_values
