"""Expert math: the GLU feed-forward, batched over experts, and grouped-matmul backends.

Backends compute the GLU of every row of the expert buffer with the weights of the expert owning that row:
* 'padded': the buffer is cut into tiles of ``plan.tile`` rows, each owned by one expert; one batched matmul
  over tiles (weights gathered per tile in dropless mode). Fast on XLA:CPU, where ragged_dot is slow.
* 'ragged_dot': ``jax.lax.ragged_dot`` over the per-expert row counts (TPU/GPU).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax.dispatch import Plan

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
}
BACKENDS = ("auto", "padded", "ragged_dot")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'padded' on CPU, 'ragged_dot' on accelerators."""
    if backend == "auto":
        return "padded" if jax.default_backend() == "cpu" else "ragged_dot"
    return backend


def glu(x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, activation: str) -> jax.Array:
    """(act(x @ wi_0) * (x @ wi_1)) @ wo. x: [..., D]; wi_*: [D, F]; wo: [F, D]."""
    act = ACTIVATIONS[activation]
    return (act(x @ wi_0) * (x @ wi_1)) @ wo


def batched_glu(x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, activation: str) -> jax.Array:
    """GLU per group g with its own weights. x: [G, m, D]; wi_*: [G, D, F]; wo: [G, F, D] -> [G, m, D]."""
    act = ACTIVATIONS[activation]
    h = act(jnp.einsum("gmd,gdf->gmf", x, wi_0)) * jnp.einsum("gmd,gdf->gmf", x, wi_1)
    return jnp.einsum("gmf,gfd->gmd", h, wo)


def grouped_glu(rows: jax.Array, weights: tuple[jax.Array, jax.Array, jax.Array], plan: Plan, backend: str,
                activation: str, per_tile_weights: bool) -> jax.Array:
    """GLU of each buffer row with its expert's weights. rows: [R, D]; weights: wi_0, wi_1 [E, D, F], wo [E, F, D].

    per_tile_weights=False means tile i is expert i (capacity mode), so the weights are used as they are.
    """
    wi_0, wi_1, wo = weights
    if backend == "ragged_dot":
        act = ACTIVATIONS[activation]
        sizes = plan.expert_rows
        h = act(jax.lax.ragged_dot(rows, wi_0, sizes)) * jax.lax.ragged_dot(rows, wi_1, sizes)
        return jax.lax.ragged_dot(h, wo, sizes)
    tiles = rows.reshape(-1, plan.tile, rows.shape[-1])
    if per_tile_weights:
        wi_0, wi_1, wo = (w[plan.tile_expert] for w in weights)
    return batched_glu(tiles, wi_0, wi_1, wo, activation).reshape(rows.shape)
