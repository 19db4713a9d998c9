"""Independent references: naive per-token numpy loops written from the papers' and released models' formulas."""
import math

import numpy as np


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def top_indices(values, k):
    """Indices of the k largest values, ties to the lower index (as a stable descending sort)."""
    return list(np.argsort(-np.asarray(values), kind="stable")[:k])


def route_token(logits, *, k, score="softmax", softmax_before_topk=True, norm_topk_prob=False,
                scaling=1.0, num_groups=1, topk_groups=1, group_score="max", fill=0.0, bias=None):
    """One token's routing by the knob definitions. Returns (expert ids, weights), both length k."""
    num_experts = len(logits)
    if score == "softmax":
        scores = softmax(logits) if softmax_before_topk else np.asarray(logits, np.float64)
    else:
        scores = sigmoid(logits)
    choice = scores + (0.0 if bias is None else np.asarray(bias, np.float64))
    if num_groups > 1:
        size = num_experts // num_groups
        group_values = []
        for g in range(num_groups):
            members = sorted(choice[g * size:(g + 1) * size], reverse=True)
            group_values.append(members[0] if group_score == "max" else members[0] + members[1])
        kept = set(top_indices(group_values, topk_groups))
        choice = np.array([c if i // size in kept else fill for i, c in enumerate(choice)])
    ids = top_indices(choice, k)
    weights = np.array([scores[i] for i in ids])
    if score == "softmax" and not softmax_before_topk:
        weights = softmax(weights)
    if norm_topk_prob:
        weights = weights / weights.sum()
    return ids, weights * scaling


def capacity_keep(experts, weights, num_experts, cap, policy):
    """keep[t][j]: whether slot (t, j) fits its expert's capacity. Loops over experts, then candidates."""
    num_tokens, k = len(experts), len(experts[0])
    keep = [[False] * k for _ in range(num_tokens)]
    for e in range(num_experts):
        slots = [(t, j) for t in range(num_tokens) for j in range(k) if experts[t][j] == e]
        if policy == "probs":
            slots.sort(key=lambda s: -weights[s[0]][s[1]])  # Python's sort is stable: ties keep token order
        for t, j in slots[:cap]:
            keep[t][j] = True
    return keep


def capacity(num_tokens, k, num_experts, factor):
    return math.ceil(factor * num_tokens * k / num_experts)


def balance_terms(experts, probs, num_experts):
    """f_i = count_i / (k T) over all k assignments; P_i = mean_t of normalised scores. Naive loops."""
    num_tokens, k = len(experts), len(experts[0])
    f = np.zeros(num_experts)
    for t in range(num_tokens):
        for j in range(k):
            if experts[t][j] < num_experts:
                f[experts[t][j]] += 1.0 / (k * num_tokens)
    p = np.zeros(num_experts)
    for t in range(num_tokens):
        p += np.asarray(probs[t], np.float64) / np.sum(probs[t]) / num_tokens
    return f, p
