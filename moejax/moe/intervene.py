"""How the MoE layer applies a routing intervention (``intervention.Intervention``, the record and its
constructors) to its router: ``check_router`` (static: the router kind can take the operations in use, by its
``RouterSpec``), ``selection_bias`` (mask and force as -/+inf on the router's selection-only bias, before the
router) and ``apply`` (the post-step on the router's ``Routing``: masked slots and slots past top_k null, rank,
scale, renormalisation; the order and per-kind semantics are in moejax/moe/intervention.py's docstring).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from moejax.moe import routers
from moejax.moe.intervention import SELECTION_OPS, Intervention, InterventionError, rank_weight_for
from moejax.moe.routers import Routing


def check_router(iv: Intervention, moe_cfg: ml_collections.ConfigDict, train: bool) -> None:
    """Raises InterventionError when the router kind cannot apply an operation in use (static: by ``ops``): its
    ``RouterSpec`` does not rank experts by score (in training, for ``ranks_in_training`` False)."""
    kind = moe_cfg.router.kind
    unsupported = [op for op in iv.ops if op != "scale"]
    if not unsupported:
        return
    spec = routers.spec(kind)
    if not spec.ranks_by_score:
        why = spec.unranked or ("its RouterSpec does not declare ranks_by_score=True (routers ranking scores + "
                                "RouterContext.bias with top-k, slots in rank order)")
        raise InterventionError(f"intervention field {unsupported[0]} is in use, but model.moe.router.kind={kind!r} "
                                f"takes only 'scale': {why}")
    if train and not spec.ranks_in_training:
        raise InterventionError(f"intervention field {unsupported[0]} is in use with model.moe.router.kind={kind!r} "
                                f"in training, where {spec.unranked or 'it does not rank experts by score'}: only "
                                "'scale' applies (evaluation ranks by score and takes every operation)")


def selection_bias(iv: Intervention, layer: int | jax.Array, bias: jax.Array) -> jax.Array:
    """The router's selection-only bias [E] with the layer's mask (-inf) and force (+inf)."""
    if not any(op in iv.ops for op in SELECTION_OPS):
        return bias
    if "mask" in iv.ops:
        bias = jnp.where(iv.mask[layer], -jnp.inf, bias)
    if "force" in iv.ops:
        bias = jnp.where(iv.force[layer], jnp.inf, bias)
    return bias


def _ranking_config(moe_cfg: ml_collections.ConfigDict, width: int) -> ml_collections.ConfigDict:
    """moe_cfg with top_k = width: the router's own function then returns its whole ranking."""
    wide = ml_collections.ConfigDict(moe_cfg.to_dict())
    wide.top_k = width
    return wide


def _past_top_k(iv: Intervention, layer: int | jax.Array, route: Routing, moe_cfg: ml_collections.ConfigDict,
                bias: jax.Array | None, offset: jax.Array) -> jax.Array:
    """[T] the expert at position ``offset`` (1-based) among those the router ranks past its own slots
    (route.experts), masked experts skipped; id E where there is none. The ranking is the router's function run
    on route.logits with top_k = every expert and the selection-only bias ``bias`` (None: the intervention's mask
    and force alone)."""
    num_experts = moe_cfg.num_experts
    if bias is None:
        bias = selection_bias(iv, layer, jnp.zeros((num_experts,), jnp.float32))
    width = route.logits.shape[-1]
    ranking = routers.spec(moe_cfg.router.kind).fn(route.logits, _ranking_config(moe_cfg, width),
                                                    routers.RouterContext(bias=bias, train=False)).experts
    taken = (ranking[:, :, None] == route.experts[:, None, :]).any(-1)
    candidate = ~taken
    if "mask" in iv.ops:
        candidate &= ~(iv.mask[layer][jnp.clip(ranking, 0, num_experts - 1)] & (ranking < num_experts))
    hit = candidate & (jnp.cumsum(candidate, axis=-1) == offset)
    return jnp.where(hit.any(-1), jnp.where(hit, ranking, 0).sum(-1), num_experts).astype(jnp.int32)


def apply(iv: Intervention, layer: int | jax.Array, route: Routing, moe_cfg: ml_collections.ConfigDict, *,
          bias: jax.Array | None = None) -> Routing:
    """The post-step on a router's Routing for model layer ``layer``: masked slots and slots past top_k null,
    rank, scale, renormalisation (the order of the module docstring). probs and logits are left as they are.
    ``bias``: the selection-only bias [E] the router was given (``selection_bias``'s result), which orders ranks
    past top_k; None: the intervention's mask and force alone (the same order for a model without a learned
    selection bias)."""
    if not any(op in iv.ops for op in ("mask", "top_k", "rank", "scale")):
        return route
    num_experts = moe_cfg.num_experts
    weights, ids = route.weights, route.experts
    slot = jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :]
    real = ids < num_experts
    expert = jnp.clip(ids, 0, num_experts - 1)
    total = weights.sum(-1, keepdims=True)
    keep = jnp.ones(ids.shape, bool)
    if "mask" in iv.ops:
        keep &= ~(iv.mask[layer][expert] & real)
    if "top_k" in iv.ops:
        limit = iv.top_k[layer]
        keep &= (limit == 0) | (slot < limit)
    weights = jnp.where(keep, weights, 0.0)
    ids = jnp.where(keep, ids, num_experts)
    on_rank = jnp.zeros((), bool)
    if "rank" in iv.ops:
        rank = iv.rank[layer]
        on_rank = rank > 0
        slots = ids.shape[1]
        chosen = jnp.where(slot == rank - 1, ids, num_experts)  # ranks 1..k: the router's own slot r-1
        if route.logits.shape[-1] > slots:  # ranks past k: the rank-r expert in slot 0
            far = _past_top_k(iv, layer, route, moe_cfg, bias, rank - slots)
            chosen = jnp.where(rank > slots, jnp.where(slot == 0, far[:, None], num_experts), chosen)
        picked = chosen < num_experts
        if rank_weight_for(moe_cfg, iv.rank_weight) == "one":
            value = jnp.ones(chosen.shape, weights.dtype)
        else:
            value = jnp.take_along_axis(route.probs, jnp.clip(chosen, 0, num_experts - 1), axis=-1)
        weights = jnp.where(on_rank, jnp.where(picked, value, 0.0), weights)
        ids = jnp.where(on_rank, chosen, ids)
        real = ids < num_experts
        expert = jnp.clip(ids, 0, num_experts - 1)
    factor = jnp.where(real, iv.scale[layer][expert], 1.0) if "scale" in iv.ops else None
    before_norm = factor is not None and not iv.scale_after_norm
    if before_norm:
        weights = weights * factor
    if routers.renormalises(moe_cfg) and ("mask" in iv.ops or "top_k" in iv.ops or before_norm):
        kept = weights.sum(-1, keepdims=True)
        rescaled = weights * (total / jnp.where(kept > 0, kept, 1.0))
        weights = jnp.where(~on_rank & (kept != total), rescaled, weights)
    if factor is not None and iv.scale_after_norm:
        weights = weights * factor
    return route.replace(weights=weights.astype(route.weights.dtype), experts=ids.astype(jnp.int32))
