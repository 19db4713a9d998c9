"""Capture, routing traces from a forward pass, expert importance and super experts (moejax/posthoc/capture.py,
importance.py, super_experts.py).

Every check is against an independent computation: the router logits recomputed in numpy from the captured MoE
inputs and the router kernel (the MoE inputs themselves recomputed as the RMSNorm of the captured residual), the
per-expert counts the model's own ``moe_aux`` statistics report, and numpy loops over tokens with numpy GLU /
GPT-OSS experts for the importance criteria, the mean expert outputs and the super-expert profile.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import model, moe, posthoc
from moejax.moe import routers, stats
from moejax.posthoc import capture, importance, read_trace, super_experts
from tests import reference
from tests.helpers_posthoc import VOCAB, random_model


def batches(count=2, shape=(2, 12), seed=1, eos=None):
    rng = np.random.default_rng(seed)
    out = [rng.integers(1, VOCAB, shape).astype(np.int32) for _ in range(count)]
    if eos is not None:
        out[0][0, 4] = out[0][1, 11] = out[1][1, 0] = eos  # mid-row, end of a batch, start of a row
    return out


def layer_arrays(config, variables):
    """{model layer: (params, moe_state)} as float64 numpy."""
    return {layer: (jax.tree.map(lambda x: np.asarray(x, np.float64), p), jax.tree.map(np.asarray, s))
            for layer, (p, s) in model.moe_layer_variables(config.model, variables).items()}


def norm_scale(config, variables, layer):
    """The ffn_norm scale of a model layer (the scan unit indexed away)."""
    path, unit = model.moe_layer_paths(config.model)[layer]
    block = variables["params"]
    for key in path[:-1]:
        block = block[key]
    scale = np.asarray(block["ffn_norm"]["scale"], np.float64)
    return scale if unit is None else scale[unit]


# ------------------------------------------------------------------------------------------- capture and record

RECORD_CASES = {
    "unrolled_shared": dict(num_layers=3, first_dense=1, num_shared=1, shared_gate=True),
    "scanned_every_2_remat": dict(num_layers=5, first_dense=1, moe_every=2, scan=True, remat=True),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_record_is_the_models_routing(case, tmp_path):
    config, variables = random_model(**RECORD_CASES[case])
    cfg = config.model
    data = batches(eos=0)
    out = posthoc.record(config, variables, data, tmp_path / "trace", with_scores=True, eos_id=0)
    trace = read_trace(out)
    layers = model.moe_layers(cfg)
    assert trace.layers.tolist() == layers and trace.num_experts == 8 and trace.top_k == 2
    assert trace.num_tokens == 48 and trace.token_ids.tolist() == np.concatenate([b.reshape(-1) for b in data]).tolist()
    # row starts (rows of 12 tokens) and the positions after each eos: 5 (mid-row), 24 (the first batch ended on
    # an eos: the next batch's start, already a row start), 37 (after the eos that starts row 36)
    assert trace.doc_starts.tolist() == [0, 5, 12, 24, 36, 37]

    weights = layer_arrays(config, variables)
    captured = list(capture.stream(config, variables, data))
    apply = jax.jit(lambda v, t: model.Transformer(cfg).apply(v, t, mutable=["moe_aux"]))
    moe_counts = np.zeros((len(layers), 8))
    for index, (tokens, got) in enumerate(zip(data, captured, strict=True)):
        rows = slice(index * 24, (index + 1) * 24)
        assert [layer.layer for layer in got.layers] == layers
        for position, layer in enumerate(got.layers):
            params, state = weights[layer.layer]
            # the MoE input is the RMSNorm of the residual stream, the block output that stream plus the MoE output
            scale = norm_scale(config, variables, layer.layer)
            np.testing.assert_allclose(layer.inputs, reference.rms_norm(layer.h_before, scale, cfg.norm_eps),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(layer.h_after, np.asarray(layer.h_before) + layer.output, rtol=1e-5, atol=1e-5)
            logits = np.asarray(layer.inputs, np.float64) @ params[moe.ROUTER]["kernel"] + params[moe.ROUTER]["bias"]
            route = routers.route(jnp.asarray(logits, jnp.float32), cfg.moe, bias=jnp.asarray(state["router_bias"]))
            np.testing.assert_array_equal(trace.experts[position, rows], np.asarray(route.experts))
            np.testing.assert_allclose(trace.weights[position, rows], route.weights, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(trace.scores[position, rows], route.probs, rtol=1e-5, atol=1e-6)
        logits, aux = apply(variables, tokens)
        moe_counts += np.asarray(stats.by_layer(stats.collect(aux["moe_aux"])).tokens_per_expert)
        np.testing.assert_allclose(got.logits, logits, rtol=1e-5, atol=1e-5)
    counts = np.stack([np.bincount(trace.experts[p].reshape(-1), minlength=8) for p in range(len(layers))])
    np.testing.assert_array_equal(counts, moe_counts)
    np.testing.assert_array_equal(importance.from_trace(trace, "frequency"), moe_counts)


def test_record_under_a_routing_intervention(tmp_path):
    interventions = pytest.importorskip("moejax.moe.intervention")
    config, variables = random_model(num_layers=2)
    iv = interventions.mask_experts(config, {0: [1, 2]}).merge(interventions.force_experts(config, {1: [5]}))
    data = batches(1)
    trace = read_trace(posthoc.record(config, variables, data, tmp_path, intervention=iv))
    assert not np.isin(trace.experts[0], [1, 2]).any()  # masked: never selected
    assert (trace.experts[1] == 5).any(-1).all()  # forced: in every token's selection
    _, aux = jax.jit(lambda v, t: model.Transformer(config.model).apply(v, t, mutable=["moe_aux"],
                                                                        intervention=iv))(variables, data[0])
    np.testing.assert_array_equal(importance.from_trace(trace, "frequency"),
                                  stats.by_layer(stats.collect(aux["moe_aux"])).tokens_per_expert)


def test_record_refuses_an_existing_trace_before_running(tmp_path):
    config, variables = random_model(num_layers=1)
    capture.record(config, variables, batches(1), tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        capture.record(config, variables, iter(()), tmp_path)
    assert read_trace(capture.record(config, variables, batches(1, seed=3), tmp_path, overwrite=True)).num_tokens == 24


def test_chain_of_experts_and_dense_models_are_refused():
    config, variables = random_model(num_layers=1, chain_iterations=2)
    with pytest.raises(NotImplementedError, match="chain_iterations=2"):
        next(capture.stream(config, variables, batches(1)))
    config.model.moe_every = 0
    with pytest.raises(ValueError, match="no MoE layer"):
        importance.from_forward(config, variables, batches(1))


# ------------------------------------------------------------------------------------------------- importance

def numpy_importance(config, variables, data):
    """{criterion: [L, E]} by a loop over tokens, slots and layers with numpy experts; the routing and the
    residual stream taken from the capture (checked above)."""
    kind = config.model.moe.expert_kind
    weights = layer_arrays(config, variables)
    layers = model.moe_layers(config.model)
    out = {name: np.zeros((len(layers), 8)) for name in importance.CRITERIA}
    saliency = np.zeros((len(layers), 8))
    for got in capture.stream(config, variables, data):
        for row, layer in enumerate(got.layers):
            params, _ = weights[layer.layer]
            x = np.asarray(layer.inputs, np.float64)
            before, after = np.asarray(layer.h_before, np.float64), np.asarray(layer.h_after, np.float64)
            for t in range(x.shape[0]):
                cos = before[t] @ after[t] / (np.linalg.norm(before[t]) * np.linalg.norm(after[t]))
                for e, g in zip(layer.routing.experts[t], layer.routing.weights[t], strict=True):
                    if not 0 <= e < 8:
                        continue
                    norm = np.linalg.norm(reference.expert(params, e, x[t][None], kind)[0])
                    out["frequency"][row, e] += 1
                    out["soft_count"][row, e] += g
                    saliency[row, e] += g * norm
                    out["easy_ep"][row, e] += g * norm * max(1 - cos, 0.0)
    out["reap"] = np.where(out["frequency"] > 0, saliency / np.maximum(out["frequency"], 1), 0.0)
    return out


@pytest.mark.parametrize("kind", ["glu", "gpt_oss"])
def test_importance_criteria_match_a_numpy_loop(kind, tmp_path):
    fields = dict(num_layers=2, expert_kind=kind) if kind == "glu" else \
        dict(num_layers=3, moe_every=2, first_dense=1, scan=True, expert_kind=kind, num_null_experts=1, top_k=3,
             router=dict(kind="adamoe"))  # null slots (ids >= E) left out everywhere
    config, variables = random_model(**fields)
    data = batches()
    got = importance.from_forward(config, variables, data, importance.CRITERIA)
    expected = numpy_importance(config, variables, data)
    for name in importance.CRITERIA:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-5, atol=1e-7, err_msg=name)
    assert (got["reap"] > 0).sum() == (got["frequency"] > 0).sum()  # 0 exactly for the experts never routed to
    # frequency and soft_count are the same from the recorded trace
    trace = read_trace(capture.record(config, variables, data, tmp_path / "trace"))
    for name in importance.trace_criteria(trace):
        np.testing.assert_allclose(got[name], importance.from_trace(trace, name), rtol=1e-12)
    with pytest.raises(ValueError, match="magnitude"):
        importance.from_forward(config, variables, data, "magnitude")


def test_a_registered_criterion_comes_from_a_trace_or_a_forward_pass_alike(monkeypatch, tmp_path):
    """Adding a criterion is one registered function: here the router-score mass of each expert over every token,
    which needs the router scores (a trace recorded with them, or the forward pass); one that needs the expert
    outputs comes from the forward pass only. Names are registered once."""
    monkeypatch.setattr(importance, "CRITERIA", dict(importance.CRITERIA))

    @importance.register("score_mass", needs=("scores",))
    def score_mass(batch):
        return batch.scores.sum(0)

    @importance.register("reap_again", needs=("outputs",), reduce="mean")
    def reap_again(batch):  # REAP's formula, registered anew
        return batch.per_expert(batch.weights * batch.norms)

    config, variables = random_model(num_layers=3, first_dense=1)
    data = batches()
    got = importance.from_forward(config, variables, data, ["score_mass", "reap_again"])
    scored = read_trace(capture.record(config, variables, data, tmp_path / "scored", with_scores=True))
    np.testing.assert_allclose(got["score_mass"], importance.from_trace(scored, "score_mass"), rtol=1e-12)
    np.testing.assert_allclose(got["score_mass"], scored.scores.astype(np.float64).sum(1), rtol=1e-12)
    assert importance.trace_criteria(scored) == ["frequency", "soft_count", "score_mass"]
    plain = read_trace(capture.record(config, variables, data, tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"'score_mass' needs \['scores'\].*with_scores"):
        importance.from_trace(plain, "score_mass")
    with pytest.raises(ValueError, match=r"'reap_again' needs \['outputs'\].*from_forward"):
        importance.from_trace(scored, "reap_again")
    np.testing.assert_array_equal(got["reap_again"], importance.from_forward(config, variables, data, "reap"))
    np.testing.assert_allclose(got["reap_again"], numpy_importance(config, variables, data)["reap"], rtol=2e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match=r"'frequency' is already registered"):
        importance.register("frequency")(score_mass)
    with pytest.raises(ValueError, match=r"needs=\['logits'\].*allowed are"):
        importance.register("by_logits", needs=("logits",))
    with pytest.raises(ValueError, match=r"reduce='max'.*allowed are \('sum', 'mean'\)"):
        importance.register("peak", reduce="max")


def test_expert_mean_outputs_match_numpy():
    config, variables = random_model(num_layers=2)
    data = batches()
    got = importance.expert_mean_outputs(config, variables, data)
    weights = layer_arrays(config, variables)
    inputs = {}

    def keep_inputs(index, layers):  # the callback form of stream, with a reduction keeping the MoE inputs
        for layer, x in layers.items():
            inputs.setdefault(layer, []).append(np.asarray(x, np.float64))

    assert capture.capture(config, variables, data, keep_inputs, lambda c: {x.layer: x.inputs for x in c.layers}) == 2
    for row, layer in enumerate(model.moe_layers(config.model)):
        x = np.concatenate(inputs[layer])
        expected = np.stack([reference.expert(weights[layer][0], e, x).mean(0) for e in range(8)])
        np.testing.assert_allclose(got[row], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- super experts

def test_a_scaled_up_expert_is_the_super_expert():
    config, variables = random_model(num_layers=3, first_dense=1)
    data = batches(1, shape=(4, 16))
    counts = importance.from_forward(config, variables, data, "frequency")
    layer, expert = 2, int(np.argmax(counts[1]))  # the busiest expert of the second MoE layer
    variables["params"][f"layers_{layer}"]["ffn"][moe.EXPERTS]["wo"] = \
        variables["params"][f"layers_{layer}"]["ffn"][moe.EXPERTS]["wo"].at[expert].multiply(100.0)
    found = super_experts.find(config, variables, data)
    assert found.super_experts == [(layer, expert)]

    weights = layer_arrays(config, variables)
    peak = np.zeros((2, 8))
    channel = np.full((2, 8), -1)
    residual = []
    (got,) = capture.stream(config, variables, data)
    for row, captured in enumerate(got.layers):
        params, _ = weights[captured.layer]
        x = np.asarray(captured.inputs, np.float64)
        for t in range(x.shape[0]):
            for e in captured.routing.experts[t]:
                out = np.abs(reference.expert(params, e, x[t][None])[0])
                if out.max() > peak[row, e]:
                    peak[row, e], channel[row, e] = out.max(), out.argmax()
        residual.append(np.abs(np.asarray(captured.h_after, np.float64)))
    profile = found.profile
    np.testing.assert_allclose(profile.max_output, peak, rtol=1e-5)
    np.testing.assert_array_equal(profile.channel, channel)
    np.testing.assert_array_equal(profile.counts, counts)
    np.testing.assert_allclose(profile.residual_max, [r.max() for r in residual], rtol=1e-6)
    np.testing.assert_allclose(profile.residual_median, [np.median(r) for r in residual], rtol=1e-6)
    expected_cut = max(np.percentile(peak, 99.5), peak.max() / 10)
    assert found.threshold == pytest.approx(expected_cut, rel=1e-6)

    # other rules on the same profile
    top3 = super_experts.classify(profile, rule="top_n", top_n=3)
    assert len(top3.super_experts) == 3 and top3.super_experts[0] == (layer, expert)
    loose = super_experts.classify(profile, rule="percentile", percentile=50)
    assert loose.flagged.sum() == (peak > np.percentile(peak, 50)).sum()
    with pytest.raises(ValueError, match="top_n=None"):
        super_experts.classify(profile, rule="top_n")
    with pytest.raises(ValueError, match="rule='max'"):
        super_experts.find(config, variables, data, rule="max")
    figure = super_experts.plot(found)
    assert len(figure.axes) == 3  # heatmap, its colour bar, the residual ratios
    assert found.to_json()["super_experts"] == [[layer, expert]]


def test_a_post_norm_moe_layer_is_captured_from_the_stream_it_reads():
    """FlexOlmo's post-norm blocks (x + post_ffn_norm(moe(x)), no ffn_norm): the MoE input is the residual stream,
    the logits are that input times the router kernel and the block output adds the RMSNorm of the MoE output, each
    recomputed in numpy from the transformers golden checkpoint's own tensors."""
    from moejax import hf
    from tests.helpers_hf import golden_dir

    config, variables = hf.load(golden_dir("flex_olmo_a"))
    assert config.model.norm_position == "post"
    tokens = batches(count=1)[0] % config.model.vocab_size
    got = next(iter(capture.stream(config, variables, [tokens])))
    params = variables["params"]
    for layer in got.layers:
        block = params[f"layers_{layer.layer}"]
        before, inputs = np.asarray(layer.h_before, np.float64), np.asarray(layer.inputs, np.float64)
        np.testing.assert_array_equal(inputs, before)
        kernel = np.asarray(block["ffn"]["router"]["kernel"], np.float64)
        np.testing.assert_allclose(np.asarray(layer.logits), inputs @ kernel, rtol=1e-4, atol=1e-5)
        output = np.asarray(layer.output, np.float64)
        normed = output / np.sqrt((output ** 2).mean(-1, keepdims=True) + config.model.norm_eps)
        scale = np.asarray(block["post_ffn_norm"]["scale"], np.float64)
        np.testing.assert_allclose(np.asarray(layer.h_after, np.float64), before + normed * scale, rtol=1e-4,
                                   atol=1e-5)
