"""The MoE metrics of a quantised model against the original: routing flips and slot changes against a plain count
over token sets, router KL against its formula, weight errors, bytes, and the loss through the one evaluator."""
import jax
import numpy as np
import pytest

from moejax.posthoc import capture
from moejax.quant import metrics, rules, transform
from tests.helpers_posthoc import random_model


def test_routing_flips_count_changed_expert_sets():
    rng = np.random.default_rng(0)
    a = np.stack([rng.permutation(6)[:3] for _ in range(500)])  # a token's experts are distinct
    b = a.copy()
    swap = rng.random(500) < 0.3
    b[swap, 1] = [next(e for e in range(6) if e not in row) for row in a[swap]]
    b[:20] = b[:20, ::-1]  # the order of the slots is not a change
    a[20:25, 2], b[20:25, 2] = 6, 9  # null experts (ids >= E) are one null id
    null_a, null_b = np.where(a >= 6, 6, a), np.where(b >= 6, 6, b)
    expected = [set(x.tolist()) != set(y.tolist()) for x, y in zip(null_a, null_b, strict=True)]
    assert metrics.routing_flips(a, b, 6).tolist() == expected and 0 < np.mean(expected) < 0.5
    changes = [len(set(x.tolist()) - set(y.tolist())) / 3 for x, y in zip(null_a[20:], null_b[20:], strict=True)]
    np.testing.assert_allclose(metrics.slot_changes(a, b, 6)[20:], changes)


def test_router_kl_is_the_kl_of_the_softmaxes_over_real_experts():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    p = np.exp(a[:, :4]) / np.exp(a[:, :4]).sum(1, keepdims=True)
    q = np.exp(b[:, :4]) / np.exp(b[:, :4]).sum(1, keepdims=True)
    np.testing.assert_allclose(metrics.router_kl(a, b, 4), (p * np.log(p / q)).sum(1), rtol=1e-10)
    assert np.allclose(metrics.router_kl(a, a + 3.0, 4), 0.0)


@pytest.fixture(scope="module")
def quantised():
    config, variables = random_model(num_layers=2)
    new, tensors = transform.quantize(config, variables, [rules.Rule("router", "int2"), rules.Rule("experts", "int4")])
    batches = [np.random.default_rng(2).integers(0, 64, (2, 32)).astype(np.int32)]
    return config, variables, new, tensors, batches


def test_routing_of_both_models_end_to_end(quantised):
    config, variables, new, tensors, batches = quantised
    result = metrics.routing(config, variables, new, batches)
    route = jax.jit(lambda v, t: [layer.routing.experts for layer in capture.forward(config, v, t).layers])
    a, b = ([np.asarray(x) for x in route(v, batches[0])] for v in (variables, new))
    expected = [np.mean([set(x) != set(y) for x, y in zip(ra.tolist(), rb.tolist(), strict=True)])
                for ra, rb in zip(a, b, strict=True)]
    assert result["layers"] == [0, 1] and result["tokens"] == 64
    np.testing.assert_allclose(result["flips"], expected)
    assert max(result["flips"]) > 0 and all(k > 0 for k in result["kl"])
    assert not metrics.routing_flips(a[0], a[0], 8).any() and not metrics.router_kl(*[np.ones((3, 8))] * 2, 8).any()


def test_weight_errors_bytes_and_evaluation(quantised):
    config, variables, new, tensors, batches = quantised
    errors = metrics.weight_errors(config, variables, new, tensors)
    w = {name: np.asarray(variables["params"]["layers_1"]["ffn"]["experts"][name], np.float64) for name in
         ("wi_0", "wi_1", "wo")}
    q = {name: np.asarray(new["params"]["layers_1"]["ffn"]["experts"][name], np.float64) for name in w}
    expected = np.sqrt(sum(((q[n] - w[n]) ** 2).sum((1, 2)) for n in w) / sum((w[n] ** 2).sum((1, 2)) for n in w))
    np.testing.assert_allclose(errors["experts"][1], expected)
    assert set(errors["matrices"]) == set(tensors) and all(0 < e < 1 for e in errors["matrices"].values())
    size = metrics.model_bytes(variables, tensors)
    quantised_weights = 2 * (3 * 8 * 16 * 8 + 16 * 8)  # 2 layers: 3 expert matrices [8, 16, 8] and a router [16, 8]
    codes = 2 * (3 * 8 * 16 * 8 + 16 * 8) // 2  # int4 and int2 in nibbles
    scales = 2 * (8 * (8 + 8 + 16) + 8) * 4  # float32, one per output channel
    assert size["quantised_weights"] == quantised_weights
    assert size["quantised"] == size["original"] - 4 * quantised_weights + codes + scales
    assert size["bits_per_weight"] == pytest.approx(8 * (codes + scales) / quantised_weights)
    windows = [np.random.default_rng(3).integers(0, 64, (2, 17)).astype(np.int32)]
    result = metrics.evaluation(config, variables, new, windows)
    assert result["original"]["tokens"] == result["quantised"]["tokens"] == 32
    assert result["delta_loss"] == result["quantised"]["loss"] - result["original"]["loss"] != 0.0
    assert result["delta_bits_per_byte"] == pytest.approx(result["delta_loss"] / np.log(2))  # one byte per token
