"""Token dispatch: which buffer row each routed slot goes to, and the gathers that move tokens there and back.

Both modes sort the T*k routing slots by expert (stable, so ties keep token order) and lay the experts' slots out
contiguously in an expert buffer of R rows:

* capacity: expert e owns rows [e*C, (e+1)*C); its slots of rank >= C are dropped (they add 0 to the output, the
  residual passes) and counted.
* dropless: expert e owns ceil(n_e / tile) * tile rows; nothing is dropped. R is the static worst case
  (T*k + E*(tile-1)) // tile * tile. tile=1 gives the exact ragged layout for ``jax.lax.ragged_dot``.

Tokens move by index gathers only (never a [T, E, C] one-hot); each gather's gradient is again a gather, since
a row holds at most one slot.
"""
import math

import jax
import jax.numpy as jnp
from flax import struct

from moejax import vma
from moejax.moe.routers import Routing


@struct.dataclass
class Plan:
    """Where each routing slot lives in the expert buffer.

    slot_row:          [T, k] int32 buffer row of each slot; R for dropped or null slots.
    row_slot:          [R] int32 flat slot index t*k + j held by each row; T*k for empty rows.
    expert_rows:       [E] int32 rows owned by each expert, laid out in expert order.
    tile_expert:       [R // tile] int32 expert of each tile of ``tile`` rows (capacity mode: tile i = expert i).
    used_tiles:        [] int32 tiles holding at least one slot's row come first; the rest are padding.
    tokens_per_expert: [E] int32 slots routed to each expert, before any dropping.
    dropped:           [] int32 slots dropped for lack of capacity.
    tile:              rows per tile (static).
    """

    slot_row: jax.Array
    row_slot: jax.Array
    expert_rows: jax.Array
    tile_expert: jax.Array
    used_tiles: jax.Array
    tokens_per_expert: jax.Array
    dropped: jax.Array
    tile: int = struct.field(pytree_node=False)

    @property
    def num_rows(self) -> int:
        return self.row_slot.shape[0]


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * k / E) slots per expert."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def slots_per_expert(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """[E] int32: the routing slots given to each expert (ids >= E are null slots and not counted)."""
    ids = jnp.where(expert_ids < num_experts, expert_ids, num_experts).reshape(-1)
    return jnp.bincount(ids, length=num_experts + 1)[:num_experts].astype(jnp.int32)


def default_tile(num_slots: int, num_experts: int) -> int:
    """About a quarter of the mean group size, a multiple of 8: padding stays ~E*tile/2 rows, tiles few."""
    return max(8, -(-math.ceil(num_slots / num_experts / 4) // 8) * 8)


def _ranks_in_order(key: jax.Array, order: jax.Array, num_keys: int):
    """For slots sorted by key (order), each sorted slot's key, its rank among its key's slots, and the count of
    each key. key: [N] int in [0, num_keys] (num_keys: none)."""
    sorted_key = key[order]
    counts = jnp.bincount(key, length=num_keys + 1)
    rank = jnp.arange(key.shape[0]) - (jnp.cumsum(counts) - counts)[sorted_key]
    return sorted_key, rank, counts[:num_keys].astype(jnp.int32)


def _sort_slots(routing: Routing, num_experts: int, by_weight: bool):
    """Sorts the T*k slots by expert, then by token order (or by descending weight, ties in token order).

    Returns order [N] (flat slot ids in sorted order), the sorted expert ids [N] (E for null slots), each
    sorted slot's rank within its expert [N], and the slots per expert [E].
    """
    experts = routing.experts.reshape(-1)
    key = jnp.where(experts < num_experts, experts, num_experts)
    if by_weight:
        order = jnp.lexsort((-routing.weights.reshape(-1), key))
    else:
        order = jnp.argsort(key, stable=True)
    return order, *_ranks_in_order(key, order, num_experts)


def slot_ranks(keys: jax.Array, num_keys: int) -> tuple[jax.Array, jax.Array]:
    """Each slot's rank among the slots with the same key, in slot order, and the count of each key.

    keys: [N] int in [0, num_keys] (num_keys: none). Returns rank [N] int32, counts [num_keys] int32.
    """
    order = jnp.argsort(keys, stable=True)
    _, rank_sorted, counts = _ranks_in_order(keys, order, num_keys)
    return jnp.zeros(keys.shape, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32)), counts


def row_slots(slot_row: jax.Array, num_rows: int) -> jax.Array:
    """The inverse of slot_row ([T, k] or flat, R marking no row): the flat slot of each of the R rows, T*k for
    empty rows."""
    flat = slot_row.reshape(-1)
    return jnp.full(num_rows + 1, flat.shape[0], jnp.int32).at[flat].set(
        jnp.arange(flat.shape[0], dtype=jnp.int32))[:num_rows]


def _plan(order, row_sorted, num_rows, tokens_shape, **fields) -> Plan:
    slot_row = jnp.zeros(order.shape[0], jnp.int32).at[order].set(row_sorted.astype(jnp.int32))
    return Plan(slot_row=slot_row.reshape(tokens_shape), row_slot=row_slots(slot_row, num_rows), **fields)


def capacity_plan(routing: Routing, num_experts: int, capacity_per_expert: int, drop_policy: str) -> Plan:
    """Each expert keeps its first C slots by token order ('position') or by weight ('probs')."""
    order, sorted_key, rank, counts = _sort_slots(routing, num_experts, by_weight=drop_policy == "probs")
    cap = capacity_per_expert
    keep = (sorted_key < num_experts) & (rank < cap)
    num_rows = num_experts * cap
    row_sorted = jnp.where(keep, sorted_key * cap + rank, num_rows)
    return _plan(order, row_sorted, num_rows, routing.experts.shape,
                 expert_rows=jnp.full(num_experts, cap, jnp.int32),
                 tile_expert=jnp.arange(num_experts, dtype=jnp.int32),
                 used_tiles=jnp.asarray(num_experts, jnp.int32),
                 tokens_per_expert=counts,
                 dropped=(sorted_key < num_experts).sum().astype(jnp.int32) - keep.sum().astype(jnp.int32),
                 tile=cap)


def dropless_plan(routing: Routing, num_experts: int, tile: int) -> Plan:
    """Every slot gets a row; each expert's rows are padded up to a multiple of ``tile``."""
    order, sorted_key, rank, counts = _sort_slots(routing, num_experts, by_weight=False)
    num_slots = order.shape[0]
    num_tiles = (num_slots + num_experts * (tile - 1)) // tile
    num_rows = num_tiles * tile
    tiles_per_expert = -(-counts // tile)
    expert_rows = tiles_per_expert * tile
    starts = jnp.concatenate([jnp.cumsum(expert_rows) - expert_rows, jnp.array([num_rows], jnp.int32)])
    row_sorted = jnp.where(sorted_key < num_experts, starts[sorted_key] + rank, num_rows)
    tile_expert = jnp.searchsorted(jnp.cumsum(tiles_per_expert), jnp.arange(num_tiles), side="right")
    return _plan(order, row_sorted, num_rows, routing.experts.shape,
                 expert_rows=expert_rows.astype(jnp.int32),
                 tile_expert=jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32),
                 used_tiles=tiles_per_expert.sum().astype(jnp.int32),
                 tokens_per_expert=counts, dropped=jnp.zeros((), jnp.int32), tile=tile)


def append_zero_row(x: jax.Array) -> jax.Array:
    """x with a zero row appended: index len(x) then gathers 0 (dropped slots, empty rows)."""
    return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])


def row_tokens(row_slot: jax.Array, num_tokens: int, top_k: int) -> jax.Array:
    """The token of each buffer row (num_tokens for an empty row) from the flat slot t*k + j it holds."""
    return jnp.where(row_slot < num_tokens * top_k, row_slot // top_k, num_tokens)


@jax.custom_vjp
def permute(x: jax.Array, slot_row: jax.Array, row_slot: jax.Array) -> jax.Array:
    """Rows of the expert buffer: x [T, D] -> [R, D]; empty rows are 0."""
    num_tokens, top_k = slot_row.shape
    return append_zero_row(x)[row_tokens(row_slot, num_tokens, top_k)]


def _permute_fwd(x, slot_row, row_slot):
    return permute(x, slot_row, row_slot), (slot_row, row_slot, x[:0])  # x[:0]: x's type, no data


def _permute_bwd(res, grad_rows):
    slot_row, row_slot, x_type = res
    grad_x = append_zero_row(grad_rows)[slot_row].sum(1, dtype=jnp.float32).astype(grad_rows.dtype)
    return vma.sum_to_type(grad_x, x_type), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute_combine(rows: jax.Array, weights: jax.Array, slot_row: jax.Array, row_slot: jax.Array) -> jax.Array:
    """y_t = sum_j weights[t, j] * rows[slot_row[t, j]]: rows [R, D], weights [T, k] -> [T, D] (float32 sum)."""
    picked = append_zero_row(rows)[slot_row]
    return jnp.einsum("tkd,tk->td", picked, weights.astype(rows.dtype),
                      preferred_element_type=jnp.float32).astype(rows.dtype)


def _combine_fwd(rows, weights, slot_row, row_slot):
    return unpermute_combine(rows, weights, slot_row, row_slot), (rows, weights, slot_row, row_slot)


def _combine_bwd(res, grad_y):
    rows, weights, slot_row, row_slot = res
    num_tokens, top_k = slot_row.shape
    picked = append_zero_row(rows)[slot_row]
    grad_weights = jnp.einsum("tkd,td->tk", picked, grad_y.astype(rows.dtype),
                              preferred_element_type=jnp.float32).astype(weights.dtype)
    row_weight = append_zero_row(weights.reshape(-1))[row_slot]
    row_grad = append_zero_row(grad_y)[row_tokens(row_slot, num_tokens, top_k)]
    grad_rows = (row_grad.astype(jnp.float32) * row_weight[:, None].astype(jnp.float32)).astype(rows.dtype)
    return vma.sum_to_type(grad_rows, rows), vma.sum_to_type(grad_weights, weights), None, None


unpermute_combine.defvjp(_combine_fwd, _combine_bwd)
