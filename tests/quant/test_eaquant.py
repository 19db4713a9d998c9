"""EAQuant's steps against numpy transcriptions of the authors' code (github.com/darren-fzq1/EAQuant:
quantize/quantizer.py's clipping searches and cali_kld_top_batch, quantize/smooth.py's get_scale and merge_scale), and
the command."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import model
from moejax.quant import eaquant, formats
from tests.helpers_posthoc import random_model

RATIOS = [0.35 + i * (1 - 0.35) / 100 for i in range(101)]


def ref_mse_search(weight, bits, group=None):
    """quantizer.py per_token_dynamic_calibration_V2('mse_tensor'), symmetric, on a torch-layout weight [out, in]
    (groups of `group` inputs per row), the grid clipped at +-(2^(b-1) - 1)."""
    x = weight.reshape(-1, group) if group else weight
    qmax = 2 ** (bits - 1) - 1
    xmax_ori, xmin_ori = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    best = np.full(xmax_ori.shape, 1e5)
    ratio = np.ones(xmax_ori.shape, np.float32)
    for r in RATIOS:
        r = np.float32(r)
        abs_max = np.maximum(np.abs(r * xmax_ori), np.abs(r * xmin_ori))
        scale = abs_max / np.float32(qmax)
        x_q = np.clip(np.round(x / scale), -qmax, qmax) * scale
        scores = ((x - x_q).astype(np.float64) ** 2).sum(1).reshape(xmax_ori.shape)
        ratio[scores < best] = r
        best = np.minimum(best, scores)
    abs_max = np.maximum(np.abs(ratio * xmax_ori), np.abs(ratio * xmin_ori))
    scale = abs_max / np.float32(qmax)
    return (np.clip(np.round(x / scale), -qmax, qmax) * scale).reshape(weight.shape)


@pytest.mark.parametrize("bits,group", [(4, None), (3, 8), (8, None)])
def test_weight_clipping_search_is_the_authors(bits, group):
    rng = np.random.default_rng(bits)
    w = rng.standard_t(3, (2, 32, 6)).astype(np.float32)  # heavy tails: clipping pays
    grid, scales = eaquant.clip_mse(w, formats.int_format(bits, group or 0))
    ours = formats.dequantize(grid, scales, formats.int_format(bits, group or 0))
    for b in range(2):
        np.testing.assert_allclose(ours[b].T, ref_mse_search(w[b].T.copy(), bits, group), rtol=1e-6, atol=1e-7)
    plain = formats.fake_quantize(w, formats.int_format(bits, group or 0))
    assert ((ours - w) ** 2).sum() < ((plain - w) ** 2).sum()  # the search clips where it helps


def ref_router_search(weight, act, bits, top_k, bias):
    """per_channel_kl_top0 on the router [E, D]: one scalar score per ratio (cali_kld_top_batch, post_attn=True)."""
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(weight).max(-1, keepdims=True)
    ori = act @ weight.T + bias

    def log_softmax(z):
        z = z.astype(np.float64)
        return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)

    idx = np.argsort(-ori, axis=-1, kind="stable")[:, :top_k]
    ref = np.take_along_axis(np.exp(log_softmax(ori)), idx, -1)
    best, chosen = 1e5, 1.0
    for r in RATIOS:
        scale = np.float32(r) * absmax / np.float32(qmax)
        x_q = np.clip(np.round(weight / scale), -qmax, qmax) * scale
        can = np.take_along_axis(log_softmax(act @ x_q.T + bias), idx, -1)
        loss = np.sum(ref * (np.log(ref) - can)) / act.shape[0]  # F.kl_div(can, ref, reduction='batchmean')
        if loss < best:
            best, chosen = loss, np.float32(r)
    return chosen


def test_router_alignment_is_the_authors_topk_kl_search():
    rng = np.random.default_rng(5)
    w = rng.standard_t(3, (16, 8)).astype(np.float32)  # [D, E]
    x = rng.normal(0, 1, (64, 16)).astype(np.float32)
    bias = rng.normal(0, 0.1, 8).astype(np.float32)
    fmt = formats.int_format(3)
    grid, scales, ratio = eaquant.clip_router(w[None], fmt, x, 2, bias)
    expected = ref_router_search(w.T.copy(), x, 3, 2, bias)
    assert ratio == pytest.approx(expected, abs=1e-7)
    np.testing.assert_allclose(scales[0, 0], np.abs(w).max(0) * np.float32(expected) / 3, rtol=1e-6)


def ref_merged_scale(act_scales, expert_weights, alpha, shared=None):
    """smooth.py: get_scale per module (weights [out, in], max over outputs), merge_scale('max')."""
    def get_scale(fcs, act):
        act = np.maximum(act, 1e-5)
        weight_scales = np.maximum(np.max([np.abs(fc).max(0) for fc in fcs], axis=0), 1e-5)
        return np.maximum(act ** alpha / weight_scales ** (1 - alpha), 1e-5)

    gate = np.zeros_like(act_scales[0])  # 'max' without '_gate': the router's own scale times 0
    if shared is not None:
        gate = np.maximum(gate, get_scale(shared[1], shared[0]))
    experts = np.stack([get_scale(fcs, act) for fcs, act in zip(expert_weights, act_scales, strict=True)])
    return np.maximum(experts.max(0), gate)


def test_smoothing_aggregation_is_the_authors_max_merge():
    rng = np.random.default_rng(6)
    wi_0, wi_1 = rng.normal(0, 1, (2, 4, 12, 5)).astype(np.float32)
    act = rng.uniform(0.1, 8, (4, 12)).astype(np.float32)
    shared = (rng.uniform(0.1, 8, 12).astype(np.float32), rng.normal(0, 1, (12, 7)).astype(np.float32),
              rng.normal(0, 1, (12, 7)).astype(np.float32))
    for extra in (None, shared):
        ours = eaquant.smoothing_scale(act, wi_0, wi_1, 0.6, extra)
        ref = ref_merged_scale(act, [[wi_0[e].T, wi_1[e].T] for e in range(4)], 0.6,
                               None if extra is None else (extra[0], [extra[1].T, extra[2].T]))
        np.testing.assert_allclose(ours, ref, rtol=1e-5)


@pytest.fixture(scope="module")
def calibrated():
    config, variables = random_model(num_layers=2, num_shared=1)
    batches = [np.random.default_rng(i).integers(0, config.model.vocab_size, (2, 16)) for i in range(3)]
    return config, variables, batches


def test_smoothing_keeps_the_function_and_balance_caps_the_tokens(calibrated):
    from moejax.quant import gptq

    config, variables, batches = calibrated
    stats = eaquant.statistics(config, variables, batches, balance=0.5)
    total, k, experts = 3 * 32, config.model.moe.top_k, config.model.moe.num_experts
    cap = int(0.5 * total * k / experts)
    routed = {layer: np.zeros(experts, np.int64) for layer in stats}
    step = gptq.calibration_step(config)  # the compiled capture of every MoE layer's inputs and selected experts
    for batch in batches:
        ids = np.asarray(step(variables, jnp.asarray(batch, jnp.int32))["experts"])
        for row, layer in enumerate(stats):
            routed[layer] += np.bincount(ids[row].ravel(), minlength=experts)[:experts]
    for layer, st in stats.items():
        np.testing.assert_array_equal(st.counts, np.minimum(routed[layer], cap))
        assert st.cap == cap and (st.counts == cap).any()
    smoothed, scales = eaquant.smooth(config, variables, stats, 0.6)
    tokens = jnp.asarray(batches[0], jnp.int32)
    apply = jax.jit(model.Transformer(config.model).apply)
    np.testing.assert_allclose(apply(jax.tree.map(jnp.asarray, smoothed), tokens), apply(variables, tokens),
                               rtol=2e-4, atol=2e-4)
    s = scales[0]
    np.testing.assert_allclose(smoothed["params"]["layers_0"]["ffn_norm"]["scale"],
                               np.asarray(variables["params"]["layers_0"]["ffn_norm"]["scale"]) / s, rtol=1e-6)
    np.testing.assert_allclose(smoothed["params"]["layers_0"]["ffn"]["experts"]["wi_1"],
                               np.asarray(variables["params"]["layers_0"]["ffn"]["experts"]["wi_1"]) * s[None, :, None],
                               rtol=1e-6)
    assert not np.allclose(s, 1.0)


def test_smoothing_folds_into_a_zero_centred_norm(calibrated):
    """model.norm='rms_offset' (Qwen3-Next) stores the norm's scale as w in 1 + w: the fold divides 1 + w by s, and the
    smoothed model computes the original's function."""
    config, variables, batches = calibrated
    config = config.copy_and_resolve_references()
    config.model.norm = "rms_offset"
    stats = eaquant.statistics(config, variables, batches, balance=0.5)
    smoothed, scales = eaquant.smooth(config, variables, stats, 0.6)
    tokens = jnp.asarray(batches[0], jnp.int32)
    apply = jax.jit(model.Transformer(config.model).apply)
    np.testing.assert_allclose(apply(jax.tree.map(jnp.asarray, smoothed), tokens), apply(variables, tokens),
                               rtol=2e-4, atol=2e-4)
    w = np.asarray(variables["params"]["layers_0"]["ffn_norm"]["scale"])
    np.testing.assert_allclose(1 + smoothed["params"]["layers_0"]["ffn_norm"]["scale"], (1 + w) / scales[0],
                               rtol=1e-5)


def test_quantize_reports_and_keeps_the_function_at_8_bits(calibrated):
    config, variables, batches = calibrated
    from moejax.quant import rules

    new, tensors, report = eaquant.quantize(config, variables, rules.parse("experts=int8;shared=int8;router=int8"),
                                            batches)
    assert set(report["router_ratio"]) == {"0", "1"} and report["smoothing"]
    tokens = jnp.asarray(batches[1], jnp.int32)
    apply = jax.jit(model.Transformer(config.model).apply)
    np.testing.assert_allclose(apply(jax.tree.map(jnp.asarray, new), tokens), apply(variables, tokens), atol=0.05)
    with pytest.raises(ValueError, match="ternary"):
        eaquant.quantize(config, variables, rules.parse("experts=ternary"), batches)
    with pytest.raises(ValueError, match=r"alpha=1.5 is invalid"):
        eaquant.quantize(config, variables, rules.parse("experts=int8"), batches, alpha=1.5)


def test_the_command_writes_an_eaquant_model(tmp_path, stdlib_corpus):
    from moejax import hf
    from moejax.posthoc import __main__ as cli
    from tests import helpers_hf

    config, variables = helpers_hf.random_mixtral(vocab_size=256, num_layers=2)
    directory = hf.save(config, variables, tmp_path / "release")
    out = tmp_path / "quantised"
    result = cli.main(["quantise", "--checkpoint", str(directory), "--data", f"text:{stdlib_corpus}/*.py",
                       "--data_dir", str(tmp_path / "data"), "--batch_size", "2", "--seq_len", "16",
                       "--max_tokens", "64", "--method=eaquant", "--rules=experts=int4;router=int8", "--out", str(out)])
    what = json.loads((out / "posthoc.json").read_text())
    assert what["method"] == "eaquant" and what["eaquant"]["alpha"] == 0.6 and what["eaquant"]["smoothing"]
    assert np.isfinite(result["metrics"]["evaluation"]["delta_bits_per_byte"])
    _, saved = moejax.load(out)
    assert not np.allclose(np.asarray(saved["params"]["layers_0"]["ffn_norm"]["scale"]),
                           np.asarray(variables["params"]["layers_0"]["ffn_norm"]["scale"]))
