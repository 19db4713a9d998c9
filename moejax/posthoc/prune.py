"""Expert pruning: remove routed experts from a trained MoE model, as a pure function on ``(config, variables)``
(a moejax run, ``moejax.load(workdir)``, or an imported checkpoint, ``moejax.hf.load(path)``).

    from moejax.posthoc import prune, read_trace
    trace = read_trace("traces/run1")
    keep = prune.keep_by_score(prune.importance(trace, "frequency"), 6, layers=trace.layers)
    config, variables = prune.prune(config, variables, keep)     # 6 routed experts in every MoE layer

Pruning keeps, in every MoE layer, the listed experts in their original order: the slices of every
``experts/<name>`` tensor, the router kernel's columns (and ``router/bias``, Chain-of-Experts' ``router_{c}``), the
selection bias ``moe_state/.../router_bias``; AdaMoE's null-expert columns after the E real ones are kept whole.
Shared experts and everything outside the MoE layers are the same arrays as before. The pruned model computes what
the original computes with the pruned experts' router logits and selection bias at -inf (up to float rounding: the
softmax sums lose their zero terms) under dropless dispatch, for the routers whose choice and weights then depend
on the kept experts' scores only (topk, top_p, adamoe, smoe_dropout, expert_choice at evaluation); capacity
dispatch sizes its buffers by E, THOR's evaluation averages the remaining experts, and 'hash' routing (a hash of the
token id modulo E) is refused. With group-limited routing the equivalence needs the masked groups' fill
(``router.group_mask_fill``) to rank below the kept experts' selection scores, as it does for probabilities.

The stacked layout holds one expert count per model (``model.moe.num_experts``): every MoE layer keeps the same
number of experts. The same machinery (``LayerPlan`` and ``compress``: new experts as combinations of old ones)
serves the merging methods of ``moejax.posthoc.merge``.

Importance from a routing trace (``importance``): 'frequency' (routed slots per expert) and 'soft_count' (sum of the
gate weights of those slots). The criteria that need expert outputs from a forward pass ('reap', 'easy_ep') are
computed by ``moejax.posthoc.importance(config, variables, batches, criterion)`` (moejax/posthoc/importance.py),
which also gives these two from the same pass.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.core
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checks, moe
from moejax import model as model_lib
from moejax.moe import layer as moe_layer
from moejax.posthoc.trace import Trace

Variables = dict[str, Any]  # {'params': ..., 'moe_state': ...}
CRITERIA = ("frequency", "soft_count")
FORWARD_CRITERIA = ("reap", "easy_ep")  # need expert output norms from a forward pass: moejax.posthoc.importance
_BLOCK_TOKENS = 1 << 20  # trace tokens read at once by importance


# ------------------------------------------------------------------------------------------ selection helpers

def importance(trace: Trace, criterion: str = "frequency") -> np.ndarray:
    """[L, E] float64 importance of every expert at every traced layer (rows in the trace's layer order: the model's
    layer index of row l is ``trace.layers[l]``).

    'frequency':  the number of routed slots expert e received (null slots, ids outside [0, E), are left out).
    'soft_count': the sum of the gate weights of those slots.
    'reap' and 'easy_ep' weigh the slots by the experts' output norms, which a routing trace does not hold: they
    raise ValueError pointing to ``moejax.posthoc.importance``, which runs the forward pass.
    """
    if criterion in FORWARD_CRITERIA:
        raise ValueError(f"importance criterion {criterion!r} needs the experts' output norms from a forward pass "
                         f"over a calibration set: use moejax.posthoc.importance(config, variables, batches, "
                         f"{criterion!r}); from a routing trace use one of {CRITERIA}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance criterion {criterion!r}: allowed are {CRITERIA} (from a trace) and "
                         f"{FORWARD_CRITERIA} (moejax.posthoc.importance, from a forward pass)")
    num_experts = trace.num_experts
    scores = np.zeros((trace.num_layers, num_experts), np.float64)
    for layer in range(trace.num_layers):
        for start in range(0, trace.num_tokens, _BLOCK_TOKENS):
            experts = np.asarray(trace.experts[layer, start:start + _BLOCK_TOKENS])
            valid = (experts >= 0) & (experts < num_experts)
            weights = None
            if criterion == "soft_count":
                weights = np.asarray(trace.weights[layer, start:start + _BLOCK_TOKENS], np.float64)[valid]
            scores[layer] += np.bincount(experts[valid].astype(np.int64), weights=weights, minlength=num_experts)
    return scores


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


def keep_global(scores: np.ndarray, total: int, layers: Sequence[int] | None = None) -> dict[int, list[int]]:
    """A budget of ``total`` experts over all L layers. A truly global selection (the ``total`` best experts of the
    whole model, compared across layers) gives the layers unequal counts, which the stacked expert layout (one
    ``model.moe.num_experts`` per model) cannot hold; so this keeps, in every layer, the top ``total // L`` experts
    (``keep_by_score``), and raises ValueError when ``total`` is not a multiple of L rather than spend less than the
    budget silently."""
    num_layers = np.asarray(scores).shape[0]
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 1 or total % num_layers:
        raise ValueError(f"total={total!r} experts over {num_layers} layers: every MoE layer keeps the same number of "
                         f"experts, so the budget must be a positive multiple of {num_layers}")
    return keep_by_score(scores, int(total) // num_layers, layers)


# ------------------------------------------------------------------------------------- the MoE layers of a tree

def moe_sites(config: ml_collections.ConfigDict) -> dict[int, tuple[tuple[str, ...], int | None]]:
    """Where each MoE layer lives: ``{model layer: (path of its 'ffn' module, unit)}``. Unrolled layers are
    ``layers_{i}/ffn`` (unit None); with ``model.scan_layers`` every MoE layer is ``blocks/block_0/ffn`` at index
    ``unit`` of the stacked leading axis [U, ...]."""
    cfg = config.model
    sites = {}
    for layer in model_lib.moe_layers(cfg):
        if cfg.scan_layers:
            sites[layer] = (("blocks", "block_0", "ffn"), (layer - cfg.first_dense_layers) // max(cfg.moe_every, 1))
        else:
            sites[layer] = ((f"layers_{layer}", "ffn"), None)
    return sites


def _subtree(tree: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any]:
    for key in path:
        tree = tree[key]
    return tree


def moe_layer_variables(config: ml_collections.ConfigDict, variables: Variables
                        ) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
    """``{model layer: (params, moe_state)}`` of each MoE layer's 'ffn' module (the MoE parameter tree of
    moejax/moe/layer.py), the unit axis of scanned layers indexed away; moe_state is {} when the variables have
    none."""
    out = {}
    state = variables.get("moe_state") or {}
    for layer, (path, unit) in moe_sites(config).items():
        try:
            params = _subtree(variables["params"], path)
        except KeyError as e:
            raise ValueError(f"the variables have no params/{'/'.join(path)} for MoE layer {layer}: do they belong to "
                             f"this config (model.scan_layers={config.model.scan_layers})?") from e
        try:
            layer_state = _subtree(state, path)
        except KeyError:
            layer_state = {}
        pick = (lambda x: x) if unit is None else (lambda x, u=unit: x[u])
        out[layer] = ({key: _map(pick, value) for key, value in params.items()},
                      {key: _map(pick, value) for key, value in layer_state.items()})
    return out


def _map(fn, tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _map(fn, value) for key, value in tree.items()}
    return fn(tree)


def expert_weights(params: Mapping[str, Any], expert: int) -> dict[str, np.ndarray]:
    """One routed expert's weights ``{name: array without the expert axis}`` (numpy) from a MoE layer's params
    (``moe_layer_variables``)."""
    return {name: np.asarray(value[expert]) for name, value in params[moe.EXPERTS].items()}


# ------------------------------------------------------------------------------------------ the rebuilding core

Column = tuple[np.ndarray, np.ndarray]  # (old expert ids [g] int64, weights [g] float64 summing to 1)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
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


def _plan_layer(layer: int, params: Mapping[str, Any], state: Mapping[str, Any], plan: LayerPlan,
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
                new_params[key][name] = _combine(value, plan.columns + nulls, value.ndim - 1)
        elif key == moe.EXPERTS:
            for name, value in sub.items():
                _check_length(layer, f"{key}/{name}", value.shape[0], num_experts)
            if plan.experts is None:
                new_params[key] = {name: _combine(value, plan.columns, 0) for name, value in sub.items()}
            else:
                if set(plan.experts) != set(sub):
                    raise ValueError(f"MoE layer {layer}: the merged experts hold {sorted(plan.experts)}, the model's "
                                     f"experts {sorted(sub)}")
                new_params[key] = {name: _like(np.asarray(value).astype(sub[name].dtype), sub[name])
                                   for name, value in plan.experts.items()}
                for name, value in new_params[key].items():
                    _check_length(layer, f"merged {key}/{name}", value.shape[0], len(plan.columns))
        elif key not in (moe.SHARED, moe.SHARED_GATE):
            raise ValueError(f"MoE layer {layer} has a parameter {key!r} that expert pruning and merging do not know "
                             f"how to resize (known: routers, {moe.EXPERTS}, {moe.SHARED}, {moe.SHARED_GATE})")
    new_state = {}
    for key, value in state.items():
        if key != moe.ROUTER_BIAS:
            raise ValueError(f"MoE layer {layer} has a moe_state entry {key!r} that expert pruning and merging do not "
                             f"know how to resize (known: {moe.ROUTER_BIAS})")
        _check_length(layer, f"moe_state {key}", value.shape[0], num_experts)
        new_state[key] = _combine(value, plan.columns, 0)
    return new_params, new_state


def check_layers(config: ml_collections.ConfigDict, per_layer: Mapping[int, Any], what: str) -> list[int]:
    """The model's MoE layers, when ``per_layer``'s keys are exactly those; ValueError otherwise."""
    expected = model_lib.moe_layers(config.model)
    given = sorted(int(layer) for layer in per_layer)
    if given != expected:
        raise ValueError(f"{what} has layers {given}; the model's MoE layers (moejax.model.moe_layers, in model layer "
                         f"numbering) are {expected}. From a trace, pass layers=trace.layers to keep_by_score")
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
    if cfg.router.kind == "hash":
        raise ValueError("model.moe.router.kind='hash' routes a token to hash(token id) mod num_experts: removing "
                         "experts would remap every token; pruning and merging refuse hash routing")
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


def compress(config: ml_collections.ConfigDict, variables: Variables, plans: Mapping[int, LayerPlan]
             ) -> tuple[ml_collections.ConfigDict, Variables]:
    """(new config, new variables) with every MoE layer rebuilt by its ``LayerPlan`` (keys: the model's MoE
    layers). The inputs are not modified; arrays outside the routers, routed experts and router biases are shared
    with them. A 'moe_aux' collection (statistics sown by ``init``) is left out: it describes the old experts."""
    layers = check_layers(config, plans, "the compression plan")
    for layer in layers:
        reps = plans[layer].representatives
        if len(reps) != len(plans[layer].columns) or any(b <= a for a, b in zip(reps, reps[1:], strict=False)):
            raise ValueError(f"MoE layer {layer}: representatives {list(reps)} must be strictly increasing, one per "
                             f"new expert ({len(plans[layer].columns)})")
    new_config = compressed_config(config, {layer: plans[layer].representatives for layer in layers})
    trees = moe_layer_variables(config, variables)
    changed = {layer: _plan_layer(layer, *trees[layer], plans[layer], config.model.moe) for layer in layers}
    new = flax.core.unfreeze(variables)  # plain dicts all the way down; the arrays are shared, not copied
    new.pop("moe_aux", None)  # statistics sown by an init or a forward pass, shaped by the old expert count
    sites = moe_sites(config)
    for which, collection in enumerate(("params", "moe_state")):
        for path in {site[0] for site in sites.values()}:
            on_path = [layer for layer in layers if sites[layer][0] == path]
            updates = [changed[layer][which] for layer in on_path]
            if not updates[0]:
                continue
            if sites[on_path[0]][1] is None:
                merged = updates[0]
            else:  # scanned: restack the units in order
                on_path.sort(key=lambda layer: sites[layer][1])
                updates = [changed[layer][which] for layer in on_path]
                merged = {key: _stack_trees([u[key] for u in updates]) for key in updates[0]}
            _subtree(new[collection], path).update(merged)
    return new_config, new


def _stack_trees(trees: Sequence[Any]) -> Any:
    if isinstance(trees[0], Mapping):
        return {key: _stack_trees([t[key] for t in trees]) for key in trees[0]}
    return _stack(trees)


# ------------------------------------------------------------------------------------------------------- prune

def prune(config: ml_collections.ConfigDict, variables: Variables, keep: Mapping[int, Sequence[int]]
          ) -> tuple[ml_collections.ConfigDict, Variables]:
    """(new config, new variables) keeping, in every MoE layer, the routed experts ``keep[layer]``.

    keep: ``{model layer index (moejax.model.moe_layers): expert ids}``, every MoE layer present, the same number
    of distinct ids in [0, E) for each (taken in increasing order: ties in the routers' top-k still go to the lower
    original id). The new config has that many experts, ``top_k`` clamped to it, and group-limited routing
    (``router.num_groups``/``topk_groups``) and ``device_groups`` rewritten when each group keeps the same count,
    else a ValueError naming the field (``compressed_config``). Sliced: experts/<name> [E, ...], every router's
    kernel columns [D, E + m] and bias [E + m] (the m AdaMoE null columns kept), moe_state router_bias [E]; for
    scanned layers per unit of the stacked [U, ...] arrays.
    """
    layers = check_layers(config, keep, "keep")
    num_experts = config.model.moe.num_experts
    kept = {}
    for layer in layers:
        ids = [int(i) for i in np.asarray(keep[layer]).reshape(-1)]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= num_experts:
            raise ValueError(f"keep[{layer}] = {list(keep[layer])}: must list distinct expert ids in [0, "
                             f"{num_experts}), at least one")
        kept[layer] = sorted(ids)
    counts = {layer: len(ids) for layer, ids in kept.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts (the layers' experts are stacked and "
                         f"model.moe.num_experts is one number per model); keep gives {counts}")
    plans = {layer: LayerPlan(singletons(ids), tuple(ids)) for layer, ids in kept.items()}
    return compress(config, variables, plans)
