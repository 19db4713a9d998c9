"""The MoE feed-forward layer: router + dispatch + routed experts + shared experts.

Parameter tree of ``MoE(cfg)`` (E = num_experts, F = expert_ffn, D = model width):

    params:
      router/kernel        [D, E + m]             float32 always (the router runs in float32); m = num_null_experts
      experts/wi_0         [E, D, F]
      experts/wi_1         [E, D, F]
      experts/wo           [E, F, D]
      shared/wi_0          [D, num_shared * F]    when num_shared > 0 (all shared experts fused in one GLU)
      shared/wi_1          [D, num_shared * F]
      shared/wo            [num_shared * F, D]
      shared_gate/kernel   [D, 1]                 when shared_gate (Qwen2-MoE's sigmoid gate on the shared MLP)
    moe_state:
      router_bias          [E]                    selection-only bias (aux-loss-free balancing), zeros at init

Aux statistics are sown into the ``'moe_aux'`` collection (one entry per call): ``tokens_per_expert`` [E],
``drop_fraction`` (capacity drops plus expert-parallel buffer overflow), ``overflow_fraction``,
``router_entropy``, ``experts_per_token`` (routed experts per token: top_k unless a router leaves slots null),
and the already-weighted losses ``balance_loss``, ``z_loss`` and ``entropy_loss`` that the train step adds to the
task loss.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from moejax import checks, dispatch, experts, losses, parallel, routing

DISPATCH_MODES = ("dropless", "capacity")
BALANCE_LOSSES = ("switch", "deepseek", "none")


def validate(cfg: ml_collections.ConfigDict, prefix: str = "model.moe") -> None:
    """Raises ConfigError naming the field, its value and what is allowed."""
    checks.positive_int(f"{prefix}.num_experts", cfg.num_experts)
    checks.positive_int(f"{prefix}.top_k", cfg.top_k)
    checks.positive_int(f"{prefix}.num_null_experts", cfg.num_null_experts, minimum=0)
    if cfg.top_k > cfg.num_experts + cfg.num_null_experts:
        checks.fail(f"{prefix}.top_k", cfg.top_k, f"must be <= model.moe.num_experts={cfg.num_experts} "
                                                  f"(+ model.moe.num_null_experts={cfg.num_null_experts})")
    if cfg.router.kind == "expert_choice" and cfg.dispatch != "dropless":
        checks.fail(f"{prefix}.dispatch", cfg.dispatch, "expert_choice routing is balanced by construction: use "
                                                        "'dropless'")
    if cfg.num_null_experts and cfg.router.kind != "adamoe":
        checks.fail(f"{prefix}.num_null_experts", cfg.num_null_experts,
                    f"null experts need model.moe.router.kind='adamoe' (got {cfg.router.kind!r}); 0 otherwise")
    checks.positive_int(f"{prefix}.expert_ffn", cfg.expert_ffn)
    checks.positive_int(f"{prefix}.num_shared", cfg.num_shared, minimum=0)
    checks.choice(f"{prefix}.activation", cfg.activation, sorted(experts.ACTIVATIONS))
    checks.choice(f"{prefix}.dispatch", cfg.dispatch, DISPATCH_MODES)
    checks.number(f"{prefix}.capacity_factor", cfg.capacity_factor, strict=True)
    if cfg.eval_capacity_factor is not None:
        checks.number(f"{prefix}.eval_capacity_factor", cfg.eval_capacity_factor, strict=True)
    checks.choice(f"{prefix}.drop_policy", cfg.drop_policy, ["position", "probs"])
    checks.choice(f"{prefix}.gmm_backend", cfg.gmm_backend, experts.BACKENDS)
    checks.positive_int(f"{prefix}.gmm_tile", cfg.gmm_tile, minimum=0)
    checks.choice(f"{prefix}.balance_loss", cfg.balance_loss, BALANCE_LOSSES)
    checks.choice(f"{prefix}.balance_scope", cfg.balance_scope, ["batch", "sequence"])
    for field in ("balance_coef", "device_balance_coef", "z_loss_coef", "entropy_loss_coef", "bias_update_rate"):
        checks.number(f"{prefix}.{field}", cfg[field])
    checks.positive_int(f"{prefix}.device_groups", cfg.device_groups)
    if cfg.num_experts % cfg.device_groups:
        checks.fail(f"{prefix}.device_groups", cfg.device_groups,
                    f"must divide model.moe.num_experts={cfg.num_experts}")
    routing.validate(cfg, prefix)


def balance_loss(route: routing.Routing, cfg: ml_collections.ConfigDict, batch: int) -> jax.Array:
    """The weighted balance loss of ``cfg.balance_loss`` over ``cfg.balance_scope``; route over B*S tokens."""
    if cfg.balance_loss == "none":
        return jnp.zeros((), jnp.float32)
    probs = losses.by_scope(route.probs, batch, cfg.balance_scope)
    chosen = losses.by_scope(route.experts, batch, cfg.balance_scope)
    if cfg.num_null_experts:
        return cfg.balance_coef * losses.null_pooled_balance_loss(probs, chosen, cfg.num_experts)
    loss = cfg.balance_coef * losses.expert_balance_loss(probs, chosen)
    if cfg.balance_loss == "deepseek" and cfg.device_balance_coef:
        loss += cfg.device_balance_coef * losses.device_balance_loss(probs, chosen, cfg.device_groups)
    return loss


class GLU(nn.Module):
    """Dense GLU MLP (act(x @ wi_0) * (x @ wi_1)) @ wo; used for shared experts and dense layers."""

    hidden: int
    activation: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        wi_0 = self.param("wi_0", self.kernel_init, (d, self.hidden), self.param_dtype)
        wi_1 = self.param("wi_1", self.kernel_init, (d, self.hidden), self.param_dtype)
        wo = self.param("wo", self.kernel_init, (self.hidden, d), self.param_dtype)
        wi_0, wi_1, wo = (w.astype(self.dtype) for w in (wi_0, wi_1, wo))
        return experts.glu(x.astype(self.dtype), wi_0, wi_1, wo, self.activation)


class ExpertWeights(nn.Module):
    """The stacked routed-expert weights wi_0, wi_1 [E, D, F] and wo [E, F, D]."""

    num_experts: int
    d_model: int
    hidden: int
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        e, d, f = self.num_experts, self.d_model, self.hidden
        return (self.param("wi_0", self.kernel_init, (e, d, f), self.param_dtype),
                self.param("wi_1", self.kernel_init, (e, d, f), self.param_dtype),
                self.param("wo", self.kernel_init, (e, f, d), self.param_dtype))


class MoE(nn.Module):
    """MoE FFN over x [B, S, D] -> [B, S, D]; ``cfg`` is the ``model.moe`` config section.

    With train=True the router applies jitter (needs the 'jitter' rng when router.jitter > 0) and capacity mode
    uses capacity_factor; with train=False it uses eval_capacity_factor when set.
    """

    cfg: ml_collections.ConfigDict
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    mesh: Mesh | None = None  # more than one device: the routed experts run under shard_map (moejax/parallel.py)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, token_ids: jax.Array | None = None) -> jax.Array:
        """x [B, S, D] -> [B, S, D]; token_ids [B, S]: the input tokens, for routers that route by token id."""
        cfg = self.cfg
        batch, seq, d_model = x.shape
        num_experts, top_k = cfg.num_experts, cfg.top_k
        tokens = x.reshape(batch * seq, d_model)

        router_in = tokens.astype(jnp.float32)
        if train and cfg.router.jitter > 0:
            router_in = routing.jitter(router_in, cfg.router.jitter, self.make_rng("jitter"))
        logits = nn.Dense(num_experts + cfg.num_null_experts, use_bias=False, dtype=jnp.float32,
                          param_dtype=jnp.float32, kernel_init=self.kernel_init, name="router")(router_in)
        bias = self.variable("moe_state", "router_bias", jnp.zeros, (num_experts,), jnp.float32)
        route = routing.route(logits, cfg, bias=bias.value, train=train,
                              token_ids=None if token_ids is None else token_ids.reshape(-1))

        weights = ExpertWeights(num_experts, d_model, cfg.expert_ffn, self.param_dtype, self.kernel_init,
                                name="experts")()
        weights = tuple(w.astype(self.dtype) for w in weights)
        backend = experts.resolve_backend(cfg.gmm_backend)
        cap = None
        if cfg.dispatch == "capacity":
            factor = cfg.capacity_factor if train or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
            cap = dispatch.capacity(batch * seq, top_k, num_experts, factor)
        if self.mesh is not None and self.mesh.size > 1:
            out, dropped, overflow = parallel.moe_ep(tokens, route, weights, cfg, self.mesh, capacity=cap,
                                                     backend=backend, compute_dtype=self.dtype)
            chosen = jnp.where(route.experts < num_experts, route.experts, num_experts).reshape(-1)
            tokens_per_expert = jnp.bincount(chosen, length=num_experts + 1)[:num_experts]
        else:
            if cap is not None:
                plan = dispatch.capacity_plan(route, num_experts, cap, cfg.drop_policy)
            else:
                tile = 1 if backend == "ragged_dot" else \
                    cfg.gmm_tile or dispatch.default_tile(batch * seq * top_k, num_experts)
                plan = dispatch.dropless_plan(route, num_experts, tile)
            rows = dispatch.permute(tokens.astype(self.dtype), plan.slot_row, plan.row_slot)
            rows = experts.grouped_glu(rows, weights, plan, backend, cfg.activation)
            out = dispatch.unpermute_combine(rows, route.weights, plan.slot_row, plan.row_slot)
            tokens_per_expert, dropped, overflow = plan.tokens_per_expert, plan.dropped, jnp.zeros((), jnp.int32)

        if cfg.num_shared > 0:
            shared = GLU(cfg.num_shared * cfg.expert_ffn, cfg.activation, self.dtype, self.param_dtype,
                         self.kernel_init, name="shared")(tokens)
            if cfg.shared_gate:
                gate = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                                kernel_init=self.kernel_init, name="shared_gate")(tokens.astype(jnp.float32))
                shared = shared * jax.nn.sigmoid(gate).astype(shared.dtype)
            out = out + shared

        valid_slots = jnp.maximum((route.experts < num_experts).sum(), 1)
        self.sow("moe_aux", "tokens_per_expert", tokens_per_expert.astype(jnp.float32))
        self.sow("moe_aux", "drop_fraction", (dropped + overflow) / valid_slots)
        self.sow("moe_aux", "overflow_fraction", overflow / valid_slots)
        entropy = losses.router_entropy(route.probs)
        self.sow("moe_aux", "router_entropy", entropy)
        self.sow("moe_aux", "entropy_loss", cfg.entropy_loss_coef * entropy)
        self.sow("moe_aux", "experts_per_token", valid_slots / (batch * seq))
        self.sow("moe_aux", "balance_loss", balance_loss(route, cfg, batch))
        self.sow("moe_aux", "z_loss", cfg.z_loss_coef * losses.z_loss(route.logits))
        return out.reshape(batch, seq, d_model).astype(self.dtype)
