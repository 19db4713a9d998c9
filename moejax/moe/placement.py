"""Expert placement with replicas: which physical expert slots hold which stored expert, for expert parallelism
with redundant experts (DeepSeek's EPLB, vLLM's and SGLang's redundant experts). ``model.moe.expert_placement``:

    ()                        no placement: physical slot p holds stored expert p
    (row_0, ..., row_{L-1})   one row per model layer (``model.num_layers`` rows): () for a dense layer, P ints
                              for every MoE layer, row[p] the stored expert physical slot p holds (every stored
                              expert in at least one slot; P the same in every MoE layer)

The routed experts' weights then hold P physical experts (``experts/<name>`` [P, ...], replicas are copies), and
the expert-parallel layer splits them over the 'expert' axis in slot order (device d holds slots d*P/ep ..
(d+1)*P/ep - 1): a plan (moejax/posthoc/placement.py) orders the slots so that each device gets its pack. A slot
routed to stored expert s goes to replica ``(token index) mod c_s`` of its c_s replicas (in slot order): replicas
split their expert's tokens evenly, deterministically, the same on one device and on a mesh; the output equals the
model without a placement (the replicas are copies). Stored ids come from the expert map (moejax/moe/expert_map.py):
logical -> stored -> physical.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checks


def rows(moe_cfg: ml_collections.ConfigDict) -> tuple[tuple[int, ...], ...]:
    """The placement's rows as tuples (JSON gives lists); () without a placement."""
    return tuple(tuple(int(v) for v in row) for row in (moe_cfg.get("expert_placement") or ()))


def has_placement(moe_cfg: ml_collections.ConfigDict) -> bool:
    return any(len(row) for row in rows(moe_cfg))


def physical_count(moe_cfg: ml_collections.ConfigDict) -> int | None:
    """P, the physical experts of every MoE layer; None without a placement."""
    counts = {len(row) for row in rows(moe_cfg) if row}
    return counts.pop() if counts else None


def tables(row: Sequence[int], num_stored: int) -> tuple[np.ndarray, np.ndarray]:
    """(replicas [S, R] int32: the physical slots of each stored expert in slot order, padded with -1; counts [S])."""
    row = np.asarray(row, np.int64)
    counts = np.bincount(row, minlength=num_stored).astype(np.int32)
    width = max(int(counts.max()), 1)
    replicas = np.full((num_stored, width), -1, np.int32)
    for s in range(num_stored):
        slots = np.flatnonzero(row == s)
        replicas[s, :len(slots)] = slots
    return replicas, counts


def layer_tables(moe_cfg: ml_collections.ConfigDict, layer: int | jax.Array, num_stored: int
                 ) -> tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]:
    """``tables`` of model layer ``layer`` (a Python int) or gathered from every layer's tables (a traced index under
    nn.scan; dense layers get the identity)."""
    all_rows = rows(moe_cfg)
    if isinstance(layer, (int, np.integer)):
        return tables(all_rows[int(layer)], num_stored)
    per_layer = [tables(row, num_stored) if row else tables(np.arange(num_stored), num_stored) for row in all_rows]
    width = max(t[0].shape[1] for t in per_layer)
    replicas = np.stack([np.pad(t[0], ((0, 0), (0, width - t[0].shape[1])), constant_values=-1) for t in per_layer])
    counts = np.stack([t[1] for t in per_layer])
    return jnp.asarray(replicas)[layer], jnp.asarray(counts)[layer]


def to_physical(stored: jax.Array, replicas: jax.Array, counts: jax.Array, num_stored: int, num_physical: int
                ) -> jax.Array:
    """Stored expert ids [T, k] -> physical slots: replica (token index mod count) of the slot's stored expert; null
    ids (>= S) become ids >= P."""
    replicas, counts = jnp.asarray(replicas), jnp.asarray(counts)
    live = stored < num_stored
    safe = jnp.where(live, stored, 0)
    token = jnp.arange(stored.shape[0], dtype=jnp.int32)[:, None]
    choice = token % jnp.maximum(counts[safe], 1)
    return jnp.where(live, replicas[safe, choice], num_physical + (stored - num_stored)).astype(stored.dtype)


def validate(model_cfg: ml_collections.ConfigDict, moe_layers: Sequence[int], stored_counts: dict[int, int]) -> None:
    """ConfigError naming ``model.moe.expert_placement`` when the placement does not fit the model."""
    all_rows = rows(model_cfg.moe)
    if not all_rows:
        return
    field = "model.moe.expert_placement"
    if len(all_rows) != model_cfg.num_layers:
        checks.fail(field, f"<{len(all_rows)} rows>", f"needs one row per model layer (model.num_layers="
                                                      f"{model_cfg.num_layers}), () for a dense layer")
    moe_set = set(moe_layers)
    sizes = set()
    for i, row in enumerate(all_rows):
        if i not in moe_set:
            if row:
                checks.fail(f"{field}[{i}]", row, f"layer {i} is dense: its row must be ()")
            continue
        stored = stored_counts[i]
        arr = np.asarray(row)
        if not row or (arr < 0).any() or (arr >= stored).any() or len(set(arr.tolist())) != stored:
            checks.fail(f"{field}[{i}]", row, f"must list, for each physical slot, a stored expert id in [0, "
                                              f"{stored}), every one of them at least once")
        sizes.add(len(row))
    if len(sizes) > 1:
        checks.fail(field, f"<rows of {sorted(sizes)} slots>", "every MoE layer must have the same number of "
                                                               "physical slots")
