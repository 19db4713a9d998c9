"""Routers: pure functions from router logits to a Routing (which experts, with what weights).

A router kind is one function ``fn(logits [T, E], cfg, ctx) -> Routing`` registered in ``ROUTERS`` with a
``RouterSpec`` that says what the router needs from the layer (an rng, the input token ids, training progress),
the facts other modules ask about it (whether it ranks experts by score, renormalises its weights, derives its
expert ids from E, handles null experts, limits the selection to groups) and checks its own config fields.
``route`` looks the spec up by ``cfg.router.kind``; routing interventions (moejax/moe/intervention.py), expert
pruning and merging (moejax/posthoc/compress.py) and the MoE layer's checks ask the spec, never the kind's name.
Every router computes in float32 whatever the compute dtype of the model. Adding a router: one function under
``@register(kind, ...)`` and a config that sets ``model.moe.router.kind``.
"""
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from moejax import checks


@struct.dataclass
class Routing:
    """The routing decision for T tokens over E experts, k slots per token.

    weights: [T, k] float32 combine weights.
    experts: [T, k] int32 expert ids; an id >= E (E itself, or a null expert of AdaMoE) marks a null slot that
             contributes nothing.
    probs:   [T, E(+m)] float32 router scores (softmax or sigmoid) used by the balance losses and metrics.
    logits:  [T, E(+m)] float32 raw router logits (z-loss); m = num_null_experts.
    """

    weights: jax.Array
    experts: jax.Array
    probs: jax.Array
    logits: jax.Array


@dataclasses.dataclass(frozen=True)
class RouterContext:
    """What a router may use besides its logits.

    bias:      [E] float32 selection-only bias (aux-loss-free balancing), or None.
    rng:       a key for routers that draw at random in training (``RouterSpec.needs_rng``), else None.
    train:     whether the layer runs in training.
    token_ids: [T] int32 input token of each position (``RouterSpec.needs_token_ids``), else None.
    progress:  [] float32 fraction of training done (``RouterSpec.needs_progress``); None outside training.
    """

    bias: jax.Array | None = None
    rng: jax.Array | None = None
    train: bool = False
    token_ids: jax.Array | None = None
    progress: jax.Array | None = None


RouterFn = Callable[[jax.Array, ml_collections.ConfigDict, RouterContext], Routing]
Validator = Callable[[ml_collections.ConfigDict, str], None]


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """A registered router: its function, what the layer must give it, what it is, and its own config checks.

    needs_rng, needs_token_ids, needs_progress: the ``RouterContext`` fields the layer fills in for it.
    ranks_by_score:   it selects by ranking ``scores + RouterContext.bias`` with ``jax.lax.top_k`` and returns its
                      slots in that order, so every routing intervention applies (mask, force, top_k, rank); False:
                      only 'scale' (moejax/moe/intervention.py).
    ranks_in_training: with ranks_by_score, False when it ranks only at evaluation (``RouterContext.train`` False).
    unranked:         why it does not rank (in training, with ranks_in_training False), for the error that refuses
                      an intervention.
    renormalises:     whether it rescales its selected weights to a fixed total (so an intervention that removes
                      slots restores that total): a bool, or a function of the ``model.moe`` section.
    ids_depend_on_num_experts: its expert ids are computed from E (e.g. a hash of the token id modulo E), so
                      removing or merging experts would remap every token: expert pruning and merging refuse it.
    null_experts:     it handles null experts (``model.moe.num_null_experts`` > 0: logits [T, E + m]).
    identity_experts: it handles identity experts (``model.moe.num_identity_experts`` z > 0: logits and
                      ``RouterContext.bias`` [T, E + z] / [E + z], ids E..E+z-1 returned as selected).
    group_limited:    it selects among the experts of ``router.topk_groups`` of ``router.num_groups`` groups.
    validate:         ``validate(cfg, prefix)`` checks the kind's own config fields (cfg the ``model.moe`` section),
                      raising ConfigError naming the field, its value and what is allowed.
    """

    fn: RouterFn
    needs_rng: bool = False
    needs_token_ids: bool = False
    needs_progress: bool = False
    ranks_by_score: bool = False
    ranks_in_training: bool = True
    unranked: str = ""
    renormalises: bool | Callable[[ml_collections.ConfigDict], bool] = False
    ids_depend_on_num_experts: bool = False
    null_experts: bool = False
    identity_experts: bool = False
    group_limited: bool = False
    validate: Validator | None = None


ROUTERS: dict[str, RouterSpec] = {}


def register(kind: str, **facts: Any) -> Callable[[RouterFn], RouterFn]:
    """Decorator adding a router function under ``cfg.router.kind == kind``; ``facts`` are ``RouterSpec``'s fields
    after ``fn`` (``needs_rng=True``, ``ranks_by_score=True``, ``validate=check``, ...). A kind already registered
    raises ValueError: pick another name."""

    def add(fn: RouterFn) -> RouterFn:
        if kind in ROUTERS:
            taken = ROUTERS[kind].fn
            raise ValueError(f"router kind {kind!r} is already registered (by {taken.__module__}."
                             f"{taken.__qualname__}): register {fn.__qualname__} under another name")
        ROUTERS[kind] = RouterSpec(fn, **facts)
        return fn

    return add


def spec(kind: str) -> RouterSpec:
    """The registered spec of ``kind``; ConfigError listing the kinds when there is none."""
    if kind not in ROUTERS:
        checks.choice("model.moe.router.kind", kind, sorted(ROUTERS))
    return ROUTERS[kind]


def renormalises(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the router of a ``model.moe`` section rescales its selected weights to a fixed total
    (``RouterSpec.renormalises``)."""
    fact = spec(cfg.router.kind).renormalises
    return bool(fact(cfg) if callable(fact) else fact)


def route(
    logits: jax.Array,
    cfg: ml_collections.ConfigDict,
    *,
    bias: jax.Array | None = None,
    rng: jax.Array | None = None,
    train: bool = False,
    token_ids: jax.Array | None = None,
    progress: jax.Array | None = None,
) -> Routing:
    """Routes tokens. logits: [T, E]; cfg: the ``model.moe`` section; the keywords are ``RouterContext``'s fields
    (bias [E], token_ids [T], progress a float32 scalar in [0, 1] or None outside training)."""
    ctx = RouterContext(bias=bias, rng=rng, train=train, token_ids=token_ids, progress=progress)
    return spec(cfg.router.kind).fn(logits.astype(jnp.float32), cfg, ctx)


def jitter(x: jax.Array, amount: float, rng: jax.Array) -> jax.Array:
    """Switch's multiplicative input noise: x * U(1 - amount, 1 + amount), elementwise."""
    noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - amount, 1.0 + amount)
    return x * noise.astype(x.dtype)


def with_bias(scores: jax.Array, bias: jax.Array | None) -> jax.Array:
    """The selection scores: scores [T, E] plus the selection-only bias [E] when there is one."""
    return scores if bias is None else scores + bias.astype(jnp.float32)


def _one_expert(cfg: ml_collections.ConfigDict, prefix: str, why: str) -> None:
    if cfg.top_k != 1:
        checks.fail(f"{prefix}.top_k", cfg.top_k, f"must be 1 with router.kind={cfg.router.kind!r} ({why})")


def group_limited(scores: jax.Array, num_groups: int, topk_groups: int, group_score: str, fill: float) -> jax.Array:
    """Keeps only the experts of the ``topk_groups`` best groups; the others' scores become ``fill``.

    scores: [T, E] with E divisible by num_groups; a group's score is its max ('max', DeepSeek-V2) or the sum of
    its two best scores ('top2_sum', DeepSeek-V3).
    """
    num_tokens, num_experts = scores.shape
    grouped = scores.reshape(num_tokens, num_groups, num_experts // num_groups)
    if group_score == "max":
        group_scores = grouped.max(-1)
    else:
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    _, best_groups = jax.lax.top_k(group_scores, topk_groups)
    keep = jnp.zeros((num_tokens, num_groups), bool).at[jnp.arange(num_tokens)[:, None], best_groups].set(True)
    keep = jnp.repeat(keep, num_experts // num_groups, axis=1)
    return jnp.where(keep, scores, jnp.asarray(fill, scores.dtype))


def _topk_fields(cfg: ml_collections.ConfigDict, prefix: str) -> None:
    """score, the group-limited selection's fields and routed_scaling_factor."""
    router = cfg.router
    checks.choice(f"{prefix}.router.score", router.score, ["softmax", "sigmoid"])
    checks.choice(f"{prefix}.router.group_score", router.group_score, ["max", "top2_sum"])
    checks.positive_int(f"{prefix}.router.num_groups", router.num_groups)
    checks.positive_int(f"{prefix}.router.topk_groups", router.topk_groups)
    if cfg.num_experts % router.num_groups:
        checks.fail(f"{prefix}.router.num_groups", router.num_groups,
                    f"must divide model.moe.num_experts={cfg.num_experts}")
    if router.topk_groups > router.num_groups:
        checks.fail(f"{prefix}.router.topk_groups", router.topk_groups,
                    f"must be <= model.moe.router.num_groups={router.num_groups}")
    if router.num_groups > 1 and router.topk_groups * (cfg.num_experts // router.num_groups) < cfg.top_k:
        checks.fail(f"{prefix}.router.topk_groups", router.topk_groups,
                    f"the kept groups hold fewer than model.moe.top_k={cfg.top_k} experts")
    if router.group_score == "top2_sum" and router.num_groups > 1 and cfg.num_experts // router.num_groups < 2:
        checks.fail(f"{prefix}.router.group_score", router.group_score,
                    "'top2_sum' needs at least 2 experts per group")
    if not (router.group_mask_fill == 0.0 or router.group_mask_fill == float("-inf")):
        checks.fail(f"{prefix}.router.group_mask_fill", router.group_mask_fill, "allowed values are 0.0, -inf")
    checks.number(f"{prefix}.router.routed_scaling_factor", router.routed_scaling_factor, strict=True)


def _topk_renormalises(cfg: ml_collections.ConfigDict) -> bool:
    """norm_topk_prob, or a softmax over the selected logits (softmax after top-k)."""
    router = cfg.router
    return bool(router.norm_topk_prob) or (router.score == "softmax" and not router.softmax_before_topk)


@register("topk", ranks_by_score=True, renormalises=_topk_renormalises, group_limited=True, identity_experts=True,
          validate=_topk_fields)
def topk(logits: jax.Array, cfg: ml_collections.ConfigDict, ctx: RouterContext) -> Routing:
    """Token-choice top-k with the knobs released checkpoints need (Mixtral, Qwen, DeepSeek-V2/V3, Megatron).

    Selection uses ``scores + bias`` (group-limited when num_groups > 1); the weights use the scores alone. With
    identity experts the E + z logits are scored alike (LongCat-Flash: a softmax over all of them, the bias over
    all of them, the selected probabilities scaled by routed_scaling_factor).
    """
    router = cfg.router
    if router.score == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        scores = probs if router.softmax_before_topk else logits
    else:
        probs = scores = jax.nn.sigmoid(logits)
    choice = with_bias(scores, ctx.bias)
    if router.num_groups > 1:
        choice = group_limited(choice, router.num_groups, router.topk_groups, router.group_score,
                               router.group_mask_fill)
    _, experts = jax.lax.top_k(choice, cfg.top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if router.score == "softmax" and not router.softmax_before_topk:
        weights = jax.nn.softmax(weights, axis=-1)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * router.routed_scaling_factor
    return Routing(weights=weights, experts=experts.astype(jnp.int32), probs=probs, logits=logits)


def _top_p_fields(cfg: ml_collections.ConfigDict, prefix: str) -> None:
    if not (isinstance(cfg.router.top_p, (int, float)) and 0 < cfg.router.top_p <= 1):
        checks.fail(f"{prefix}.router.top_p", cfg.router.top_p, "must be a number in (0, 1]")


@register("top_p", ranks_by_score=True, validate=_top_p_fields)
def top_p(logits: jax.Array, cfg: ml_collections.ConfigDict, ctx: RouterContext) -> Routing:
    """Dynamic top-p routing (Huang et al., 2024, "Harder Tasks Need More Experts"): each token takes the fewest
    highest-probability experts whose cumulative softmax probability reaches ``router.top_p``, the expert that
    crosses the threshold included (as in the released code), at most ``top_k`` of them (the static slot bound; the
    remaining slots are null, id E). Weights are the raw probabilities, not renormalised. ``bias`` (selection only)
    re-orders the candidates without changing their probabilities.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    _, experts = jax.lax.top_k(with_bias(probs, ctx.bias), cfg.top_k)
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    before = jnp.cumsum(weights, axis=-1) - weights  # probability mass of the better-ranked experts
    keep = before < cfg.router.top_p
    num_experts = logits.shape[-1]
    return Routing(weights=jnp.where(keep, weights, 0.0), experts=jnp.where(keep, experts, num_experts).astype(
        jnp.int32), probs=probs, logits=logits)


@register("adamoe", ranks_by_score=True, renormalises=True, null_experts=True)
def adamoe(logits: jax.Array, cfg: ml_collections.ConfigDict, ctx: RouterContext) -> Routing:
    """AdaMoE (Zeng et al., 2024): top-k over the E real and ``num_null_experts`` null experts (logits [T, E + m]);
    a null expert costs nothing and adds nothing. Ids >= E are null slots (dispatch skips them); the weights are
    the softmax probabilities renormalised over the real experts chosen (0 when a token picks only null ones).
    ``bias`` [E] (selection only) applies to the real experts.
    """
    num_real = cfg.num_experts
    probs = jax.nn.softmax(logits, axis=-1)
    choice = probs if ctx.bias is None else probs.at[:, :num_real].add(ctx.bias.astype(jnp.float32))
    _, experts = jax.lax.top_k(choice, cfg.top_k)
    weights = jnp.where(experts < num_real, jnp.take_along_axis(probs, experts, axis=-1), 0.0)
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights=weights, experts=experts.astype(jnp.int32), probs=probs, logits=logits)


def _expert_choice_fields(cfg: ml_collections.ConfigDict, prefix: str) -> None:
    if cfg.dispatch != "dropless":
        checks.fail(f"{prefix}.dispatch", cfg.dispatch, "expert_choice routing is balanced by construction: use "
                                                        "'dropless'")
    checks.number(f"{prefix}.router.ec_capacity", cfg.router.ec_capacity, strict=True)


@register("expert_choice", ranks_by_score=True, ranks_in_training=False,
          unranked="experts choose tokens (no per-token ranking)", validate=_expert_choice_fields)
def expert_choice(logits: jax.Array, cfg: ml_collections.ConfigDict, ctx: RouterContext) -> Routing:
    """Expert Choice (Zhou et al., 2022): in training each expert takes its C = ceil(ec_capacity * T / E) tokens
    of highest softmax score over the T tokens of the batch, so a token gets 0..E experts (slots [T, E], null
    where not picked) with its scores as weights. The choice sees every token of the batch, later positions
    included, so in a causal LM it leaks future information; evaluation (train=False) therefore routes by token
    choice, top_k of the same scores, which is causal, and the validation loss stays honest.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    choice = with_bias(probs, ctx.bias)
    num_tokens, num_experts = probs.shape
    if not ctx.train:
        _, experts = jax.lax.top_k(choice, cfg.top_k)
        return Routing(weights=jnp.take_along_axis(probs, experts, axis=-1), experts=experts.astype(jnp.int32),
                       probs=probs, logits=logits)
    per_expert = min(num_tokens, max(1, math.ceil(cfg.router.ec_capacity * num_tokens / num_experts)))
    _, picked_tokens = jax.lax.top_k(choice.T, per_expert)  # [E, C]
    picked = jnp.zeros((num_tokens, num_experts), bool).at[picked_tokens, jnp.arange(num_experts)[:, None]].set(True)
    experts = jnp.where(picked, jnp.arange(num_experts, dtype=jnp.int32)[None, :], num_experts)
    return Routing(weights=jnp.where(picked, probs, 0.0), experts=experts, probs=probs, logits=logits)


HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash (2^32 / golden ratio)


def hash_experts(token_ids: jax.Array, num_experts: int, seed: int) -> jax.Array:
    """The fixed token-id -> expert map of Hash Layers: ((id + seed) * 2654435761 mod 2^32) >> 16, mod E."""
    mixed = (token_ids.astype(jnp.uint32) + jnp.uint32(seed)) * jnp.uint32(HASH_MULTIPLIER)
    return ((mixed >> 16) % jnp.uint32(num_experts)).astype(jnp.int32)


def _hash_fields(cfg: ml_collections.ConfigDict, prefix: str) -> None:
    _one_expert(cfg, prefix, "one expert per token")
    checks.positive_int(f"{prefix}.router.hash_seed", cfg.router.hash_seed, minimum=0)


@register("hash", needs_token_ids=True, ids_depend_on_num_experts=True, validate=_hash_fields,
          unranked="its expert comes from the token id, not from a ranking of the router scores")
def hash_router(logits: jax.Array, cfg: ml_collections.ConfigDict, ctx: RouterContext) -> Routing:
    """Hash Layers (Roller et al., 2021): each token goes to the one expert its input token id hashes to, with
    weight 1; the router logits play no part in the choice (probs are still reported for the metrics)."""
    if ctx.token_ids is None:
        raise ValueError("router kind 'hash' routes by token id: call the MoE layer with token_ids (the Transformer "
                         "passes its input tokens)")
    experts = hash_experts(ctx.token_ids.reshape(-1), cfg.num_experts, cfg.router.hash_seed)[:, None]
    return Routing(weights=jnp.ones(experts.shape, jnp.float32), experts=experts,
                   probs=jax.nn.softmax(logits, axis=-1), logits=logits)


def smoe_dropout_k(cfg: ml_collections.ConfigDict, progress: jax.Array | None) -> jax.Array:
    """SMoE-Dropout's linear schedule of active experts: k(t) = k_start + round((top_k - k_start) * t / T), with
    t / T = progress; top_k when progress is None."""
    k_max = cfg.top_k
    if progress is None:
        return jnp.asarray(k_max, jnp.int32)
    k_min = cfg.router.k_start or k_max
    grown = k_min + jnp.round((k_max - k_min) * jnp.clip(progress, 0.0, 1.0))
    return grown.astype(jnp.int32)


def _smoe_dropout_fields(cfg: ml_collections.ConfigDict, prefix: str) -> None:
    for field in ("k_start", "eval_top_k"):
        checks.positive_int(f"{prefix}.router.{field}", cfg.router[field], minimum=0)
        if cfg.router[field] > cfg.top_k:
            checks.fail(f"{prefix}.router.{field}", cfg.router[field], f"must be <= model.moe.top_k={cfg.top_k}")


@register("smoe_dropout", needs_progress=True, ranks_by_score=True, renormalises=True, validate=_smoe_dropout_fields)
def smoe_dropout(logits: jax.Array, cfg: ml_collections.ConfigDict, ctx: RouterContext) -> Routing:
    """SMoE-Dropout (Chen et al., 2023): the top-k(t) experts of a random router (frozen with router.frozen), with
    weights softmax over the k(t) selected logits; k(t) grows linearly from router.k_start to top_k over training
    (``smoe_dropout_k``). Slots past k(t) are null (id E). Evaluation uses router.eval_top_k experts (0: top_k, the
    whole FFN when top_k = E): the "self-slimmable" model runs at any k."""
    num_experts, k_max = logits.shape[-1], cfg.top_k
    if ctx.train:
        active = smoe_dropout_k(cfg, ctx.progress)
    else:
        active = jnp.asarray(cfg.router.eval_top_k or k_max, jnp.int32)
    _, experts = jax.lax.top_k(with_bias(logits, ctx.bias), k_max)
    keep = jnp.arange(k_max)[None, :] < active
    selected = jnp.where(keep, jnp.take_along_axis(logits, experts, axis=-1), -jnp.inf)
    weights = jnp.where(keep, jax.nn.softmax(selected, axis=-1), 0.0)
    return Routing(weights=weights, experts=jnp.where(keep, experts, num_experts).astype(jnp.int32),
                   probs=jax.nn.softmax(logits, axis=-1), logits=logits)


def validate(cfg: ml_collections.ConfigDict, prefix: str = "model.moe") -> None:
    """Checks the router fields of a ``model.moe`` section: the kind, the fields every kind shares (the layer's
    jitter, the router kernel's bias, a frozen router), then the kind's own (``RouterSpec.validate``)."""
    router = cfg.router
    checks.choice(f"{prefix}.router.kind", router.kind, sorted(ROUTERS))
    checks.number(f"{prefix}.router.jitter", router.jitter)
    if router.jitter >= 1:
        checks.fail(f"{prefix}.router.jitter", router.jitter, "must be in [0, 1)")
    for field in ("frozen", "bias"):
        if not isinstance(router[field], bool):
            checks.fail(f"{prefix}.router.{field}", router[field], "must be True or False")
    kind_checks = ROUTERS[router.kind].validate
    if kind_checks is not None:
        kind_checks(cfg, prefix)
