"""Post-update hooks: functions ``hook(state, collected) -> state`` that the train step runs after the optimizer
update, with the MoE statistics of the step's forward pass (``stats.collect``). ``from_config`` lists the hooks a
config enables.

* ``router_bias_update`` (Loss-Free Balancing, arXiv 2408.15664; DeepSeek-V3): each MoE layer's selection-only
  ``router_bias`` moves by ``rate * sign(mean load - load)`` (``model.moe.bias_update_rate`` > 0).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from moejax import moe
from moejax.moe import losses, stats

Hook = Callable[[Any, dict[stats.ModulePath, stats.RoutedStats]], Any]


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", key))


def router_bias_update(state: Any, collected: dict[stats.ModulePath, stats.RoutedStats], *, rate: float) -> Any:
    """Every router_bias in state.moe_state updated from the load its own MoE module recorded (matched by the
    module's path; scanned layers are stacked [L, E] on both sides)."""

    def update(path, bias):
        keys = tuple(_key_name(k) for k in path)
        if keys[-1] != moe.ROUTER_BIAS:
            return bias
        return losses.update_bias(bias, collected[keys[:-1]].tokens_per_expert, rate)

    return state.replace(moe_state=jax.tree_util.tree_map_with_path(update, state.moe_state))


def from_config(config: ml_collections.ConfigDict) -> tuple[Hook, ...]:
    hooks: list[Hook] = []
    if config.model.moe.bias_update_rate > 0:
        hooks.append(functools.partial(router_bias_update, rate=config.model.moe.bias_update_rate))
    return tuple(hooks)
