"""The MoE layer against a naive dense reference: every expert on every token, combined by numpy-made decisions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import dispatch, moe, routing
from tests import reference as ref

B, S, D, F = 2, 12, 16, 8

ROUTERS = {
    "mixtral": dict(score="softmax", norm_topk_prob=True),
    "deepseek_v2": dict(score="softmax", num_groups=4, topk_groups=2, group_score="max", routed_scaling_factor=16.0),
    "deepseek_v3": dict(score="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum", norm_topk_prob=True,
                        routed_scaling_factor=2.5),
    "megatron": dict(score="softmax", softmax_before_topk=False),
    "switch": dict(score="softmax"),
}


def make_cfg(router="mixtral", **fields):
    cfg = base.get_config().model.moe
    cfg.update(num_experts=8, top_k=2, expert_ffn=F)
    cfg.router.update(ROUTERS[router])
    cfg.update(fields)
    moe.validate(cfg)
    return cfg


def init(cfg, seed=0, bias=None, dtype=jnp.float32):
    layer = moe.MoE(cfg, dtype=dtype, kernel_init=nn.initializers.normal(0.4))
    x = jax.random.normal(jax.random.key(seed), (B, S, D))
    variables = layer.init(jax.random.key(seed + 1), x)
    state = {"router_bias": jnp.zeros(cfg.num_experts) if bias is None else jnp.asarray(bias, jnp.float32)}
    return layer, x, variables["params"], state


def decisions(cfg, logits, bias, train=False):
    """Numpy routing decisions (ids, keep mask) from the knob definitions in tests/reference.py."""
    r = cfg.router
    ids = np.array([ref.route_token(row, k=cfg.top_k, score=r.score, softmax_before_topk=r.softmax_before_topk,
                                    num_groups=r.num_groups, topk_groups=r.topk_groups, group_score=r.group_score,
                                    fill=r.group_mask_fill, bias=bias)[0] for row in logits])
    keep = np.ones(ids.shape, bool)
    if cfg.dispatch == "capacity":
        factor = cfg.capacity_factor if train or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
        weights = [ref.route_token(row, k=cfg.top_k, score=r.score, softmax_before_topk=r.softmax_before_topk,
                                   norm_topk_prob=r.norm_topk_prob, scaling=r.routed_scaling_factor,
                                   num_groups=r.num_groups, topk_groups=r.topk_groups, group_score=r.group_score,
                                   fill=r.group_mask_fill, bias=bias)[1] for row in logits]
        cap = ref.capacity(len(ids), cfg.top_k, cfg.num_experts, factor)
        keep = np.array(ref.capacity_keep(ids, weights, cfg.num_experts, cap, cfg.drop_policy))
    return ids, keep


def reference_moe(cfg, params, x, ids, keep):
    """y_t = sum over kept slots of w_tj * GLU_{e_tj}(x_t) (+ gated shared GLU); weights differentiable in jnp."""
    r = cfg.router
    tokens = x.reshape(-1, D)
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


def assert_layer_matches_reference(cfg, seed=0, bias=None):
    layer, x, params, state = init(cfg, seed, bias)
    logits = np.asarray(x.reshape(-1, D) @ params["router"]["kernel"])
    ids, keep = decisions(cfg, logits, None if bias is None else np.asarray(bias))
    cotangent = jax.random.normal(jax.random.key(99), x.shape)

    def loss_layer(params, x):
        return jnp.sum(layer.apply({"params": params, "moe_state": state}, x) * cotangent)

    def loss_ref(params, x):
        return jnp.sum(reference_moe(cfg, params, x, ids, keep) * cotangent)

    y = layer.apply({"params": params, "moe_state": state}, x)
    np.testing.assert_allclose(y, reference_moe(cfg, params, x, ids, keep), rtol=1e-5, atol=1e-5)
    got = jax.grad(loss_layer, argnums=(0, 1))(params, x)
    want = jax.grad(loss_ref, argnums=(0, 1))(params, x)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()), err_msg=str(path))
    return ids, keep


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_forward_and_gradients_match_reference(router, mode):
    cfg = make_cfg(router, dispatch=mode, capacity_factor=1.0)
    bias = np.random.default_rng(3).normal(size=8) * 0.1 if router == "deepseek_v3" else None
    _, keep = assert_layer_matches_reference(cfg, bias=bias)
    if mode == "capacity":
        assert not keep.all(), "the capacity case should drop something to be a real test"


@pytest.mark.parametrize("shared_gate", [False, True])
def test_shared_experts(shared_gate):
    """DeepSeekMoE (fused shared experts) and Qwen2-MoE (shared expert behind a sigmoid gate)."""
    cfg = make_cfg("deepseek_v2", num_shared=2, shared_gate=shared_gate)
    assert_layer_matches_reference(cfg)
    _, _, params, _ = init(cfg)
    assert params["shared"]["wi_0"].shape == (D, 2 * F) and params["shared"]["wo"].shape == (2 * F, D)
    assert ("shared_gate" in params) == shared_gate


@pytest.mark.parametrize("backend,tile", [("tiled", 1), ("tiled", 3), ("tiled", 64), ("ragged_dot", 0)])
def test_dropless_backends_and_tiles(backend, tile):
    assert_layer_matches_reference(make_cfg("mixtral", gmm_backend=backend, gmm_tile=tile))


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_capacity_policies_drop_as_specified(policy):
    cfg = make_cfg("switch", dispatch="capacity", capacity_factor=0.5, drop_policy=policy, top_k=1,
                   num_experts=4)
    _, keep = assert_layer_matches_reference(cfg, seed=5)
    layer, x, params, state = init(cfg, 5)
    _, aux = layer.apply({"params": params, "moe_state": state}, x, mutable=["moe_aux"])
    assert float(aux["moe_aux"]["drop_fraction"][0]) == pytest.approx(1 - keep.mean())


def test_capacity_crafted_drops():
    """C = ceil(1.0 * 6 * 1 / 2) = 3; expert 0 gets tokens 0,1,3,5 and must drop one of them."""
    experts = jnp.array([[0], [0], [1], [0], [1], [0]], jnp.int32)
    weights = jnp.array([[0.9], [0.5], [0.6], [0.7], [0.8], [0.95]])
    route = routing.Routing(weights=weights, experts=experts, probs=jnp.zeros((6, 2)), logits=jnp.zeros((6, 2)))
    cap = dispatch.capacity(6, 1, 2, 1.0)
    assert cap == 3
    for policy, dropped_token in [("position", 5), ("probs", 1)]:
        plan = dispatch.capacity_plan(route, 2, cap, policy)
        dropped = np.flatnonzero(np.asarray(plan.slot_row[:, 0]) >= plan.num_rows)
        assert dropped.tolist() == [dropped_token] and int(plan.dropped) == 1
        assert np.asarray(plan.tokens_per_expert).tolist() == [4, 2]


def test_dropless_equals_capacity_when_capacity_covers_worst_case():
    cfg = make_cfg("mixtral")
    layer, x, params, state = init(cfg)
    dropless = layer.apply({"params": params, "moe_state": state}, x)
    cfg.update(dispatch="capacity", capacity_factor=cfg.num_experts / cfg.top_k)  # C = T: nothing can drop
    capped, aux = moe.MoE(cfg).apply({"params": params, "moe_state": state}, x, mutable=["moe_aux"])
    np.testing.assert_allclose(capped, dropless, rtol=1e-6, atol=1e-6)
    assert float(aux["moe_aux"]["drop_fraction"][0]) == 0.0


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_all_tokens_to_one_expert(mode):
    bias = np.zeros(8)
    bias[3] = 100.0  # selection-only: every token picks expert 3 first, weights unchanged
    cfg = make_cfg("mixtral", dispatch=mode)
    ids, keep = assert_layer_matches_reference(cfg, bias=bias)
    assert (ids[:, 0] == 3).all()
    layer, x, params, state = init(cfg, bias=bias)
    _, aux = layer.apply({"params": params, "moe_state": state}, x, mutable=["moe_aux"])
    counts = np.asarray(aux["moe_aux"]["tokens_per_expert"][0])
    np.testing.assert_array_equal(counts, np.bincount(ids.reshape(-1), minlength=8))
    tokens, cap = B * S, ref.capacity(B * S, 2, 8, cfg.capacity_factor)
    expected_drop = (tokens - cap) / (2 * tokens) if mode == "capacity" else 0.0
    assert float(aux["moe_aux"]["drop_fraction"][0]) == pytest.approx(expected_drop)


def test_null_slots_contribute_nothing():
    """Expert id E marks a null slot: no row, no output, no gradient."""
    x = jax.random.normal(jax.random.key(0), (4, 3))
    experts = jnp.array([[0, 2], [2, 1], [1, 2], [0, 0]], jnp.int32)  # E = 2 is the null id
    weights = jnp.array([[1.0, 5.0], [5.0, 2.0], [3.0, 5.0], [0.5, 0.25]])
    route = routing.Routing(weights=weights, experts=experts, probs=jnp.zeros((4, 2)), logits=jnp.zeros((4, 2)))
    plan = dispatch.dropless_plan(route, 2, tile=2)
    y = dispatch.unpermute_combine(dispatch.permute(x, plan.slot_row, plan.row_slot) * 2.0, weights,
                                   plan.slot_row, plan.row_slot)
    expected = np.stack([1.0 * 2 * x[0], 2.0 * 2 * x[1], 3.0 * 2 * x[2], 0.75 * 2 * x[3]])
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert np.asarray(plan.tokens_per_expert).tolist() == [3, 2]


def test_jitter_only_in_training():
    cfg = make_cfg("mixtral", dispatch="capacity")
    cfg.router.jitter = 0.5
    layer, x, params, state = init(cfg)
    variables = {"params": params, "moe_state": state}
    eval_out = layer.apply(variables, x)
    assert np.array_equal(eval_out, layer.apply(variables, x))
    train_out = layer.apply(variables, x, train=True, rngs={"jitter": jax.random.key(1)})
    assert not np.allclose(train_out, eval_out)


def test_eval_capacity_factor():
    cfg = make_cfg("mixtral", dispatch="capacity", capacity_factor=0.5, eval_capacity_factor=4.0)
    layer, x, params, state = init(cfg)
    _, aux = layer.apply({"params": params, "moe_state": state}, x, mutable=["moe_aux"])
    assert float(aux["moe_aux"]["drop_fraction"][0]) == 0.0
    _, aux = layer.apply({"params": params, "moe_state": state}, x, train=True, mutable=["moe_aux"])
    assert float(aux["moe_aux"]["drop_fraction"][0]) > 0.0


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_bfloat16_close_to_float32(mode):
    cfg = make_cfg("deepseek_v2", dispatch=mode, num_shared=1)
    _, x, params, state = init(cfg)
    full = moe.MoE(cfg).apply({"params": params, "moe_state": state}, x)
    half = moe.MoE(cfg, dtype=jnp.bfloat16).apply({"params": params, "moe_state": state}, x)
    assert half.dtype == jnp.bfloat16
    err = float(jnp.linalg.norm(half.astype(jnp.float32) - full) / jnp.linalg.norm(full))
    assert err < 2e-2
    grads = jax.grad(lambda p: moe.MoE(cfg, dtype=jnp.bfloat16).apply(
        {"params": p, "moe_state": state}, x).astype(jnp.float32).sum())(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert grads["router"]["kernel"].dtype == jnp.float32


def test_parameter_tree_and_state():
    cfg = make_cfg("mixtral", num_shared=1, shared_gate=True)
    variables = moe.MoE(cfg).init(jax.random.key(0), jnp.zeros((B, S, D)))
    shapes = jax.tree.map(jnp.shape, {k: variables[k] for k in ("params", "moe_state")})
    assert shapes == {
        "params": {"router": {"kernel": (D, 8)},
                   "experts": {"wi_0": (8, D, F), "wi_1": (8, D, F), "wo": (8, F, D)},
                   "shared": {"wi_0": (D, F), "wi_1": (D, F), "wo": (F, D)},
                   "shared_gate": {"kernel": (D, 1)}},
        "moe_state": {"router_bias": (8,)},
    }


def test_core_imports_only_jax_flax_numpy_ml_collections():
    import subprocess
    import sys
    code = ("import sys; import moejax.moe, moejax.model; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tensorflow_datasets', 'optax', "
            "'orbax', 'grain', 'clu', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
