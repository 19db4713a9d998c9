"""The MoE-layer tests' shared setup: a layer with its inputs, the differentiable dense reference of the layer, and
loss + gradients of a layer (single-device or on a mesh).

``dense_moe`` is the gradient reference: every expert on every token (einsums, no dispatch), combined with
routing decisions made in numpy (tests/reference.py), in jnp so that jax.grad differentiates it. The forward
reference is the naive loop ``reference.moe_layer``.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import parallel
from moejax.moe import layer, stats
from tests import reference

B, S, D = 2, 12, 16  # the default input [B, S, D]


def init(cfg, seed=0, bias=None, dtype=jnp.float32, shape=(B, S, D), std=0.4):
    """(layer, x [shape], params, moe_state): ``MoE(cfg)`` initialised with normal(std) kernels; moe_state holds
    ``bias`` as its router_bias (zeros when None)."""
    module = layer.MoE(cfg, dtype=dtype, kernel_init=nn.initializers.normal(std))
    x = jax.random.normal(jax.random.key(seed), shape)
    params = module.init(jax.random.key(seed + 1), x)["params"]
    state = {"router_bias": jnp.zeros(cfg.num_experts) if bias is None else jnp.asarray(bias, jnp.float32)}
    return module, x, params, state


def one_expert_bias(num_experts, expert=3):
    """A selection-only router bias that sends every token's first slot to ``expert``."""
    return np.zeros(num_experts, np.float32) + 100.0 * (np.arange(num_experts) == expert)


def decisions(cfg, params, x, bias=None, train=False):
    """The numpy routing decisions of the layer on x: (tokens [T, D] float64, ids [T, k], weights [T, k],
    keep [T, k])."""
    tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = tokens @ np.asarray(params["router"]["kernel"], np.float64)
    ids, weights = reference.route_tokens(logits, cfg, None if bias is None else np.asarray(bias, np.float64))
    return tokens, ids, weights, reference.kept_slots(cfg, ids, weights, train)


def dense_moe(cfg, params, x, ids, keep):
    """y_t = sum over kept slots of w_tj * GLU_{e_tj}(x_t) (+ the gated shared GLU), every expert computed on
    every token; the weights recomputed from the router kernel in jnp (differentiable), the choices fixed."""
    r = cfg.router
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ params["router"]["kernel"]
    rows = jnp.arange(tokens.shape[0])[:, None]
    if r.score == "sigmoid":
        w = jax.nn.sigmoid(logits)[rows, ids]
    elif r.softmax_before_topk:
        w = jax.nn.softmax(logits)[rows, ids]
    else:
        w = jax.nn.softmax(logits[rows, ids])
    if r.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    w = w * r.routed_scaling_factor * keep
    combine = jnp.zeros((tokens.shape[0], cfg.num_experts)).at[rows, ids].add(w)
    p = params["experts"]
    h = jax.nn.silu(jnp.einsum("td,edf->etf", tokens, p["wi_0"])) * jnp.einsum("td,edf->etf", tokens, p["wi_1"])
    y = jnp.einsum("etf,efd,te->td", h, p["wo"], combine)
    if cfg.num_shared:
        s = params["shared"]
        shared = (jax.nn.silu(tokens @ s["wi_0"]) * (tokens @ s["wi_1"])) @ s["wo"]
        if cfg.shared_gate:
            shared = shared * jax.nn.sigmoid(tokens @ params["shared_gate"]["kernel"])
        y = y + shared
    return y.reshape(x.shape)


def mesh_of(shape):
    """A mesh of (data, fsdp, expert, tensor) sizes over the forced host devices."""
    return jax.make_mesh(shape, parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def token_sharding(mesh):
    return NamedSharding(mesh, P(parallel.TOKEN_AXES))


def loss_and_grads(module, params, state, x, sharding=None):
    """(y, gradients w.r.t. (params, x), moe_aux) of sum(y * cos(y)) in training mode, jitted; x placed with
    ``sharding`` when given."""
    def loss(params, x):
        y, aux = module.apply({"params": params, "moe_state": state}, x, train=True, mutable=["moe_aux"])
        return jnp.sum(y * jnp.cos(y)), (y, aux["moe_aux"])

    if sharding is not None:
        x = jax.device_put(x, sharding)
    (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads, aux


def assert_trees_close(got, want, rtol=1e-5, atol=1e-5, relative_atol=False, what=""):
    """Every leaf of got close to the same leaf of want (atol scaled by max |want| when relative_atol)."""
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        tol = atol * float(jnp.abs(w).max()) if relative_atol else atol
        np.testing.assert_allclose(g, w, rtol=rtol, atol=tol, err_msg=f"{what} {jax.tree_util.keystr(path)}")


def lone_stats(moe_aux):
    """The RoutedStats record (passes combined) of a lone MoE layer applied with mutable=['moe_aux']."""
    (record,) = stats.collect(moe_aux).values()
    return record
