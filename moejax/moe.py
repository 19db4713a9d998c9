"""The MoE feed-forward layer: router + dispatch + routed experts + shared experts.

Parameter tree of ``MoE(cfg)`` (E = num_experts, F = expert_ffn, D = model width):

    params:
      router/kernel        [D, E + m]             float32 always (the router runs in float32); m = num_null_experts
      router_{c}/kernel    [D, E + m]             Chain-of-Experts: the router of iteration c = 1..C-1
      experts/wi_0         [E, D, F]
      experts/wi_1         [E, D, F]
      experts/wo           [E, F, D]
      shared/wi_0          [D, num_shared * F]    when num_shared > 0 (all shared experts fused in one GLU)
      shared/wi_1          [D, num_shared * F]
      shared/wo            [num_shared * F, D]
      shared_gate/kernel   [D, 1]                 when shared_gate (Qwen2-MoE's sigmoid gate on the shared MLP)
    moe_state:
      router_bias          [E]                    selection-only bias (aux-loss-free balancing), zeros at init

Aux statistics are sown into the ``'moe_aux'`` collection (one entry per routed pass: C with Chain-of-Experts):
``tokens_per_expert`` [E], ``drop_fraction`` (capacity drops plus expert-parallel buffer overflow),
``overflow_fraction``, ``router_entropy``, ``experts_per_token`` (routed experts per token: top_k unless a router
leaves slots null), and the already-weighted losses ``balance_loss``, ``z_loss`` and ``entropy_loss`` that the
train step adds to the task loss.
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
CHAIN_RESIDUALS = ("outer", "inner", "inner_outer")


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
    checks.positive_int(f"{prefix}.chain_iterations", cfg.chain_iterations)
    checks.choice(f"{prefix}.chain_residual", cfg.chain_residual, CHAIN_RESIDUALS)
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
    checks.choice(f"{prefix}.dispatch_kernel", cfg.dispatch_kernel, dispatch.KERNELS)
    if cfg.gmm_backend == "megablox" and jax.default_backend() == "gpu":
        checks.fail(f"{prefix}.gmm_backend", cfg.gmm_backend, "megablox is a TPU (Mosaic) kernel; on GPU use 'auto', "
                                                              "'ragged_dot' or 'tokamax'")
    if cfg.gmm_backend == "tokamax" and not experts.tokamax_installed():
        checks.fail(f"{prefix}.gmm_backend", cfg.gmm_backend, experts.TOKAMAX_MISSING)
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


class RouterKernel(nn.Module):
    """The router's linear map x [T, D] -> logits [T, n] in float32; ``frozen`` stops its gradient (SMoE-Dropout's
    random fixed router; the optimizer also leaves it out of weight decay)."""

    features: int
    frozen: bool = False
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        if self.frozen:
            kernel = jax.lax.stop_gradient(kernel)
        return jnp.dot(x.astype(jnp.float32), kernel)


class MoE(nn.Module):
    """MoE FFN over x [B, S, D] -> [B, S, D]; ``cfg`` is the ``model.moe`` config section.

    With train=True the router applies jitter (needs the 'jitter' rng when router.jitter > 0), routers that draw
    experts at random use the 'routing' rng, and capacity mode uses capacity_factor; with train=False it uses
    eval_capacity_factor when set. ``progress`` (the fraction of training done, a scalar) feeds routers with a
    schedule (SMoE-Dropout's growing k).

    Chain-of-Experts (``chain_iterations`` C > 1): the tokens pass C times through the same routed and shared
    experts, each iteration with its own router (``router``, ``router_1``, ...; one shared ``router`` with
    ``chain_shared_router``). ``chain_residual`` says how the iterations combine: 'outer' (no inner residual,
    x_c = f_c(x_{c-1}); the block adds its input after the chain: the plain MoE when C = 1), 'inner' (x_c =
    x_{c-1} + f_c(x_{c-1}) and the block's output is x_C, replacing the residual stream as the released CoE code
    does) or 'inner_outer' (inner residual, and the block adds x_C - x_0 to its input).
    """

    cfg: ml_collections.ConfigDict
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    mesh: Mesh | None = None  # more than one device: the routed experts run under shard_map (moejax/parallel.py)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, token_ids: jax.Array | None = None,
                 progress: jax.Array | None = None) -> jax.Array:
        """x [B, S, D] -> [B, S, D]; token_ids [B, S]: the input tokens, for routers that route by token id."""
        cfg = self.cfg
        batch, seq, d_model = x.shape
        tokens = x.reshape(batch * seq, d_model).astype(self.dtype)
        weights = ExpertWeights(cfg.num_experts, d_model, cfg.expert_ffn, self.param_dtype, self.kernel_init,
                                name="experts")()
        weights = tuple(jnp.asarray(w, self.dtype) for w in weights)  # numpy params (load_checkpoint) too
        bias = self.variable("moe_state", "router_bias", jnp.zeros, (cfg.num_experts,), jnp.float32)
        shared = shared_gate = None
        if cfg.num_shared > 0:
            shared = GLU(cfg.num_shared * cfg.expert_ffn, cfg.activation, self.dtype, self.param_dtype,
                         self.kernel_init, name="shared")
            if cfg.shared_gate:
                shared_gate = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                                       kernel_init=self.kernel_init, name="shared_gate")
        width = cfg.num_experts + cfg.num_null_experts
        routers = [RouterKernel(width, cfg.router.frozen, self.kernel_init, name="router")]
        for c in range(1, cfg.chain_iterations):
            routers.append(routers[0] if cfg.chain_shared_router else
                           RouterKernel(width, cfg.router.frozen, self.kernel_init, name=f"router_{c}"))
        ids = None if token_ids is None else token_ids.reshape(-1)

        state, update = tokens, jnp.zeros_like(tokens)
        for router in routers:
            out = self._routed(state, router, weights, bias.value, batch, train=train, token_ids=ids,
                               progress=progress)
            if shared is not None:
                extra = shared(state)
                if shared_gate is not None:
                    extra = extra * jax.nn.sigmoid(shared_gate(state.astype(jnp.float32))).astype(extra.dtype)
                out = out + extra
            if cfg.chain_residual == "outer":
                state = out.astype(self.dtype)
            else:
                update = update + out.astype(self.dtype)
                state = tokens + update
        result = update if cfg.chain_residual == "inner_outer" else state
        return result.reshape(batch, seq, d_model).astype(self.dtype)

    def _routed(self, tokens: jax.Array, router: RouterKernel, weights: tuple[jax.Array, ...], bias: jax.Array,
                batch: int, *, train: bool, token_ids: jax.Array | None, progress: jax.Array | None) -> jax.Array:
        """One pass of tokens [T, D] through router and routed experts; sows this call's statistics and losses."""
        cfg = self.cfg
        num_experts, top_k = cfg.num_experts, cfg.top_k
        num_tokens = tokens.shape[0]
        router_in = tokens.astype(jnp.float32)
        if train and cfg.router.jitter > 0:
            router_in = routing.jitter(router_in, cfg.router.jitter, self.make_rng("jitter"))
        rng = self.make_rng("routing") if train and cfg.router.kind in routing.NEEDS_RNG else None
        route = routing.route(router(router_in), cfg, bias=bias, rng=rng, train=train, token_ids=token_ids,
                              progress=progress)
        backend = experts.resolve_backend(cfg.gmm_backend)
        cap = None
        if cfg.dispatch == "capacity":
            factor = cfg.capacity_factor if train or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
            cap = dispatch.capacity(num_tokens, top_k, num_experts, factor)
        if self.mesh is not None and self.mesh.size > 1:
            out, dropped, overflow = parallel.moe_ep(tokens, route, weights, cfg, self.mesh, capacity=cap,
                                                     backend=backend, compute_dtype=self.dtype)
            chosen = jnp.where(route.experts < num_experts, route.experts, num_experts).reshape(-1)
            tokens_per_expert = jnp.bincount(chosen, length=num_experts + 1)[:num_experts]
        else:
            if cap is not None:
                plan = dispatch.capacity_plan(route, num_experts, cap, cfg.drop_policy)
            else:
                slots = route.experts.shape[1]
                tile = 1 if backend in experts.RAGGED_BACKENDS else \
                    cfg.gmm_tile or dispatch.default_tile(num_tokens * slots, num_experts)
                plan = dispatch.dropless_plan(route, num_experts, tile)
            permute, unpermute_combine = dispatch.kernel_ops(cfg.dispatch_kernel)
            rows = permute(tokens.astype(self.dtype), plan.slot_row, plan.row_slot)
            rows = experts.grouped_glu(rows, weights, plan, backend, cfg.activation)
            out = unpermute_combine(rows, route.weights, plan.slot_row, plan.row_slot)
            tokens_per_expert, dropped, overflow = plan.tokens_per_expert, plan.dropped, jnp.zeros((), jnp.int32)

        valid_slots = jnp.maximum((route.experts < num_experts).sum(), 1)
        self.sow("moe_aux", "tokens_per_expert", tokens_per_expert.astype(jnp.float32))
        self.sow("moe_aux", "drop_fraction", (dropped + overflow) / valid_slots)
        self.sow("moe_aux", "overflow_fraction", overflow / valid_slots)
        entropy = losses.router_entropy(route.probs)
        self.sow("moe_aux", "router_entropy", entropy)
        self.sow("moe_aux", "entropy_loss", cfg.entropy_loss_coef * entropy)
        self.sow("moe_aux", "experts_per_token", valid_slots / num_tokens)
        self.sow("moe_aux", "balance_loss", balance_loss(route, cfg, batch))
        self.sow("moe_aux", "z_loss", cfg.z_loss_coef * losses.z_loss(route.logits))
        return out
