"""The compression core that expert pruning (``moejax.posthoc.prune``) and merging (``moejax.posthoc.merge``)
share: every MoE layer's E routed experts become n, each new expert a weighted combination of old ones, as a pure
function on ``(config, variables)``.

An ``ExpertMap`` says, for one MoE layer, which old experts each new one combines and with what weights (its router
column: every router's kernel column, ``router/bias`` entry and ``moe_state`` ``router_bias`` entry; and its
weights unless the map gives merged ones), and which old expert stands for it where the config needs a position.
``compress(config, variables, maps)`` rebuilds every MoE layer by its map, wherever the model keeps it
(``moejax.model.moe_layer_paths``: unrolled or scanned), and returns the new config (``compressed_config``: the
expert count, top_k, group-limited routing and device groups rewritten, validated). AdaMoE's null-expert columns
after the E real ones are kept whole; shared experts and everything outside the MoE layers are the same arrays.
``compress`` resizes the router: every MoE layer keeps the same number of logical experts (one
``model.moe.num_experts`` per model). Routers whose expert ids are computed from E
(``RouterSpec.ids_depend_on_num_experts``) are refused.

``bind(config, variables, bindings)`` keeps the router as it was (every kernel column, bias, selection bias and
group) and rewrites the layer's expert map (``moejax/moe/expert_map.py``): each logical expert points at one stored
expert (several may share one: merged experts bound to their merge) or is removed (-1); each layer may store a
different number of experts. ``logical_experts`` reads a layer's weights per logical expert through its map.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import flax.core
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checks, moe
from moejax import model as model_lib
from moejax.moe import expert_map, placement, routers
from moejax.moe import experts as experts_lib
from moejax.moe import layer as moe_layer

Variables = dict[str, Any]  # {'params': ..., 'moe_state': ...}


def expert_weights(params: Mapping[str, Any], expert: int) -> dict[str, np.ndarray]:
    """One stored routed expert's weights ``{name: array without the expert axis}`` (numpy) from a MoE layer's
    params (``moejax.model.moe_layer_variables``); ``logical_experts`` reads through the layer's expert map."""
    return {name: np.asarray(value[expert]) for name, value in params[moe.EXPERTS].items()}


def logical_experts(config: ml_collections.ConfigDict, layer: int, params: Mapping[str, Any]
                    ) -> dict[str, np.ndarray]:
    """``{name: [E, ...]}`` numpy: the weights of each logical expert of MoE layer ``layer`` (its stored expert
    through the expert map; zeros for a removed one)."""
    row = expert_map.row(config.model.moe, layer)
    out = {}
    for name, value in params[moe.EXPERTS].items():
        value = np.asarray(value)
        out[name] = np.where((row >= 0).reshape((-1,) + (1,) * (value.ndim - 1)), value[np.maximum(row, 0)], 0
                             ).astype(value.dtype)
    return out


Column = tuple[np.ndarray, np.ndarray]  # (old expert ids [g] int64, weights [g] float64 summing to 1)


@dataclasses.dataclass(frozen=True)
class ExpertMap:
    """How one MoE layer's E routed experts become n.

    columns:         per new expert j, (old ids [g], weights [g]): its router column (every router's kernel column,
                     its router/bias entry, its moe_state router_bias entry) is sum_i weights[i] * old column ids[i];
                     a single id with weight 1 is a plain copy (exact).
    representatives: per new expert, the old id that stands for it where the config needs an expert's position
                     (group-limited routing, device groups); strictly increasing.
    experts:         the new routed experts' weights ``{name: [n, ...]}``; None: the same combinations as the
                     router columns of the old experts' weights.
    """

    columns: tuple[Column, ...]
    representatives: tuple[int, ...]
    experts: Mapping[str, Any] | None = None


def singletons(ids: Sequence[int]) -> tuple[Column, ...]:
    """Columns copying the old experts ``ids`` (pruning)."""
    return tuple((np.array([int(i)], np.int64), np.ones(1, np.float64)) for i in ids)


def _is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray) or np.isscalar(x)


def _like(value: np.ndarray, original: Any) -> Any:
    """value as the array type of original (numpy stays numpy, jax arrays become jax arrays)."""
    return value if _is_numpy(original) else jnp.asarray(value)


def _combine(x: Any, columns: Sequence[Column], axis: int) -> Any:
    """x with its axis ``axis`` (E entries) replaced by one entry per column: entry j = sum_i w_ji x[ids_ji]. A plain
    gather (exact, same array type) when every column copies one entry; otherwise summed in float64 on the host and
    cast back to x's dtype."""
    front = (slice(None),) * axis
    if all(len(ids) == 1 and weights[0] == 1 for ids, weights in columns):
        return x[front + (np.array([int(ids[0]) for ids, _ in columns], np.int64),)]
    parts = []
    for ids, weights in columns:
        block = np.asarray(x[front + (np.asarray(ids, np.int64),)], np.float64)
        shape = (1,) * axis + (-1,) + (1,) * (block.ndim - axis - 1)
        parts.append((block * np.asarray(weights, np.float64).reshape(shape)).sum(axis))
    return _like(np.stack(parts, axis).astype(x.dtype), x)


def _stack(values: Sequence[Any]) -> Any:
    return np.stack(values) if all(_is_numpy(v) for v in values) else jnp.stack([jnp.asarray(v) for v in values])


def _check_length(layer: int, where: str, actual: int, expected: int) -> None:
    if actual != expected:
        raise ValueError(f"MoE layer {layer}: {where} has {actual} entries on its expert axis, the config says "
                         f"{expected}: do the variables belong to this config?")


def _rebuild_layer(layer: int, params: Mapping[str, Any], state: Mapping[str, Any], mapping: ExpertMap,
                   cfg: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict[str, Any]]:
    """The replaced entries of one MoE layer's params and moe_state (unit axis already removed)."""
    num_experts, num_null = cfg.num_experts, cfg.num_null_experts
    nulls = singletons(range(num_experts, num_experts + num_null))
    new_params = {}
    for key, sub in params.items():
        if moe.is_router(key):
            new_params[key] = {}
            for name, value in sub.items():  # kernel [D, E + m], bias [E + m]
                _check_length(layer, f"{key}/{name}", value.shape[-1], num_experts + num_null)
                new_params[key][name] = _combine(value, mapping.columns + nulls, value.ndim - 1)
        elif key == moe.EXPERTS:
            for name, value in sub.items():
                _check_length(layer, f"{key}/{name}", value.shape[0], num_experts)
            if mapping.experts is None:
                new_params[key] = {name: _combine(value, mapping.columns, 0) for name, value in sub.items()}
            else:
                if set(mapping.experts) != set(sub):
                    raise ValueError(f"MoE layer {layer}: the merged experts hold {sorted(mapping.experts)}, the "
                                     f"model's experts {sorted(sub)}")
                new_params[key] = {name: _like(np.asarray(value).astype(sub[name].dtype), sub[name])
                                   for name, value in mapping.experts.items()}
                for name, value in new_params[key].items():
                    _check_length(layer, f"merged {key}/{name}", value.shape[0], len(mapping.columns))
        elif key not in (moe.SHARED, moe.SHARED_GATE):
            raise ValueError(f"MoE layer {layer} has a parameter {key!r} that expert pruning and merging do not know "
                             f"how to resize (known: routers, {moe.EXPERTS}, {moe.SHARED}, {moe.SHARED_GATE})")
    new_state = {}
    for key, value in state.items():
        if key != moe.ROUTER_BIAS:
            raise ValueError(f"MoE layer {layer} has a moe_state entry {key!r} that expert pruning and merging do not "
                             f"know how to resize (known: {moe.ROUTER_BIAS})")
        _check_length(layer, f"moe_state {key}", value.shape[0], num_experts)
        new_state[key] = _combine(value, mapping.columns, 0)
    return new_params, new_state


def check_layers(config: ml_collections.ConfigDict, per_layer: Mapping[int, Any], what: str) -> list[int]:
    """The model's MoE layers, when ``per_layer``'s keys are exactly those; ValueError otherwise."""
    expected = model_lib.moe_layers(config.model)
    given = sorted(int(layer) for layer in per_layer)
    if given != expected:
        raise ValueError(f"{what} has layers {given}; the model's MoE layers (moejax.model.moe_layers, in model layer "
                         f"numbering) are {expected}. From a trace, pass layers=trace.layers to prune.keep_by_score")
    return expected


def _surviving_groups(representatives: Mapping[int, Sequence[int]], num_experts: int, num_groups: int,
                      field: str) -> int:
    """The group count after compression when each kept group keeps the same number of experts in every layer (the
    groups stay contiguous and in order); ValueError naming ``field`` otherwise."""
    size = num_experts // num_groups
    result = None
    for layer, ids in representatives.items():
        counts = np.bincount(np.asarray(ids, np.int64) // size, minlength=num_groups)
        kept = counts[counts > 0]
        if len(set(kept.tolist())) != 1:
            raise ValueError(f"{field}={num_groups} cannot survive: MoE layer {layer} keeps {counts.tolist()} experts "
                             f"of its {num_groups} groups of {size}; every group kept must keep the same number of "
                             f"experts (or set {field}=1 first, which changes the routing)")
        groups = len(kept)
        if result is not None and groups != result:
            raise ValueError(f"{field}={num_groups} cannot survive: the MoE layers keep experts from different numbers "
                             f"of groups ({result} and, in layer {layer}, {groups}); one config holds one group count")
        result = groups
    return int(result)


def compressed_config(config: ml_collections.ConfigDict, representatives: Mapping[int, Sequence[int]]
                      ) -> ml_collections.ConfigDict:
    """A copy of config with n = len(representatives[layer]) routed experts per MoE layer: ``top_k`` (and the
    routers' ``k_start`` / ``eval_top_k``) at most n (+ null experts); ``router.num_groups`` and
    ``device_groups`` become the number of groups the representatives come from when each such group keeps the
    same count (``topk_groups`` at most that), else ValueError naming the field (device groups that no loss uses
    become 1 instead). The new ``model.moe`` section is validated (ConfigError naming the field)."""
    new = copy.deepcopy(config)
    cfg = new.model.moe
    old = cfg.num_experts
    counts = {len(ids) for ids in representatives.values()}
    if len(counts) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {dict(representatives)}")
    n = counts.pop()
    if routers.spec(cfg.router.kind).ids_depend_on_num_experts:
        raise ValueError(f"model.moe.router.kind={cfg.router.kind!r} computes its expert ids from "
                         f"model.moe.num_experts (RouterSpec.ids_depend_on_num_experts, e.g. a hash of the token id "
                         f"modulo E): removing experts would remap every token; pruning and merging refuse it")
    cfg.num_experts = n
    cfg.top_k = min(cfg.top_k, n + cfg.num_null_experts)
    for field in ("k_start", "eval_top_k"):
        cfg.router[field] = min(cfg.router[field], cfg.top_k)
    if cfg.router.num_groups > 1:
        groups = _surviving_groups(representatives, old, cfg.router.num_groups, "model.moe.router.num_groups")
        cfg.router.num_groups = groups
        cfg.router.topk_groups = min(cfg.router.topk_groups, groups)
    if cfg.device_groups > 1:
        try:
            cfg.device_groups = _surviving_groups(representatives, old, cfg.device_groups, "model.moe.device_groups")
        except ValueError:
            if cfg.balance_loss == "deepseek" and cfg.device_balance_coef:
                raise
            cfg.device_groups = 1  # no loss uses the device groups
    try:
        moe_layer.validate(cfg)
    except checks.ConfigError as e:
        raise checks.ConfigError(f"compressing to {n} routed experts per MoE layer (from {old}) leaves an invalid "
                                 f"config: {e}") from e
    return new


def compress(config: ml_collections.ConfigDict, variables: Variables, maps: Mapping[int, ExpertMap]
             ) -> tuple[ml_collections.ConfigDict, Variables]:
    """(new config, new variables) with every MoE layer rebuilt by its ``ExpertMap`` (keys: the model's MoE
    layers). The inputs are not modified; arrays outside the routers, routed experts and router biases are shared
    with them. A 'moe_aux' collection (statistics sown by ``init``) is left out: it describes the old experts."""
    layers = check_layers(config, maps, "the expert maps")
    _refuse_placement(config)
    if expert_map.has_map(config.model.moe):
        raise ValueError("the model has expert maps (model.moe.expert_map): resizing its router would need the maps "
                         "resized too; remove or bind logical experts with compress.bind instead")
    for layer in layers:
        reps = maps[layer].representatives
        if len(reps) != len(maps[layer].columns) or any(b <= a for a, b in zip(reps, reps[1:], strict=False)):
            raise ValueError(f"MoE layer {layer}: representatives {list(reps)} must be strictly increasing, one per "
                             f"new expert ({len(maps[layer].columns)})")
    new_config = compressed_config(config, {layer: maps[layer].representatives for layer in layers})
    trees = model_lib.moe_layer_variables(config.model, variables)
    changed = {layer: _rebuild_layer(layer, *trees[layer], maps[layer], config.model.moe) for layer in layers}
    new = flax.core.unfreeze(variables)  # plain dicts all the way down; the arrays are shared, not copied
    new.pop("moe_aux", None)  # statistics sown by an init or a forward pass, shaped by the old expert count
    sites = model_lib.moe_layer_paths(config.model)
    for which, collection in enumerate(("params", "moe_state")):
        for path in {site.path for site in sites.values()}:
            on_path = [layer for layer in layers if sites[layer].path == path]
            updates = [changed[layer][which] for layer in on_path]
            if not updates[0]:
                continue
            if sites[on_path[0]].unit is None:
                merged = updates[0]
            else:  # scanned: restack the units in order
                on_path.sort(key=lambda layer: sites[layer].unit)
                updates = [changed[layer][which] for layer in on_path]
                merged = {key: _stack_trees([u[key] for u in updates]) for key in updates[0]}
            functools.reduce(operator.getitem, path, new[collection]).update(merged)
    return new_config, new


def _stack_trees(trees: Sequence[Any]) -> Any:
    if isinstance(trees[0], Mapping):
        return {key: _stack_trees([t[key] for t in trees]) for key in trees[0]}
    return _stack(trees)


# ----------------------------------------------------------------------------------------------- binding


@dataclasses.dataclass(frozen=True)
class Binding:
    """One MoE layer after merging or uneven pruning, its router untouched.

    row:     [E] ints: logical expert i -> stored expert row[i] in 0..S-1 (every one of them used), or -1 when
             logical expert i is removed.
    experts: the S stored experts' weights ``{name: [S, ...]}`` (the names of the model's expert kind).
    """

    row: np.ndarray
    experts: Mapping[str, Any]


def _refuse_placement(config: ml_collections.ConfigDict) -> None:
    if placement.has_placement(config.model.moe):
        raise ValueError("the model has an expert placement (model.moe.expert_placement: replicas of its stored "
                         "experts): take it out first with moejax.posthoc.placement.unplaced, place again after")


def _pad(value: Any, size: int) -> Any:
    """value [S, ...] with zero experts appended up to ``size`` (the stacked shape of scanned layers)."""
    missing = size - value.shape[0]
    if not missing:
        return value
    zeros = np.zeros((missing,) + tuple(value.shape[1:]), np.asarray(value).dtype)
    return np.concatenate([np.asarray(value), zeros]) if _is_numpy(value) else jnp.concatenate(
        [value, jnp.asarray(zeros)])


def bind(config: ml_collections.ConfigDict, variables: Variables, bindings: Mapping[int, Binding]
         ) -> tuple[ml_collections.ConfigDict, Variables]:
    """(new config, new variables) with every MoE layer's expert map and stored experts from ``bindings`` (keys:
    the model's MoE layers); the routers, their biases, the selection bias and shared experts are the same arrays.
    The new config's ``model.moe.expert_map`` holds the rows (``()`` where a layer is the identity); scanned layers
    store the most experts any of them needs, zeros past a layer's own count. A 'moe_aux' collection is left
    out. ValueError when a row removes experts of a router whose ids are computed from E (hash routing)."""
    layers = check_layers(config, bindings, "the bindings")
    cfg = config.model.moe
    _refuse_placement(config)
    names = set(experts_names(config))
    sites_layers = set(model_lib.moe_layers(config.model))
    old_rows = list(expert_map.rows(cfg))
    rows = old_rows or [tuple(range(cfg.num_experts)) if i in sites_layers else ()
                        for i in range(config.model.num_layers)]
    for layer in layers:
        binding = bindings[layer]
        row = expert_map.check_row(np.asarray(binding.row).reshape(-1).tolist(), cfg.num_experts,
                                   f"the binding of MoE layer {layer}")
        if (row < 0).any() and routers.spec(cfg.router.kind).ids_depend_on_num_experts:
            raise ValueError(f"model.moe.router.kind={cfg.router.kind!r} computes its expert ids from the token "
                             f"(RouterSpec.ids_depend_on_num_experts): it cannot avoid removed experts")
        if set(binding.experts) != names:
            raise ValueError(f"MoE layer {layer}: the stored experts hold {sorted(binding.experts)}, the model's "
                             f"expert kind {sorted(names)}")
        stored = int(row.max()) + 1
        for name, value in binding.experts.items():
            _check_length(layer, f"stored experts/{name}", value.shape[0], stored)
        rows[layer] = tuple(int(v) for v in row)
    identity = all(not values or values == tuple(range(cfg.num_experts)) for values in rows)
    new_config = copy.deepcopy(config)
    new_config.model.moe.expert_map = () if identity else tuple(rows)
    try:
        model_lib.validate(new_config.model)
    except checks.ConfigError as e:
        raise checks.ConfigError(f"the expert maps leave an invalid config: {e}") from e
    new = flax.core.unfreeze(variables)
    new.pop("moe_aux", None)
    sites = model_lib.moe_layer_paths(config.model)
    widest = expert_map.stored_count(new_config.model.moe, None)
    for path in {site.path for site in sites.values()}:
        on_path = sorted((layer for layer in layers if sites[layer].path == path),
                         key=lambda layer: sites[layer].unit or 0)
        target = functools.reduce(operator.getitem, path, new["params"])[moe.EXPERTS]
        for name in names:
            old = target[name]
            values = [bindings[layer].experts[name] for layer in on_path]
            values = [_like(np.asarray(v).astype(old.dtype), old) for v in values]
            if sites[on_path[0]].unit is None:
                target[name] = values[0]
            else:
                target[name] = _stack([_pad(v, widest) for v in values])
    return new_config, new


def experts_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The routed experts' parameter names of the model's expert kind."""
    return tuple(experts_lib.from_config(config.model.moe).param_names)


def unmapped(config: ml_collections.ConfigDict, variables: Variables) -> tuple[ml_collections.ConfigDict, Variables]:
    """The same model without expert maps: every logical expert stored, bound experts as copies of their merge
    (exact). ValueError naming the layer when a map removes logical experts (a plain layout cannot leave them out
    of the router). A model without maps is returned as it is."""
    if not expert_map.has_map(config.model.moe):
        return config, variables
    bindings = {}
    for layer, (params, _) in model_lib.moe_layer_variables(config.model, variables).items():
        row = expert_map.row(config.model.moe, layer)
        if (row < 0).any():
            raise ValueError(f"model.moe.expert_map[{layer}] removes logical experts "
                             f"{np.flatnonzero(row < 0).tolist()}: a layout without expert maps cannot leave them "
                             f"out of the router (prune every layer to the same count to slice the router instead)")
        bindings[layer] = Binding(np.arange(config.model.moe.num_experts), logical_experts(config, layer, params))
    return bind(config, variables, bindings)
