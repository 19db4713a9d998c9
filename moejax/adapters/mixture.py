"""Mixtures of LoRA experts: every weight that ``model.lora.targets`` picks gains E LoRA experts and a router over
them (``model.lora.mixture``), in place of its one adapter.

For a picked weight W [in..., out...] (n_in input axes) and its input x:

    g = route(x W_r)                            W_r [in..., E] (``<name>_moe_lora_router``), float32
    y = x W + scaling * sum_e g_e (drop_e(x) A_e) B_e     A [E, in..., r], B [E, r, out...]
                                                          (``<name>_moe_lora_a``, ``<name>_moe_lora_b``)

g comes from the router registry's 'topk' router (moejax/moe/routers.py) with softmax scores: top_k = 0 takes every
expert with its softmax weight (LoRAMoE, arXiv 2312.09979, as its released code computes it: a dense softmax over
the E experts of each adapted linear), top_k = k keeps the k best and renormalises their weights (MoLA, arXiv
2402.08562, as its code does). Each expert draws its own dropout mask (both papers' code call the dropout once per
expert). E may differ by model layer (``per_layer``: MoLA's "higher layers need more experts"). A, B and W_r
start as LoRA's A, B and the authors' router (kaiming-uniform, torch nn.Linear's), so the adapted model computes
its base until it trains.

Every adapted linear sows one ``stats.RoutedStats`` record per call under ``'moe_aux'/<module>/<name>_lora_stats``
and its routing under ``<name>_lora_routing`` (routing traces: moejax/adapters/mixture_trace.py); the MoE layers'
``stats`` collector reads neither, ``collect`` here reads the records: tokens per expert, router entropy
and the unweighted balance loss of ``balance``: 'loramoe' (the localized balancing constraint, ``loramoe_balance``)
or 'switch' (moejax/moe/losses.py ``expert_balance_loss``); ``weighted_losses`` is what the objective adds.

A routing intervention (moejax/moe/intervention.py: mask, force, scale, top_k, rank) reaches a router through the
variable collection ``lora_intervention`` (``<name>`` at the module's path: moejax/adapters/mixture_intervention.py
builds it); the layer then applies it as the MoE layer does (``intervene.selection_bias``, ``intervene.apply``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import checks
from moejax.moe import intervene, losses, routers, stats

BALANCES = ("loramoe", "switch", "none")
STEM = "_moe"  # <name>_moe_lora_a, <name>_moe_lora_b: the experts' A and B
ROUTER_SUFFIX = "_moe_lora_router"
STATS_SUFFIX = "_lora_stats"
ROUTING_SUFFIX = "_lora_routing"  # (experts [T, k], weights [T, k], probs [T, E]) per call: traces (mixture_trace.py)
INTERVENTION = "lora_intervention"  # variable collection of routing interventions (mixture_intervention.py)
_LAYER = re.compile(r"^layers_(\d+)$")


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    """A ``model.lora.mixture`` section with experts, as the modules read it (frozen, hashable)."""

    num_experts: int
    per_layer: tuple[int, ...] = ()
    top_k: int = 0
    balance: str = "loramoe"
    balance_coef: float = 0.0
    blc_alpha: float = 0.0
    task_type: int = -1
    ranks: tuple[int, ...] = ()  # rank-heterogeneous experts: expert e's rank; () = model.lora.rank for all

    def experts_at(self, layer: int | None) -> int:
        """E at a model layer (``per_layer`` when set; layer None: outside the numbered layers)."""
        if not self.per_layer:
            return self.num_experts
        if layer is None or layer >= len(self.per_layer):
            raise ValueError(f"model.lora.mixture.per_layer={self.per_layer} has no count for layer {layer}")
        return self.per_layer[layer]

    def router_config(self, num_experts: int) -> ml_collections.ConfigDict:
        """The ``model.moe``-like section the registry's 'topk' router reads for E experts."""
        router = ml_collections.ConfigDict(dict(
            kind="topk", score="softmax", softmax_before_topk=True, norm_topk_prob=self.top_k > 0,
            routed_scaling_factor=1.0, num_groups=1, topk_groups=1, group_score="max", group_mask_fill=0.0))
        return ml_collections.ConfigDict(dict(num_experts=num_experts, top_k=self.top_k or num_experts,
                                              router=router))


def spec(lora: ml_collections.ConfigDict) -> MixtureSpec | None:
    """The MixtureSpec of a ``model.lora`` section, None when it has no mixture."""
    mix = lora.get("mixture")
    if mix is None or not (mix.num_experts or len(mix.per_layer)):
        return None
    return MixtureSpec(int(mix.num_experts), tuple(int(n) for n in mix.per_layer), int(mix.top_k), str(mix.balance),
                       float(mix.balance_coef), float(mix.blc_alpha), int(mix.task_type),
                       tuple(int(r) for r in mix.get("ranks", ())))


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """The ``model.lora.mixture`` fields (ConfigError naming the field, its value and what is allowed)."""
    mix = model_cfg.get("lora", {}).get("mixture")
    if mix is None:
        return
    p = "model.lora.mixture"
    if not (isinstance(mix.num_experts, int) and not isinstance(mix.num_experts, bool) and
            (mix.num_experts == 0 or mix.num_experts >= 2)):
        checks.fail(f"{p}.num_experts", mix.num_experts, "must be 0 (plain LoRA) or an int >= 2")
    per_layer = mix.per_layer
    if isinstance(per_layer, str) or not isinstance(per_layer, (tuple, list)):
        checks.fail(f"{p}.per_layer", per_layer, "must be a tuple of expert counts, one per model layer, or ()")
    if len(per_layer):
        if len(per_layer) != model_cfg.num_layers:
            checks.fail(f"{p}.per_layer", tuple(per_layer),
                        f"must hold one count per model layer (model.num_layers={model_cfg.num_layers})")
        for i, n in enumerate(per_layer):
            if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
                checks.fail(f"{p}.per_layer[{i}]", n, "must be an int >= 1")
        if model_cfg.scan_layers:
            checks.fail(f"{p}.per_layer", tuple(per_layer), "needs model.scan_layers=False (layers of different "
                                                            "shapes cannot be scanned)")
    if not (isinstance(mix.top_k, int) and not isinstance(mix.top_k, bool) and mix.top_k >= 0):
        checks.fail(f"{p}.top_k", mix.top_k, "must be 0 (every expert, softmax weights) or an int >= 1")
    counts = tuple(per_layer) or ((mix.num_experts,) if mix.num_experts else ())
    if counts and mix.top_k > min(counts):
        checks.fail(f"{p}.top_k", mix.top_k, f"must be <= the fewest experts of a layer ({min(counts)})")
    checks.choice(f"{p}.balance", mix.balance, BALANCES)
    checks.number(f"{p}.balance_coef", mix.balance_coef)
    if not (isinstance(mix.blc_alpha, (int, float)) and 0 <= mix.blc_alpha < 1):
        checks.fail(f"{p}.blc_alpha", mix.blc_alpha, "must be a number in [0, 1)")
    if mix.balance == "loramoe" and any(n % 2 for n in counts):
        checks.fail(f"{p}.balance", mix.balance, f"'loramoe' splits each layer's experts into two equal groups: "
                                                 f"every expert count must be even (got {counts})")
    ranks = mix.get("ranks", ())
    if isinstance(ranks, str) or not isinstance(ranks, (tuple, list)):
        checks.fail(f"{p}.ranks", ranks, "must be a tuple of one rank per expert, or ()")
    if len(ranks):
        if len(per_layer) or len(ranks) != mix.num_experts:
            checks.fail(f"{p}.ranks", tuple(ranks), f"must hold one rank per expert (num_experts={mix.num_experts}), "
                                                    f"with per_layer=()")
        for i, r in enumerate(ranks):
            if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
                checks.fail(f"{p}.ranks[{i}]", r, "must be an int >= 1")
    if not (isinstance(mix.task_type, int) and not isinstance(mix.task_type, bool) and mix.task_type >= -1):
        checks.fail(f"{p}.task_type", mix.task_type, "must be -1 (no localized constraint) or a task type >= 0 "
                                                     "(1: the first group's, 0: the second group's)")


def layer_index(path: Sequence[str]) -> int | None:
    """The model layer of a module path (``layers_{i}``), None outside the numbered layers."""
    for key in path:
        found = _LAYER.match(str(key))
        if found:
            return int(found.group(1))
    return None


def dense_gates(route: routers.Routing, num_experts: int) -> jax.Array:
    """route's weights scattered on the experts: [T, E] (0 for the experts a token does not take)."""
    hot = jax.nn.one_hot(route.experts, num_experts, dtype=jnp.float32)
    return jnp.einsum("tke,tk->te", hot, route.weights.astype(jnp.float32))


def loramoe_balance(gates: jax.Array, task_types: jax.Array, alpha: float) -> jax.Array:
    """LoRAMoE's localized balancing constraint as the authors' ``peft/tuners/lora.py`` computes it (unweighted):
    the gates [B, S, E] summed over positions, times the importance I [B, E] (for a sample of type 1: 1 + alpha on
    the first half of the experts and 1 - alpha on the second; type 0: the reverse; any other type: 1 - alpha
    everywhere), flattened; its squared coefficient of variation var / (mean^2 + 1e-10), var with Bessel's
    correction (torch's ``var``). task_types: [B] int."""
    batch, _, num_experts = gates.shape
    first = jnp.arange(num_experts) < num_experts // 2
    types = jnp.broadcast_to(jnp.asarray(task_types), (batch,))[:, None]
    match = ((types == 1) & first[None]) | ((types == 0) & ~first[None])
    importance = jnp.where(match, 1.0 + alpha, 1.0 - alpha)
    z = (gates.astype(jnp.float32).sum(1) * importance).reshape(-1)
    if z.shape[0] == 1:
        return jnp.zeros((), jnp.float32)
    return jnp.var(z, ddof=1) / (jnp.mean(z) ** 2 + 1e-10)


def _letters(n_in: int, n_out: int) -> tuple[str, str]:
    free = [c for c in string.ascii_lowercase if c not in "ber"]
    return "".join(free[:n_in]), "".join(free[n_in:n_in + n_out])


def expert_scaling(mix: MixtureSpec, rank: int, alpha: float, rslora: bool, num_experts: int) -> jax.Array:
    """[E] each expert's alpha / r_e (alpha / sqrt(r_e) with rslora); r_e = ``mix.ranks[e]`` or rank."""
    ranks = jnp.asarray(mix.ranks or (rank,) * num_experts, jnp.float32)
    return alpha / (jnp.sqrt(ranks) if rslora else ranks)


def term(module: nn.Module, mix: MixtureSpec, *, rank: int, alpha: float, rslora: bool, dropout: float, name: str,
         x: jax.Array, kernel_shape: Sequence[int], n_in: int, dtype: Any, param_dtype: Any,
         a_init: Callable[[int], nn.initializers.Initializer]) -> jax.Array:
    """sum_e g_e s_e (drop_e(x) A_e) B_e for the weight ``name`` [in..., out...] of module (s_e: ``expert_scaling``),
    declaring A, B and the router in module and sowing the routing's statistics. x [..., in...] -> [..., out...] in
    dtype; a_init(fan_in): A's initialiser (moejax/adapters/lora.py). Rank-heterogeneous experts (``mix.ranks``)
    hold A [E, in..., max r], B [E, max r, out...] whose components past r_e are masked out."""
    num_experts = mix.experts_at(layer_index(module.path))
    if mix.ranks:
        rank = max(mix.ranks)
    in_shape, out_shape = tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])
    fan_in = math.prod(in_shape)
    a = module.param(f"{name}{STEM}_lora_a", a_init(fan_in), (num_experts, *in_shape, rank), param_dtype)
    b = module.param(f"{name}{STEM}_lora_b", nn.initializers.zeros, (num_experts, rank, *out_shape), param_dtype)
    bound = 1.0 / math.sqrt(fan_in)  # torch nn.Linear's kaiming_uniform_(a=sqrt(5)), the authors' router init
    w_r = module.param(name + ROUTER_SUFFIX, lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound),
                       (*in_shape, num_experts), jnp.float32)
    lead = x.shape[:x.ndim - n_in]
    tokens = math.prod(lead)
    logits = jnp.tensordot(x.astype(jnp.float32), w_r, axes=n_in).reshape(tokens, num_experts)
    router_cfg = mix.router_config(num_experts)
    iv = module.get_variable(INTERVENTION, name) if module.has_variable(INTERVENTION, name) else None
    bias = None if iv is None else intervene.selection_bias(iv, 0, jnp.zeros((num_experts,), jnp.float32))
    route = routers.spec("topk").fn(logits, router_cfg, routers.RouterContext(bias=bias))
    if iv is not None:  # a routing intervention on this router (row 0 of a one-layer Intervention)
        route = intervene.apply(iv, 0, route, router_cfg, bias=bias)
    gates = dense_gates(route, num_experts)  # [T, E]
    ins, outs = _letters(n_in, len(out_shape))
    x = x.astype(dtype).reshape(tokens, *in_shape)
    if dropout and not module.is_initializing():
        stream = next((s for s in ("dropout", "routing") if module.has_rng(s)), None)
        if stream is not None:  # one mask per expert, as the authors' code draws
            keep = jax.random.bernoulli(module.make_rng(stream), 1.0 - dropout, (tokens, num_experts, *in_shape))
            h = jnp.einsum(f"te{ins},e{ins}r->ter", jnp.where(keep, x[:, None] / (1.0 - dropout), 0).astype(dtype),
                           jnp.asarray(a, dtype))
        else:
            h = jnp.einsum(f"t{ins},e{ins}r->ter", x, jnp.asarray(a, dtype))
    else:
        h = jnp.einsum(f"t{ins},e{ins}r->ter", x, jnp.asarray(a, dtype))
    weight = gates * expert_scaling(mix, rank, alpha, rslora, num_experts)[None]  # [T, E]: g_e s_e
    if mix.ranks:  # expert e uses its first r_e rank components only
        h = h * (jnp.arange(rank)[None] < jnp.asarray(mix.ranks)[:, None]).astype(dtype)[None]
    out = jnp.einsum(f"ter,er{outs}->t{outs}", h * weight[..., None].astype(dtype), jnp.asarray(b, dtype))
    _sow(module, mix, name, route, gates, lead, num_experts)
    return out.reshape(*lead, *out_shape)


def _sow(module: nn.Module, mix: MixtureSpec, name: str, route: routers.Routing, gates: jax.Array,
         lead: tuple[int, ...], num_experts: int) -> None:
    zero = jnp.zeros((), jnp.float32)
    balance = zero
    if mix.balance == "loramoe" and mix.task_type >= 0:
        per_sequence = gates.reshape(math.prod(lead[:-1]), lead[-1], num_experts) if len(lead) >= 2 else gates[None]
        balance = loramoe_balance(per_sequence, mix.task_type, mix.blc_alpha)
    elif mix.balance == "switch":
        balance = losses.expert_balance_loss(route.probs[None], route.experts[None])
    layer = layer_index(module.path)
    module.sow("moe_aux", name + ROUTING_SUFFIX, (route.experts, route.weights, route.probs))
    module.sow("moe_aux", name + STATS_SUFFIX, stats.RoutedStats(
        layer=jnp.asarray(-1 if layer is None else layer, jnp.int32),
        tokens_per_expert=jnp.sum(jax.nn.one_hot(route.experts, num_experts), axis=(0, 1)),
        dropped=zero, overflow=zero, routed_slots=jnp.asarray(route.experts.size, jnp.float32),
        num_tokens=jnp.asarray(route.experts.shape[0], jnp.float32),
        router_entropy=losses.router_entropy(route.probs), balance_loss=balance, device_balance_loss=zero,
        z_loss=losses.z_loss(route.logits)))


def collect(moe_aux: dict) -> dict[tuple[str, ...], stats.RoutedStats]:
    """{(module path..., adapted weight's name): its record (calls summed)} of every mixture in a forward pass's
    'moe_aux' collection."""
    found: dict[tuple[str, ...], stats.RoutedStats] = {}

    def visit(node: dict, path: tuple[str, ...]) -> None:
        for key in sorted(node):
            if key.endswith(STATS_SUFFIX):
                found[(*path, key[: -len(STATS_SUFFIX)])] = stats.combine(tuple(node[key]))
            elif isinstance(node[key], dict):
                visit(node[key], (*path, key))

    visit(dict(moe_aux), ())
    return found


def weighted_losses(moe_aux: dict, model_cfg: ml_collections.ConfigDict) -> jax.Array:
    """balance_coef * the sum of every mixture's balance loss (the authors add blc_weight * each adapted linear's
    loss, over every layer); 0 without a mixture."""
    lora = model_cfg.get("lora")
    mix = None if lora is None or lora.get("mixture") is None else spec(lora)
    total = jnp.zeros((), jnp.float32)
    if mix is None or mix.balance == "none" or not mix.balance_coef:
        return total
    for record in collect(moe_aux).values():
        total = total + mix.balance_coef * jnp.sum(record.balance_loss)
    return total
