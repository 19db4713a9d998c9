"""LoRA adapters (moejax/adapters/lora.py, merging.py): the adapted products against numpy (x W + alpha/r x A B),
the routed experts' adapters against a numpy loop over the experts on their routed tokens (every backend, per expert
and shared) with their gradients against a dense reference, PEFT's initialisations, the optimizer and train step
updating the adapters only, merging (logits and decoding), fresh adapters on a base model, and the errors that name
the field."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax import checks, generate, model, parallel
from moejax.adapters import lora, merging
from moejax.moe import layer
from moejax.training import initialise, optim
from tests import helpers_configs, helpers_moe, helpers_steps, reference


def randomised(variables, scale=0.3, seed=0):
    """variables with every adapter B (zeros at init) drawn from N(0, scale^2), so that the adapters count."""
    def draw(path, leaf):
        if not jax.tree_util.keystr(path).endswith(f"{lora.B_SUFFIX}']"):
            return leaf
        key = jax.random.fold_in(jax.random.key(seed), hash(jax.tree_util.keystr(path)) % (2**31))
        return scale * jax.random.normal(key, leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def tiny_model(targets, **fields):
    """The tiny training config with one MoE layer of 8 experts (width 32), model.lora.targets and fields."""
    config = helpers_configs.tiny()
    config.model.num_layers = 1
    config.model.lora.targets = tuple(targets)
    helpers_configs.override(config, fields)
    model.validate(config.model)
    return config


# ------------------------------------------------------------------ the adapted products


@pytest.mark.parametrize("rslora", [False, True])
def test_dense_projections_add_the_scaled_low_rank_product(rslora):
    """q (one input axis, out [H, Dh]) and o (input [H, Dh]): x W + alpha/r (x A) B, alpha/sqrt(r) with rslora."""
    spec = lora.LoraSpec(("q/kernel", "o/kernel"), rank=4, alpha=16.0, rslora=rslora)

    class Projections(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = lora.DenseGeneral((2, 3), use_bias=False, lora=spec, name="q")(x)
            return q, lora.DenseGeneral(5, axis=(-2, -1), use_bias=False, lora=spec, name="o")(q)

    x = jax.random.normal(jax.random.key(0), (2, 4, 6))
    params = randomised(jax.jit(Projections().init)(jax.random.key(1), x))["params"]
    q, o = Projections().apply({"params": params}, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    scale = 16.0 / (2.0 if rslora else 4.0)
    xs = np.asarray(x, np.float64)
    q_ref = (xs @ p["q"]["kernel"].reshape(6, 6) + scale * (xs @ p["q"]["kernel_lora_a"]) @
             p["q"]["kernel_lora_b"].reshape(4, 6)).reshape(2, 4, 2, 3)
    flat = q_ref.reshape(2, 4, 6)
    o_ref = flat @ p["o"]["kernel"].reshape(6, 5) + scale * (flat @ p["o"]["kernel_lora_a"].reshape(6, 4)) @ \
        p["o"]["kernel_lora_b"]
    np.testing.assert_allclose(q, q_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    assert p["o"]["kernel_lora_a"].shape == (2, 3, 4) and p["q"]["kernel_lora_b"].shape == (4, 2, 3)


def test_glu_router_and_gate_adapters_against_numpy():
    """A MoE layer's shared GLU (wi_0, wo), router and shared gate with adapters, the routed experts without: the
    layer equals the numpy layer with W + alpha/r A B in place of each picked weight."""
    cfg = helpers_configs.moe("mixtral", num_shared=1, shared_gate=True)
    spec = lora.LoraSpec(("shared/(wi_0|wo)", "router/kernel", "shared_gate/kernel"), rank=2, alpha=3.0)
    module = layer.MoE(cfg, kernel_init=nn.initializers.normal(0.4), lora=spec)
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    params = randomised(jax.jit(module.init)(jax.random.key(1), x)["params"])
    assert "wi_1_lora_a" not in params["shared"] and "wi_0_lora_a" not in params["experts"]
    y = jax.jit(module.apply)({"params": params}, x)
    merged = jax.tree.map(lambda a: np.asarray(a, np.float64), merging.merge(
        _model_section(spec), {"params": params})[1]["params"])
    tokens, ids, weights, keep = helpers_moe.decisions(cfg, merged, x)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), reference.moe_layer(tokens, merged, ids, weights, keep),
                               rtol=1e-4, atol=1e-5)


def _model_section(spec):
    """A model section whose lora fields are spec's (for merging.merge on a bare layer's params)."""
    m = helpers_configs.tiny().model
    m.lora.update(targets=spec.targets, rank=spec.rank, alpha=spec.alpha, rslora=spec.rslora, experts=spec.experts)
    return m


@pytest.mark.parametrize("backend", ["tiled", "ragged_dot"])
@pytest.mark.parametrize("mode", ["per_expert", "shared"])
def test_routed_expert_adapters_against_a_loop_over_experts(backend, mode):
    """Routed experts with adapters on wi_0 and wo: the layer equals a numpy loop over every token's routed experts
    with W_e + alpha/r A_e B_e (one adapter per expert, or one shared by all), on each backend; the adapters'
    gradients equal those of the dense reference (every expert on every token, the same routing)."""
    cfg = helpers_configs.moe("mixtral", gmm_backend=backend)
    spec = lora.LoraSpec(("experts/(wi_0|wo)",), rank=3, alpha=6.0, experts=mode)
    module = layer.MoE(cfg, kernel_init=nn.initializers.normal(0.4), lora=spec)
    x = jax.random.normal(jax.random.key(0), (2, 12, 16))
    params = randomised(jax.jit(module.init)(jax.random.key(1), x)["params"], scale=0.5)
    experts = params["experts"]
    lead = (8,) if mode == "per_expert" else ()
    a_name, b_name = lora.adapter_names("wi_0", shared=mode == "shared")
    assert experts[a_name].shape == (*lead, 16, 3) and experts[b_name].shape == (*lead, 3, 8)
    assert "wi_1_lora_a" not in experts
    y = jax.jit(module.apply)({"params": params}, x)
    merged = jax.tree.map(lambda a: np.asarray(a, np.float64),
                          merging.merge(_model_section(spec), {"params": params})[1]["params"])
    tokens, ids, weights, keep = helpers_moe.decisions(cfg, merged, x)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), reference.moe_layer(tokens, merged, ids, weights, keep),
                               rtol=1e-4, atol=1e-5)

    def loss(adapters, forward):
        return jnp.sum(jnp.cos(forward(lora.join(params, adapters))))

    def dense(p):
        w = merging.merge(_model_section(spec), {"params": p})[1]["params"]
        return helpers_moe.dense_moe(cfg, w, x, ids, keep)

    adapters = lora.split(params)[1]
    got = jax.jit(jax.grad(lambda a: loss(a, lambda p: module.apply({"params": p}, x))))(adapters)
    want = jax.jit(jax.grad(lambda a: loss(a, dense)))(adapters)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_expert_parallel_adapters_match_one_device():
    """On a mesh of 2 data x 2 expert x 2 tensor devices the routed experts' adapters shard as their weights do (A
    keeps the input axes, B the output axes) and give the single-device outputs and gradients."""
    cfg = helpers_configs.moe("mixtral")
    spec = lora.LoraSpec(("experts/(wi_0|wo)",), rank=3, alpha=6.0)
    x = jax.random.normal(jax.random.key(0), (8, 4, 16))
    one = layer.MoE(cfg, kernel_init=nn.initializers.normal(0.4), lora=spec)
    params = randomised(jax.jit(one.init)(jax.random.key(1), x)["params"], scale=0.5)
    mesh = helpers_moe.mesh_of((2, 1, 2, 2))
    sharded = layer.MoE(cfg, kernel_init=nn.initializers.normal(0.4), lora=spec, mesh=mesh)
    specs = jax.tree.map(lambda s: s.spec, parallel.param_shardings(params, mesh))["experts"]
    assert specs["wi_0_lora_a"] == P("expert", "fsdp", None) and specs["wi_0_lora_b"] == P("expert", None, "tensor")
    assert specs["wo_lora_a"] == P("expert", "tensor", None) and specs["wo_lora_b"] == P("expert", None, "fsdp")

    def loss(p, x, module):
        y = module.apply({"params": p}, x)
        return jnp.sum(jnp.cos(y)), y

    (_, want), g_want = jax.jit(jax.value_and_grad(lambda p: loss(p, x, one), has_aux=True))(params)
    xs = jax.device_put(x, helpers_moe.token_sharding(mesh))
    (_, got), g_got = jax.jit(jax.value_and_grad(lambda p: loss(p, xs, sharded), has_aux=True))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("init", ["kaiming_uniform", "gaussian"])
def test_initialisation_is_peft_s(init):
    """B starts at zero (the adapted model is its base); A is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's
    kaiming_uniform_(a=sqrt(5))) or N(0, 1/r^2); the base weights are those of the base model's initialisation."""
    config = tiny_model(["attn/q/kernel", "experts/wi_0"], **{"model.lora.init": init, "model.lora.rank": 4})
    tokens = jnp.zeros((1, 4), jnp.int32)
    variables = jax.jit(model.Transformer(config.model).init)(jax.random.key(0), tokens)
    base = jax.jit(model.Transformer(lora.without_adapters(config.model)).init)(jax.random.key(0), tokens)
    base_part, adapters = lora.split(variables["params"])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), base_part, base["params"]))
    a = np.asarray(adapters["layers_0"]["ffn"]["experts"]["wi_0_lora_a"])  # [8, 32, 4], fan_in 32
    assert not np.any(np.asarray(adapters["layers_0"]["ffn"]["experts"]["wi_0_lora_b"]))
    if init == "kaiming_uniform":
        assert np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).max() > 0.9 / np.sqrt(32)
        assert np.std(a) == pytest.approx(1 / np.sqrt(3 * 32), rel=0.1)
    else:
        assert np.std(a) == pytest.approx(1 / 4, rel=0.1) and abs(np.mean(a)) < 0.02


# ------------------------------------------------------------------ training touches the adapters only


def test_train_step_updates_the_adapters_only():
    """One train step (weight decay on): every base parameter keeps its value, every adapter moves (B off zero); the
    optimizer's moments exist for the adapters alone."""
    config = tiny_model(["attn/(q|v)/kernel", "experts/wi_", "router/kernel"],
                        **{"train.weight_decay": 0.1, "train.warmup_steps": 0, "train.learning_rate": 1e-2})
    module = model.Transformer(config.model)
    state = helpers_steps.initial_state(config, module)
    step = jax.jit(helpers_steps.train_step(config, module))
    batch = jax.random.randint(jax.random.key(3), (4, 17), 0, 256)
    new, _, (loss, grad_norm) = step(state, helpers_steps.empty_metrics(config), batch)
    trainable = lora.trainable(state.params)
    for (path, old), keep, moved in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(trainable),
                                        jax.tree.leaves(new.params), strict=True):
        assert np.array_equal(old, moved) != keep, jax.tree_util.keystr(path)
    adapters = lora.split(state.params)[1]
    shapes = sorted(leaf.shape for leaf in jax.tree.leaves(adapters))
    moments = sorted(leaf.shape for leaf in jax.tree.leaves(new.opt_state) if np.ndim(leaf) > 0)
    assert moments == sorted(shapes * 2)  # Adam's mu and nu, for the adapters only
    assert isinstance(optim.make_optimizer(config), optim.Partitioned)
    assert float(grad_norm) > 0 and np.isfinite(float(loss))


def test_router_adapters_with_a_frozen_router_are_refused():
    with pytest.raises(checks.ConfigError, match=r"model.lora.targets=.*router.*model.moe.router.frozen=True"):
        tiny_model(["router/kernel"], **{"model.moe.router.frozen": True})


# ------------------------------------------------------------------ merging


@pytest.mark.parametrize("fields", [
    {},
    {"model.scan_layers": True, "model.lora.experts": "shared", "model.lora.rslora": True},
    {"model.moe.expert_kind": "gpt_oss", "model.qkv_bias": True, "model.o_bias": True, "model.moe.num_shared": 1,
     "model.moe.shared_gate": True},
], ids=["unrolled", "scanned_shared_rslora", "gpt_oss_shared_experts"])
def test_merged_model_gives_the_unmerged_logits(fields):
    targets = ["attn/(q|k|v|o)/kernel", "experts/wi_", "experts/wo", "shared/", "shared_gate", "router/kernel",
               "lm_head"]
    if not fields.get("model.moe.num_shared"):
        targets = [t for t in targets if "shared" not in t]
    config = tiny_model(targets, **fields)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 256)
    variables = randomised(jax.jit(model.Transformer(config.model).init)(jax.random.key(0), tokens))
    logits = jax.jit(model.Transformer(config.model).apply)(variables, tokens)
    merged_config, merged = merging.merge(config, variables)
    assert lora.spec(merged_config.model) is None and not lora.split(merged["params"])[1]
    assert lora.spec(config.model) is not None  # the input config is left as it was
    forward = jax.jit(model.Transformer(merged_config.model).apply)
    again = forward(merged, tokens)
    base = forward({**variables, "params": lora.split(variables["params"])[0]}, tokens)
    np.testing.assert_allclose(again, logits, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(base - logits).max()) > 1e-2  # the adapters change the model


def test_latent_attention_decoding_reads_the_adapted_kv_b():
    """Cached decoding absorbs kv_b into the queries: with adapters on MLA's kv_b, q and o, each greedily decoded
    token is the argmax of the full forward pass over the tokens before it."""
    config = tiny_model(["attn/(kv_b|q|o)/kernel"], **{"model.attention": "mla", "model.num_kv_heads": 0})
    config.model.mla.update(q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    model.validate(config.model)
    prompts = np.asarray(jax.random.randint(jax.random.key(1), (2, 5), 0, 256))
    init = jax.jit(model.Transformer(config.model).init)
    variables = randomised(init(jax.random.key(0), jnp.asarray(prompts)), scale=1.0)
    tokens = generate.generate(config, variables, prompts, max_new_tokens=4)
    logits = jax.jit(model.Transformer(config.model).apply)(variables, jnp.asarray(tokens[:, :-1]))
    assert np.array_equal(np.argmax(np.asarray(logits[:, 4:]), -1), tokens[:, 5:])
    base = lora.without_adapters(config.model)  # the adapters change what is decoded
    base_logits = jax.jit(model.Transformer(base).apply)({**variables, "params": lora.split(variables["params"])[0]},
                                                         jnp.asarray(tokens[:, :-1]))
    assert not np.array_equal(np.argmax(np.asarray(base_logits[:, 4:]), -1), tokens[:, 5:])


# ------------------------------------------------------------------ a base model gets fresh adapters


def test_a_base_model_gets_fresh_adapters_and_a_resolved_run_keeps_its_lora(tmp_path):
    """with_adapters adds the config's adapters (B zero: the model is its base) to base parameters; resolve keeps
    the run's model.lora over a run directory's model."""
    config = tiny_model(["attn/q/kernel", "experts/wo"])
    base_cfg = lora.without_adapters(config.model)
    tokens = jnp.zeros((1, 4), jnp.int32)
    base = jax.jit(model.Transformer(base_cfg).init)(jax.random.key(5), tokens)["params"]
    params = initialise.with_adapters(config, base)
    assert lora.split(params)[0].keys() == base.keys()
    adapters = lora.split(params)[1]
    assert adapters["layers_0"]["ffn"]["experts"]["wo_lora_a"].shape == (8, 32, 8)
    assert initialise.with_adapters(config, params) is params
    from moejax.training import checkpoint

    source = helpers_configs.tiny()
    checkpoint.save_variables(tmp_path / "base", source, {"params": base, "moe_state": {}})
    config.init_from = f"run:{tmp_path / 'base'}"
    resolved = initialise.resolve(config)
    assert tuple(resolved.model.lora.targets) == ("attn/q/kernel", "experts/wo")


# ------------------------------------------------------------------ errors name the field


BAD = [
    ({"model.lora.targets": ("attn/qq",)}, "model.lora.targets[0]='attn/qq'", "picks no weight"),
    ({"model.lora.targets": ("norm/scale",)}, "model.lora.targets[0]='norm/scale'", "layers_0/attn/q/kernel"),
    ({"model.lora.targets": ("attn/(q",)}, "model.lora.targets[0]='attn/(q'", "not a regular expression"),
    ({"model.lora.rank": 0}, "model.lora.rank=0", "integer >= 1"),
    ({"model.lora.alpha": -1.0}, "model.lora.alpha=-1.0", "> 0"),
    ({"model.lora.dropout": 1.0}, "model.lora.dropout=1.0", r"\[0, 1\)"),
    ({"model.lora.init": "xavier"}, "model.lora.init='xavier'", "'kaiming_uniform', 'gaussian'"),
    ({"model.lora.experts": "all"}, "model.lora.experts='all'", "'per_expert', 'shared'"),
]


@pytest.mark.parametrize("overrides,field_and_value,allowed", BAD)
def test_bad_lora_fields_are_named(overrides, field_and_value, allowed):
    config = helpers_configs.tiny()
    config.model.lora.targets = ("attn/q/kernel",)
    helpers_configs.override(config, overrides)
    with pytest.raises(checks.ConfigError) as error:
        model.validate(config.model)
    message = str(error.value)
    assert f"config field {field_and_value} is invalid" in message
    assert __import__("re").search(allowed, message), message
