"""Expert math: the GLU feed-forward and the grouped-matmul backends that run it per expert.

Backends compute the GLU of every row of the expert buffer with the weights of the expert owning that row:
* 'tiled': the buffer is cut into tiles of ``plan.tile`` rows, each owned by one expert; a loop over the used
  tiles runs plain matmuls with that expert's weights. Fast on XLA:CPU, where ragged_dot is slow.
* 'ragged_dot': ``jax.lax.ragged_dot`` over the per-expert row counts (TPU/GPU).
"""
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax import vma
from moejax.dispatch import Plan

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
}
BACKENDS = ("auto", "tiled", "ragged_dot")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'tiled' on CPU, 'ragged_dot' on accelerators."""
    if backend == "auto":
        return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
    return backend


def glu(x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, activation: str) -> jax.Array:
    """(act(x @ wi_0) * (x @ wi_1)) @ wo. x: [..., D]; wi_*: [D, F]; wo: [F, D]."""
    act = ACTIVATIONS[activation]
    return (act(x @ wi_0) * (x @ wi_1)) @ wo


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def tiled_glu(tiles: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, tile_expert: jax.Array,
              activation: str, used_tiles: jax.Array) -> jax.Array:
    """GLU of each tile with its expert's weights, looping over the ``used_tiles`` first tiles only.

    tiles: [G, m, D]; wi_*: [E, D, F]; wo: [E, F, D]; tile_expert: [G] int32 -> [G, m, D], unused tiles 0.
    A loop of plain matmuls reads each expert's weights in place (no [G, D, F] gather) and skips the padding
    tiles that the static worst-case layout reserves.
    """

    def body(i, out):
        e = tile_expert[i]
        return out.at[i].set(glu(tiles[i], wi_0[e], wi_1[e], wo[e], activation))

    init = vma.varying_like(jnp.zeros_like(tiles), tiles, wi_0, wi_1, wo, tile_expert)
    return jax.lax.fori_loop(0, used_tiles, body, init)


def _tiled_glu_fwd(tiles, wi_0, wi_1, wo, tile_expert, activation, used_tiles):
    out = tiled_glu(tiles, wi_0, wi_1, wo, tile_expert, activation, used_tiles)
    return out, (tiles, wi_0, wi_1, wo, tile_expert, used_tiles)


def _tiled_glu_bwd(activation, res, grad_out):
    tiles, wi_0, wi_1, wo, tile_expert, used_tiles = res

    def tile_grads(i):
        e = tile_expert[i]
        _, vjp = jax.vjp(functools.partial(glu, activation=activation), tiles[i], wi_0[e], wi_1[e], wo[e])
        return e, vjp(grad_out[i])

    def accumulate(i, grads, e, tile, live=True):
        grad_tiles, *grad_w = grads
        d_x, *d_w = (jnp.where(live, d, 0) for d in tile)
        grad_w = (g.at[e].add(d.astype(jnp.float32)) for g, d in zip(grad_w, d_w, strict=True))
        return (grad_tiles.at[i].set(d_x), *grad_w)

    # The first tile runs outside the loop so that the carry takes the types (inside shard_map: the varying
    # axes) that jax.vjp gives the per-tile gradients; it counts only when some tile is used.
    zeros = (jnp.zeros_like(tiles), *(jnp.zeros(w.shape, jnp.float32) for w in (wi_0, wi_1, wo)))
    first = accumulate(0, zeros, *tile_grads(0), live=used_tiles > 0)
    grad_tiles, *grad_w = jax.lax.fori_loop(1, used_tiles, lambda i, g: accumulate(i, g, *tile_grads(i)), first)
    grad_w = [vma.sum_to_type(g.astype(w.dtype), w) for g, w in zip(grad_w, (wi_0, wi_1, wo), strict=True)]
    return (vma.sum_to_type(grad_tiles, tiles), *grad_w, None, None)


tiled_glu.defvjp(_tiled_glu_fwd, _tiled_glu_bwd)


def grouped_glu(rows: jax.Array, weights: tuple[jax.Array, jax.Array, jax.Array], plan: Plan, backend: str,
                activation: str) -> jax.Array:
    """GLU of each buffer row with its expert's weights. rows: [R, D]; weights: wi_0, wi_1 [E, D, F], wo [E, F, D]."""
    wi_0, wi_1, wo = weights
    if backend == "ragged_dot":
        act = ACTIVATIONS[activation]
        sizes = plan.expert_rows
        h = act(jax.lax.ragged_dot(rows, wi_0, sizes)) * jax.lax.ragged_dot(rows, wi_1, sizes)
        return jax.lax.ragged_dot(h, wo, sizes)
    tiles = rows.reshape(-1, plan.tile, rows.shape[-1])
    return tiled_glu(tiles, wi_0, wi_1, wo, plan.tile_expert, activation, plan.used_tiles).reshape(rows.shape)
