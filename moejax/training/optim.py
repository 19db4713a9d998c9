"""The optimizer: global-norm clipping (``train.grad_clip``; 0 disables it), AdamW with weight decay on every
parameter of rank >= 2 (not on norm scales), linear warm-up from 0 to ``train.learning_rate`` over
``train.warmup_steps``, then ``train.schedule``.

Frozen parameters are an optimizer partition by logical axis name: with ``model.moe.router.frozen`` (SMoE-Dropout)
every router kernel (logical axes ending in 'router') gets ``optax.set_to_zero`` and keeps its initialisation;
clipping and AdamW see the other parameters only.

With LoRA adapters (``model.lora.targets``, moejax/adapters/lora.py) the partition trains the adapters only: the
optimizer holds state for them alone, and the returned ``Partitioned`` names them (``trainable``) so that the train
step stops the gradient of the frozen base (moejax/training/step.py).

With ``train.router_warmup_steps`` the first steps train the routers alone (moejax/training/staging.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from moejax import checks, parallel
from moejax.adapters import lora

SCHEDULES = ("cosine", "step", "constant")


def validate(t: ml_collections.ConfigDict) -> None:
    """Checks the optimizer and schedule fields of ``config.train``."""
    checks.number("train.learning_rate", t.learning_rate, strict=True)
    checks.positive_int("train.warmup_steps", t.warmup_steps, minimum=0)
    if t.warmup_steps > t.steps:
        checks.fail("train.warmup_steps", t.warmup_steps, f"must be <= train.steps={t.steps}")
    checks.choice("train.schedule", t.schedule, SCHEDULES)
    if not (isinstance(t.min_lr_ratio, (int, float)) and 0 <= t.min_lr_ratio <= 1):
        checks.fail("train.min_lr_ratio", t.min_lr_ratio, "must be a number in [0, 1]")
    checks.number("train.step_decay_factor", t.step_decay_factor, strict=True)
    at = list(t.step_decay_at)
    if not (all(isinstance(f, (int, float)) and 0 < f < 1 for f in at) and at == sorted(set(at))):
        checks.fail("train.step_decay_at", t.step_decay_at, "must be increasing fractions of train.steps in (0, 1)")
    checks.number("train.weight_decay", t.weight_decay)
    for field in ("b1", "b2"):
        if not (isinstance(t[field], (int, float)) and 0 <= t[field] < 1):
            checks.fail(f"train.{field}", t[field], "must be a number in [0, 1)")
    checks.number("train.grad_clip", t.grad_clip)


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_steps, then cosine / step (DeepSeekMoE) / constant. ``t`` = config.train."""
    decay_steps = max(t.steps - t.warmup_steps, 1)
    if t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=t.min_lr_ratio)
    elif t.schedule == "step":  # x step_decay_factor at each fraction of all steps (warm-up included)
        boundaries: dict[int, float] = {}
        for fraction in t.step_decay_at:
            at = max(round(fraction * t.steps) - t.warmup_steps, 0)
            boundaries[at] = boundaries.get(at, 1.0) * t.step_decay_factor
        decay = optax.piecewise_constant_schedule(t.learning_rate, boundaries)
    else:
        decay = optax.constant_schedule(t.learning_rate)
    if not t.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    return optax.join_schedules([warmup, decay], [t.warmup_steps])


def frozen_labels(params: Any) -> Any:
    """'frozen' for every router kernel (logical axes ending in 'router'), 'trained' for the rest."""
    return jax.tree.map(lambda axes: "frozen" if axes[-1] == "router" else "trained",
                        parallel.param_logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))


class Partitioned(NamedTuple):
    """An optax GradientTransformation that updates the parameters ``trainable(params)`` marks True only (the
    others get zero updates and no state); the train step stops the gradient of the others."""

    init: Callable[..., Any]
    update: Callable[..., Any]
    trainable: Callable[[Any], Any]  # params -> a tree of bools like params


def adapter_labels(params: Any) -> Any:
    """'trained' for every LoRA adapter, 'frozen' for the rest (the base model)."""
    return jax.tree.map(lambda keep: "trained" if keep else "frozen", lora.trainable(params))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (weight decay on rank >= 2 parameters) after global-norm clipping; frozen routers left out; with LoRA
    adapters, everything but the adapters left out."""
    t = config.train
    adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw
    if t.get("router_warmup_steps", 0):  # Innovator's routing warm-up (moejax/training/staging.py)
        from moejax.training import staging

        staging.validate(config)
        tx = staging.router_warmup(tx, t.router_warmup_steps)
    if lora.spec(config.model) is not None:
        partition = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, adapter_labels)
        return Partitioned(partition.init, partition.update, lora.trainable)
    if config.model.moe.router.frozen:
        return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, frozen_labels)
    return tx
