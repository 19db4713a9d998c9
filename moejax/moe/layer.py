"""The MoE feed-forward layer (a thin Flax shell): router kernel -> router (routers.py) -> dispatch, routed experts
and combine (pipeline.py, or expert_parallel.py on a mesh) + shared experts; sows one ``stats.RoutedStats`` per
routed pass.

Parameter tree of ``MoE(cfg)`` (E = num_experts, F = expert_ffn, D = model width; names in moejax/moe/__init__.py):

    params:
      router/kernel        [D, E + m + z]         float32 always (the router runs in float32); m = num_null_experts,
                                                  z = num_identity_experts
      router/bias          [E + m + z]            float32, when router.bias (GPT-OSS: logits = x @ W + b)
      router_{c}/kernel    [D, E + m]             Chain-of-Experts: the router of iteration c = 1..C-1
      experts/<name>       the expert kind's stacked parameters (model.moe.expert_kind; moejax/moe/experts.py):
                           'glu': wi_0, wi_1 [E, D, F], wo [E, F, D]
                           'gpt_oss': wi_0, wi_1 [E, D, F], wo [E, F, D], bi_0, bi_1 [E, F], bo [E, D]
      shared/wi_0          [D, Fs]                when num_shared > 0 (all shared experts fused in one GLU);
      shared/wi_1          [D, Fs]                Fs = shared_ffn, or num_shared * F when shared_ffn is 0
      shared/wo            [Fs, D]
      shared_gate/kernel   [D, 1]                 when shared_gate (Qwen2-MoE's sigmoid gate on the shared MLP)
      .../<w>_lora_a, _lora_b                     LoRA adapters of the weights ``lora`` picks (moejax/adapters/
                                                  lora.py): experts/<w>_lora_a [E, in, r], experts/<w>_lora_b
                                                  [E, r, out] (or <w>_shared_lora_a [in, r], ... shared by all)
    moe_state:
      router_bias          [E]                    selection-only bias (aux-loss-free balancing), zeros at init;
                                                  applying without a 'moe_state' collection uses zeros
      identity_bias        [z]                    the identity experts' selection-only bias (not updated by the
                                                  aux-loss-free hook), zeros at init

Identity experts (``num_identity_experts`` z > 0; LongCat-Flash's zero-computation experts, arXiv 2509.01322):
ids E..E+z-1 of the router's selection; each returns its input, so a token adds its input times the summed weight
of its identity slots to the routed experts' output; dispatch skips them like null slots.

Statistics: each routed pass sows one ``RoutedStats`` record (moejax/moe/stats.py) under ``'moe_aux'/.../stats``
(C records with Chain-of-Experts): its layer index, tokens per expert, drops, overflow, router entropy, experts per
token and the unweighted balance and z losses. ``stats.collect`` reads them; the objective weights the losses.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from moejax import checks, moe
from moejax.adapters import expert_lora
from moejax.adapters import lora as lora_lib
from moejax.moe import (
    dispatch,
    expert_map,
    expert_parallel,
    experts,
    intervene,
    losses,
    pipeline,
    placement,
    quantised,
    routers,
    stats,
)
from moejax.moe import intervention as interventions

DISPATCH_MODES = ("dropless", "capacity")
BALANCE_LOSSES = ("switch", "deepseek", "none")
CHAIN_RESIDUALS = ("outer", "inner", "inner_outer")


def validate(cfg: ml_collections.ConfigDict, prefix: str = "model.moe") -> None:
    """Raises ConfigError naming the field, its value and what is allowed."""
    checks.positive_int(f"{prefix}.num_experts", cfg.num_experts)
    checks.positive_int(f"{prefix}.top_k", cfg.top_k)
    checks.positive_int(f"{prefix}.num_null_experts", cfg.num_null_experts, minimum=0)
    identity = cfg.get("num_identity_experts", 0)
    checks.positive_int(f"{prefix}.num_identity_experts", identity, minimum=0)
    if cfg.top_k > cfg.num_experts + cfg.num_null_experts + identity:
        checks.fail(f"{prefix}.top_k", cfg.top_k, f"must be <= model.moe.num_experts={cfg.num_experts} "
                                                  f"(+ model.moe.num_null_experts={cfg.num_null_experts} + "
                                                  f"model.moe.num_identity_experts={identity})")
    if identity:
        _validate_identity(cfg, prefix, identity)
    scale_input = cfg.get("scale_expert_input", False)
    if not isinstance(scale_input, bool):
        checks.fail(f"{prefix}.scale_expert_input", scale_input, "must be True or False")
    if scale_input and cfg.top_k != 1:
        checks.fail(f"{prefix}.top_k", cfg.top_k, f"must be 1 with {prefix}.scale_expert_input=True (the routing "
                                                  f"weight scales the one routed expert's input, as in Llama 4)")
    checks.positive_int(f"{prefix}.chain_iterations", cfg.chain_iterations)
    checks.choice(f"{prefix}.chain_residual", cfg.chain_residual, CHAIN_RESIDUALS)
    with_nulls = sorted(kind for kind, spec in routers.ROUTERS.items() if spec.null_experts)
    if cfg.num_null_experts and cfg.router.kind not in with_nulls:
        checks.fail(f"{prefix}.num_null_experts", cfg.num_null_experts,
                    f"null experts need a model.moe.router.kind that handles them, one of {with_nulls} (got "
                    f"{cfg.router.kind!r}); 0 otherwise")
    checks.positive_int(f"{prefix}.expert_ffn", cfg.expert_ffn)
    checks.positive_int(f"{prefix}.num_shared", cfg.num_shared, minimum=0)
    checks.positive_int(f"{prefix}.shared_ffn", cfg.shared_ffn, minimum=0)
    if cfg.shared_ffn and not cfg.num_shared:
        checks.fail(f"{prefix}.shared_ffn", cfg.shared_ffn, f"sets the shared experts' width: needs "
                                                            f"{prefix}.num_shared > 0 (or shared_ffn 0)")
    checks.choice(f"{prefix}.activation", cfg.activation, sorted(experts.ACTIVATIONS))
    checks.choice(f"{prefix}.expert_kind", cfg.expert_kind, sorted(experts.EXPERT_KINDS))
    for field in ("swiglu_limit", "swiglu_alpha"):
        checks.number(f"{prefix}.{field}", cfg[field], strict=True)
    checks.choice(f"{prefix}.dispatch", cfg.dispatch, DISPATCH_MODES)
    checks.number(f"{prefix}.capacity_factor", cfg.capacity_factor, strict=True)
    if cfg.eval_capacity_factor is not None:
        checks.number(f"{prefix}.eval_capacity_factor", cfg.eval_capacity_factor, strict=True)
    checks.choice(f"{prefix}.drop_policy", cfg.drop_policy, ["position", "probs"])
    checks.choice(f"{prefix}.gmm_backend", cfg.gmm_backend, experts.BACKENDS)
    checks.choice(f"{prefix}.dispatch_kernel", cfg.dispatch_kernel, pipeline.KERNELS)
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
    routers.validate(cfg, prefix)


def _validate_identity(cfg: ml_collections.ConfigDict, prefix: str, identity: int) -> None:
    with_identity = sorted(kind for kind, spec in routers.ROUTERS.items() if spec.identity_experts)
    if cfg.router.kind not in with_identity:
        checks.fail(f"{prefix}.num_identity_experts", identity, f"identity experts need a model.moe.router.kind "
                    f"that handles them, one of {with_identity} (got {cfg.router.kind!r}); 0 otherwise")
    if cfg.num_null_experts:
        checks.fail(f"{prefix}.num_identity_experts", identity, f"identity and null experts do not mix: needs "
                                                                f"{prefix}.num_null_experts=0")
    if cfg.router.get("num_groups", 1) > 1:
        checks.fail(f"{prefix}.router.num_groups", cfg.router.num_groups, f"group-limited routing has no groups for "
                                                                          f"the identity experts: must be 1 with "
                                                                          f"{prefix}.num_identity_experts > 0")


class GLU(nn.Module):
    """Dense GLU MLP (act(x @ wi_0) * (x @ wi_1)) @ wo; used for shared experts and dense layers. ``lora``: LoRA
    adapters on the matrices its rules pick (moejax/adapters/lora.py)."""

    hidden: int
    activation: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    lora: lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        wi_0 = self.param("wi_0", self.kernel_init, (d, self.hidden), self.param_dtype)
        wi_1 = self.param("wi_1", self.kernel_init, (d, self.hidden), self.param_dtype)
        wo = self.param("wo", self.kernel_init, (self.hidden, d), self.param_dtype)
        named = {name: w.astype(self.dtype) for name, w in zip(("wi_0", "wi_1", "wo"), (wi_0, wi_1, wo), strict=True)}

        def linear(h: jax.Array, name: str) -> jax.Array:  # h @ W, plus the adapter's term where one is picked
            out = h @ named[name]
            term = lora_lib.adapter_term(self, self.lora, name, h, named[name].shape, 1, self.dtype,
                                         self.param_dtype)
            return out if term is None else out + term.astype(out.dtype)

        act = experts.ACTIVATIONS[self.activation]
        x = x.astype(self.dtype)
        return linear(act(linear(x, "wi_0")) * linear(x, "wi_1"), "wo")


class ExpertWeights(nn.Module):
    """The routed experts' stacked parameters of an expert kind, in its ``param_names`` order (its ``zero_init``
    parameters zeros, the others from kernel_init); then, for the matrices ``adapted`` names, their LoRA adapters
    (moejax/adapters/expert_lora.py ``expert_adapters``: the order of ``AdaptedExperts``)."""

    expert: experts.Experts
    num_experts: int
    d_model: int
    hidden: int
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    lora: lora_lib.LoraSpec | None = None
    adapted: tuple[str, ...] = ()

    @nn.compact
    def __call__(self) -> experts.Weights:
        shapes = self.expert.param_shapes(self.num_experts, self.d_model, self.hidden)
        weights = tuple(self._held(name) or
                        self.param(name, nn.initializers.zeros if name in self.expert.zero_init else self.kernel_init,
                                   shapes[name], self.param_dtype) for name in self.expert.param_names)
        if not self.adapted:
            return weights
        return weights + expert_lora.expert_adapters(self, self.lora, self.expert, self.adapted, self.num_experts,
                                                  shapes, self.param_dtype)

    def _held(self, name: str) -> quantised.QuantisedWeight | None:
        """The parameter when it is held as int codes (quantised decoding: moejax/moe/quantised.py), which the
        grouped matmul reads as it is; None otherwise."""
        value = self.get_variable("params", name) if self.has_variable("params", name) else None
        return value if quantised.is_weight(value) else None


class RouterKernel(nn.Module):
    """The router's linear map x [T, D] -> logits [T, n] in float32, plus a learned bias [n] with ``use_bias`` and
    a LoRA term where ``lora`` picks the kernel. (A frozen router, SMoE-Dropout's, is an optimizer partition:
    moejax/training/optim.py.)"""

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    use_bias: bool = False
    lora: lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        logits = jnp.dot(x.astype(jnp.float32), kernel)
        term = lora_lib.adapter_term(self, self.lora, "kernel", x, kernel.shape, 1, jnp.float32, jnp.float32)
        if term is not None:
            logits = logits + term
        if self.use_bias:
            logits = logits + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return logits


class MoE(nn.Module):
    """MoE FFN over x [B, S, D] -> [B, S, D]; ``cfg`` is the ``model.moe`` config section.

    With train=True the router applies jitter (needs the 'jitter' rng when router.jitter > 0), routers that draw
    experts at random use the 'routing' rng, and capacity mode uses capacity_factor; with train=False it uses
    eval_capacity_factor when set. ``progress`` (the fraction of training done, a scalar) feeds routers with a
    schedule (SMoE-Dropout's growing k). ``layer`` (an int, or an int32 scalar under nn.scan) is the model layer
    index stored in the statistics and the row of ``intervention`` it reads.

    ``intervention`` (moejax/moe/intervention.py): routing interventions indexed by the model layer index (mask,
    force, scale, top_k, rank); its mask and force join the selection-only bias given to the router, the rest
    rewrites the router's Routing before dispatch (every Chain-of-Experts pass alike). None: no intervention.

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
    mesh: Mesh | None = None  # more than one device: the routed experts run under shard_map (expert_parallel.py)
    lora: lora_lib.LoraSpec | None = None  # LoRA adapters on the weights its rules pick (moejax/adapters/lora.py)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, token_ids: jax.Array | None = None,
                 progress: jax.Array | None = None, layer: int | jax.Array = 0,
                 intervention: interventions.Intervention | None = None) -> jax.Array:
        """x [B, S, D] -> [B, S, D]; token_ids [B, S]: the input tokens, for routers that route by token id."""
        cfg = self.cfg
        identity = cfg.get("num_identity_experts", 0)
        if intervention is not None:
            if identity:
                checks.fail("model.moe.num_identity_experts", identity, "routing interventions on layers with "
                                                                       "identity experts are not supported")
            intervene.check_router(intervention, cfg, train)
            if isinstance(layer, int) and not 0 <= layer < intervention.num_layers:
                interventions.fail("mask.shape", tuple(intervention.mask.shape),
                                   f"has no row for layer {layer}")
        batch, seq, d_model = x.shape
        tokens = x.reshape(batch * seq, d_model).astype(self.dtype)
        expert = experts.from_config(cfg)
        num_stored = expert_map.stored_count(cfg, layer if isinstance(layer, int) else None)
        num_weights = placement.physical_count(cfg) or num_stored  # replicas: the physical slots
        adapted = expert_lora.expert_targets(self.lora, (*self.path, moe.EXPERTS), expert)
        weights = ExpertWeights(expert, num_weights, d_model, cfg.expert_ffn, self.param_dtype, self.kernel_init,
                                self.lora, adapted, name=moe.EXPERTS)()
        weights = tuple(w if quantised.is_weight(w) else jnp.asarray(w, self.dtype)  # numpy params too; int
                        for w in weights)                                               # codes as they are
        if adapted:  # LoRA on the routed slots, inside the grouped matmul
            expert = expert_lora.AdaptedExperts(expert, adapted, self.lora.scaling)
        if self.is_mutable_collection("moe_state") or self.has_variable("moe_state", moe.ROUTER_BIAS):
            bias = self.variable("moe_state", moe.ROUTER_BIAS, jnp.zeros, (cfg.num_experts,), jnp.float32).value
        else:
            bias = jnp.zeros((cfg.num_experts,), jnp.float32)
        identity_bias = None
        if identity and (self.is_mutable_collection("moe_state") or self.has_variable("moe_state", moe.IDENTITY_BIAS)):
            identity_bias = self.variable("moe_state", moe.IDENTITY_BIAS, jnp.zeros, (identity,), jnp.float32).value
        elif identity:
            identity_bias = jnp.zeros((identity,), jnp.float32)
        shared = shared_gate = None
        if cfg.num_shared > 0:
            shared = GLU(cfg.shared_ffn or cfg.num_shared * cfg.expert_ffn, cfg.activation, self.dtype,
                         self.param_dtype, self.kernel_init, self.lora, name=moe.SHARED)
            if cfg.shared_gate:
                shared_gate = lora_lib.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                                             kernel_init=self.kernel_init, lora=self.lora, name=moe.SHARED_GATE)
        width = cfg.num_experts + cfg.num_null_experts + identity
        kernels = [RouterKernel(width, self.kernel_init, cfg.router.bias, self.lora, name=moe.ROUTER)]
        for c in range(1, cfg.chain_iterations):
            kernels.append(kernels[0] if cfg.chain_shared_router else
                           RouterKernel(width, self.kernel_init, cfg.router.bias, self.lora, name=f"{moe.ROUTER}_{c}"))
        ids = None if token_ids is None else token_ids.reshape(-1)

        state, update = tokens, jnp.zeros_like(tokens)
        for kernel in kernels:
            out = self._routed(state, kernel, expert, weights, bias, batch, layer, num_stored, train=train,
                               token_ids=ids, progress=progress, intervention=intervention,
                               identity_bias=identity_bias)
            if shared is not None:
                extra = shared(state.reshape(batch, seq, d_model)).reshape(state.shape)  # [B, S, D]: per sequence
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

    def _routed(self, tokens: jax.Array, kernel: RouterKernel, expert: experts.Experts,
                weights: experts.Weights, bias: jax.Array, batch: int, layer: int | jax.Array, num_stored: int, *,
                train: bool, token_ids: jax.Array | None, progress: jax.Array | None,
                intervention: interventions.Intervention | None = None,
                identity_bias: jax.Array | None = None) -> jax.Array:
        """One pass of tokens [T, D] through router and routed experts; sows this pass's statistics. The router
        works on the E logical experts; with an expert map (moejax/moe/expert_map.py) the removed ones are masked
        and the selected ids become stored ids before dispatch. The statistics count logical experts.
        identity_bias [z]: the identity experts' selection bias (num_identity_experts), after the experts' own."""
        cfg = self.cfg
        num_experts = cfg.num_experts
        num_tokens = tokens.shape[0]
        spec = routers.spec(cfg.router.kind)
        router_in = tokens.astype(jnp.float32)
        if train and cfg.router.jitter > 0:
            router_in = routers.jitter(router_in, cfg.router.jitter, self.make_rng("jitter"))
        if intervention is not None:
            bias = intervene.selection_bias(intervention, layer, bias)
        ctx = routers.RouterContext(
            bias=bias, train=train,
            rng=self.make_rng("routing") if train and spec.needs_rng else None,
            token_ids=token_ids if spec.needs_token_ids else None,
            progress=progress if spec.needs_progress else None)
        logits = kernel(router_in)
        map_row = expert_map.layer_row(cfg, layer) if expert_map.has_map(cfg) else None
        if map_row is not None:
            logits, bias = expert_map.mask_removed(logits, ctx.bias, map_row, num_experts)
            ctx = dataclasses.replace(ctx, bias=bias)
        if identity_bias is not None:
            ctx = dataclasses.replace(ctx, bias=jnp.concatenate([ctx.bias, identity_bias.astype(jnp.float32)]))
        route = spec.fn(logits, cfg, ctx)
        if intervention is not None:
            route = intervene.apply(intervention, layer, route, cfg, bias=bias)
        logical = route
        if map_row is not None:
            stored, stored_weights = expert_map.to_stored(route.experts, route.weights, map_row, num_experts,
                                                          num_stored)
            route = dataclasses.replace(route, experts=stored, weights=stored_weights)
        num_weights = num_stored
        if placement.has_placement(cfg):  # stored -> physical: a replica per token
            num_weights = placement.physical_count(cfg)
            replicas, counts = placement.layer_tables(cfg, layer, num_stored)
            route = dataclasses.replace(route, experts=placement.to_physical(route.experts, replicas, counts,
                                                                             num_stored, num_weights))
        backend = experts.resolve_backend(cfg.gmm_backend)
        cap = None
        if cfg.dispatch == "capacity":
            factor = cfg.capacity_factor if train or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
            cap = dispatch.capacity(num_tokens, cfg.top_k, num_stored, factor)  # per expert, not per replica
        expert, slot_inputs = expert_lora.slot_dropout(self, self.lora, expert, route.experts.size, tokens.shape[-1],
                                                       cfg.expert_ffn, self.dtype)
        routed_in = tokens
        if cfg.get("scale_expert_input", False):  # Llama 4: the weight scales the expert's input (top-1: validate)
            routed_in = tokens * route.weights.astype(tokens.dtype)
            route = dataclasses.replace(route, weights=jnp.ones_like(route.weights))
        if self.mesh is not None and self.mesh.size > 1:
            if slot_inputs is not None:
                raise ValueError(f"model.lora.dropout={self.lora.dropout} on routed-expert adapters runs on one "
                                 f"device only: set it to 0 on a mesh of {self.mesh.size} devices")
            tensor = self.mesh.shape.get("tensor", 1)
            if tensor > 1 and expert.after_contraction:  # the layer sums the tensor shards' partial outputs
                weights = tuple(w / tensor if name in expert.after_contraction else w
                                for name, w in zip(expert.param_names, weights, strict=True))
            out, dropped, overflow = expert_parallel.moe_ep(routed_in, route, expert, weights,
                                                            expert_map.with_num_experts(cfg, num_weights), self.mesh,
                                                            capacity=cap, backend=backend, compute_dtype=self.dtype)
        else:
            tile = pipeline.tile_for(backend, cfg.gmm_tile, num_tokens * route.experts.shape[1], num_weights)
            out, dropped = pipeline.routed_experts(routed_in.astype(self.dtype), route, expert, weights,
                                                   num_experts=num_weights, backend=backend,
                                                   kernel=cfg.dispatch_kernel, tile=tile, capacity=cap,
                                                   drop_policy=cfg.drop_policy, slot_inputs=slot_inputs)
            overflow = jnp.zeros((), jnp.int32)
        route = logical
        if identity_bias is not None:  # each identity slot returns the token itself, times its weight
            is_identity = (route.experts >= num_experts) & (route.experts < num_experts + identity_bias.shape[0])
            gate = jnp.where(is_identity, route.weights, 0.0).sum(-1, keepdims=True)
            out = out + (tokens.astype(jnp.float32) * gate).astype(out.dtype)
        valid = route.experts < num_experts
        balance, device_balance = losses.balance_losses(route, cfg, batch)
        self.sow("moe_aux", stats.STATS, stats.RoutedStats(
            layer=jnp.asarray(layer, jnp.int32),
            tokens_per_expert=dispatch.slots_per_expert(route.experts, num_experts).astype(jnp.float32),
            dropped=dropped.astype(jnp.float32), overflow=overflow.astype(jnp.float32),
            routed_slots=valid.sum().astype(jnp.float32), num_tokens=jnp.asarray(num_tokens, jnp.float32),
            router_entropy=losses.router_entropy(route.probs), balance_loss=balance,
            device_balance_loss=device_balance, z_loss=losses.z_loss(route.logits)))
        return out

