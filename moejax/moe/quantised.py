"""Routed experts held as int codes and scales (weight-only quantised decoding, moejax/quant/decode.py): the
``QuantisedWeight`` pytree and the routed-expert path the MoE pipeline takes when expert weights arrive quantised.

A decoding step routes T*k slots, far fewer than E experts. ``routed_experts`` then gathers the codes and scales of
the (at most T*k) distinct experts the slots select, in ascending id, renumbers the slots' experts 0..G-1 among
them, and runs the usual dispatch -> experts -> combine on those G experts only:

* ``kernel='jnp'``: the gathered codes are dequantised (``codes * scale`` in float32, cast to the weight's dtype:
  the values of the fake-quantised model) and run on the resolved grouped-matmul backend. Each tile holds the same
  rows, in the same order, as with all E float experts, so the outputs equal the fake-quantised layer's bit for bit.
* ``kernel='pallas'`` (``model.moe.dispatch_kernel``): Pallas permute / combine and moejax/kernels/quant_gmm.py's
  grouped matmul, which dequantises the codes tile by tile inside the kernel (no float copy of an expert).

Where the slots are at least as many as the experts (a prefill), or a weight's codes cannot be split per expert
(scanned layers; int4 with an odd output width), every expert is dequantised and the layer runs as with float
weights. Float leaves beside the quantised ones (GPT-OSS biases, LoRA adapters) are gathered alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.moe.routers import Routing


@dataclasses.dataclass(frozen=True)
class QuantisedWeight:
    """One parameter as int codes and float32 scales. ``codes``: int8 [B, K, N] (bits > 4); bits <= 4: two's
    complement nibbles two per byte, uint8 [B, K, N / 2] when N is even (byte c of a row holds output c in its low
    nibble and output c + N / 2 in its high one: unpacking is a concatenation; with adjacent outputs sharing a byte
    the interleave made a one-token forward on XLA:CPU about 1.4x slower), else flat [ceil(B K N / 2)] in
    ``moejax.quant.formats.pack``'s order (consecutive codes, the first in the low nibble). ``scales`` [B,
    ceil(K / G), N] (G = group, or K per output channel). ``shape`` and ``dtype`` are those of the parameter, [B, K,
    N] its ``Matrix`` view. Inside shard_map a stacked weight holds its device's experts: B is read from codes."""

    codes: Any
    scales: Any
    bits: int
    group: int
    view: tuple[int, int, int]
    shape: tuple[int, ...]
    dtype: str

    @property
    def stacked(self) -> bool:
        """Whether the codes split per expert: a [E, K, N] parameter with codes [E, K, N] or [E, K, N / 2]."""
        return len(self.shape) == 3 and tuple(self.shape[1:]) == tuple(self.view[1:]) and np.ndim(self.codes) == 3

    @property
    def rows(self) -> int:
        """B of the codes held (the experts on this device for a stacked weight)."""
        return int(np.shape(self.codes)[0]) if self.stacked else self.view[0]

    @property
    def group_size(self) -> int:
        """Inputs per scale: the group, or K per output channel."""
        k = self.view[1]
        return min(self.group, k) if self.group else k

    def grid(self) -> jax.Array:
        """The codes as float32 [B, K, N] (jax.numpy)."""
        b, (_, k, n) = self.rows, self.view
        if self.bits > 4:
            return jnp.asarray(self.codes).astype(jnp.float32)
        packed = jnp.asarray(self.codes)
        if packed.ndim == 3:  # output halves: sign-extend the low nibble by shifts, the high one by one shift
            signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
            return jnp.concatenate([(signed << 4) >> 4, signed >> 4], axis=-1).astype(jnp.float32)
        nibbles = jnp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:b * k * n].astype(jnp.int8)
        return jnp.where(nibbles >= 8, nibbles - 16, nibbles).reshape(b, k, n).astype(jnp.float32)

    def dequantise(self) -> jax.Array:
        """codes * scales in float32, cast to dtype, in the parameter's shape (jax.numpy)."""
        grid, b, (_, k, n) = self.grid(), self.rows, self.view
        gk = self.group_size
        scales = jnp.asarray(self.scales, jnp.float32)
        if k % gk == 0:  # each scale over its whole group, without repeating the scales
            w = (grid.reshape(b, k // gk, gk, n) * scales[:, :, None, :]).reshape(b, k, n)
        else:
            w = grid * jnp.repeat(scales, gk, axis=1)[:, :k]
        return w.astype(self.dtype).reshape((b, *self.shape[1:]) if self.stacked else self.shape)

    def take(self, ids: jax.Array) -> QuantisedWeight:
        """The experts ids [G] of a stacked weight (their codes and scales gathered)."""
        count = int(ids.shape[0])
        return dataclasses.replace(self, codes=jnp.asarray(self.codes)[ids], scales=jnp.asarray(self.scales)[ids],
                                   view=(count, *self.view[1:]), shape=(count, *self.shape[1:]))

    def pad(self, count: int) -> QuantisedWeight:
        """A stacked weight with ``count`` zero experts appended (codes and scales 0)."""
        widths = lambda x: ((0, count),) + ((0, 0),) * (np.ndim(x) - 1)  # noqa: E731
        b = self.rows + count
        return dataclasses.replace(self, codes=jnp.pad(self.codes, widths(self.codes)),
                                   scales=jnp.pad(self.scales, widths(self.scales)), view=(b, *self.view[1:]),
                                   shape=(b, *self.shape[1:]))

    @property
    def nbytes(self) -> int:
        return int(np.asarray(self.codes).nbytes + np.asarray(self.scales).nbytes)


jax.tree_util.register_dataclass(QuantisedWeight, data_fields=["codes", "scales"],
                                 meta_fields=["bits", "group", "view", "shape", "dtype"])


def is_weight(x: Any) -> bool:
    return isinstance(x, QuantisedWeight)


def any_quantised(weights: tuple) -> bool:
    return any(is_weight(w) for w in weights)


def dequantised(weights: tuple, dtype: Any) -> tuple:
    """Every QuantisedWeight among weights dequantised, then cast to the compute dtype (as the layer casts float
    weights)."""
    return tuple(w.dequantise().astype(dtype) if is_weight(w) else w for w in weights)


def selected(expert_ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(used [G], local): the distinct experts among expert_ids [T, k] in ascending id, G = min(T k, E) (the
    unused entries repeat expert E - 1 and no slot points at them), and each slot's index among them (G for a null
    slot, id >= E)."""
    flat = expert_ids.reshape(-1)
    count = min(flat.shape[0], num_experts)
    valid = flat < num_experts
    present = jnp.zeros(num_experts + 1, bool).at[jnp.where(valid, flat, num_experts)].set(True)[:num_experts]
    used = jnp.nonzero(present, size=count, fill_value=num_experts)[0].astype(jnp.int32)
    local = jnp.where(valid, jnp.searchsorted(used, flat), count).astype(jnp.int32)
    return jnp.minimum(used, num_experts - 1), local.reshape(expert_ids.shape)


def gathers(weights: tuple, num_slots: int, num_experts: int) -> bool:
    """Whether the step reads only its selected experts: fewer slots than experts, every weight split per expert."""
    return num_slots < num_experts and all(w.stacked for w in weights if is_weight(w))


def routed_experts(run, tokens: jax.Array, route: Routing, expert, weights: tuple, *, num_experts: int,
                   backend: str, kernel: str, tile: int, capacity: int | None = None, drop_policy: str = "position",
                   slot_inputs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``run`` (``moejax.moe.pipeline.routed_experts``, which calls this) with QuantisedWeight expert weights (same
    arguments, same result as the dequantised weights give): the selected experts only when ``gathers``, else all
    of them dequantised."""
    options = dict(backend=backend, kernel=kernel, tile=tile, capacity=capacity, drop_policy=drop_policy,
                   slot_inputs=slot_inputs)
    if not gathers(weights, route.experts.size, num_experts):
        full = dequantised(weights, tokens.dtype)
        return run(tokens, route, expert, full, num_experts=num_experts, **options)
    used, local = selected(route.experts, num_experts)
    picked = tuple(w.take(used) if is_weight(w) else jnp.asarray(w)[used] for w in weights)
    route = dataclasses.replace(route, experts=local)
    if kernel == "pallas" and slot_inputs is None and _kernel_takes(picked):
        return _pallas_experts(tokens, route, expert, picked, int(used.shape[0]), capacity, drop_policy)
    return run(tokens, route, expert, dequantised(picked, tokens.dtype),
                                   num_experts=int(used.shape[0]), **options)


def _kernel_takes(weights: tuple) -> bool:
    from moejax.kernels import quant_gmm

    return all(quant_gmm.supports(w.view[1], w.view[2], w.bits, w.group_size) for w in weights if is_weight(w))


def _pallas_experts(tokens, route, expert, weights, num_experts, capacity, drop_policy):
    """Dispatch -> experts -> combine with the Pallas dispatch kernels and the dequantising grouped matmul
    (moejax/kernels/quant_gmm.py) on rows in tiles of ``quant_gmm.TILE_ROWS`` per expert."""
    from moejax.kernels import dispatch as pallas_dispatch
    from moejax.kernels import quant_gmm
    from moejax.moe import dispatch

    if capacity is not None:
        plan = dispatch.capacity_plan(route, num_experts, capacity, drop_policy)
    else:
        plan = dispatch.dropless_plan(route, num_experts, quant_gmm.TILE_ROWS)
    rows = pallas_dispatch.permute(tokens, plan.slot_row, plan.row_slot)

    def matmul(lhs: jax.Array, rhs: Any) -> jax.Array:  # lhs [R, K] in tiles of plan.tile rows
        tiles = lhs.reshape(-1, plan.tile, lhs.shape[-1])
        if is_weight(rhs):
            out = quant_gmm.tiled_matmul(tiles, plan.tile_expert, rhs.codes, rhs.scales, bits=rhs.bits,
                                         group=rhs.group_size, n=rhs.view[2])
        else:
            out = jnp.einsum("tmk,tkn->tmn", tiles, rhs[plan.tile_expert], preferred_element_type=jnp.float32)
        return out.astype(lhs.dtype).reshape(lhs.shape[0], -1)

    rows = expert.apply_ragged(rows, weights, matmul)
    return pallas_dispatch.unpermute_combine(rows, route.weights, plan.slot_row, plan.row_slot), plan.dropped
