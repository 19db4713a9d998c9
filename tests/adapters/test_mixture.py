"""Mixtures of LoRA experts (moejax/adapters/mixture.py): LoRAMoE's layer against a numpy loop (frozen FFN +
sum_i g_i (alpha/r) B_i A_i x on every adapted linear), MoLA's top-k and per-layer expert counts, the localized
balancing constraint against a numpy transcription of the authors' code, the statistics every adapted linear sows,
gradients reaching the adapters and routers only, and the errors that name the field."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from moejax import checks, model
from moejax.adapters import conversion, lora, mixture, mixture_trace
from moejax.moe import layer
from moejax.posthoc import analysis
from tests import helpers_configs, helpers_steps


def randomised(params, scale=0.3, seed=0):
    """params with every adapter B (zeros at init) drawn from N(0, scale^2)."""
    def draw(path, leaf):
        if not jax.tree_util.keystr(path).endswith(f"{lora.B_SUFFIX}']"):
            return leaf
        key = jax.random.fold_in(jax.random.key(seed), hash(jax.tree_util.keystr(path)) % (2**31))
        return scale * jax.random.normal(key, leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, params)


def silu(x):
    return x / (1 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def mixture_linear(x, p, name, scaling, top_k):
    """numpy: x W + scaling * sum_i g_i (x A_i) B_i, g the router's softmax (top_k > 0: the k best renormalised),
    a loop over tokens and experts."""
    w, a, b = p[name], p[f"{name}_moe_lora_a"], p[f"{name}_moe_lora_b"]
    router = p[f"{name}_moe_lora_router"]
    out = x @ w
    for t in range(x.shape[0]):
        g = softmax(x[t] @ router)
        if top_k:
            keep = np.argsort(-g)[:top_k]
            g = np.where(np.isin(np.arange(g.size), keep), g, 0.0)
            g = g / g.sum()
        for i in range(a.shape[0]):
            out[t] += g[i] * scaling * ((x[t] @ a[i]) @ b[i])
    return out


def glu_reference(x, p, scaling, top_k):
    return mixture_linear(silu(mixture_linear(x, p, "wi_0", scaling, top_k)) * mixture_linear(x, p, "wi_1", scaling,
                                                                                             top_k),
                          p, "wo", scaling, top_k)


@pytest.mark.parametrize("top_k", [0, 2])
def test_mixture_glu_against_a_numpy_loop(top_k):
    """A dense GLU whose three matrices each gain 4 LoRA experts and a router: LoRAMoE (top_k=0, dense softmax) and
    MoLA (top_k=2, renormalised) against the loop over tokens and experts."""
    mix = mixture.MixtureSpec(num_experts=4, top_k=top_k, balance="none")
    spec = lora.LoraSpec(("wi_0", "wi_1", "wo"), rank=2, alpha=6.0, mixture=mix)
    module = layer.GLU(24, kernel_init=nn.initializers.normal(0.3), lora=spec)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = randomised(module.init(jax.random.key(1), x)["params"])
    assert params["wi_0_moe_lora_a"].shape == (4, 16, 2) and params["wo_moe_lora_b"].shape == (4, 2, 16)
    assert params["wo_moe_lora_router"].shape == (24, 4)
    y, aux = module.apply({"params": params}, x, mutable=["moe_aux"])
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    ref = glu_reference(np.asarray(x, np.float64).reshape(10, 16), p, 3.0, top_k)
    np.testing.assert_allclose(np.asarray(y).reshape(10, 16), ref, rtol=1e-4, atol=1e-5)
    records = mixture.collect(aux["moe_aux"])
    assert sorted(records) == [("wi_0",), ("wi_1",), ("wo",)]
    assert float(records[("wo",)].tokens_per_expert.sum()) == 10 * (top_k or 4)


def blc_reference(route_weight, task_types, num, alpha):
    """A numpy transcription of the authors' Linear.forward blcls (peft/tuners/lora.py) with blc_weight 1."""
    task_types = task_types.reshape(-1, 1)
    importance = np.where(np.concatenate((np.repeat(task_types == 1, num // 2, 1),
                                          np.repeat(task_types == 0, num // 2, 1)), axis=-1), 1.0 + alpha, 1.0 - alpha)
    z = (route_weight.sum(1) * importance).reshape(-1)
    return z.var(ddof=1) / (z.mean() ** 2 + 1e-10)


def test_localized_balancing_constraint_against_the_authors_code():
    rng = np.random.default_rng(0)
    gates = softmax(rng.normal(size=(4, 7, 6)))
    types = np.array([1, 0, 1, 2])
    got = mixture.loramoe_balance(gates, types, 0.3)
    np.testing.assert_allclose(got, blc_reference(gates, types, 6, 0.3), rtol=1e-5)
    assert float(mixture.loramoe_balance(gates, 1, 0.0)) == pytest.approx(blc_reference(gates, np.ones(4), 6, 0.0),
                                                                         rel=1e-5)


def tiny_dense(**lora_fields):
    """A 2-layer dense model (width 32) with LoRA experts on its FFN."""
    config = helpers_configs.small_model(helpers_configs.tiny(), num_layers=2, moe_every=0, scan_layers=False)
    config.model.lora.update(targets=("ffn/(wi_0|wi_1|wo)",), rank=2, alpha=4.0)
    helpers_configs.override(config, {f"model.lora.mixture.{k}": v for k, v in lora_fields.items()})
    model.validate(config.model)
    return config


def test_mola_per_layer_counts_and_stats():
    config = tiny_dense(per_layer=(2, 4), top_k=2, balance="switch", balance_coef=0.01)
    module = model.Transformer(config.model)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 100)
    variables = module.init(jax.random.key(1), tokens)
    assert variables["params"]["layers_0"]["ffn"]["wi_0_moe_lora_a"].shape[0] == 2
    assert variables["params"]["layers_1"]["ffn"]["wo_moe_lora_router"].shape[-1] == 4
    _, aux = module.apply({"params": variables["params"]}, tokens, mutable=["moe_aux"])
    records = mixture.collect(aux["moe_aux"])
    layers = {path[0]: int(r.layer) for path, r in records.items()}
    assert layers == {"layers_0": 0, "layers_1": 1}
    assert all(float(r.tokens_per_expert.sum()) == 16 * 2 for r in records.values())
    assert float(mixture.weighted_losses(aux["moe_aux"], config.model)) > 0


def test_gradients_reach_the_adapters_and_routers_only():
    """One train step with the balance loss on (B drawn off zero so every adapter and router gets a gradient): the
    base keeps its values, every expert's A, B and every router move."""
    config = tiny_dense(num_experts=4, balance="loramoe", balance_coef=0.1, blc_alpha=0.2, task_type=0)
    helpers_configs.override(config, {"train.warmup_steps": 0, "train.learning_rate": 1e-2})
    module = model.Transformer(config.model)
    state = helpers_steps.initial_state(config, module)
    state = state.replace(params=randomised(state.params))
    step = jax.jit(helpers_steps.train_step(config, module))
    batch = jax.random.randint(jax.random.key(3), (4, 17), 0, 100)
    new, _, (loss, _) = step(state, helpers_steps.empty_metrics(config), batch)
    for (path, old), keep, moved in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                        jax.tree.leaves(lora.trainable(state.params)), jax.tree.leaves(new.params),
                                        strict=True):
        assert np.array_equal(old, moved) != keep, jax.tree_util.keystr(path)
    names = {jax.tree_util.keystr(p) for p, t in jax.tree_util.tree_leaves_with_path(lora.trainable(state.params))
             if t}
    assert any("moe_lora_router" in n for n in names) and np.isfinite(float(loss))


@pytest.mark.parametrize("fields, field", [
    ({"per_layer": (2, 2, 2)}, "model.lora.mixture.per_layer"),
    ({"num_experts": 1}, "model.lora.mixture.num_experts"),
    ({"num_experts": 3, "top_k": 4, "balance": "none"}, "model.lora.mixture.top_k"),
    ({"num_experts": 3}, "model.lora.mixture.balance"),
    ({"num_experts": 2, "blc_alpha": 1.5}, "model.lora.mixture.blc_alpha"),
    ({"num_experts": 2, "ranks": (4, 8, 8)}, "model.lora.mixture.ranks"),
    ({"num_experts": 2, "ranks": (4, 0)}, r"model.lora.mixture.ranks\[1\]"),
])
def test_bad_mixture_fields_name_the_field(fields, field):
    with pytest.raises(checks.ConfigError, match=field):
        tiny_dense(**fields)


def test_mixture_on_routed_experts_is_refused():
    config = helpers_configs.tiny()
    config.model.num_layers = 1
    config.model.lora.targets = ("experts/wi_0",)
    config.model.lora.mixture.num_experts = 2
    with pytest.raises(checks.ConfigError, match="model.lora.targets"):
        model.validate(config.model)


def test_svd_conversion_against_numpy():
    """W0 + s A B is numpy's truncated SVD of W - W0 (rank 3), its error the tail singular values (Eckart-Young),
    and the stacked factors of two experts of ranks 2 and 4 hold each expert's own factors, zero-padded."""
    rng = np.random.default_rng(0)
    w, w0 = rng.normal(size=(12, 7)), rng.normal(size=(12, 7))
    a, b = conversion.lowrank_adapter(w, w0, 3, scaling=2.0)
    u, s, vh = np.linalg.svd(w - w0, full_matrices=False)
    np.testing.assert_allclose(w0 + 2.0 * a @ b, w0 + (u[:, :3] * s[:3]) @ vh[:3], atol=1e-10)
    np.testing.assert_allclose(np.sum((w - w0 - 2.0 * a @ b) ** 2), np.sum(s[3:] ** 2), rtol=1e-10)
    experts = [{"wo": rng.normal(size=(12, 7))} for _ in range(2)]
    stacked = conversion.experts_as_adapters(experts, {"wo": w0}, ranks=(2, 4), scalings=(1.0, 0.5))
    assert stacked["wo_moe_lora_a"].shape == (2, 12, 4) and stacked["wo_moe_lora_b"].shape == (2, 4, 7)
    for e, (rank, scaling) in enumerate(((2, 1.0), (4, 0.5))):
        u, s, vh = np.linalg.svd(experts[e]["wo"] - w0, full_matrices=False)
        got = scaling * stacked["wo_moe_lora_a"][e] @ stacked["wo_moe_lora_b"][e]
        np.testing.assert_allclose(got, (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-10)
    assert not stacked["wo_moe_lora_a"][0][:, 2:].any()


def test_rank_heterogeneous_experts_against_a_numpy_loop():
    """Experts of ranks 1 and 3 (alpha / r_e each): x W + sum_e g_e (alpha / r_e) (x A_e[:, :r_e]) B_e[:r_e]."""
    mix = mixture.MixtureSpec(num_experts=2, balance="none", ranks=(1, 3))
    spec = lora.LoraSpec(("wo",), rank=8, alpha=6.0, mixture=mix)
    module = layer.GLU(24, kernel_init=nn.initializers.normal(0.3), lora=spec)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = randomised(module.init(jax.random.key(1), x)["params"])
    assert params["wo_moe_lora_a"].shape == (2, 24, 3)
    y = module.apply({"params": params}, x)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    xs = np.asarray(x, np.float64).reshape(10, 16)
    h = silu(xs @ p["wi_0"]) * (xs @ p["wi_1"])
    want = h @ p["wo"]
    g = softmax(h @ p["wo_moe_lora_router"])
    for e, rank in enumerate((1, 3)):
        want += g[:, e:e + 1] * (6.0 / rank) * (h @ p["wo_moe_lora_a"][e][:, :rank]) @ p["wo_moe_lora_b"][e][:rank]
    np.testing.assert_allclose(np.asarray(y).reshape(10, 16), want, rtol=1e-4, atol=1e-5)


def test_routing_trace_and_posthoc_analyses():
    """The trace of a MoLA GLU's 'wi_0' router holds numpy's top-2 of softmax(x W_r) and its renormalised weights;
    the post-hoc gate mass and expert frequency read it; a 2-layer model's trace has one row per layer."""
    mix = mixture.MixtureSpec(num_experts=4, top_k=2, balance="none")
    spec = lora.LoraSpec(("wi_0", "wo"), rank=2, alpha=4.0, mixture=mix)
    module = layer.GLU(24, kernel_init=nn.initializers.normal(0.3), lora=spec)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = randomised(module.init(jax.random.key(1), x)["params"])
    _, aux = module.apply({"params": params}, x, mutable=["moe_aux"])
    trace = mixture_trace.from_aux([aux["moe_aux"]], np.arange(10), "wi_0")
    probs = softmax(np.asarray(x, np.float64).reshape(10, 16) @ np.asarray(params["wi_0_moe_lora_router"], np.float64))
    top = np.argsort(-probs, axis=1)[:, :2]
    np.testing.assert_array_equal(np.sort(trace.experts[0], 1), np.sort(top, 1))
    chosen = np.take_along_axis(probs, top, 1)
    np.testing.assert_allclose(np.sort(trace.weights[0], 1), np.sort(chosen / chosen.sum(1, keepdims=True), 1),
                               rtol=1e-5)
    mass = np.zeros(4)
    np.add.at(mass, top.reshape(-1), (chosen / chosen.sum(1, keepdims=True)).reshape(-1))
    np.testing.assert_allclose(analysis.gate_mass(trace)[0], mass / mass.sum(), rtol=1e-5)
    assert analysis.expert_frequency(trace).shape == (1, 4)

    config = tiny_dense(per_layer=(2, 4), top_k=2, balance="none")
    variables = model.Transformer(config.model).init(jax.random.key(1), np.zeros((1, 8), np.int32))
    batches = [np.asarray(jax.random.randint(jax.random.key(i), (2, 8), 0, 100)) for i in range(2)]
    full = mixture_trace.record(config, {"params": variables["params"]}, batches, "wo")
    assert full.layers.tolist() == [0, 1] and full.num_experts == 4 and full.num_tokens == 32
    assert full.experts[0].max() < 2 and full.scores is None
    np.testing.assert_allclose(analysis.expert_frequency(full).sum(1), 1.0)
