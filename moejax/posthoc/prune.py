"""Expert pruning: remove routed experts from a trained MoE model, as a pure function on ``(config, variables)``
(a moejax run, ``moejax.load(workdir)``, or an imported checkpoint, ``moejax.hf.load(path)``): choose the experts to
keep from their importance (``keep_by_score``, ``keep_global``), then ``prune``.

    from moejax.posthoc import importance, prune, read_trace
    scores = importance.from_trace(read_trace("traces/run1"), "frequency", config=config)   # or from_forward
    keep = prune.keep_by_score(scores, 6, layers=moejax.model.moe_layers(config.model))
    config, variables = prune.prune(config, variables, keep)     # 6 routed experts in every MoE layer

Importance comes from ``moejax.posthoc.importance``: from a routing trace (``from_trace``: the criteria that need
the routing alone, 'frequency' and 'soft_count'; ``config=`` checks the trace against the model and orders its rows
as the model's MoE layers) or from a forward pass over calibration data (``from_forward``: every criterion,
'reap' and 'easy_ep' included).

Pruning keeps, in every MoE layer, the listed experts in their original order: the slices of every
``experts/<name>`` tensor, the router kernel's columns (and ``router/bias``, Chain-of-Experts' ``router_{c}``), the
selection bias ``moe_state/.../router_bias``; AdaMoE's null-expert columns after the E real ones are kept whole
(``moejax.posthoc.compress``, the core merging shares). Shared experts and everything outside the MoE layers are
the same arrays as before. The pruned model computes what the original computes with the pruned experts' router
logits and selection bias at -inf (up to float rounding: the softmax sums lose their zero terms) under dropless
dispatch, for the routers whose choice and weights then depend on the kept experts' scores only (topk, top_p,
adamoe, smoe_dropout, expert_choice at evaluation); capacity dispatch sizes its buffers by E, THOR's evaluation
averages the remaining experts, and routers whose expert ids are computed from E (hash routing) are refused. With
group-limited routing the equivalence needs the masked groups' fill (``router.group_mask_fill``) to rank below the
kept experts' selection scores, as it does for probabilities.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from moejax import model as model_lib
from moejax import moe
from moejax.moe import expert_map
from moejax.posthoc import compress

# ------------------------------------------------------------------------------------------------ selection


def keep_by_score(scores: np.ndarray, n: int, layers: Sequence[int] | None = None) -> dict[int, list[int]]:
    """The n highest-scoring experts of every layer, sorted by id: ``{layer: [ids]}`` for ``prune``.

    scores: [L, E]; ties go to the lower expert id. layers: the model's layer index of each row (a trace's
    ``trace.layers``); None numbers the rows 0..L-1, which are the model's layer indices only when every layer is
    MoE (``prune`` names the layers it expects otherwise).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [L, E], got shape {scores.shape}")
    num_layers, num_experts = scores.shape
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= num_experts:
        raise ValueError(f"n={n!r} experts to keep per layer: must be an integer in [1, E={num_experts}]")
    rows = list(range(num_layers)) if layers is None else [int(layer) for layer in np.asarray(layers).reshape(-1)]
    if len(rows) != num_layers:
        raise ValueError(f"layers names {len(rows)} layers but scores has {num_layers} rows")
    order = np.argsort(-scores, axis=1, kind="stable")  # stable: equal scores keep the lower id first
    return {layer: sorted(int(e) for e in order[row, :n]) for row, layer in enumerate(rows)}


def keep_global(scores: np.ndarray, total: int, layers: Sequence[int] | None = None, min_per_layer: int = 1
                ) -> dict[int, list[int]]:
    """A budget of ``total`` experts over all L layers, selected globally: every layer's ``min_per_layer`` best
    experts, then the best remaining experts of the whole model by score (compared across layers as given: pass
    scores on a common scale), ties to the earlier layer and the lower id. The layers then keep different numbers
    of experts (``prune`` stores them through the expert maps). ``{layer: [ids]}`` sorted by id."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [L, E], got shape {scores.shape}")
    num_layers, num_experts = scores.shape
    if isinstance(min_per_layer, bool) or not 1 <= int(min_per_layer) <= num_experts:
        raise ValueError(f"min_per_layer={min_per_layer!r}: must be an integer in [1, E={num_experts}]")
    low, high = num_layers * int(min_per_layer), num_layers * num_experts
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or not low <= total <= high:
        raise ValueError(f"total={total!r} experts over {num_layers} layers: must be an integer in [{low}, {high}] "
                         f"(min_per_layer={min_per_layer} in every layer, at most all experts)")
    rows = list(range(num_layers)) if layers is None else [int(layer) for layer in np.asarray(layers).reshape(-1)]
    if len(rows) != num_layers:
        raise ValueError(f"layers names {len(rows)} layers but scores has {num_layers} rows")
    chosen = np.zeros(scores.shape, bool)
    order = np.argsort(-scores, axis=1, kind="stable")
    for row in range(num_layers):
        chosen[row, order[row, :min_per_layer]] = True
    flat = np.argsort(-np.where(chosen, -np.inf, scores).reshape(-1), kind="stable")
    for index in flat[:total - low]:
        chosen.reshape(-1)[index] = True
    return {layer: np.flatnonzero(chosen[row]).tolist() for row, layer in enumerate(rows)}


# ------------------------------------------------------------------------------------------------------ prune


def prune(config: ml_collections.ConfigDict, variables: compress.Variables, keep: Mapping[int, Sequence[int]]
          ) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """(new config, new variables) keeping, in every MoE layer, the routed experts ``keep[layer]``.

    keep: ``{model layer index (moejax.model.moe_layers): expert ids}``, every MoE layer present, the same number
    of distinct ids in [0, E) for each (taken in increasing order: ties in the routers' top-k still go to the lower
    original id). The new config has that many experts, ``top_k`` clamped to it, and group-limited routing
    (``router.num_groups``/``topk_groups``) and ``device_groups`` rewritten when each group keeps the same count,
    else a ValueError naming the field (``compress.compressed_config``). Sliced: experts/<name> [E, ...], every
    router's kernel columns [D, E + m] and bias [E + m] (the m AdaMoE null columns kept), moe_state router_bias [E];
    for scanned layers per unit of the stacked [U, ...] arrays.
    """
    layers = compress.check_layers(config, keep, "keep")
    num_experts = config.model.moe.num_experts
    kept = {}
    for layer in layers:
        ids = [int(i) for i in np.asarray(keep[layer]).reshape(-1)]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= num_experts:
            raise ValueError(f"keep[{layer}] = {list(keep[layer])}: must list distinct expert ids in [0, "
                             f"{num_experts}), at least one")
        kept[layer] = sorted(ids)
    counts = {layer: len(ids) for layer, ids in kept.items()}
    if len(set(counts.values())) == 1 and not expert_map.has_map(config.model.moe):
        maps = {layer: compress.ExpertMap(compress.singletons(ids), tuple(ids)) for layer, ids in kept.items()}
        return compress.compress(config, variables, maps)
    return _remove(config, variables, kept)


def _remove(config: ml_collections.ConfigDict, variables: compress.Variables, kept: Mapping[int, list[int]]
            ) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """Pruning through the expert maps (uneven counts, or a model that already has maps): the router keeps its E
    logical experts, the ones not kept are removed (-1), and each layer stores only the experts its kept logical
    experts reach. top_k is clamped to the fewest logical experts a layer keeps (+ null experts)."""
    cfg = config.model.moe
    bindings = {}
    for layer, (params, _) in model_lib.moe_layer_variables(config.model, variables).items():
        old = expert_map.row(cfg, layer)
        ids = kept[layer]
        gone = [i for i in ids if old[i] < 0]
        if gone:
            raise ValueError(f"keep[{layer}] = {ids}: logical experts {gone} are already removed by the model's "
                             f"expert map (model.moe.expert_map[{layer}])")
        used = sorted({int(old[i]) for i in ids})
        row = np.full(cfg.num_experts, -1, np.int64)
        for i in ids:
            row[i] = used.index(int(old[i]))
        bindings[layer] = compress.Binding(row, {name: value[np.asarray(used)] if not isinstance(value, np.ndarray)
                                                 else np.asarray(value)[used]
                                                 for name, value in params[moe.EXPERTS].items()})
    fewest = min(len(ids) for ids in kept.values())
    if cfg.top_k > fewest + cfg.num_null_experts:
        config = copy.deepcopy(config)
        config.model.moe.top_k = fewest + cfg.num_null_experts
        for field in ("k_start", "eval_top_k"):
            config.model.moe.router[field] = min(config.model.moe.router[field], config.model.moe.top_k)
    return compress.bind(config, variables, bindings)
