"""The MoE layer against independent references: its forward pass against the naive per-token loop
``reference.moe_layer`` (routing decided in numpy), its gradients against the dense every-expert-on-every-token
formulation (tests/helpers_moe.py), its statistics against numpy counts and formulas; the expert kinds and
dispatch plans."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checks, model
from moejax.moe import dispatch, experts, layer, routers, stats
from tests import helpers_configs, helpers_moe
from tests import reference as ref
from tests.helpers_moe import B, D, S

F = 8  # helpers_configs.moe's expert width


def assert_layer_matches_reference(cfg, seed=0, bias=None):
    """Forward against reference.moe_layer, every gradient (params and input) against helpers_moe.dense_moe."""
    module, x, params, state = helpers_moe.init(cfg, seed, bias)
    tokens, ids, weights, keep = helpers_moe.decisions(cfg, params, x, bias)
    y = module.apply({"params": params, "moe_state": state}, x)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref.moe_layer(tokens, params, ids, weights, keep),
                               rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(99), x.shape)
    got = jax.grad(lambda p, x: jnp.sum(module.apply({"params": p, "moe_state": state}, x) * cotangent),
                   argnums=(0, 1))(params, x)
    want = jax.grad(lambda p, x: jnp.sum(helpers_moe.dense_moe(cfg, p, x, ids, keep) * cotangent),
                    argnums=(0, 1))(params, x)
    helpers_moe.assert_trees_close(got, want, relative_atol=True)
    return ids, keep


@pytest.mark.parametrize("router", sorted(helpers_configs.ROUTERS))
@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_forward_and_gradients_match_reference(router, mode):
    cfg = helpers_configs.moe(router, dispatch=mode, capacity_factor=1.0)
    bias = np.random.default_rng(3).normal(size=8) * 0.1 if router == "deepseek_v3" else None
    _, keep = assert_layer_matches_reference(cfg, bias=bias)
    if mode == "capacity":
        assert not keep.all(), "the capacity case should drop something to be a real test"


@pytest.mark.parametrize("shared_gate", [False, True])
def test_shared_experts(shared_gate):
    """DeepSeekMoE (fused shared experts) and Qwen2-MoE (shared expert behind a sigmoid gate)."""
    cfg = helpers_configs.moe("deepseek_v2", num_shared=2, shared_gate=shared_gate)
    assert_layer_matches_reference(cfg)
    _, _, params, _ = helpers_moe.init(cfg)
    assert params["shared"]["wi_0"].shape == (D, 2 * F) and params["shared"]["wo"].shape == (2 * F, D)
    assert ("shared_gate" in params) == shared_gate


@pytest.mark.parametrize("backend,tile", [("tiled", 1), ("tiled", 3), ("tiled", 64), ("ragged_dot", 0)])
def test_dropless_backends_and_tiles(backend, tile):
    assert_layer_matches_reference(helpers_configs.moe("mixtral", gmm_backend=backend, gmm_tile=tile))


def test_applies_without_a_moe_state_collection():
    """{'params': p} alone routes with a zero router bias; init still creates the bias in 'moe_state'."""
    cfg = helpers_configs.moe("mixtral")
    module, x, params, state = helpers_moe.init(cfg)
    y = module.apply({"params": params}, x)
    tokens, ids, weights, _ = helpers_moe.decisions(cfg, params, x)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref.moe_layer(tokens, params, ids, weights),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, module.apply({"params": params, "moe_state": state}, x))
    _, aux = module.apply({"params": params}, x, train=True, mutable=["moe_aux"])
    assert helpers_moe.lone_stats(aux["moe_aux"]).tokens_per_expert.shape == (8,)
    assert jax.tree.map(jnp.shape, module.init(jax.random.key(0), x)["moe_state"]) == {"router_bias": (8,)}


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_capacity_policies_drop_as_specified(policy):
    cfg = helpers_configs.moe("switch", dispatch="capacity", capacity_factor=0.5, drop_policy=policy, top_k=1,
                              num_experts=4)
    _, keep = assert_layer_matches_reference(cfg, seed=5)
    module, x, params, state = helpers_moe.init(cfg, 5)
    _, aux = module.apply({"params": params, "moe_state": state}, x, mutable=["moe_aux"])
    record = helpers_moe.lone_stats(aux["moe_aux"])
    assert float(record.drop_fraction) == pytest.approx(1 - keep.mean())
    assert float(record.dropped) == (~keep).sum() and float(record.overflow) == 0.0


def test_capacity_crafted_drops():
    """C = ceil(1.0 * 6 * 1 / 2) = 3; expert 0 gets tokens 0,1,3,5 and must drop one of them."""
    experts_ = jnp.array([[0], [0], [1], [0], [1], [0]], jnp.int32)
    weights = jnp.array([[0.9], [0.5], [0.6], [0.7], [0.8], [0.95]])
    route = routers.Routing(weights=weights, experts=experts_, probs=jnp.zeros((6, 2)), logits=jnp.zeros((6, 2)))
    cap = dispatch.capacity(6, 1, 2, 1.0)
    assert cap == 3
    for policy, dropped_token in [("position", 5), ("probs", 1)]:
        plan = dispatch.capacity_plan(route, 2, cap, policy)
        dropped = np.flatnonzero(np.asarray(plan.slot_row[:, 0]) >= plan.num_rows)
        assert dropped.tolist() == [dropped_token] and int(plan.dropped) == 1
        assert np.asarray(plan.tokens_per_expert).tolist() == [4, 2]


def test_dropless_equals_capacity_when_capacity_covers_worst_case():
    cfg = helpers_configs.moe("mixtral")
    module, x, params, state = helpers_moe.init(cfg)
    dropless = module.apply({"params": params, "moe_state": state}, x)
    cfg.update(dispatch="capacity", capacity_factor=cfg.num_experts / cfg.top_k)  # C = T: nothing can drop
    capped, aux = layer.MoE(cfg).apply({"params": params, "moe_state": state}, x, mutable=["moe_aux"])
    np.testing.assert_allclose(capped, dropless, rtol=1e-6, atol=1e-6)
    assert float(helpers_moe.lone_stats(aux["moe_aux"]).drop_fraction) == 0.0


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_all_tokens_to_one_expert(mode):
    bias = helpers_moe.one_expert_bias(8)  # selection-only: every token picks expert 3 first, weights unchanged
    cfg = helpers_configs.moe("mixtral", dispatch=mode)
    ids, keep = assert_layer_matches_reference(cfg, bias=bias)
    assert (ids[:, 0] == 3).all()
    module, x, params, state = helpers_moe.init(cfg, bias=bias)
    _, aux = module.apply({"params": params, "moe_state": state}, x, mutable=["moe_aux"])
    record = helpers_moe.lone_stats(aux["moe_aux"])
    np.testing.assert_array_equal(record.tokens_per_expert, np.bincount(ids.reshape(-1), minlength=8))
    tokens, cap = B * S, ref.capacity(B * S, 2, 8, cfg.capacity_factor)
    expected_drop = (tokens - cap) / (2 * tokens) if mode == "capacity" else 0.0
    assert float(record.drop_fraction) == pytest.approx(expected_drop)
    assert float(record.maxvio) == pytest.approx(tokens / (2 * tokens / 8) - 1)


@pytest.mark.parametrize("router,fields", [("mixtral", dict(dispatch="capacity", capacity_factor=0.75)),
                                           ("deepseek_v3", dict(balance_loss="deepseek", device_balance_coef=0.1,
                                                                device_groups=4, balance_scope="sequence"))])
def test_stats_record_matches_numpy(router, fields):
    """The one record a routed pass sows: its layer index, the loads, drops, slots and tokens counted in numpy,
    and the unweighted router entropy, balance and z losses by their formulas."""
    cfg = helpers_configs.moe(router, **fields)
    module, x, params, state = helpers_moe.init(cfg, seed=4)
    _, aux = module.apply({"params": params, "moe_state": state}, x, train=True, layer=5, mutable=["moe_aux"])
    assert list(aux["moe_aux"]) == [stats.STATS] and len(aux["moe_aux"][stats.STATS]) == 1
    record = helpers_moe.lone_stats(aux["moe_aux"])
    tokens, ids, _, keep = helpers_moe.decisions(cfg, params, x, train=True)
    logits = tokens @ np.asarray(params["router"]["kernel"], np.float64)
    probs = ref.sigmoid(logits) if cfg.router.score == "sigmoid" else ref.softmax(logits)
    assert int(record.layer) == 5
    np.testing.assert_array_equal(record.tokens_per_expert, np.bincount(ids.reshape(-1), minlength=8))
    assert float(record.dropped) == (~keep).sum() and float(record.routed_slots) == ids.size
    assert float(record.num_tokens) == B * S and float(record.experts_per_token) == 2.0
    normalised = probs / probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(float(record.router_entropy), np.mean(-(normalised * np.log(normalised)).sum(-1)),
                               rtol=1e-5)
    np.testing.assert_allclose(float(record.z_loss), np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=1e-5)
    groups = [range(B * S)] if cfg.balance_scope == "batch" else [range(b * S, (b + 1) * S) for b in range(B)]
    expert_level, device_level = [], []
    for g in groups:
        f, p = ref.balance_terms([ids[t] for t in g], [probs[t] for t in g], 8)
        expert_level.append(8 * (f * p).sum())
        device_level.append(sum(np.mean(8 * f[d * 2:(d + 1) * 2]) * np.sum(p[d * 2:(d + 1) * 2]) for d in range(4)))
    np.testing.assert_allclose(float(record.balance_loss), np.mean(expert_level), rtol=1e-5)
    expected_device = np.mean(device_level) if cfg.balance_loss == "deepseek" else 0.0
    np.testing.assert_allclose(float(record.device_balance_loss), expected_device, rtol=1e-5)


def test_null_slots_contribute_nothing():
    """Expert id E marks a null slot: no row, no output, no gradient."""
    x = jax.random.normal(jax.random.key(0), (4, 3))
    experts_ = jnp.array([[0, 2], [2, 1], [1, 2], [0, 0]], jnp.int32)  # E = 2 is the null id
    weights = jnp.array([[1.0, 5.0], [5.0, 2.0], [3.0, 5.0], [0.5, 0.25]])
    route = routers.Routing(weights=weights, experts=experts_, probs=jnp.zeros((4, 2)), logits=jnp.zeros((4, 2)))
    plan = dispatch.dropless_plan(route, 2, tile=2)
    y = dispatch.unpermute_combine(dispatch.permute(x, plan.slot_row, plan.row_slot) * 2.0, weights,
                                   plan.slot_row, plan.row_slot)
    expected = np.stack([1.0 * 2 * x[0], 2.0 * 2 * x[1], 3.0 * 2 * x[2], 0.75 * 2 * x[3]])
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert np.asarray(plan.tokens_per_expert).tolist() == [3, 2]
    assert np.asarray(dispatch.slots_per_expert(experts_, 2)).tolist() == [3, 2]


def test_jitter_only_in_training():
    cfg = helpers_configs.moe("mixtral", dispatch="capacity")
    cfg.router.jitter = 0.5
    module, x, params, state = helpers_moe.init(cfg)
    variables = {"params": params, "moe_state": state}
    eval_out = module.apply(variables, x)  # no noise, no rng needed: the numpy reference's routing
    tokens, ids, weights, keep = helpers_moe.decisions(cfg, params, x)
    np.testing.assert_allclose(np.asarray(eval_out).reshape(-1, D), ref.moe_layer(tokens, params, ids, weights, keep),
                               rtol=1e-5, atol=1e-5)
    train_out = module.apply(variables, x, train=True, rngs={"jitter": jax.random.key(1)})
    assert not np.allclose(train_out, eval_out)


def test_eval_capacity_factor():
    cfg = helpers_configs.moe("mixtral", dispatch="capacity", capacity_factor=0.5, eval_capacity_factor=4.0)
    module, x, params, state = helpers_moe.init(cfg)
    _, aux = module.apply({"params": params, "moe_state": state}, x, mutable=["moe_aux"])
    assert float(helpers_moe.lone_stats(aux["moe_aux"]).drop_fraction) == 0.0
    _, aux = module.apply({"params": params, "moe_state": state}, x, train=True, mutable=["moe_aux"])
    assert float(helpers_moe.lone_stats(aux["moe_aux"]).drop_fraction) > 0.0


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_bfloat16_close_to_float32(mode):
    cfg = helpers_configs.moe("deepseek_v2", dispatch=mode, num_shared=1)
    _, x, params, state = helpers_moe.init(cfg)
    full = layer.MoE(cfg).apply({"params": params, "moe_state": state}, x)
    half = layer.MoE(cfg, dtype=jnp.bfloat16).apply({"params": params, "moe_state": state}, x)
    assert half.dtype == jnp.bfloat16
    err = float(jnp.linalg.norm(half.astype(jnp.float32) - full) / jnp.linalg.norm(full))
    assert err < 2e-2
    grads = jax.grad(lambda p: layer.MoE(cfg, dtype=jnp.bfloat16).apply(
        {"params": p, "moe_state": state}, x).astype(jnp.float32).sum())(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert grads["router"]["kernel"].dtype == jnp.float32


def test_parameter_tree_and_state():
    cfg = helpers_configs.moe("mixtral", num_shared=1, shared_gate=True)
    variables = layer.MoE(cfg).init(jax.random.key(0), jnp.zeros((B, S, D)))
    shapes = jax.tree.map(jnp.shape, {k: variables[k] for k in ("params", "moe_state")})
    assert shapes == {
        "params": {"router": {"kernel": (D, 8)},
                   "experts": {"wi_0": (8, D, F), "wi_1": (8, D, F), "wo": (8, F, D)},
                   "shared": {"wi_0": (D, F), "wi_1": (D, F), "wo": (F, D)},
                   "shared_gate": {"kernel": (D, 1)}},
        "moe_state": {"router_bias": (8,)},
    }


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_glu_experts_one_by_one_and_grouped(activation):
    """GLUExperts: its parameter shapes and axes, apply_one (one expert) and grouped_apply over expert-sorted rows
    on the tiled and ragged_dot backends, against the numpy GLU of each row's expert."""
    kind = experts.from_config(helpers_configs.moe(activation=activation))
    assert kind == experts.GLUExperts(activation) and experts.EXPERT_KINDS["glu"] is experts.GLUExperts
    shapes = kind.param_shapes(3, 6, 5)
    assert shapes == {"wi_0": (3, 6, 5), "wi_1": (3, 6, 5), "wo": (3, 5, 6)}
    assert set(kind.param_axes) == set(kind.param_names) == set(shapes)
    assert all(len(kind.param_axes[n]) == len(shapes[n]) and kind.param_axes[n][0] == "expert" for n in shapes)
    rng = np.random.default_rng(0)
    weights = tuple(jnp.asarray(rng.normal(size=shapes[n]), jnp.float32) for n in kind.param_names)
    x = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
    np.testing.assert_allclose(kind.apply_one(x, *(w[1] for w in weights)),
                               ref.glu(x, *(w[1] for w in weights), act=activation), rtol=1e-5, atol=1e-5)
    owner = np.array([0, 0, 2, 2, 2, 1, 1])  # rows sorted by expert
    route = routers.Routing(weights=jnp.ones((7, 1)), experts=jnp.asarray(owner[:, None], jnp.int32), probs=None,
                            logits=None)
    want = np.stack([ref.glu(x[r], *(w[owner[r]] for w in weights), act=activation) for r in range(7)])
    for backend, tile in (("tiled", 2), ("ragged_dot", 1)):
        plan = dispatch.dropless_plan(route, 3, tile)
        rows = dispatch.permute(x, plan.slot_row, plan.row_slot)
        out = experts.grouped_apply(kind, rows, weights, plan, backend)
        got = dispatch.unpermute_combine(out, route.weights, plan.slot_row, plan.row_slot)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=backend)


def test_unknown_expert_kind_is_named():
    cfg = helpers_configs.moe()
    cfg.expert_kind = "mlp"
    with pytest.raises(checks.ConfigError, match=r"model\.moe\.expert_kind='mlp'.*'glu'"):
        layer.validate(cfg)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_stats_by_layer_in_layer_order(scan_layers):
    """A Transformer with dense layers between MoE layers: collect finds one record per MoE module (by its path,
    stacked when scanned) and by_layer orders them by the layer index each one stores."""
    config = helpers_configs.tiny().model
    config.num_layers, config.first_dense_layers, config.moe_every, config.scan_layers = 5, 1, 2, scan_layers
    assert model.moe_layers(config) == [1, 3]
    module = model.Transformer(config)
    tokens = jnp.zeros((2, 8), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(0), tokens)["params"]
    _, aux = jax.jit(lambda p: module.apply({"params": p}, tokens, mutable=["moe_aux"]))(params)
    collected = stats.collect(aux["moe_aux"])
    if scan_layers:
        assert list(collected) == [("blocks", "block_0", "ffn")]
    else:
        assert list(collected) == [("layers_1", "ffn"), ("layers_3", "ffn")]
    per_layer = stats.by_layer(collected)
    assert per_layer.layer.tolist() == [1, 3] and per_layer.tokens_per_expert.shape == (2, 8)
    np.testing.assert_array_equal(per_layer.tokens_per_expert.sum(-1), [2 * 8 * 2] * 2)
    assert all(getattr(per_layer, name).shape == (2,) for name in stats.LAYER_STATS)
    assert stats.by_layer({}) is None


def test_core_imports_only_jax_flax_numpy_ml_collections():
    import subprocess
    import sys
    code = ("import sys; import moejax.moe.layer, moejax.model; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tensorflow_datasets', 'optax', "
            "'orbax', 'grain', 'clu', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
