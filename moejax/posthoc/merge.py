"""Expert merging: fewer routed experts, each a weighted average of several old ones, as pure functions on
``(config, variables)`` (a moejax run or an imported checkpoint), built on ``moejax.posthoc.compress``.

    from moejax.posthoc import merge, read_trace
    config, variables = merge.mcsmoe(config, variables, read_trace("traces/run1"), num_experts=4)

* ``mcsmoe`` (MC-SMoE, Li et al. 2023, arXiv 2310.01334): per layer the ``num_experts`` most frequently routed
  experts are dominant; every other expert joins the dominant expert whose router column is most similar (cosine);
  each group's members are neuron-aligned to the dominant (``align_permutation``: weight matching of the hidden
  neurons) and averaged with their routing frequencies as weights (``merge_group``).
* ``hcsmoe`` (HC-SMoE, Chen et al. 2024, arXiv 2410.08589): hierarchical clustering of the experts by their mean
  output on a calibration set (given by the caller), then a (frequency-weighted) average per cluster.
* ``average``: a plain average of given groups.

A neuron of a routed expert is one index of its hidden width F: column j of wi_0 / wi_1, entry j of their biases
(kinds with bi_0 / bi_1) and row j of wo; permuting the neurons of one expert leaves its function unchanged, which is
what makes averaging aligned experts meaningful. The hidden axis of every parameter is read from the expert kind's
``param_axes`` (its 'mlp' axis; moejax/moe/experts.py), so every kind in ``EXPERT_KINDS`` is handled; parameters
without one (GPT-OSS's output bias bo) are averaged as they are.

The new experts of a layer are ordered by their representative's old id (the dominant expert, or a group's lowest
member), which is what group-limited routing and device groups see (``compress.compressed_config``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import scipy.cluster.hierarchy
import scipy.optimize

from moejax import model as model_lib
from moejax import moe
from moejax.moe import experts as experts_lib
from moejax.posthoc import compress, importance
from moejax.posthoc.trace import Trace

ExpertWeights = Mapping[str, Any]  # one expert's weights {name: array without the expert axis}
ExpertKind = str | type | experts_lib.Experts | None


# ------------------------------------------------------------------------------------- one expert's neurons

def _kind(expert_kind: ExpertKind, names: Sequence[str] = ()) -> type:
    """The expert class of a kind name, class or instance; None: the kind whose parameter names are ``names``."""
    if expert_kind is None:
        matches = [cls for cls in experts_lib.EXPERT_KINDS.values() if set(cls.param_names) == set(names)]
        if len(matches) != 1:
            raise ValueError(f"cannot tell the expert kind from the parameter names {sorted(names)}: pass expert_kind "
                             f"(one of {sorted(experts_lib.EXPERT_KINDS)})")
        return matches[0]
    if isinstance(expert_kind, str):
        if expert_kind not in experts_lib.EXPERT_KINDS:
            raise ValueError(f"unknown expert kind {expert_kind!r}: allowed are {sorted(experts_lib.EXPERT_KINDS)}")
        return experts_lib.EXPERT_KINDS[expert_kind]
    return expert_kind if isinstance(expert_kind, type) else type(expert_kind)


def hidden_axes(expert_kind: ExpertKind, names: Sequence[str] = ()) -> dict[str, int]:
    """``{parameter name: its hidden-neuron axis}`` in one expert's weights (no expert axis), from the kind's
    ``param_axes`` ('mlp'): 'glu' -> {wi_0: 1, wi_1: 1, wo: 0}; 'gpt_oss' adds {bi_0: 0, bi_1: 0}."""
    cls = _kind(expert_kind, names)
    return {name: axes.index("mlp") - 1 for name, axes in cls.param_axes.items() if "mlp" in axes}


def _neurons(weights: ExpertWeights, axes: Mapping[str, int]) -> np.ndarray:
    """[F, P] float64: each hidden neuron's parameters (over the parameters with a hidden axis) as one row."""
    return np.concatenate([np.moveaxis(np.asarray(weights[name], np.float64), axis, 0).reshape(
        np.shape(weights[name])[axis], -1) for name, axis in sorted(axes.items())], axis=1)


def align_permutation(reference_weights: ExpertWeights, weights: ExpertWeights,
                      expert_kind: ExpertKind = "glu") -> np.ndarray:
    """[F] int64 perm matching the hidden neurons of ``weights`` to those of ``reference_weights``: neuron i of the
    reference is matched with neuron perm[i], so ``permute_expert(weights, perm)`` is aligned with the reference.

    Weight matching (as in MC-SMoE): maximise sum_i <n_ref(i), n(perm[i])>, a neuron n(j) being all its parameters
    (for GLU experts: cost[i, j] = -(wi_0[:, i] . wi_0'[:, j] + wi_1[:, i] . wi_1'[:, j] + wo[i] . wo'[j]); kinds
    with hidden biases add bi_0[i] bi_0'[j] + bi_1[i] bi_1'[j]), solved exactly by
    ``scipy.optimize.linear_sum_assignment``. A neuron-permuted copy of an expert is matched back exactly when its
    neurons are distinct (the identity matching is then the unique maximum, by Cauchy-Schwarz).
    """
    axes = hidden_axes(expert_kind, list(weights))
    reference, current = _neurons(reference_weights, axes), _neurons(weights, axes)
    if reference.shape != current.shape:
        raise ValueError(f"the experts differ in shape: {reference.shape[0]} and {current.shape[0]} hidden neurons of "
                         f"{reference.shape[1]} and {current.shape[1]} parameters")
    rows, cols = scipy.optimize.linear_sum_assignment(-(reference @ current.T))
    perm = np.empty(len(rows), np.int64)
    perm[rows] = cols
    return perm


def permute_expert(weights: ExpertWeights, perm: Sequence[int], expert_kind: ExpertKind = None
                   ) -> dict[str, Any]:
    """One expert's weights with its hidden neurons reordered: new neuron i = old neuron perm[i] (columns of wi_0 /
    wi_1, entries of bi_0 / bi_1, rows of wo). The expert computes the same function. ``expert_kind`` None: told
    from the parameter names."""
    axes = hidden_axes(expert_kind, list(weights))
    perm = np.asarray(perm, np.int64)
    return {name: value[(slice(None),) * axes[name] + (perm,)] if name in axes else value
            for name, value in weights.items()}


def _normalised(frequencies: Sequence[float] | None, size: int) -> np.ndarray:
    """[size] float64 weights summing to 1: the frequencies, or uniform when None or all zero."""
    if frequencies is None:
        return np.full(size, 1.0 / size)
    weights = np.asarray(frequencies, np.float64).reshape(-1)
    if weights.shape != (size,) or (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"frequencies must be {size} finite non-negative numbers, got {np.asarray(frequencies)}")
    total = weights.sum()
    return weights / total if total > 0 else np.full(size, 1.0 / size)


def merge_group(experts_weights: Sequence[ExpertWeights], frequencies: Sequence[float] | None, dominant: int,
                expert_kind: ExpertKind = None, align: bool = True) -> dict[str, np.ndarray]:
    """The merged weights of a group of experts (each ``{name: array}`` without the expert axis): every member's
    neurons aligned to the dominant member's (``align_permutation``; not with ``align=False``), then averaged with
    weights frequencies / sum(frequencies) (uniform when None or all zero). Computed in float64, returned as numpy
    in the dominant member's dtypes."""
    if not experts_weights:
        raise ValueError("merge_group needs at least one expert")
    if not 0 <= dominant < len(experts_weights):
        raise ValueError(f"dominant={dominant} is not a member index in [0, {len(experts_weights)})")
    weights = _normalised(frequencies, len(experts_weights))
    anchor = experts_weights[dominant]
    kind = _kind(expert_kind, list(anchor))
    aligned = [member if i == dominant or not align else permute_expert(member, align_permutation(anchor, member, kind),
                                                                        kind)
               for i, member in enumerate(experts_weights)]
    return {name: sum(w * np.asarray(member[name], np.float64) for w, member in zip(weights, aligned, strict=True)
                      ).astype(np.asarray(anchor[name]).dtype) for name in anchor}


# --------------------------------------------------------------------------------------------- grouping rules

def mcsmoe_groups(router_columns: np.ndarray, frequencies: np.ndarray, num_experts: int) -> list[list[int]]:
    """MC-SMoE's groups of one layer: the ``num_experts`` most frequent experts (ties to the lower id) are dominant;
    every other expert joins the dominant whose router column (router_columns [D, E]) has the highest cosine
    similarity with its own (ties to the lower dominant id). Returns one list per dominant expert in increasing id
    order, the dominant first, then its members in increasing id."""
    columns = np.asarray(router_columns, np.float64)
    frequencies = np.asarray(frequencies, np.float64).reshape(-1)
    total = columns.shape[1]
    if frequencies.shape != (total,):
        raise ValueError(f"frequencies must be [E] = [{total}], got shape {frequencies.shape}")
    if not 1 <= num_experts <= total:
        raise ValueError(f"num_experts={num_experts} must be in [1, E={total}]")
    dominant = sorted(int(e) for e in np.argsort(-frequencies, kind="stable")[:num_experts])
    unit = columns / np.maximum(np.linalg.norm(columns, axis=0, keepdims=True), 1e-30)
    similarity = unit.T @ unit[:, dominant]  # [E, n]
    groups = {d: [d] for d in dominant}
    for e in range(total):
        if e not in groups:
            groups[dominant[int(np.argmax(similarity[e]))]].append(e)
    return [groups[d] for d in dominant]


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


# ------------------------------------------------------------------------------------------------ whole models

def _per_layer(config: ml_collections.ConfigDict, values: np.ndarray | None, what: str,
               layers: Sequence[int] | None) -> dict[int, np.ndarray] | None:
    """Rows [L, ...] of a per-layer array keyed by model MoE layer (rows in the order of ``layers``, default the
    model's MoE layers)."""
    if values is None:
        return None
    values = np.asarray(values)
    order = model_lib.moe_layers(config.model) if layers is None else [int(layer) for layer in layers]
    if values.shape[0] != len(order):
        raise ValueError(f"{what} has {values.shape[0]} layers, expected {len(order)} (layers {order})")
    by_layer = dict(zip(order, values, strict=True))
    compress.check_layers(config, by_layer, what)
    return by_layer


def _merged_experts(params: Mapping[str, Any], groups: Sequence[Sequence[int]], frequencies: np.ndarray | None,
                    dominants: Sequence[int], expert_kind: ExpertKind, align: bool) -> dict[str, np.ndarray]:
    """The stacked [n, ...] weights of the merged experts of one layer."""
    merged = []
    for members, dominant in zip(groups, dominants, strict=True):
        weights = [compress.expert_weights(params, e) for e in members]
        freq = None if frequencies is None else frequencies[list(members)]
        merged.append(merge_group(weights, freq, members.index(dominant), expert_kind, align))
    return {name: np.stack([m[name] for m in merged]) for name in merged[0]}


def _columns(groups: Sequence[Sequence[int]], frequencies: np.ndarray | None) -> tuple[compress.Column, ...]:
    return tuple((np.asarray(members, np.int64), _normalised(None if frequencies is None else
                                                             frequencies[list(members)], len(members)))
                 for members in groups)


def mcsmoe(config: ml_collections.ConfigDict, variables: compress.Variables, trace: Trace, num_experts: int,
           align: bool = True) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """MC-SMoE merging to ``num_experts`` routed experts per MoE layer.

    trace: a routing trace of the model (``moejax.posthoc.trace``) covering its MoE layers; the routing frequencies
    (routed slots per expert) pick the dominant experts and weigh the average. Grouping: ``mcsmoe_groups`` on the
    columns of the layer's router kernel (the map whose outputs are the router logits, a data-free stand-in for
    the paper's router-logit similarity over calibration tokens). Merging: ``merge_group`` (members aligned to the
    dominant expert unless ``align=False``, frequency-weighted average). Router: each merged expert keeps its
    dominant expert's router column (kernel column, router/bias and moe_state router_bias entries), MC-SMoE's
    choice, so routing picks among the merged experts as it picked among the dominant ones.
    """
    counts = importance.from_trace(trace, "frequency", config=config)  # rows: the model's MoE layers
    expert_kind = config.model.moe.expert_kind
    num_real = config.model.moe.num_experts
    maps = {}
    for row, (layer, (params, _)) in enumerate(model_lib.moe_layer_variables(config.model, variables).items()):
        frequencies = counts[row]
        kernel = np.asarray(params[moe.ROUTER]["kernel"])[:, :num_real]
        groups = mcsmoe_groups(kernel, frequencies, num_experts)
        dominants = [members[0] for members in groups]
        groups = [sorted(members) for members in groups]
        maps[layer] = compress.ExpertMap(compress.singletons(dominants), tuple(dominants),
                                         _merged_experts(params, groups, frequencies, dominants, expert_kind, align))
    return compress.compress(config, variables, maps)


def hcsmoe(config: ml_collections.ConfigDict, variables: compress.Variables, expert_outputs: np.ndarray,
           num_experts: int, linkage: str = "average", frequencies: np.ndarray | None = None,
           metric: str = "euclidean", align: bool = False, layers: Sequence[int] | None = None
           ) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """HC-SMoE merging to ``num_experts`` routed experts per MoE layer.

    expert_outputs: [L, E, D] each expert's mean output over a calibration set (computed by the caller), rows in
    the order of ``layers`` (default: the model's MoE layers, moejax.model.moe_layers). Clustering:
    ``hcsmoe_groups`` (``linkage`` 'average' as in the paper, or 'single', 'complete', 'ward', ...; ``metric`` any
    scipy distance). Merging: per cluster the average of its members' weights, weighted by ``frequencies`` [L, E]
    (e.g. ``importance.from_trace(trace, 'frequency')`` rows) when given, else uniform; with ``align=True`` the members
    are first neuron-aligned to the cluster's most frequent member (lowest id on ties). Router: a cluster's router
    column (kernel column, router/bias and moe_state router_bias entries) is the same weighted average of its
    members' columns (the choice made here; MC-SMoE instead keeps one member's column).
    """
    outputs = _per_layer(config, expert_outputs, "expert_outputs", layers)
    freqs = _per_layer(config, frequencies, "frequencies", layers)
    maps = {}
    for layer, (params, _) in model_lib.moe_layer_variables(config.model, variables).items():
        groups = hcsmoe_groups(outputs[layer], num_experts, linkage, metric)
        layer_freqs = None if freqs is None else np.asarray(freqs[layer], np.float64)
        columns = _columns(groups, layer_freqs)
        merged = None
        if align:
            dominants = [members[int(np.argmax(layer_freqs[members]))] if layer_freqs is not None else members[0]
                         for members in groups]
            merged = _merged_experts(params, groups, layer_freqs, dominants, config.model.moe.expert_kind, True)
        maps[layer] = compress.ExpertMap(columns, tuple(members[0] for members in groups), merged)
    return compress.compress(config, variables, maps)


def average(config: ml_collections.ConfigDict, variables: compress.Variables,
            groups: Mapping[int, Sequence[Sequence[int]]]) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """Plain averages of given groups: ``groups[layer]`` lists disjoint groups of expert ids for every MoE layer
    (the same number of groups in each); new expert = the mean of its group's weights, router column the mean of
    their router columns. Experts in no group are dropped; groups of one expert are copies (exact), so singleton
    groups of the kept experts are pruning. New experts are ordered by their group's lowest id."""
    layers = compress.check_layers(config, groups, "groups")
    num_real = config.model.moe.num_experts
    maps = {}
    for layer in layers:
        layer_groups = sorted((sorted(int(e) for e in members) for members in groups[layer]),
                              key=lambda members: members[0] if members else -1)
        flat = [e for members in layer_groups for e in members]
        if not layer_groups or any(not members for members in layer_groups) or len(set(flat)) != len(flat) or \
                min(flat) < 0 or max(flat) >= num_real:
            raise ValueError(f"groups[{layer}] = {[list(g) for g in groups[layer]]}: must be non-empty, disjoint "
                             f"groups of expert ids in [0, {num_real})")
        maps[layer] = compress.ExpertMap(_columns(layer_groups, None), tuple(members[0] for members in layer_groups))
    return compress.compress(config, variables, maps)
