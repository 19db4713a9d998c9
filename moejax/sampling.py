"""Token sampling from logits, as ``moejax.generate`` decodes.

Greedy when ``temperature == 0`` (ties go to the lowest id, as ``argmax``); otherwise the logits are
divided by the temperature, cut to the ``top_k`` largest (0: no cut), then to the nucleus ``top_p`` of the
distribution that remains (the smallest set of most likely tokens whose probability reaches top_p: a token is
kept when the mass of the tokens ranked before it is below top_p; tokens tied with the last kept one are kept
too), the order of transformers' sampling warpers, and drawn with ``rng``. ``sampling_problem`` checks the sampling
arguments before anything runs.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [..., V] with the tokens outside the top_k largest (top_k > 0) and outside the nucleus top_p (< 1) set
    to -inf (the rule of the module docstring)."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        ranked = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: the first token has nothing before it
        threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample(logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """logits [B, V] -> token ids [B] int32: argmax when temperature is 0, else a draw from the filtered
    distribution softmax(filter_logits(logits / temperature))."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def sampling_problem(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
                     vocab: int | None = None) -> tuple[str, Any, str] | None:
    """The first of ``generate``'s sampling arguments that it cannot run with, as (name, value, what is allowed);
    None when it can run with all. vocab: the model's vocabulary size (None: top_k is not compared with it)."""
    def integer(value: Any, minimum: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not integer(max_new_tokens, 1):
        return "max_new_tokens", max_new_tokens, "must be an integer >= 1"
    if not (number(temperature) and temperature >= 0):
        return "temperature", temperature, "must be a number >= 0 (0: greedy)"
    if not integer(top_k, 0):
        return "top_k", top_k, "must be an integer >= 0 (0: no top-k cut)"
    if vocab is not None and top_k > vocab:
        return "top_k", top_k, f"must be <= the vocabulary size {vocab} (0: no top-k cut)"
    if not (number(top_p) and 0.0 < top_p <= 1.0):
        return "top_p", top_p, "must be a number in (0, 1] (1: no nucleus cut)"
    return None
