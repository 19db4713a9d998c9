"""The acceptance rule of speculative decoding (moejax/speculative.py), greedy and sampled.

Sampled (Leviathan et al. 2023, arXiv 2211.17192, Algorithm 1; Chen et al. 2023, arXiv 2302.01318, Algorithm 2):
the draft proposed x_1..x_gamma, drawn from its distributions q_1..q_gamma; the target's distributions at the same
positions are p_1..p_{gamma+1} (p_{gamma+1} after the last proposal). Proposal i is accepted when
u_i < min(1, p_i(x_i) / q_i(x_i)), u_i ~ U[0, 1), and the first rejected one is replaced by a draw from the residual
norm(max(0, p_i - q_i)); when all gamma are accepted, a bonus token is drawn from p_{gamma+1}. The tokens kept are
then distributed exactly as the target's own sampling (the papers' Theorem 3.5 / Theorem 1). Both p and q are the
distributions sampling actually draws from: softmax of the logits over the temperature, cut to top-k and top-p
(moejax/sampling.py).

Greedy (temperature 0): the proposals equal to the target's argmax are kept, up to the first that differs, which
becomes the target's argmax (the limit of the rule above with one-hot p and q).

Draws from a distribution use one uniform each, by the inverse of its cumulative distribution (``draw``), so a
numpy transcription with the same uniforms gives the same tokens (tests/inference/test_speculative_sampling.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import sampling


def probabilities(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [..., V] -> the distribution sampling draws from at this temperature (> 0), top-k and top-p."""
    return jax.nn.softmax(sampling.filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p), axis=-1)


def draw(weights: jax.Array, u: jax.Array) -> jax.Array:
    """weights [..., V] >= 0 (not necessarily normalised), u [...] in [0, 1) -> the first token whose cumulative
    weight exceeds u * total weight (int32): a draw from weights / total. Tokens of weight 0 are never drawn."""
    cumulative = jnp.cumsum(weights.astype(jnp.float32), axis=-1)
    threshold = u[..., None] * cumulative[..., -1:]
    return jnp.minimum(jnp.sum(cumulative <= threshold, axis=-1), weights.shape[-1] - 1).astype(jnp.int32)


def accept_sampled(p: jax.Array, q: jax.Array, proposals: jax.Array, u_accept: jax.Array,
                   u_fix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """p [B, G + 1, V] the target's distributions, q [B, G, V] the draft's, proposals [B, G] int (drawn from q),
    u_accept [B, G] and u_fix [B] uniforms in [0, 1) -> (accepted [B] int32: the proposals kept before the first
    rejection, fix [B] int32: the token after them: the residual draw at the first rejection, or the bonus draw from
    p[:, G] when all G are kept)."""
    gamma = proposals.shape[1]
    p_x = jnp.take_along_axis(p[:, :gamma], proposals[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, proposals[..., None], axis=-1)[..., 0]
    ok = u_accept * q_x < p_x  # u < p / q, without dividing (q_x > 0: the draft drew x)
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # no residual after the last: the bonus from p
    rows = jnp.arange(p.shape[0])
    p_at, q_at = p[rows, accepted], q_pad[rows, accepted]
    residual = jnp.maximum(p_at - q_at, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_at)
    return accepted, draw(residual, u_fix)


def accept_greedy(logits: jax.Array, proposals: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B, G + 1, V] of the target, proposals [B, G] -> (accepted [B]: the leading proposals equal to the
    target's argmax, fix [B]: the target's argmax after them)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    gamma = proposals.shape[1]
    accepted = jnp.sum(jnp.cumprod((proposals == greedy[:, :gamma]).astype(jnp.int32), axis=1), axis=1)
    return accepted.astype(jnp.int32), jnp.take_along_axis(greedy, accepted[:, None], axis=1)[:, 0]


def next_tokens(accepted: jax.Array, fix: jax.Array, proposals: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rows of a batch advance together by n = the fewest proposals any row kept: (n, each row's token after its
    n kept proposals: its own proposal n + 1 where the row kept more (accepted, so distributed as the target's
    sampling), else its fix)."""
    n = jnp.min(accepted)
    padded = jnp.concatenate([proposals, fix[:, None]], axis=1)
    return n, jnp.where(accepted > n, padded[:, n], fix)


def picker(temperature: float, top_k: int = 0, top_p: float = 1.0):
    """``pick(logits [B, V], rng) -> (tokens [B] int32, the distribution drawn from [B, V], or None when greedy)``."""
    if temperature == 0:
        return lambda logits, rng: (jnp.argmax(logits, axis=-1).astype(jnp.int32), None)

    def pick(logits: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        dist = probabilities(logits, temperature, top_k, top_p)
        return draw(dist, jax.random.uniform(rng, logits.shape[:-1])), dist

    return pick
