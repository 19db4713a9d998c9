"""How MC-SMoE and HC-SMoE group the routed experts of a layer before merging them (``moejax.posthoc.merge``):
MC-SMoE's similarities (router logits over calibration tokens, or router weights), its global group counts and its
dominant-expert grouping; HC-SMoE's hierarchical clustering of the experts' mean outputs."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.cluster.hierarchy


def _normalised(frequencies, size: int) -> np.ndarray:
    """[size] float64 weights summing to 1: the frequencies, or uniform when None or all zero."""
    if frequencies is None:
        return np.full(size, 1.0 / size)
    weights = np.asarray(frequencies, np.float64).reshape(-1)
    if weights.shape != (size,) or (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"frequencies must be {size} finite non-negative numbers, got {np.asarray(frequencies)}")
    total = weights.sum()
    return weights / total if total > 0 else np.full(size, 1.0 / size)


def similarity_from_logits(router_logits: np.ndarray) -> np.ndarray:
    """[E, E] MC-SMoE's 'router-logits' similarity of one layer: (cos(l_i, l_j) + 1) / 2 between the columns of
    the router logits [T, E] over calibration tokens (the authors' ``SIMILARITY_MAPPING_FUNCTION['cosine']``)."""
    logits = np.asarray(router_logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"router logits of one layer must be [T, E], got shape {logits.shape}")
    return _cosine01(logits)


def similarity_from_router_weights(router_kernel: np.ndarray) -> np.ndarray:
    """[E, E] MC-SMoE's 'router-weight' similarity: (cos + 1) / 2 between the router kernel's columns [D, E]."""
    return _cosine01(np.asarray(router_kernel, np.float64))


def _cosine01(columns: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(columns, axis=0), 1e-7)  # torch's cosine_similarity eps (FP32_EPS)
    unit = columns / norms
    return (unit.T @ unit + 1) / 2


def mcsmoe_group_counts(frequencies: Mapping[int, np.ndarray], average: int) -> dict[int, int]:
    """MC-SMoE's global group counts (the authors' ``_assign_num_groups_per_layer``): each layer's usage
    frequencies (summing to 1) with its most used expert set to 1.0 (every layer keeps a group), pooled over the
    layers and sorted; the threshold is the value at position ``average * L`` (``average * L - 1`` when ``average``
    is E); a layer keeps as many groups as it has experts above the threshold. Ties at the threshold give fewer
    groups than ``average * L`` in total, as in the authors' code."""
    layers = sorted(frequencies)
    usage = {layer: _normalised(frequencies[layer], len(frequencies[layer])) for layer in layers}
    num_experts = len(usage[layers[0]])
    if not 1 <= average <= num_experts:
        raise ValueError(f"num_experts={average} (the average number of groups per layer) must be in [1, "
                         f"E={num_experts}]")
    modified = {}
    for layer in layers:
        row = usage[layer].copy()
        row[int(np.argmax(row))] = 1.0
        modified[layer] = row
    pooled = np.sort(np.concatenate([modified[layer] for layer in layers]))[::-1]
    total = average * len(layers) - (1 if average == num_experts else 0)
    threshold = pooled[total]
    if threshold == 1.0:
        raise ValueError(f"num_experts={average}: too many groups for the global assignment (the threshold reaches "
                         f"the layers' forced most-used experts)")
    return {layer: int((modified[layer] > threshold).sum()) for layer in layers}


def mcsmoe_groups(similarity: np.ndarray, frequencies: np.ndarray, num_groups: int) -> list[list[int]]:
    """MC-SMoE's groups of one layer (the authors' ``group_experts_globally_from_dominant_experts``, step 2): the
    ``num_groups`` most used experts are dominant (ties to the lower id); every other expert, taken in decreasing
    usage, joins the dominant it is most similar to (``similarity`` [E, E]; ties to the more used dominant).
    Returns one list per group ordered by its lowest member, members in increasing id."""
    similarity = np.asarray(similarity, np.float64)
    frequencies = np.asarray(frequencies, np.float64).reshape(-1)
    total = frequencies.shape[0]
    if similarity.shape != (total, total):
        raise ValueError(f"similarity must be [E, E] = [{total}, {total}], got shape {similarity.shape}")
    if not 1 <= num_groups <= total:
        raise ValueError(f"num_groups={num_groups} must be in [1, E={total}]")
    order = np.argsort(-frequencies, kind="stable")
    cores = order[:num_groups]
    groups = {int(c): [int(c)] for c in cores}
    for e in order[num_groups:]:
        groups[int(cores[int(np.argmax(similarity[e, cores]))])].append(int(e))
    return sorted((sorted(members) for members in groups.values()), key=lambda members: members[0])


def hcsmoe_groups(expert_outputs: np.ndarray, num_experts: int, linkage: str = "average",
                  metric: str = "euclidean") -> list[list[int]]:
    """HC-SMoE's groups of one layer: agglomerative clustering (``scipy.cluster.hierarchy.linkage`` with method
    ``linkage`` and distance ``metric``) of the experts' mean outputs [E, D], cut into exactly ``num_experts``
    clusters (``cut_tree``). Returns the clusters ordered by their lowest member, members in increasing id."""
    outputs = np.asarray(expert_outputs, np.float64)
    total = outputs.shape[0]
    if outputs.ndim != 2:
        raise ValueError(f"expert outputs of one layer must be [E, D], got shape {outputs.shape}")
    if not 1 <= num_experts <= total:
        raise ValueError(f"num_experts={num_experts} must be in [1, E={total}]")
    if num_experts == total:
        return [[e] for e in range(total)]
    tree = scipy.cluster.hierarchy.linkage(outputs, method=linkage, metric=metric)
    labels = scipy.cluster.hierarchy.cut_tree(tree, n_clusters=num_experts).reshape(-1)
    clusters: dict[int, list[int]] = {}
    for e, label in enumerate(labels):
        clusters.setdefault(int(label), []).append(e)
    return sorted(clusters.values(), key=lambda members: members[0])
