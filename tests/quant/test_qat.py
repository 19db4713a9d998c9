"""Quantisation-aware training: the straight-through gradients and the fake-quantised forward against numpy, the
config's errors, and a tiny ``moejax.main`` run whose checkpoint, quantised after training with the same rules,
computes what its training forward computed."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import checks, model
from moejax.quant import formats, qat, rules
from moejax.training import objectives
from tests import helpers_configs
from tests.helpers_posthoc import random_model


def np_int(w, bits, group=0):
    """Symmetric int<bits> of w [B, K, N]: one scale per output and group of inputs (the whole K for group 0)."""
    b, k, n = w.shape
    g = group or k
    tiles = w.reshape(b, k // g, g, n)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(tiles).max(axis=2, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(qmax), 1).astype(np.float32)
    q = np.clip(np.round(tiles / scale), -qmax, qmax) * scale
    return q.reshape(b, k, n), np.broadcast_to(scale, tiles.shape).reshape(b, k, n), qmax


def np_ternary(w):
    """BitNet b1.58's absmean: scale max(mean |W|, 1e-5) per matrix, values round(W / s) clipped to {-1, 0, 1}."""
    scale = np.maximum(np.abs(w).mean(axis=(1, 2), keepdims=True), np.float32(1e-5)).astype(np.float32)
    q = np.clip(np.round(w / scale), -1, 1) * scale
    return q, np.broadcast_to(scale, w.shape), 1


CASES = {"int4": (formats.parse("int4"), lambda w: np_int(w, 4)),
         "int8/g4": (formats.parse("int8/g4"), lambda w: np_int(w, 8, 4)),
         "ternary": (formats.parse("ternary"), np_ternary)}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("ste", qat.STE_MODES)
def test_ste_gradient_and_forward_against_numpy(name, ste):
    fmt, reference = CASES[name]
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (3, 8, 5)).astype(np.float32)
    w[0, 0, 0] = 6.0  # one large weight: the ternary scale clips it (and others), the absmax scales never clip
    cotangent = rng.normal(0, 1, w.shape).astype(np.float32)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(qat.fake_quantize_ste(x, fmt, ste) * cotangent))(
        jnp.asarray(w))
    q, scale, qmax = reference(w)
    np.testing.assert_allclose(value, np.sum(q * cotangent), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(qat.fake_quantize_ste(jnp.asarray(w), fmt, ste)), q, rtol=1e-6,
                               atol=1e-7)
    inside = np.abs(w / scale) <= qmax + 0.5
    expected = cotangent * inside if ste == "clipped" else cotangent
    np.testing.assert_array_equal(np.asarray(grad), expected)
    assert inside.all() == (name != "ternary")  # the clipped case differs from the identity where it must


def test_ternary_values_are_minus_s_zero_s():
    w = np.random.default_rng(1).normal(0, 0.02, (4, 16, 8)).astype(np.float32)
    q = np.asarray(qat.fake_quantize_ste(jnp.asarray(w), formats.parse("ternary"), "identity"))
    for b in range(4):
        s = np.abs(w[b]).mean()
        values = np.unique(q[b])
        np.testing.assert_allclose(values, [-s, 0.0, s], rtol=1e-6)


def _numpy_quantised(config, params, fmt_of):
    """params with every matrix fmt_of(target) names quantised by the numpy references (per stacked index)."""
    out = jax.tree.map(np.array, params)
    for matrix in rules.matrices(config, params):
        reference = fmt_of(matrix.target)
        if reference is None:
            continue
        node = out
        for key in matrix.path[:-1]:
            node = node[key]
        stack = matrix.view(np.asarray(node[matrix.path[-1]], np.float32))
        node[matrix.path[-1]] = reference(stack)[0].reshape(matrix.shape)
    return out


def test_training_forward_runs_on_the_quantised_weights():
    config, variables = random_model(num_layers=2, num_shared=1)
    config.quant.rules = "experts=ternary;attention=int4"
    refs = {"experts": np_ternary, "attention": lambda w: np_int(w, 4)}
    batch = jnp.asarray(np.random.default_rng(2).integers(0, config.model.vocab_size, (2, 9)), jnp.int32)
    module = model.Transformer(config.model)
    key, step = jax.random.key(0), jnp.zeros((), jnp.int32)
    with_qat = objectives.from_config(config, module, key)
    qat_objective = jax.jit(lambda *args: with_qat(*args))
    qat_loss, _ = qat_objective(variables["params"], variables["moe_state"], batch, step)
    plain = config.copy_and_resolve_references()
    plain.quant.rules = ""
    quantised = _numpy_quantised(config, variables["params"], refs.get)
    without = objectives.from_config(plain, module, key)
    plain_objective = jax.jit(lambda *args: without(*args))
    plain_loss, _ = plain_objective(quantised, variables["moe_state"], batch, step)
    full_loss, _ = plain_objective(variables["params"], variables["moe_state"], batch, step)
    np.testing.assert_allclose(qat_loss, plain_loss, rtol=2e-5)
    assert abs(float(full_loss) - float(qat_loss)) > 1e-3  # the quantisation changes the loss
    # the shared experts and the router stay in full precision
    new = qat.quantize_params(config, variables["params"], qat.parse(config))
    for keys in (("layers_0", "ffn", "shared", "wi_0"), ("layers_1", "ffn", "router", "kernel")):
        a, b = new, variables["params"]
        for k in keys:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("field,value,match", [
    ("rules", "experts=fp8", r"quant.rules='experts=fp8' is invalid: experts=fp8: quantisation-aware training"),
    ("rules", "experts=int9", r"quant.rules.*not a weight format"),
    ("rules", "mlp=int4", r"quant.rules.*target='mlp' is invalid"),
    ("ste", "sign", r"quant.ste='sign' is invalid: allowed values are 'identity', 'clipped'")])
def test_bad_quant_fields_are_named(field, value, match):
    config = helpers_configs.tiny()
    config.quant.rules = "experts=int4"
    config.quant[field] = value
    with pytest.raises(checks.ConfigError, match=match):
        qat.validate(config)


def test_rules_matching_nothing_are_named():
    config, variables = random_model(num_layers=2)
    config.quant.rules = "shared=int4"
    with pytest.raises(checks.ConfigError, match=r"quant.rules='shared=int4' is invalid: rules\[0\].*matches no"):
        qat.validate(config, variables["params"])


def test_a_qat_run_trains_and_its_posthoc_quantisation_is_its_forward(stdlib_corpus, tmp_path):
    from moejax.posthoc import __main__ as posthoc
    from moejax.training import loop

    rule_text = "experts=int4/g8;attention=int8"
    config = helpers_configs.tiny(stdlib_corpus.parent / "cache", {
        "data.name": f"text:{stdlib_corpus}/*.py", "train.steps": 16, "train.log_every": 4,
        "train.eval_every": 0, "checkpoint.every_steps": 16, "quant.rules": rule_text})
    workdir = tmp_path / "run"
    loop.run(config, workdir)
    train = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    out = tmp_path / "quantised"
    posthoc.main(["quantise", "--checkpoint", str(workdir), "--rules", rule_text, "--data",
                  f"text:{stdlib_corpus}/*.py", "--data_dir", str(stdlib_corpus.parent / "cache"),
                  "--batch_size", "2", "--seq_len", "16", "--max_tokens", "32", "--out", str(out)])
    trained_config, trained = moejax.load(workdir)
    _, deployed = moejax.load(out)
    forward = qat.quantize_params(trained_config, trained["params"], rules.parse(rule_text))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), forward,
                                     deployed["params"]))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 12)), jnp.int32)
    apply = jax.jit(model.Transformer(trained_config.model).apply)
    np.testing.assert_array_equal(
        np.asarray(apply({**trained, "params": forward}, tokens)),
        np.asarray(apply({**deployed, "params": jax.tree.map(jnp.asarray, deployed["params"])}, tokens)))


def test_posthoc_ternary_rounding_is_the_qat_forward_up_to_the_scale_sum():
    from moejax.quant import transform

    config, variables = random_model(num_layers=2, num_shared=1)
    rule_list = rules.parse("experts=ternary")
    rounded, _ = transform.quantize(config, variables, rule_list)
    forward = qat.quantize_params(config, variables["params"], rule_list)
    for a, b in zip(jax.tree.leaves(forward), jax.tree.leaves(rounded["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
