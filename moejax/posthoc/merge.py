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
import scipy.optimize

from moejax import model as model_lib
from moejax import moe
from moejax.moe import expert_map
from moejax.moe import experts as experts_lib
from moejax.posthoc import compress, importance
from moejax.posthoc.grouping import (  # noqa: F401  (merge.mcsmoe_groups, ... as before)
    _normalised,
    hcsmoe_groups,
    mcsmoe_group_counts,
    mcsmoe_groups,
    similarity_from_logits,
    similarity_from_router_weights,
)
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


# ------------------------------------------------------------------------------------------------ whole models

ALIGN = ("none", "first", "dominant")


def _per_layer(config: ml_collections.ConfigDict, values: Any, what: str,
               layers: Sequence[int] | None) -> dict[int, np.ndarray] | None:
    """Rows of a per-layer array keyed by model MoE layer: a mapping ``{layer: array}``, or an array [L, ...]
    whose rows are in the order of ``layers`` (default the model's MoE layers)."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        by_layer = {int(layer): np.asarray(value) for layer, value in values.items()}
    else:
        values = np.asarray(values)
        order = model_lib.moe_layers(config.model) if layers is None else [int(layer) for layer in layers]
        if values.shape[0] != len(order):
            raise ValueError(f"{what} has {values.shape[0]} layers, expected {len(order)} (layers {order})")
        by_layer = dict(zip(order, values, strict=True))
    compress.check_layers(config, by_layer, what)
    return by_layer


def _kept(config: ml_collections.ConfigDict, layer: int) -> set[int]:
    """The logical experts of a layer that its expert map has not removed."""
    return set(np.flatnonzero(expert_map.row(config.model.moe, layer) >= 0).tolist())


def _check_groups(config: ml_collections.ConfigDict, layer: int, groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """Disjoint non-empty groups of live logical ids, ordered by their lowest member, members sorted."""
    num_real = config.model.moe.num_experts
    ordered = sorted((sorted(int(e) for e in members) for members in groups),
                     key=lambda members: members[0] if members else -1)
    flat = [e for members in ordered for e in members]
    if not ordered or any(not members for members in ordered) or len(set(flat)) != len(flat) or \
            min(flat) < 0 or max(flat) >= num_real:
        raise ValueError(f"groups[{layer}] = {[list(g) for g in groups]}: must be non-empty, disjoint groups of "
                         f"expert ids in [0, {num_real})")
    removed = sorted(set(flat) - _kept(config, layer))
    if removed:
        raise ValueError(f"groups[{layer}] names logical experts {removed}, which the model's expert map already "
                         f"removes (model.moe.expert_map[{layer}])")
    return ordered


def _bound(config: ml_collections.ConfigDict, variables: compress.Variables,
           merged: Mapping[int, tuple[list[list[int]], dict[str, np.ndarray]]]
           ) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """Binds every group member to its merged expert: ``merged[layer] = (groups, stored {name: [n, ...]})``;
    logical experts in no group are removed. The router stays as it was."""
    bindings = {}
    for layer, (groups, stored) in merged.items():
        row = np.full(config.model.moe.num_experts, -1, np.int64)
        for j, members in enumerate(groups):
            row[members] = j
        bindings[layer] = compress.Binding(row, stored)
    return compress.bind(config, variables, bindings)


def _merged_experts(logical: Mapping[str, np.ndarray], groups: Sequence[Sequence[int]],
                    frequencies: np.ndarray | None, dominants: Sequence[int], expert_kind: ExpertKind,
                    align: str) -> dict[str, np.ndarray]:
    """The stacked [n, ...] weights of the merged experts of one layer from its logical experts' weights
    ``{name: [E, ...]}``: ``align`` 'dominant' aligns each member to its group's dominant, 'first' every expert
    to the layer's first live expert (done by the caller), 'none' nothing."""
    merged = []
    for members, dominant in zip(groups, dominants, strict=True):
        weights = [{name: value[e] for name, value in logical.items()} for e in members]
        freq = None if frequencies is None else frequencies[list(members)]
        merged.append(merge_group(weights, freq, members.index(dominant), expert_kind, align == "dominant"))
    return {name: np.stack([m[name] for m in merged]) for name in merged[0]}


def _aligned_to_first(logical: dict[str, np.ndarray], live: Sequence[int], expert_kind: ExpertKind
                      ) -> dict[str, np.ndarray]:
    """Every live expert's neurons aligned to the first live expert's (MC-SMoE's weight-matching permutation
    step, the authors' ``align_switch_permutation_for_all_experts_by_weight_matching``)."""
    out = {name: value.copy() for name, value in logical.items()}
    anchor = {name: value[live[0]] for name, value in logical.items()}
    for e in live[1:]:
        member = {name: value[e] for name, value in logical.items()}
        aligned = permute_expert(member, align_permutation(anchor, member, expert_kind), expert_kind)
        for name in out:
            out[name][e] = aligned[name]
    return out


def _check_align(align: Any) -> str:
    if align is True:
        return "dominant"
    if align is False:
        return "none"
    if align not in ALIGN:
        raise ValueError(f"align={align!r}: allowed are {ALIGN} (or True = 'dominant', False = 'none')")
    return align


def router_logits(config: ml_collections.ConfigDict, variables: compress.Variables, batches: Any
                  ) -> dict[int, np.ndarray]:
    """``{MoE layer: [T, E] float32}`` the router logits of every calibration token (``moejax.posthoc.capture``),
    for ``mcsmoe``'s router-logit similarity."""
    from moejax.posthoc import capture

    num_real = config.model.moe.num_experts
    parts: dict[int, list[np.ndarray]] = {}
    for captured in capture.stream(config, variables, batches, lambda c: {
            layer.layer: layer.logits[:, :num_real] for layer in c.layers}):
        for layer, logits in captured.items():
            parts.setdefault(int(layer), []).append(np.asarray(logits, np.float32))
    return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}


def mcsmoe(config: ml_collections.ConfigDict, variables: compress.Variables, trace: Trace, num_experts: int,
           align: str | bool = "first", *, router_logits: Any = None, similarity: str | None = None,
           global_groups: bool = True) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """MC-SMoE merging (Li et al. 2023, arXiv 2310.01334) as the authors' code runs it
    (UNITES-Lab/MC-SMoE ``merging/grouping_mixtral.py``): ``num_experts`` merged experts per MoE layer on average.

    1. Usage: the routing frequencies of the trace (routed slots per logical expert), per layer summing to 1.
    2. Group counts: ``global_groups`` (the authors' default): ``mcsmoe_group_counts``, uneven per layer; False:
       ``num_experts`` in every layer.
    3. Similarity: ``similarity='router_logits'`` (the authors' default; ``router_logits`` {layer: [T, E]} or
       [L, T, E] over calibration tokens, see ``merge.router_logits``) or 'router_weight' (the router kernel's
       columns, no data). Default: 'router_logits' when router_logits is given, else an error naming both.
    4. Groups: ``mcsmoe_groups`` (the most used experts dominant, the others join the most similar).
    5. Alignment: 'first' (every expert's neurons matched to the layer's first expert by weight matching, the
       authors' permutation step), 'dominant' (to its group's dominant expert), 'none' (the authors' Mixtral script).
    6. Merge: the usage-weighted average of each group (``merge_group``), bound: every member points at the merged
       expert and the router is unchanged (``compress.bind``; each layer may store a different number of experts).

    Departures that can change results (docs/methods.md, MC-SMoE): usage counts the model's own routed slots (its
    selection bias and group limits included; the authors count the top-2 of the raw logits); a group never routed
    to is averaged uniformly (the authors' epsilon denominator gives it zeros); every MoE layer is merged; the
    compress stage and the distillation are separate steps (``moejax.posthoc.lowrank``, ``distill.*``).
    """
    align = _check_align(align)
    if similarity is None:
        if router_logits is None:
            raise ValueError("mcsmoe needs router_logits= (the calibration tokens' router logits, "
                             "merge.router_logits(config, variables, batches)) for the authors' router-logit "
                             "similarity, or similarity='router_weight' (the router kernel's columns)")
        similarity = "router_logits"
    if similarity not in ("router_logits", "router_weight"):
        raise ValueError(f"similarity={similarity!r}: allowed are 'router_logits', 'router_weight'")
    logits = _per_layer(config, router_logits, "router_logits", trace.layers if not isinstance(
        router_logits, Mapping) and router_logits is not None else None) if similarity == "router_logits" else None
    if similarity == "router_logits" and logits is None:
        raise ValueError("similarity='router_logits' needs router_logits= (merge.router_logits)")
    counts = importance.from_trace(trace, "frequency", config=config)  # rows: the model's MoE layers
    layer_vars = model_lib.moe_layer_variables(config.model, variables)
    frequencies = {layer: np.asarray(counts[row], np.float64) for row, layer in enumerate(layer_vars)}
    if global_groups:
        group_counts = mcsmoe_group_counts(frequencies, num_experts)
    else:
        group_counts = {layer: num_experts for layer in layer_vars}
    num_real = config.model.moe.num_experts
    expert_kind = config.model.moe.expert_kind
    merged = {}
    for layer, (params, _) in layer_vars.items():
        live = sorted(_kept(config, layer))
        usage = frequencies[layer].copy()
        if similarity == "router_logits":
            sim = similarity_from_logits(np.asarray(logits[layer])[:, :num_real])
        else:
            sim = similarity_from_router_weights(np.asarray(params[moe.ROUTER]["kernel"])[:, :num_real])
        n = min(group_counts[layer], len(live))
        sub = mcsmoe_groups(sim[np.ix_(live, live)], usage[live], n)
        groups = [sorted(live[i] for i in members) for members in sub]
        dominants = [max(members, key=lambda e: (usage[e], -e)) for members in groups]
        logical = compress.logical_experts(config, layer, params)
        if align == "first":
            logical = _aligned_to_first(logical, live, expert_kind)
        merged[layer] = (groups, _merged_experts(logical, groups, usage, dominants, expert_kind, align))
    return _bound(config, variables, merged)


def hcsmoe(config: ml_collections.ConfigDict, variables: compress.Variables, expert_outputs: np.ndarray,
           num_experts: int, linkage: str = "average", frequencies: np.ndarray | None = None,
           metric: str = "euclidean", align: str | bool = "none", layers: Sequence[int] | None = None
           ) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """HC-SMoE merging (Chen et al. 2024, arXiv 2410.08589) to ``num_experts`` merged experts per MoE layer.

    expert_outputs: [L, E, D] each expert's mean output over a calibration set (``importance.expert_mean_outputs``),
    rows in the order of ``layers`` (default: the model's MoE layers). Clustering: ``hcsmoe_groups`` (``linkage``
    'average', the paper's choice; ``metric`` any scipy distance). Merging: per cluster the average of its members'
    weights, weighted by ``frequencies`` [L, E] (``importance.from_trace(trace, 'frequency')`` rows) when given,
    else uniform; ``align`` as in ``mcsmoe`` ('dominant': to the cluster's most frequent member). Bound: every
    member points at its cluster's merged expert; the router is unchanged (``compress.bind``).

    Departures that can change results (docs/methods.md, HC-SMoE): scipy's hierarchical clustering (the authors'
    released scripts run K-means through a misspelt flag); usage over all k slots (the authors count the top-2);
    top_k is kept when fewer clusters than k remain (the authors lower it).
    """
    align = _check_align(align)
    outputs = _per_layer(config, expert_outputs, "expert_outputs", layers)
    freqs = _per_layer(config, frequencies, "frequencies", layers)
    expert_kind = config.model.moe.expert_kind
    merged = {}
    for layer, (params, _) in model_lib.moe_layer_variables(config.model, variables).items():
        live = sorted(_kept(config, layer))
        sub = hcsmoe_groups(np.asarray(outputs[layer])[live], min(num_experts, len(live)), linkage, metric)
        groups = [sorted(live[i] for i in members) for members in sub]
        layer_freqs = None if freqs is None else np.asarray(freqs[layer], np.float64)
        dominants = [members[int(np.argmax(layer_freqs[members]))] if layer_freqs is not None else members[0]
                     for members in groups]
        logical = compress.logical_experts(config, layer, params)
        if align == "first":
            logical = _aligned_to_first(logical, live, expert_kind)
        merged[layer] = (groups, _merged_experts(logical, groups, layer_freqs, dominants, expert_kind, align))
    return _bound(config, variables, merged)


def average(config: ml_collections.ConfigDict, variables: compress.Variables,
            groups: Mapping[int, Sequence[Sequence[int]]]) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """Plain averages of given groups: ``groups[layer]`` lists disjoint groups of logical expert ids for every MoE
    layer (any number per layer); each group's merged expert is the mean of its members' weights and every member
    is bound to it (the router unchanged). Logical experts in no group are removed; a group of one is a copy
    (exact)."""
    layers = compress.check_layers(config, groups, "groups")
    merged = {}
    for layer, (params, _) in model_lib.moe_layer_variables(config.model, variables).items():
        if layer not in layers:
            continue
        layer_groups = _check_groups(config, layer, groups[layer])
        logical = compress.logical_experts(config, layer, params)
        merged[layer] = (layer_groups, _merged_experts(logical, layer_groups, None, [m[0] for m in layer_groups],
                                                       config.model.moe.expert_kind, "none"))
    return _bound(config, variables, merged)
