"""The routers that sample experts in training, registered in ``moejax.moe.routers.ROUTERS`` when
``moejax.moe.routers`` is imported: PhiMoE's SparseMixer (``kind='sparsemixer'``) and THOR's stochastic experts
(``kind='thor'``)."""
import jax
import jax.numpy as jnp
import ml_collections

from moejax import checks
from moejax.moe.routers import RouterContext, Routing, _one_expert, register, with_bias


def _sparsemixer_fields(cfg: ml_collections.ConfigDict, prefix: str) -> None:
    checks.number(f"{prefix}.router.jitter_eps", cfg.router.jitter_eps)


SPARSEMIXER_UNRANKED = "in training it samples each slot's expert (Gumbel-max over the slot's masked logits)"


@register("sparsemixer", needs_rng=True, ranks_by_score=True, ranks_in_training=False, unranked=SPARSEMIXER_UNRANKED,
          validate=_sparsemixer_fields)
def sparsemixer(logits: jax.Array, cfg: ml_collections.ConfigDict, ctx: RouterContext) -> Routing:
    """SparseMixer as PhiMoE routes (GRIN-MoE, Liu et al., 2024, arXiv 2409.12136; transformers' ``sparsemixer``),
    one slot after the other (PhiMoE has top_k = 2; a wider top_k repeats the second slot's rule).

    Slot j: among the experts not selected yet, the best by logit (+ the selection-only ``bias``) is ``best``, with
    logit ``top``; an expert i leaves the slot's softmax when (top - s_i) / max(|s_i|, top) > 2 * router.jitter_eps
    (and so do the experts already selected); the slot's weight is that masked softmax at the slot's expert, not
    renormalised over the slots. Evaluation (train False) takes ``best``: transformers' evaluation routing exactly.

    Training samples the slot's expert from the masked softmax (Gumbel-max, the ``rng``), and its weight is the
    masked softmax at it times 1 when it is ``best`` or with probability 1/4 otherwise, else 0.3333 (Heun's
    third-order midpoint of SparseMixer); the gradient is the masked softmax's own (the factor is held out of
    it), as transformers' PhimoeMultiplier computes it. ``probs`` is the softmax of the logits (the balance
    losses and the metrics).
    """
    eps2 = 2.0 * cfg.router.jitter_eps
    sample = ctx.train
    if sample and ctx.rng is None:
        raise ValueError("router kind 'sparsemixer' samples its experts in training: pass the 'routing' rng")
    num_experts = logits.shape[-1]
    choice = with_bias(logits, ctx.bias)
    taken = jnp.zeros(logits.shape, bool)
    weights, experts = [], []
    for slot in range(cfg.top_k):
        best = jnp.argmax(jnp.where(taken, -jnp.inf, choice), axis=-1)
        top = jnp.take_along_axis(logits, best[:, None], axis=-1)
        outside = (top - logits) / jnp.maximum(jnp.abs(logits), top) > eps2
        masked = jnp.where(outside | taken, -jnp.inf, logits)
        gates = jax.nn.softmax(masked, axis=-1)
        expert = best
        if sample:
            gumbel_key, coin_key = jax.random.split(jax.random.fold_in(ctx.rng, slot))
            expert = jnp.argmax(with_bias(masked, ctx.bias) + jax.random.gumbel(gumbel_key, masked.shape), axis=-1)
        weight = jnp.take_along_axis(gates, expert[:, None], axis=-1)[:, 0]
        if sample:
            kept = (expert == best) | (jax.random.uniform(coin_key, weight.shape) > 0.75)
            factor = jnp.float32(0.3333) + jnp.float32(0.6667) * kept.astype(jnp.float32)
            weight = weight + jax.lax.stop_gradient(weight * factor - weight)
        taken = taken | jax.nn.one_hot(expert, num_experts, dtype=bool)
        weights.append(weight)
        experts.append(expert)
    return Routing(weights=jnp.stack(weights, axis=-1), experts=jnp.stack(experts, axis=-1).astype(jnp.int32),
                   probs=jax.nn.softmax(logits, axis=-1), logits=logits)


def _thor_fields(cfg: ml_collections.ConfigDict, prefix: str) -> None:
    _one_expert(cfg, prefix, "one random expert per pass")


@register("thor", needs_rng=True, validate=_thor_fields,
          unranked="its expert is drawn at random in training and every expert is averaged in evaluation")
def thor(logits: jax.Array, cfg: ml_collections.ConfigDict, ctx: RouterContext) -> Routing:
    """THOR (Zuo et al., 2022): no learned routing. In training every token of the call goes to one expert drawn
    uniformly at random (rng; one draw per layer and forward pass), with weight 1; the train step runs each batch
    twice with independent draws and adds the consistency loss (train.consistency_coef). Evaluation averages the
    outputs of all E experts (weights 1/E; top_k must be 1). The router logits play no part (probs are reported)."""
    num_tokens, num_experts = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    if ctx.train:
        if ctx.rng is None:
            raise ValueError("router kind 'thor' draws an expert at random in training: pass the 'routing' rng")
        expert = jax.random.randint(ctx.rng, (), 0, num_experts, jnp.int32)
        return Routing(weights=jnp.ones((num_tokens, 1), jnp.float32),
                       experts=jnp.full((num_tokens, 1), expert, jnp.int32), probs=probs, logits=logits)
    experts = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
    return Routing(weights=jnp.full((num_tokens, num_experts), 1.0 / num_experts, jnp.float32), experts=experts,
                   probs=probs, logits=logits)
