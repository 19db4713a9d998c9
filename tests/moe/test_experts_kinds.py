"""The expert kinds beyond the GLU, and the MoE-layer options of released models: GPT-OSS experts (biased, clamped
SwiGLU) against numpy, one by one and through the tiled and ragged_dot backends (output and gradients), the whole
MoE layer with a biased router, expert parallelism against the single-device layer, the shared experts' own width
(shared_ffn) and the config checks of these fields; one live check against transformers' GptOssExperts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checks, parallel
from moejax.moe import dispatch, experts, layer, routers
from tests import helpers_configs, helpers_moe, reference
from tests.helpers_moe import loss_and_grads, mesh_of, token_sharding

LIMIT, ALPHA = 7.0, 1.702
E, K, D, F = 4, 2, 16, 8


def random_weights(kind, num_experts=E, d=D, f=F, seed=0, scale=1.0):
    shapes = kind.param_shapes(num_experts, d, f)
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shapes[n]) * scale, jnp.float32) for n in kind.param_names)


def gpt_oss_cfg(**fields):
    cfg = helpers_configs.moe(expert_kind="gpt_oss", num_experts=E, top_k=K, expert_ffn=F, balance_loss="none",
                              **fields)
    cfg.router.update(softmax_before_topk=False, bias=True)  # GPT-OSS's router: softmax over the top-k logits
    layer.validate(cfg)
    return cfg


def test_gpt_oss_kind_declares_its_parameters():
    kind = experts.from_config(gpt_oss_cfg(swiglu_limit=5.0, swiglu_alpha=1.5))
    assert kind == experts.GPTOSSExperts(5.0, 1.5) and experts.EXPERT_KINDS["gpt_oss"] is experts.GPTOSSExperts
    shapes = kind.param_shapes(3, 6, 5)
    assert shapes == {"wi_0": (3, 6, 5), "wi_1": (3, 6, 5), "wo": (3, 5, 6), "bi_0": (3, 5), "bi_1": (3, 5),
                      "bo": (3, 6)}
    assert set(kind.param_axes) == set(kind.param_names) == set(shapes)
    assert all(len(kind.param_axes[n]) == len(shapes[n]) and kind.param_axes[n][0] == "expert" for n in shapes)
    assert kind.param_axes["bi_0"] == ("expert", "mlp") and kind.param_axes["bo"] == ("expert", "embed")
    for name in kind.param_names:  # the sharding rules know every parameter of the kind
        assert parallel.PARAM_AXES[("experts", name)] == kind.param_axes[name]
    params = jax.eval_shape(lambda: layer.MoE(gpt_oss_cfg()).init(jax.random.key(0), jnp.zeros((1, 4, D))))
    assert params["params"]["router"]["bias"].shape == (E,)
    assert params["params"]["router"]["bias"].dtype == jnp.float32
    real = layer.MoE(gpt_oss_cfg()).init(jax.random.key(0), jnp.ones((1, 4, D)))["params"]
    for name in kind.zero_init:
        np.testing.assert_array_equal(real["experts"][name], 0.0)
    np.testing.assert_array_equal(real["router"]["bias"], 0.0)


def test_gpt_oss_apply_one_clamps_like_numpy():
    """Inputs large enough that gates pass the limit and up projections leave [-limit, limit] both ways."""
    kind = experts.GPTOSSExperts(LIMIT, ALPHA)
    weights = random_weights(kind, scale=1.0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(9, D)) * 2.0, jnp.float32)
    one = [w[2] for w in weights]
    gate = np.asarray(x) @ np.asarray(one[0]) + np.asarray(one[3])
    up = np.asarray(x) @ np.asarray(one[1]) + np.asarray(one[4])
    assert (gate > LIMIT).any() and (up > LIMIT).any() and (up < -LIMIT).any()
    np.testing.assert_allclose(kind.apply_one(x, *one), reference.gpt_oss_expert(x, *one), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend, tile", [("tiled", 2), ("ragged_dot", 1)])
def test_gpt_oss_grouped_apply_and_gradients(backend, tile):
    """grouped_apply over expert-sorted rows (empty expert 3 included) against numpy row by row, and its gradients
    against those of apply_one applied row by row."""
    kind = experts.GPTOSSExperts(LIMIT, ALPHA)
    weights = random_weights(kind, scale=0.7)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(7, D)) * 2.0, jnp.float32)
    owner = np.array([0, 0, 2, 2, 2, 1, 1])
    route = routers.Routing(weights=jnp.ones((7, 1)), experts=jnp.asarray(owner[:, None], jnp.int32), probs=None,
                            logits=None)
    plan = dispatch.dropless_plan(route, E, tile)

    def grouped(x, weights):
        rows = dispatch.permute(x, plan.slot_row, plan.row_slot)
        out = experts.grouped_apply(kind, rows, weights, plan, backend)
        return dispatch.unpermute_combine(out, route.weights, plan.slot_row, plan.row_slot)

    def by_row(x, weights):
        return jnp.stack([kind.apply_one(x[r], *(w[owner[r]] for w in weights)) for r in range(7)])

    want = np.stack([reference.gpt_oss_expert(x[r:r + 1], *(w[owner[r]] for w in weights))[0] for r in range(7)])
    np.testing.assert_allclose(jax.jit(grouped)(x, weights), want, rtol=1e-5, atol=1e-4)
    probe = jnp.asarray(np.random.default_rng(3).normal(size=(7, D)), jnp.float32)
    got = jax.jit(jax.grad(lambda x, w: jnp.sum(grouped(x, w) * probe), argnums=(0, 1)))(x, weights)
    ref = jax.grad(lambda x, w: jnp.sum(by_row(x, w) * probe), argnums=(0, 1))(x, weights)
    helpers_moe.assert_trees_close(got, ref, rtol=1e-5, atol=1e-4, what=backend)
    np.testing.assert_array_equal(got[1][5][3], 0.0)  # expert 3 has no rows: no output-bias gradient


def np_gpt_oss_layer(params, x):
    """The GPT-OSS MoE block in numpy: logits = x @ W + b, top-k logits, softmax over them, the weighted sum of the
    chosen experts' outputs."""
    tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    r = params["router"]
    logits = tokens @ np.asarray(r["kernel"], np.float64) + np.asarray(r["bias"], np.float64)
    out = np.zeros_like(tokens)
    for t, row in enumerate(logits):
        top = np.argsort(-row, kind="stable")[:K]
        w = np.exp(row[top] - row[top].max())
        w /= w.sum()
        for e, weight in zip(top, w, strict=True):
            out[t] += weight * reference.expert(params, e, tokens[t:t + 1], kind="gpt_oss")[0]
    return out.reshape(x.shape)


def dense_gpt_oss_layer(params, x):
    """The same block in jnp with every expert on every token (differentiable; the gradient reference)."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ params["router"]["kernel"] + params["router"]["bias"]
    top_logits, top = jax.lax.top_k(logits, K)
    combine = jnp.zeros((tokens.shape[0], E)).at[jnp.arange(tokens.shape[0])[:, None], top].add(
        jax.nn.softmax(top_logits, axis=-1))
    kind = experts.GPTOSSExperts(LIMIT, ALPHA)
    p = params["experts"]
    outs = jnp.stack([kind.apply_one(tokens, *(p[n][e] for n in kind.param_names)) for e in range(E)], axis=1)
    return jnp.einsum("ted,te->td", outs, combine).reshape(x.shape)


def gpt_oss_layer_inputs(shape=(2, 12, D), seed=0):
    """(x, params, state) with non-zero biases (the init zeros them)."""
    module = layer.MoE(gpt_oss_cfg(), kernel_init=nn.initializers.normal(0.4))
    x = jax.random.normal(jax.random.key(seed), shape) * 2.0
    params = module.init(jax.random.key(seed + 1), x)["params"]
    rng = np.random.default_rng(seed + 2)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.asarray(rng.normal(size=p.shape) * 0.5, jnp.float32)
        if path[-1].key in ("bi_0", "bi_1", "bo", "bias") else p, params)
    return x, params, {"router_bias": jnp.zeros(E)}


@pytest.mark.parametrize("backend", ["tiled", "ragged_dot"])
def test_gpt_oss_moe_layer_forward_and_gradients(backend):
    x, params, state = gpt_oss_layer_inputs()
    module = layer.MoE(gpt_oss_cfg(gmm_backend=backend))
    y, grads, _ = loss_and_grads(module, params, state, x)
    np.testing.assert_allclose(y, np_gpt_oss_layer(params, x), rtol=1e-5, atol=1e-4)

    def ref_loss(params, x):
        y = dense_gpt_oss_layer(params, x)
        return jnp.sum(y * jnp.cos(y))

    want = jax.grad(ref_loss, argnums=(0, 1))(params, x)
    helpers_moe.assert_trees_close(grads, want, rtol=1e-4, atol=1e-4, relative_atol=True, what=backend)


@pytest.mark.parametrize("mode, shape", [("a2a", (4, 1, 2, 1)), ("ring", (4, 1, 2, 1)), ("a2a", (2, 1, 2, 2))],
                         ids=["a2a-expert2", "ring-expert2", "a2a-expert2-tensor2"])
def test_gpt_oss_expert_parallel_equals_single_device(mode, shape):
    """mesh.expert = 2 (and with mesh.tensor = 2, whose partial outputs must count the output bias once)."""
    x, params, state = gpt_oss_layer_inputs(shape=(8, 4, D))
    want = loss_and_grads(layer.MoE(gpt_oss_cfg()), params, state, x)
    mesh = mesh_of(shape)
    got = loss_and_grads(layer.MoE(gpt_oss_cfg(ep_mode=mode), mesh=mesh), params, state, x, token_sharding(mesh))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    helpers_moe.assert_trees_close(got[1], want[1], rtol=1e-4, atol=1e-5, relative_atol=True, what=mode)


def test_shared_ffn_sets_the_shared_width():
    cfg = helpers_configs.moe(num_shared=2, shared_ffn=12)
    params = jax.eval_shape(lambda: layer.MoE(cfg).init(jax.random.key(0), jnp.zeros((1, 4, D))))["params"]
    assert params["shared"]["wi_0"].shape == (D, 12) and params["shared"]["wo"].shape == (12, D)
    cfg.shared_ffn = 0
    params = jax.eval_shape(lambda: layer.MoE(cfg).init(jax.random.key(0), jnp.zeros((1, 4, D))))["params"]
    assert params["shared"]["wi_0"].shape == (D, 2 * cfg.expert_ffn)


@pytest.mark.parametrize("fields, match", [
    (dict(expert_kind="swiglu"), r"model\.moe\.expert_kind='swiglu'.*'glu', 'gpt_oss'"),
    (dict(shared_ffn=16), r"model\.moe\.shared_ffn=16.*num_shared > 0"),
    (dict(shared_ffn=-1, num_shared=1), r"model\.moe\.shared_ffn=-1.*integer >= 0"),
    (dict(swiglu_limit=0.0), r"model\.moe\.swiglu_limit=0\.0.*> 0"),
    (dict(swiglu_alpha=-1.0), r"model\.moe\.swiglu_alpha=-1\.0.*number > 0"),
])
def test_bad_moe_fields_are_named(fields, match):
    cfg = helpers_configs.moe()
    cfg.update(fields)
    with pytest.raises(checks.ConfigError, match=match):
        layer.validate(cfg)


def test_router_bias_must_be_a_bool():
    cfg = helpers_configs.moe()
    cfg.router.bias = None
    with pytest.raises(checks.ConfigError, match=r"model\.moe\.router\.bias=None.*True or False"):
        layer.validate(cfg)


def test_gpt_oss_experts_match_transformers():
    """transformers' GptOssExperts (its gate_up_proj interleaves gate and up columns) on the same weights."""
    torch = pytest.importorskip("torch")
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    config = pytest.importorskip("transformers").GptOssConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K, swiglu_limit=LIMIT)
    hf = gpt_oss.GptOssExperts(config)
    kind = experts.GPTOSSExperts(LIMIT, config.swiglu_alpha)
    wi_0, wi_1, wo, bi_0, bi_1, bo = random_weights(kind, scale=0.7)
    gate_up = np.stack([np.asarray(wi_0), np.asarray(wi_1)], axis=-1).reshape(E, D, 2 * F)
    gate_up_bias = np.stack([np.asarray(bi_0), np.asarray(bi_1)], axis=-1).reshape(E, 2 * F)
    with torch.no_grad():
        for name, value in (("gate_up_proj", gate_up), ("gate_up_proj_bias", gate_up_bias),
                            ("down_proj", np.asarray(wo)), ("down_proj_bias", np.asarray(bo))):
            getattr(hf, name).copy_(torch.tensor(np.asarray(value)))
        x = np.random.default_rng(4).normal(size=(6, D)).astype(np.float32) * 2.0
        idx = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 0], [2, 1]])
        w = torch.softmax(torch.randn(6, K, generator=torch.Generator().manual_seed(0)), dim=-1)
        want = hf(torch.from_numpy(x), idx, w).numpy()
    weights = (wi_0, wi_1, wo, bi_0, bi_1, bo)
    got = sum(np.asarray(w[:, j:j + 1]) * np.stack([np.asarray(kind.apply_one(jnp.asarray(x[t:t + 1]),
              *(p[int(idx[t, j])] for p in weights)))[0] for t in range(6)]) for j in range(K))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
