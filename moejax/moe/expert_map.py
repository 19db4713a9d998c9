"""Expert maps: the router of a MoE layer scores its E logical experts; a per-layer map sends each logical expert to
one stored expert, or removes it. ``model.moe.expert_map`` holds the maps:

    ()                        no map: logical expert i is stored expert i in every MoE layer (every model trained
                              from scratch or imported as released)
    (row_0, ..., row_{L-1})   one row per model layer (``model.num_layers`` rows): () for a dense layer, E ints for
                              every MoE layer, row[i] the stored expert of logical expert i, or -1 when logical
                              expert i is removed

A MoE layer with a map stores S experts (``experts/<name>`` [S, ...]): the distinct non-negative entries of its row,
which must be exactly 0..S-1. Several logical experts may share one stored expert (merged experts "bound" to their
merge, as MC-SMoE and HC-SMoE leave the router unchanged and point every group member at the merged expert); a
removed logical expert is never selected and gets weight 0: its router logit is replaced by ``REMOVED_LOGIT``
before the router's score (softmax or sigmoid give it exactly 0) and its selection-only bias by -inf. For softmax
routers this equals deleting the router's column. The router (kernel, bias, selection bias, groups) keeps all E
logical experts.

Unrolled layers store exactly S_l experts each; scanned layers (``model.scan_layers``) share one stacked shape, so
every scanned MoE layer stores max_l S_l experts and the ones past S_l are zeros that no logical expert reaches.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checks

REMOVED = -1
REMOVED_LOGIT = -1e30  # finite: exp and sigmoid give exactly 0, p * log p stays 0 in the router entropy


def rows(moe_cfg: ml_collections.ConfigDict) -> tuple[tuple[int, ...], ...]:
    """The map's rows as tuples (a config read back from JSON holds lists); () without a map."""
    return tuple(tuple(int(v) for v in row) for row in (moe_cfg.get("expert_map") or ()))


def has_map(moe_cfg: ml_collections.ConfigDict) -> bool:
    return any(len(row) for row in rows(moe_cfg))


def row(moe_cfg: ml_collections.ConfigDict, layer: int) -> np.ndarray:
    """[E] int64: logical -> stored expert of model layer ``layer`` (the identity where the layer has no map)."""
    maps = rows(moe_cfg)
    if layer < len(maps) and maps[layer]:
        return np.asarray(maps[layer], np.int64)
    return np.arange(moe_cfg.num_experts, dtype=np.int64)


def stored_count(moe_cfg: ml_collections.ConfigDict, layer: int | None) -> int:
    """The number of stored routed experts of model layer ``layer``; None: the most over the MoE layers (the
    stacked shape of scanned layers). With a map every MoE layer has a row (``validate``)."""
    if not has_map(moe_cfg):
        return moe_cfg.num_experts
    if layer is None:
        return max(int(max(values)) + 1 for values in rows(moe_cfg) if values)
    return int(row(moe_cfg, layer).max()) + 1


def table(moe_cfg: ml_collections.ConfigDict) -> np.ndarray:
    """[num_layers, E] int32: every model layer's row (identity rows where there is no map)."""
    return np.stack([row(moe_cfg, i) for i in range(len(rows(moe_cfg)))]).astype(np.int32)


def layer_row(moe_cfg: ml_collections.ConfigDict, layer: int | jax.Array) -> jax.Array | np.ndarray:
    """The row of ``layer``: numpy for a Python int, a gather from ``table`` for a traced layer index (nn.scan)."""
    if isinstance(layer, (int, np.integer)):
        return row(moe_cfg, int(layer)).astype(np.int32)
    return jnp.asarray(table(moe_cfg))[layer]


def mask_removed(logits: jax.Array, bias: jax.Array, map_row: jax.Array, num_experts: int
                 ) -> tuple[jax.Array, jax.Array]:
    """(logits [T, E + m], bias [E]) with the removed logical experts' logits at REMOVED_LOGIT and their
    selection-only bias at -inf; null-expert columns (past E) untouched."""
    removed = jnp.asarray(map_row) < 0
    width = logits.shape[-1]
    removed_cols = jnp.concatenate([removed, jnp.zeros((width - num_experts,), bool)]) if width > num_experts \
        else removed
    logits = jnp.where(removed_cols, jnp.asarray(REMOVED_LOGIT, logits.dtype), logits)
    return logits, jnp.where(removed, -jnp.inf, bias)


def stored_ids(expert_ids: jax.Array, map_row: jax.Array, num_experts: int, num_stored: int) -> jax.Array:
    """Logical expert ids [T, k] -> stored ids, one per slot; null slots and removed experts become ids >= S."""
    map_row = jnp.asarray(map_row, jnp.int32)
    real = expert_ids < num_experts
    stored = map_row[jnp.where(real, expert_ids, 0)]
    return jnp.where(real & (stored >= 0), stored, num_stored + jnp.maximum(expert_ids - num_experts, 0)
                     ).astype(expert_ids.dtype)


def to_stored(expert_ids: jax.Array, weights: jax.Array, map_row: jax.Array, num_experts: int, num_stored: int
              ) -> tuple[jax.Array, jax.Array]:
    """(stored ids, weights) [T, k] of logical expert ids and their weights: ids >= E (null slots) and removed
    experts become null ids >= S. A token's slots that reach the same stored expert (logical experts bound to one
    merge) become one slot, the first, carrying their summed weight (the others null, weight 0): the expert runs
    once per token, and a token never sends two slots to one expert (what the expert-parallel buffers assume)."""
    stored = stored_ids(expert_ids, map_row, num_experts, num_stored)
    live = stored < num_stored
    k = stored.shape[-1]
    same = (stored[..., :, None] == stored[..., None, :]) & live[..., :, None] & live[..., None, :]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [j, i]: i < j
    repeat = jnp.any(same & earlier, axis=-1)  # slot j repeats an earlier slot's stored expert
    summed = jnp.sum(jnp.where(same, weights[..., None, :], 0), axis=-1).astype(weights.dtype)
    weights = jnp.where(repeat, jnp.zeros_like(weights), jnp.where(live, summed, weights))
    return jnp.where(repeat, num_stored, stored).astype(expert_ids.dtype), weights


def with_num_experts(moe_cfg: ml_collections.ConfigDict, num_experts: int) -> ml_collections.ConfigDict:
    """A copy of moe_cfg with num_experts = the stored expert count (what dispatch and the expert-parallel layer
    see); moe_cfg itself when the counts agree."""
    if num_experts == moe_cfg.num_experts:
        return moe_cfg
    copy = ml_collections.ConfigDict(moe_cfg.to_dict())
    copy.num_experts = num_experts
    return copy


def check_row(values: Sequence[int], num_experts: int, field: str) -> np.ndarray:
    """One MoE layer's row checked: E ints in [-1, S) whose non-negative values are exactly 0..S-1, at least one."""
    arr = np.asarray(values)
    if arr.shape != (num_experts,) or not np.issubdtype(arr.dtype, np.integer):
        checks.fail(field, tuple(np.asarray(values).tolist()), f"must be {num_experts} ints "
                                                               f"(model.moe.num_experts), one per logical expert")
    used = sorted(set(arr[arr >= 0].tolist()))
    if (arr < REMOVED).any() or not used or used != list(range(len(used))):
        checks.fail(field, tuple(arr.tolist()), f"entries must be {REMOVED} (removed) or stored expert ids 0..S-1, "
                                                f"each of 0..S-1 used at least once, at least one logical expert kept")
    return arr


def validate(model_cfg: ml_collections.ConfigDict, moe_layers: Sequence[int]) -> None:
    """ConfigError naming ``model.moe.expert_map`` (and the row) when the map does not fit the model."""
    moe_cfg = model_cfg.moe
    maps = rows(moe_cfg)
    if not maps:
        return
    field = "model.moe.expert_map"
    if len(maps) != model_cfg.num_layers:
        checks.fail(field, f"<{len(maps)} rows>", f"needs one row per model layer (model.num_layers="
                                                  f"{model_cfg.num_layers}), () for a dense layer, or () for no map")
    moe_set = set(moe_layers)
    for i, values in enumerate(maps):
        if not values:
            if i in moe_set:
                checks.fail(f"{field}[{i}]", values, f"layer {i} is a MoE layer: with a map every MoE layer has a row "
                                                     f"of {moe_cfg.num_experts} ints (0..E-1 for the identity)")
            continue
        if i not in moe_set:
            checks.fail(f"{field}[{i}]", values, f"layer {i} is dense: its row must be ()")
        arr = check_row(values, moe_cfg.num_experts, f"{field}[{i}]")
        kept = int((arr >= 0).sum())
        if moe_cfg.top_k > kept + moe_cfg.num_null_experts:
            checks.fail("model.moe.top_k", moe_cfg.top_k, f"must be <= the {kept} logical experts layer {i} keeps "
                                                          f"(model.moe.expert_map[{i}]) + null experts")


def materialise(moe_cfg: ml_collections.ConfigDict, layer: int, experts: dict) -> dict:
    """A mapped layer's stored ``{name: [S, ...]}`` as E logical experts ``{name: [E, ...]}`` (bound experts as
    copies); ValueError naming the layer when a logical expert is removed (no stored expert stands for it)."""
    map_row = row(moe_cfg, layer)
    if (map_row < 0).any():
        raise ValueError(f"model.moe.expert_map[{layer}] removes logical experts "
                         f"{np.flatnonzero(map_row < 0).tolist()}: they have no weights to write")
    return {name: value[map_row] for name, value in experts.items()}
