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

    return jax.lax.fori_loop(0, used_tiles, body, jnp.zeros_like(tiles))


def _tiled_glu_fwd(tiles, wi_0, wi_1, wo, tile_expert, activation, used_tiles):
    out = tiled_glu(tiles, wi_0, wi_1, wo, tile_expert, activation, used_tiles)
    return out, (tiles, wi_0, wi_1, wo, tile_expert, used_tiles)


def _tiled_glu_bwd(activation, res, grad_out):
    tiles, wi_0, wi_1, wo, tile_expert, used_tiles = res

    def body(i, grads):
        grad_tiles, g_wi_0, g_wi_1, g_wo = grads
        e = tile_expert[i]
        _, vjp = jax.vjp(functools.partial(glu, activation=activation), tiles[i], wi_0[e], wi_1[e], wo[e])
        d_x, d_wi_0, d_wi_1, d_wo = vjp(grad_out[i])
        return (grad_tiles.at[i].set(d_x), g_wi_0.at[e].add(d_wi_0.astype(jnp.float32)),
                g_wi_1.at[e].add(d_wi_1.astype(jnp.float32)), g_wo.at[e].add(d_wo.astype(jnp.float32)))

    zeros = [jnp.zeros(w.shape, jnp.float32) for w in (wi_0, wi_1, wo)]
    grad_tiles, *grad_w = jax.lax.fori_loop(0, used_tiles, body, (jnp.zeros_like(tiles), *zeros))
    return (grad_tiles, *(g.astype(w.dtype) for g, w in zip(grad_w, (wi_0, wi_1, wo), strict=True)), None, None)


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
