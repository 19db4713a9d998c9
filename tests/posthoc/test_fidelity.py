"""Post-hoc methods against their authors' formulas, re-implemented in numpy: EASY-EP's importance (the turn factor on
the routed experts' output only), RICE's token-level nPMI and the super-expert profile over every expert, shared
experts included.

Each reference follows the authors' released code or the paper's definition (see docs/methods.md), loops over
tokens in float64 and takes from the forward pass only the routing and the residual stream, which
tests/posthoc/test_capture.py checks against the model.
"""
import math

import numpy as np
import pytest

from moejax import model
from moejax.posthoc import analysis, capture, importance, steer, super_experts
from moejax.posthoc.trace import Trace
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



# ----------------------------------------------------------------------------------------------------- RICE nPMI

def rice_npmi(experts, token_ids, num_experts):
    """[E, V] nPMI as RICE defines it (arXiv 2505.14681, section 2): over a corpus of T tokens, p(x) = the share of
    tokens that are x, p(E_i) = the share of tokens whose top-k includes expert E_i, p(x, E_i) = the share of tokens
    that are x and include E_i; nPMI = log2(p(x, E_i) / (p(x) p(E_i))) / -log2 p(x, E_i), -1 where x never selects
    E_i (and 1 where every token does). experts [T, k] (ids outside [0, E) are null); token_ids [T]."""
    total = len(token_ids)
    selected = [{int(e) for e in row if 0 <= e < num_experts} for row in experts]
    out = np.full((num_experts, int(max(token_ids)) + 1), -1.0)
    for x in set(int(t) for t in token_ids):
        p_x = sum(int(t) == x for t in token_ids) / total
        for e in range(num_experts):
            p_e = sum(e in s for s in selected) / total
            p_xe = sum(int(t) == x and e in s for t, s in zip(token_ids, selected, strict=True)) / total
            if p_xe == 1.0:
                out[e, x] = 1.0
            elif p_xe > 0:
                out[e, x] = math.log2(p_xe / (p_x * p_e)) / -math.log2(p_xe)
    return out


def random_trace(seed=0, tokens=300, experts=6, k=3, vocab=10, nulls=True):
    """A routing trace with repeated experts within a token's slots and null slots (ids >= E): the cases where
    token and slot events differ beyond the log k normaliser."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, vocab, tokens)
    chosen = rng.integers(0, experts + (2 if nulls else 0), (2, tokens, k))
    chosen[:, token_ids == 4, 0] = np.array([2, 5])[:, None]  # marker 4 prefers one expert per layer
    return Trace(experts=chosen.astype(np.int32), weights=np.full(chosen.shape, 0.5, np.float32),
                 token_ids=token_ids.astype(np.int32), layers=np.array([1, 3]), num_experts=experts)


def test_npmi_counts_tokens_as_rice_defines_it(monkeypatch):
    trace = random_trace()
    for layer in range(trace.num_layers):
        expected = rice_npmi(trace.experts[layer], trace.token_ids, trace.num_experts)
        np.testing.assert_allclose(analysis.npmi(trace, layer), expected, atol=1e-12)
        np.testing.assert_allclose(analysis.npmi(trace, layer, [4, 4, 77, 0]),
                                   expected[:, [4, 4, 0, 0]] * [1, 1, 0, 1] + [0, 0, -1, 0], atol=1e-12)
    monkeypatch.setattr(analysis, "_BLOCK_ELEMENTS", 16)  # blocks of a few tokens give the same counts
    np.testing.assert_allclose(analysis.npmi(trace, 1), rice_npmi(trace.experts[1], trace.token_ids, 6), atol=1e-12)
    with pytest.raises(ValueError, match="events='tokens'.*allowed are"):
        analysis.npmi(trace, 0, events="tokens")


def test_token_and_slot_events_differ_by_the_normaliser():
    """With k distinct real experts per token the PMI is the same and the slot normaliser is larger by log k."""
    rng = np.random.default_rng(3)
    tokens, k = 200, 2
    token_ids = rng.integers(0, 5, tokens)
    chosen = np.stack([np.stack([rng.choice(6, k, replace=False) for _ in range(tokens)])])
    trace = Trace(experts=chosen.astype(np.int32), weights=np.full(chosen.shape, 0.5, np.float32),
                  token_ids=token_ids.astype(np.int32), layers=np.array([0]), num_experts=6)
    by_token, by_slot = analysis.npmi(trace, 0), analysis.npmi(trace, 0, events="slot")
    met = by_token > -1
    p_token = np.array([np.sum((token_ids == t) & (chosen[0] == e).any(1)) for e, t in zip(*np.nonzero(met),
                                                                                             strict=True)]) / tokens
    # nPMI * -log p(e, t) is the PMI, the same under both counts; p(e, t) is k times smaller over slots
    np.testing.assert_allclose(by_token[met] * -np.log(p_token), by_slot[met] * -np.log(p_token / k), atol=1e-12)
    assert not np.allclose(by_token[met], by_slot[met])


def test_rice_experts_and_tokens_by_token_events():
    trace = random_trace(seed=1)
    experts, values = analysis.top_experts_for_token(trace, 4, n=2)
    for layer in range(trace.num_layers):
        column = rice_npmi(trace.experts[layer], trace.token_ids, 6)[:, 4]
        np.testing.assert_allclose(values[layer], sorted(column, reverse=True)[:2], atol=1e-12)
        np.testing.assert_allclose(column[experts[layer]], values[layer], atol=1e-12)
    ids, values = analysis.top_tokens_per_expert(trace, 1, n=3)
    expected = rice_npmi(trace.experts[1], trace.token_ids, 6)
    for e in range(6):
        best = sorted((-expected[e, t], t) for t in range(expected.shape[1]) if expected[e, t] > -1)[:3]
        np.testing.assert_allclose(values[e, :len(best)], [-v for v, _ in best], atol=1e-12)
        assert ids[e, :len(best)].tolist() == [t for _, t in best]
    chosen = steer.marker_experts(trace, [4], n=2)  # RICE's default: token events
    np.testing.assert_allclose(chosen.npmi, np.stack([rice_npmi(trace.experts[layer], trace.token_ids, 6)[:, 4]
                                                      for layer in range(2)]), atol=1e-12)
    assert chosen.experts == {1: [2], 3: [5]}


# -------------------------------------------------------------------------------------------------- super experts

def authors_super_experts(values, quantile=99.5, times=10):
    """ZunhaiSu/Super-Experts-Profilling eval_utils.py ``_identify_super_experts``: over the output maxima of every
    expert's down projection (routed and shared) the experts above the 99.5th percentile and above the largest / 10
    (the code floors the largest with ``//``; the paper's rule divides, as moejax does)."""
    values = {key: float(v) for key, v in values.items()}
    everything = np.array(list(values.values()))
    cut, top = np.percentile(everything, quantile), everything.max() / times
    return sorted((key for key, v in values.items() if v > cut and v > top), key=lambda key: -values[key])


def test_super_experts_profile_every_expert_shared_ones_included():
    config, variables = random_model(num_layers=3, first_dense=1, num_shared=1, shared_gate=True)
    data = batches(1, shape=(4, 16))
    shared = variables["params"]["layers_2"]["ffn"]["shared"]
    shared["wo"] = shared["wo"] * 100.0  # the second MoE layer's shared experts carry the outliers
    found = super_experts.find(config, variables, data)
    params = layer_params(config, variables)
    routed, shared_peak = np.zeros((2, 8)), np.zeros(2)
    for got in capture.stream(config, variables, data):
        for row, layer in enumerate(got.layers):
            p = params[layer.layer]
            x = np.asarray(layer.inputs, np.float64)
            for t in range(len(x)):  # every token's down projection: the hook sees each module's output
                for e in layer.routing.experts[t]:
                    routed[row, e] = max(routed[row, e], np.abs(reference.expert(p, int(e), x[t][None])).max())
                out = reference.glu(x[t], p["shared"]["wi_0"], p["shared"]["wi_1"], p["shared"]["wo"])
                shared_peak[row] = max(shared_peak[row], np.abs(out).max())  # before the shared gate
    np.testing.assert_allclose(found.profile.max_output, routed, rtol=1e-5)
    np.testing.assert_allclose(found.profile.shared_max_output, shared_peak, rtol=1e-5)
    layers = [int(layer) for layer in found.profile.layers]
    values = {(layers[r], e): routed[r, e] for r in range(2) for e in range(8)}
    values.update({(layers[r], -1): shared_peak[r] for r in range(2)})  # -1: the authors' name for shared experts
    expected = authors_super_experts(values)
    assert expected == [(2, -1)]
    assert found.shared_super_experts == [2] and found.super_experts == []
    assert found.threshold == pytest.approx(max(np.percentile(list(values.values()), 99.5),
                                                max(values.values()) / 10), rel=1e-6)
    saved = found.to_json()
    assert saved["shared_super_experts"] == [2] and saved["flagged_shared"] == [False, True]
    top = super_experts.classify(found.profile, rule="top_n", top_n=3)
    order = sorted(values, key=lambda key: -values[key])[:3]
    assert [(layer, e) for layer, e in order if e >= 0] == top.super_experts
    assert [layer for layer, e in order if e < 0] == top.shared_super_experts
    assert len(super_experts.plot(found).axes) == 3


def test_super_experts_without_shared_experts_are_the_routed_profile():
    config, variables = random_model(num_layers=2)
    found = super_experts.find(config, variables, batches(1))
    assert found.profile.shared_max_output is None and found.flagged_shared is None
    assert found.shared_super_experts == [] and found.to_json()["shared_max_output"] is None
    np.testing.assert_array_equal(found.profile.values(), found.profile.max_output)


def numpy_first_token_weight(x, attn, norm_scale, theta, eps):
    """[B, H, T]: the attention weight each query gives key position 0, for grouped-query attention with rotary
    embeddings (half layout) on the block input x [B, T, D], in float64: softmax over the visible keys of
    q_t . k_j / sqrt(Dh)."""
    h = reference.rms_norm(x, norm_scale, eps)
    q = np.einsum("btd,dnh->btnh", h, np.asarray(attn["q"]["kernel"], np.float64))
    k = np.einsum("btd,dnh->btnh", h, np.asarray(attn["k"]["kernel"], np.float64))
    half = q.shape[-1] // 2
    angles = np.arange(x.shape[1])[:, None] * theta ** (-np.arange(half) / half)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]

    def rope(a):
        return np.concatenate([a[..., :half] * cos - a[..., half:] * sin, a[..., half:] * cos + a[..., :half] * sin],
                              -1)

    q, k = rope(q), rope(k)
    groups = q.shape[2] // k.shape[2]
    k = np.repeat(k, groups, axis=2)
    out = np.zeros((x.shape[0], q.shape[2], x.shape[1]))
    for b in range(x.shape[0]):
        for n in range(q.shape[2]):
            for t in range(x.shape[1]):
                logits = k[b, :t + 1, n] @ q[b, t, n] / math.sqrt(q.shape[-1])
                out[b, n, t] = reference.softmax(logits)[0]
    return out


def test_attention_sink_is_the_weight_on_the_first_position():
    """A one-layer model: the block input is the token embedding, so the attention weights follow in numpy."""
    config, variables = random_model(num_layers=1)
    data = batches(2, shape=(3, 10))
    got = super_experts.attention_sinks(config, variables, data)
    params = variables["params"]
    weights = []
    for tokens in data:
        x = np.asarray(params["embed"]["embedding"], np.float64)[tokens]
        weights.append(numpy_first_token_weight(x, params["layers_0"]["attn"],
                                                np.asarray(params["layers_0"]["attn_norm"]["scale"], np.float64),
                                                config.model.rope_theta, config.model.norm_eps)[:, :, 1:])
    np.testing.assert_allclose(got, [np.mean(weights)], rtol=1e-5)


def test_attention_sink_decay_when_experts_are_zeroed():
    """Zeroing the first MoE layer's experts (the paper's pruning: down projection at 0) leaves that layer's
    attention as it was (decay 0) and changes the next layer's; sink_decay is (before - after) / before."""
    config, variables = random_model(num_layers=3, first_dense=1)
    data = batches(1, shape=(2, 12))
    before = super_experts.attention_sinks(config, variables, data)
    pruned = {"params": dict(variables["params"]), "moe_state": variables["moe_state"]}
    ffn = dict(pruned["params"]["layers_1"]["ffn"])
    ffn["experts"] = dict(ffn["experts"], wo=np.zeros_like(np.asarray(ffn["experts"]["wo"])))
    pruned["params"]["layers_1"] = dict(pruned["params"]["layers_1"], ffn=ffn)
    after = super_experts.attention_sinks(config, pruned, data)
    decay = super_experts.sink_decay(before, after)
    assert decay[0] == pytest.approx(0.0, abs=1e-6) and abs(decay[1]) > 1e-4
    np.testing.assert_allclose(decay, (before - after) / before)
    assert np.isnan(super_experts.sink_decay([0.0], [0.1]))[0]
    scanned, scanned_variables = random_model(num_layers=5, first_dense=1, moe_every=2, scan=True)
    assert super_experts.attention_sinks(scanned, scanned_variables, data).shape == (2,)
