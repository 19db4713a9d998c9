"""Router losses and the aux-loss-free bias update; pure functions of routing statistics.

The losses here are unweighted: the training objective applies their coefficients (``model.moe.balance_coef``,
``device_balance_coef``, ``z_loss_coef``, ``entropy_loss_coef``; see moejax/training/objectives.py).

Scope: every balance loss takes ``probs [G, T, E]`` and ``experts [G, T, k]`` where G groups of T tokens are
balanced separately and the losses averaged over G: G = batch size for ``balance_scope='sequence'``, G = 1 for
``'batch'`` (see ``by_scope``).
"""
import jax
import jax.numpy as jnp
import ml_collections

from moejax.moe.routers import Routing


def by_scope(x: jax.Array, batch: int, scope: str) -> jax.Array:
    """[B*S, ...] -> [G, T, ...]: G=B sequences of S tokens ('sequence') or one group of all ('batch')."""
    groups = batch if scope == "sequence" else 1
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])


def assignment_fraction(experts: jax.Array, num_experts: int) -> jax.Array:
    """f_i: share of the k*T routing slots given to expert i. experts: [G, T, k] -> [G, E].

    Null slots (id E) count in the denominator kT but for no expert.
    """
    slots = experts.shape[-2] * experts.shape[-1]
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # ids >= E give zero rows
    return one_hot.sum((-3, -2)) / slots


def mean_probs(probs: jax.Array) -> jax.Array:
    """P_i: mean over tokens of the scores normalised to sum 1 per token. probs: [G, T, E] -> [G, E]."""
    return (probs / probs.sum(-1, keepdims=True)).mean(-2)


def expert_balance_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
    """E * sum_i f_i P_i averaged over groups: 1 under uniform routing.

    Switch/GShard's loss (f counted over all k assignments, normalised by kT) and DeepSeekMoE's expert-level
    loss (f'_i = E/(kT) count_i, so sum_i f'_i P_i) are this same quantity.
    """
    num_experts = probs.shape[-1]
    f = assignment_fraction(experts, num_experts)
    return (num_experts * (f * mean_probs(probs)).sum(-1)).mean()


def null_pooled_balance_loss(probs: jax.Array, experts: jax.Array, num_real: int) -> jax.Array:
    """AdaMoE's balance loss over E real + m null experts: (E + m) * sum_i f_i P_i averaged over groups, where
    every null expert's f_i is replaced by the mean f of the null experts (only their total use is balanced).
    probs: [G, T, E + m]; experts: [G, T, k] with ids in [0, E + m)."""
    num_all = probs.shape[-1]
    f = assignment_fraction(experts, num_all)
    f = jnp.concatenate([f[..., :num_real], jnp.broadcast_to(f[..., num_real:].mean(-1, keepdims=True),
                                                              f[..., num_real:].shape)], axis=-1)
    return (num_all * (f * mean_probs(probs)).sum(-1)).mean()


def device_balance_loss(probs: jax.Array, experts: jax.Array, num_devices: int) -> jax.Array:
    """DeepSeekMoE's device-level loss sum_d f'_d P'_d over D contiguous groups of experts: 1 when uniform.

    f'_d = mean of f'_j = E f_j over the group's experts; P'_d = sum of P_j over them.
    """
    num_experts = probs.shape[-1]
    f = num_experts * assignment_fraction(experts, num_experts)
    p = mean_probs(probs)
    f_dev = f.reshape(*f.shape[:-1], num_devices, -1).mean(-1)
    p_dev = p.reshape(*p.shape[:-1], num_devices, -1).sum(-1)
    return (f_dev * p_dev).sum(-1).mean()


def z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean_t (logsumexp_j z_tj)^2. logits: [T, E]."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def router_entropy(probs: jax.Array) -> jax.Array:
    """Mean over tokens of the entropy (nats) of the normalised router scores. probs: [T, E]."""
    p = probs / probs.sum(-1, keepdims=True)
    return -jnp.mean(jnp.sum(p * jnp.log(jnp.clip(p, 1e-30)), axis=-1))


def update_bias(bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing (Wang et al. 2024): b_i += rate * sign(mean_load - load_i). Shapes [E]
    (or [L, E]: L stacked layers, each balanced over its own experts)."""
    load = tokens_per_expert.astype(jnp.float32)
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)


def balance_losses(route: Routing, cfg: ml_collections.ConfigDict, batch: int) -> tuple[jax.Array, jax.Array]:
    """The unweighted (expert-level, device-level) balance losses of ``cfg.balance_loss`` over
    ``cfg.balance_scope``; route over B*S tokens, cfg the ``model.moe`` section. Expert level: ``expert_balance_loss``
    (AdaMoE's ``null_pooled_balance_loss`` with null or identity experts); device level: ``device_balance_loss``
    for 'deepseek' with a device coefficient. A loss the config does not use is 0."""
    zero = jnp.zeros((), jnp.float32)
    if cfg.balance_loss == "none":
        return zero, zero
    probs = by_scope(route.probs, batch, cfg.balance_scope)
    chosen = by_scope(route.experts, batch, cfg.balance_scope)
    if cfg.num_null_experts or cfg.get("num_identity_experts", 0):  # identity experts pooled like null ones
        return null_pooled_balance_loss(probs, chosen, cfg.num_experts), zero
    device = zero
    if cfg.balance_loss == "deepseek" and cfg.device_balance_coef:
        device = device_balance_loss(probs, chosen, cfg.device_groups)
    return expert_balance_loss(probs, chosen), device
