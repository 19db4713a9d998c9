"""Post-hoc methods against their authors' formulas, re-implemented in numpy: EASY-EP's importance (the turn factor on
the routed experts' output only), RICE's token-level nPMI and the super-expert profile over every expert, shared
experts included.

Each reference follows the authors' released code or the paper's definition (see docs/methods.md), loops over
tokens in float64 and takes from the forward pass only the routing and the residual stream, which
tests/posthoc/test_capture.py checks against the model.
"""
import numpy as np
import pytest

from moejax import model
from moejax.posthoc import capture, importance
from tests import reference
from tests.helpers_posthoc import VOCAB, random_model


def batches(count=2, shape=(2, 12), seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, shape).astype(np.int32) for _ in range(count)]


def layer_params(config, variables):
    """{model layer: MoE params as float64 numpy}."""
    return {layer: {name: {key: np.asarray(value, np.float64) for key, value in tree.items()}
                    for name, tree in params.items()}
            for layer, (params, _) in model.moe_layer_variables(config.model, variables).items()}


# ------------------------------------------------------------------------------------------------------ EASY-EP

def easy_ep_reference(config, variables, data):
    """[L, E]: RUCAIBox/EASYEP's score. pruning/model_new.py: x_before = the residual stream entering the MoE,
    x_after_rmoe = x_before + y with y = sum_j w_j expert_j(ffn_norm(x)) over the routed experts only (shared experts
    added afterwards, outside the comparison), simibr = cosine(x_before, x_after_rmoe), norms = ||expert_j(x)||_2;
    pruning/expert_selection.py: score[layer, idx] += weight * max(1 - simibr, 0) * norm over every token."""
    params = layer_params(config, variables)
    num_experts = config.model.moe.num_experts
    scores = np.zeros((len(model.moe_layers(config.model)), num_experts))
    for got in capture.stream(config, variables, data):
        for row, layer in enumerate(got.layers):
            x = np.asarray(layer.inputs, np.float64)
            before = np.asarray(layer.h_before, np.float64)
            ids, weights = np.asarray(layer.routing.experts), np.asarray(layer.routing.weights, np.float64)
            for t in range(x.shape[0]):
                outputs = {j: reference.expert(params[layer.layer], int(e), x[t][None])[0]
                           for j, e in enumerate(ids[t]) if 0 <= e < num_experts}
                y = sum((weights[t, j] * out for j, out in outputs.items()), np.zeros(x.shape[1]))
                after = before[t] + y
                simibr = before[t] @ after / (np.linalg.norm(before[t]) * np.linalg.norm(after))
                for j, out in outputs.items():
                    scores[row, ids[t, j]] += weights[t, j] * max(1.0 - simibr, 0.0) * np.linalg.norm(out)
    return scores


EASY_EP_CASES = {
    "shared_gate": dict(num_layers=3, first_dense=1, num_shared=1, shared_gate=True),
    "scanned_two_shared": dict(num_layers=5, first_dense=1, moe_every=2, scan=True, num_shared=2),
    "no_shared": dict(num_layers=2),
}


@pytest.mark.parametrize("case", sorted(EASY_EP_CASES))
def test_easy_ep_turns_on_the_routed_output_only(case):
    config, variables = random_model(**EASY_EP_CASES[case])
    data = batches()
    got = importance.from_forward(config, variables, data, "easy_ep")
    np.testing.assert_allclose(got, easy_ep_reference(config, variables, data), rtol=2e-5, atol=1e-7)


def test_capture_splits_the_moe_output_into_routed_and_shared():
    """``routed`` is the gate-weighted sum of the selected experts' outputs and ``shared`` the shared GLU's output
    (before the shared gate); together they give the MoE output."""
    config, variables = random_model(num_layers=3, first_dense=1, num_shared=1, shared_gate=True)
    params = layer_params(config, variables)
    for got in capture.stream(config, variables, batches(1)):
        for layer in got.layers:
            p = params[layer.layer]
            x = np.asarray(layer.inputs, np.float64)
            routed = np.stack([sum((float(w) * reference.expert(p, int(e), x[t][None])[0]
                                    for e, w in zip(layer.routing.experts[t], layer.routing.weights[t], strict=True)),
                                   np.zeros(x.shape[1])) for t in range(len(x))])
            shared = reference.glu(x, p["shared"]["wi_0"], p["shared"]["wi_1"], p["shared"]["wo"])
            np.testing.assert_allclose(layer.routed, routed, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(layer.shared, shared, rtol=1e-4, atol=1e-5)
            gate = 1.0 / (1.0 + np.exp(-(x @ p["shared_gate"]["kernel"])))
            np.testing.assert_allclose(layer.output, routed + shared * gate, rtol=1e-4, atol=1e-5)
    plain, plain_variables = random_model(num_layers=1)
    (got,) = capture.stream(plain, plain_variables, batches(1))
    assert got.layers[0].shared is None
    np.testing.assert_array_equal(got.layers[0].routed, got.layers[0].output)  # no shared experts: the same array


def test_easy_ep_with_shared_experts_differs_from_the_whole_block_turn():
    """The old turn (h_before against the block output, shared experts included) gives other scores when the model
    has shared experts: the criterion measures the routed experts' turn, not the block's."""
    config, variables = random_model(num_layers=3, first_dense=1, num_shared=1, shared_gate=True)
    data = batches()
    got = importance.from_forward(config, variables, data, "easy_ep")
    params = layer_params(config, variables)
    whole = np.zeros_like(got)
    for captured in capture.stream(config, variables, data):
        for row, layer in enumerate(captured.layers):
            before, after = np.asarray(layer.h_before, np.float64), np.asarray(layer.h_after, np.float64)
            x = np.asarray(layer.inputs, np.float64)
            for t in range(len(x)):
                turn = max(1 - before[t] @ after[t] / (np.linalg.norm(before[t]) * np.linalg.norm(after[t])), 0.0)
                for e, w in zip(layer.routing.experts[t], layer.routing.weights[t], strict=True):
                    norm = np.linalg.norm(reference.expert(params[layer.layer], int(e), x[t][None])[0])
                    whole[row, e] += float(w) * norm * turn
    assert not np.allclose(got, whole, rtol=1e-3)

