"""Activation quantisation (``TARGET=FORMAT,ACT``): the per-token fake quantisation against numpy (int per token and
group, FP8 and MXFP4 tiles with ml_dtypes' casts) and its straight-through gradient; an MoE layer's routed experts,
shared experts and router on quantised inputs against a numpy forward of the layer; ``moejax.evaluate``'s loss and
the QAT objective on the same model; the errors."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moejax import checks, evaluate, model
from moejax.posthoc import capture
from moejax.quant import activation, qat, rules
from moejax.training import objectives
from tests.helpers_posthoc import random_model
from tests.quant.test_qat import np_int
from tests.reference import cross_entropy


def np_act(x, act):
    """x [..., K] quantised per token (and group of inputs) in numpy: int<b> amax / Q, FP8 E4M3 amax / 448 per 128
    inputs, MXFP4 E2M1 with 2^ceil(log2(amax / 6)) per 32 inputs."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    if act == "afp8":
        group, top, cast = 128, np.float32(448), ml_dtypes.float8_e4m3fn
    elif act == "amxfp4":
        group, top, cast = 32, None, ml_dtypes.float4_e2m1fn
    else:
        bits, _, g = act[1:].partition("/g")
        group, top, cast = int(g or k), np.float32(2 ** (int(bits) - 1) - 1), None
    group = min(group, k)
    tiles = x.reshape(*x.shape[:-1], k // group, group)
    amax = np.abs(tiles).max(-1, keepdims=True)
    if top is None:
        scale = np.where(amax > 0, np.exp2(np.ceil(np.log2(np.where(amax > 0, amax, 1) / 6))), 1).astype(np.float32)
    else:
        scale = np.where(amax > 0, amax / top, 1).astype(np.float32)
    y = tiles / scale
    q = np.clip(np.round(y), -top, top) if cast is None else y.astype(cast).astype(np.float32)
    return (q * scale).reshape(x.shape)


@pytest.mark.parametrize("act", ["a8", "a4/g8", "afp8", "amxfp4"])
def test_per_token_fake_quantisation_and_its_gradient_against_numpy(act):
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (2, 3, 64)) * rng.uniform(0.01, 10, (2, 3, 1))).astype(np.float32)
    x[0, 1] = 0.0  # a token of zeros stays zeros
    fmt = rules.activation_format(act)
    cotangent = rng.normal(0, 1, x.shape).astype(np.float32)
    value, grad = jax.value_and_grad(lambda v: jnp.sum(activation.fake_quantize(v, fmt) * cotangent))(jnp.asarray(x))
    out = np.asarray(activation.fake_quantize(jnp.asarray(x), fmt))
    np.testing.assert_array_equal(out, np_act(x, act))
    assert not np.array_equal(out, x) and not out[0, 1].any()
    np.testing.assert_array_equal(np.asarray(grad), cotangent)  # straight through: the absmax scales clip nothing
    # an attention output projection's input [B, S, H, Dh]: one scale over the token's heads and head width
    heads = np.asarray(activation.quantise_inputs(jnp.asarray(x.reshape(2, 3, 4, 16)), fmt, contracted=2))
    np.testing.assert_array_equal(heads, np_act(x, act).reshape(2, 3, 4, 16))


RULES = "experts=int4,a8;shared=int8,a4/g4;router=none,a8;attention=none,afp8"


@pytest.fixture(scope="module")
def layer_model():
    """A one-layer model with shared experts, its weights rounded in numpy (experts int4, shared int8 per output
    channel) and tokens [2, 13]."""
    config, variables = random_model(num_layers=1, num_shared=1)
    quantised = jax.tree.map(np.array, variables)
    ffn = quantised["params"]["layers_0"]["ffn"]
    for group, bits in (("experts", 4), ("shared", 8)):
        for name in ("wi_0", "wi_1", "wo"):
            w = ffn[group][name]
            ffn[group][name] = np_int(w.reshape(-1, *w.shape[-2:]), bits)[0].reshape(w.shape)
    tokens = np.random.default_rng(4).integers(0, 64, (2, 13)).astype(np.int32)
    return config, variables, quantised, tokens


def test_an_moe_layer_on_quantised_inputs_against_numpy(layer_model):
    config, variables, quantised, tokens = layer_model
    rule_list = rules.parse(RULES, activations=True)

    def forward(v, t):
        with activation.context(config, v["params"], rule_list):
            c = capture.forward(config, v, t)
        layer = c.layers[0]
        return c.logits, layer.inputs, layer.logits, layer.routing.experts, layer.routing.weights, layer.routed, \
            layer.shared

    logits, x, router_logits, ids, gates, routed, shared = map(np.asarray, jax.jit(forward)(quantised, tokens))
    p = quantised["params"]["layers_0"]["ffn"]
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    # the router on int8 per-token inputs (its kernel and bias as they are)
    np.testing.assert_allclose(router_logits, np_act(x, "a8") @ p["router"]["kernel"] + p["router"]["bias"],
                               rtol=1e-5, atol=1e-5)
    # the routed experts: every matrix's input int8 per token (the hidden activation of each routed slot too)
    xq, e = np_act(x, "a8"), p["experts"]
    expected = np.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            k = ids[t, slot]
            h = silu(xq[t] @ e["wi_0"][k]) * (xq[t] @ e["wi_1"][k])
            expected[t] += gates[t, slot] * (np_act(h, "a8") @ e["wo"][k])
    np.testing.assert_allclose(routed, expected, rtol=2e-4, atol=2e-4)
    # the shared experts' GLU: int4 per token and group of 4 inputs
    s, xs = p["shared"], np_act(x, "a4/g4")
    h = silu(xs @ s["wi_0"]) * (xs @ s["wi_1"])
    np.testing.assert_allclose(shared, np_act(h, "a4/g4") @ s["wo"], rtol=2e-4, atol=2e-4)
    # moejax.evaluate with the same rules: the weights rounded by the rules, the loss of these logits
    windows = np.concatenate([tokens, tokens[:, :1]], axis=1)
    result = evaluate.evaluate(config, variables, [windows], quantise=RULES)
    assert result["loss"] == pytest.approx(cross_entropy(logits, windows[:, 1:]), abs=2e-5)
    assert result["quantisation"]["rules"][0]["act"] == "a8"
    assert max(result["quantisation"]["routing"]["kl"]) > 0  # the router's inputs moved


def test_the_qat_objective_quantises_activations(layer_model):
    config, variables, quantised, tokens = layer_model
    config = config.copy_and_resolve_references()
    config.quant.rules = "experts=int4,a8;shared=int8,a4/g4;router=none,a8"
    module = model.Transformer(config.model)
    key, step, batch = jax.random.key(0), jnp.zeros((), jnp.int32), jnp.asarray(tokens)
    with_qat = objectives.from_config(config, module, key)
    loss, _ = jax.jit(lambda *args: with_qat(*args))(variables["params"], variables["moe_state"], batch, step)
    plain = config.copy_and_resolve_references()
    plain.quant.rules = ""
    without = objectives.from_config(plain, module, key)

    def on_quantised_inputs(p):
        with activation.context(config, p, qat.parse(config)):
            return without(p, variables["moe_state"], batch, step)[0]

    reference, weights_only = jax.jit(lambda p: (on_quantised_inputs(p), without(p, variables["moe_state"], batch,
                                                                                 step)[0]))(quantised["params"])
    np.testing.assert_allclose(loss, reference, rtol=2e-6)
    assert abs(float(weights_only) - float(loss)) > 1e-4  # the activations change the loss


def test_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"rules: 'experts=int4,a8' quantises activations \('a8'\), which a stored"):
        rules.parse("experts=int4,a8")
    with pytest.raises(ValueError, match=r"rules\[0\]\.act='a9' is not an activation format: allowed are a<b>"):
        rules.parse("experts=int4,a9", activations=True)
    config, variables = random_model(num_layers=2, scan=True)
    with pytest.raises(ValueError, match=r"activation formats differ between the layers \[0, 1\] of the scanned stack "
                                         r"blocks/block_0/attn/\w+/kernel \(\['a4', 'a8'\]\)"):
        activation.table(config, variables["params"], rules.parse("attention=none,a8@0;attention=none,a4",
                                                                  activations=True))
    config.quant.rules = "experts=fp8,a8"
    with pytest.raises(checks.ConfigError, match=r"quant.rules='experts=fp8,a8' is invalid: experts=fp8"):
        qat.validate(config)
