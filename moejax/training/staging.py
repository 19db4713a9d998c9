"""The routing warm-up of Innovator's staged upcycling (Liao et al. 2025, "Innovator: Scientific Continued
Pretraining with Fine-grained MoE Upcycling", arXiv 2507.18671; docs/methods.md#innovators-staged-upcycling).

``train.router_warmup_steps = N`` (0: off): for the first N optimizer steps of a run only the MoE routers train.
Every parameter outside a router (a path without a ``router`` / ``router_<c>`` module) gets a zero gradient before
clipping and AdamW (so the clipping norm is the routers' own) and a zero update after them (so weight decay does
not move it either); from step N every parameter trains. The count is the optimizer's own (``WarmupState.count``,
saved in the checkpoint's optimizer state): a resumed run continues it, a run started from other weights
(``init_from``, upcycling) counts from 0. The other parameters' AdamW moments stay zero during the warm-up and the
AdamW step count and the learning-rate schedule run on, as one optimizer over every parameter does.

The staged data that goes with it (Innovator trains the warm-up on domain data, then general and domain data
together) is ``data.mix`` / ``data.mix_stages`` (moejax/data/mixing.py).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from moejax import checks, model, moe


def is_router_path(path: tuple) -> bool:
    """Whether a parameter path lies in an MoE router module ('router', or Chain-of-Experts' 'router_<c>')."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return any(n == moe.ROUTER or (n.startswith(moe.ROUTER + "_") and n[len(moe.ROUTER) + 1:].isdigit())
               for n in names)


def router_mask(params: Any) -> Any:
    """A tree of Python bools like params: True for the router parameters."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_router_path(path), params)


class WarmupState(NamedTuple):
    count: jax.Array  # optimizer steps taken (int32)
    inner: Any  # the wrapped optimizer's state


def router_warmup(tx: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """tx that trains the routers only while fewer than ``steps`` updates have been taken (module docstring)."""

    def init(params: Any) -> WarmupState:
        return WarmupState(jnp.zeros((), jnp.int32), tx.init(params))

    def update(grads: Any, state: WarmupState, params: Any = None) -> tuple[Any, WarmupState]:
        warm = state.count < steps
        mask = router_mask(grads)

        def frozen_in_warmup(is_router: bool, x: Any) -> Any:
            return x if is_router else jnp.where(warm, jnp.zeros_like(x), x)

        grads = jax.tree.map(frozen_in_warmup, mask, grads)
        updates, inner = tx.update(grads, state.inner, params)
        updates = jax.tree.map(frozen_in_warmup, mask, updates)
        return updates, WarmupState(state.count + 1, inner)

    return optax.GradientTransformation(init, update)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks ``train.router_warmup_steps`` against the run; ConfigError naming the field, the value and what is
    allowed."""
    steps = config.train.router_warmup_steps
    checks.positive_int("train.router_warmup_steps", steps, minimum=0)
    if not steps:
        return
    if steps > config.train.steps:
        checks.fail("train.router_warmup_steps", steps, f"must be <= train.steps={config.train.steps}")
    if not model.moe_layers(config.model):
        checks.fail("train.router_warmup_steps", steps, "trains the MoE routers alone: the model has no MoE layer "
                                                        "(model.moe_every=0); use 0")
    if config.model.moe.router.frozen:
        checks.fail("train.router_warmup_steps", steps, "trains the routers alone, but model.moe.router.frozen=True "
                                                        "freezes them; use 0 or unfreeze the routers")
    if tuple(config.model.lora.targets):
        checks.fail("train.router_warmup_steps", steps, "cannot be combined with LoRA adapters "
                                                        "(model.lora.targets), which train the adapters alone; use 0")
