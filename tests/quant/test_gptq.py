"""GPTQ against a plain numpy transcription of the authors' GPTQ.fasterquant (github.com/IST-DASLab/gptq, gptq.py)
with the formats' quantisers, and the per-expert calibration: each expert's Hessian from exactly the tokens routed
to it, the fallback to round-to-nearest below min_tokens, the layers one after the other."""
import numpy as np
import pytest

from moejax import model
from moejax.posthoc import capture
from moejax.quant import formats, gptq, rules
from tests.helpers_posthoc import random_model


def reference_gptq(W, H, fmt, blocksize=128, percdamp=0.01):
    """The authors' fasterquant, line by line, on W [rows = outputs, columns = inputs] (float64), with the format's
    scale and grid in place of their Quantizer (find_params per row, or per block of rows for FP8)."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, columns = W.shape
    groupsize, rows_per_scale = fmt.tile_for(columns)

    def find_params(block):
        amax = np.abs(block).max(1)
        amax = np.repeat(amax.reshape(-1, rows_per_scale).max(1), rows_per_scale)
        return fmt.scale(amax.astype(np.float32)).astype(np.float64)

    def quantize(w, scale):
        return fmt.grid((w / scale).astype(np.float32)).astype(np.float64) * scale

    scale = find_params(W)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = np.zeros_like(W)
    Q = np.zeros_like(W)
    damp = percdamp * np.mean(np.diag(H))
    H[np.arange(columns), np.arange(columns)] += damp
    H = np.linalg.cholesky(H)
    H = np.linalg.inv(H @ H.T)  # torch.cholesky_inverse
    Hinv = np.linalg.cholesky(H).T  # torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Losses1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize < columns and (i1 + i) % groupsize == 0:
                scale = find_params(W[:, (i1 + i):(i1 + i + groupsize)])
            q = quantize(w, scale)
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, Losses.sum()


def _layer(seed=0, k=48, n=12, tokens=200):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, k)) * rng.uniform(0.2, 2.0, k)  # uneven input scales: GPTQ has work to do
    x[:, 5] = 0.0  # a dead input
    w = rng.normal(0.0, 0.5, (k, n)).astype(np.float32)  # [K, N]: y = x @ w
    return x.astype(np.float32), w, (2.0 / tokens) * (x.T.astype(np.float64) @ x)


@pytest.mark.parametrize("name,blocksize", [("int4", 16), ("int3/g8", 16), ("int4/g32", 16), ("fp8/16x4", 16),
                                            ("mxfp4", 128)])
def test_solve_matches_the_authors_algorithm(name, blocksize):
    """Blocks of 16 columns exercise the lazy batch updates; groups of 8 inside a block read the weights as the block
    started, groups of 32 span blocks; one input is dead (its weights zeroed)."""
    fmt = formats.parse(name)
    x, w, h = _layer()
    grid, scales, loss = gptq.solve(w, h, fmt, blocksize=blocksize)
    ours = formats.dequantize(grid[None], scales[None], fmt)[0]
    expected, expected_loss = reference_gptq(w.T, h, fmt, blocksize=blocksize)
    expected = expected.T
    close = np.isclose(ours, expected, rtol=1e-4, atol=1e-5)
    assert close.mean() > 0.99  # float32 against float64: a rounding boundary may fall either way
    assert np.all(ours[5] == 0) and np.isclose(loss, expected_loss, rtol=0.05)
    rtn = formats.fake_quantize(w[None], fmt)[0]
    assert np.linalg.norm(x @ (ours - w)) < np.linalg.norm(x @ (rtn - w))  # the layer's output error shrinks


def _model_and_batches(**fields):
    config, variables = random_model(num_layers=2, **fields)
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 64, (4, 24)).astype(np.int32)]
    return config, variables, batches


def test_each_expert_is_calibrated_on_its_own_routed_tokens():
    config, variables, batches = _model_and_batches(num_shared=1)
    stats = gptq.layer_stats(config, variables, batches, layer=1)
    xs, ids = [], []
    for c in capture.stream(config, variables, batches):
        xs.append(np.asarray(c.layers[1].inputs, np.float32))
        ids.append(np.asarray(c.layers[1].routing.experts))
    x, ids = np.concatenate(xs), np.concatenate(ids)
    params, _ = model.moe_layer_variables(config.model, variables)[1]
    for e in range(8):
        mine = x[(ids == e).any(1)]
        assert stats.counts[e] == len(mine)
        np.testing.assert_allclose(stats.xx[e], mine.T.astype(np.float64) @ mine, rtol=1e-5, atol=1e-5)
        wi_0, wi_1 = (np.asarray(params["experts"][name][e]) for name in ("wi_0", "wi_1"))
        hidden = mine @ wi_0 / (1 + np.exp(-(mine @ wi_0))) * (mine @ wi_1)  # SiLU GLU
        np.testing.assert_allclose(stats.hh[e], hidden.T @ hidden, rtol=1e-4, atol=1e-4)
    assert stats.counts.sum() == x.shape[0] * 2 and stats.tokens == x.shape[0]
    np.testing.assert_allclose(stats.all_xx, x.T.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_layer_by_layer_with_few_token_experts_rounded_to_nearest():
    config, variables, batches = _model_and_batches()
    rule_list = [rules.Rule("experts", "int4"), rules.Rule("attention", "int8")]
    new, tensors, report = gptq.quantize(config, variables, rule_list, batches, min_tokens=14)
    first = report["layers"]["0"]
    assert set(report["layers"]) == {"0", "1"} and sum(first["tokens"]) == 4 * 24 * 2
    assert first["rtn_experts"] == [e for e, n in enumerate(first["tokens"]) if n < 14] != []
    # the experts with too few tokens: exactly round to nearest; the others: GPTQ, which differs from it
    original = np.asarray(variables["params"]["layers_0"]["ffn"]["experts"]["wi_0"])
    rtn = formats.fake_quantize(original, formats.parse("int4"))
    got = np.asarray(new["params"]["layers_0"]["ffn"]["experts"]["wi_0"])
    for e in range(8):
        assert np.array_equal(got[e], rtn[e]) == (e in first["rtn_experts"])
    # attention is rounded to nearest; layer 1 was calibrated on the model with layer 0 quantised
    q = np.asarray(variables["params"]["layers_0"]["attn"]["q"]["kernel"])
    assert np.array_equal(np.asarray(new["params"]["layers_0"]["attn"]["q"]["kernel"]),
                          formats.fake_quantize(q.reshape(1, 16, 16), formats.parse("int8")).reshape(q.shape))
    stats = gptq.layer_stats(config, {**variables, "params": {**new["params"], "layers_1": variables["params"][
        "layers_1"]}}, batches, layer=1)
    assert stats.counts.tolist() == report["layers"]["1"]["tokens"]


def test_bad_gptq_arguments_are_named():
    config, variables, batches = _model_and_batches()
    for kwargs, match in (({"min_tokens": 0}, "min_tokens=0"), ({"percdamp": 0.0}, "percdamp=0.0"),
                          ({"blocksize": 0}, "blocksize=0")):
        with pytest.raises(ValueError, match=match):
            gptq.quantize(config, variables, [rules.Rule("experts", "int4")], batches, **kwargs)
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq.solve(np.zeros((4, 2), np.float32), np.eye(3), formats.parse("int4"))


def test_hidden_activations_match_the_expert_kinds():
    """wo's calibration inputs are computed in numpy: the same as the expert kinds' jax functions."""
    import jax.numpy as jnp

    from moejax.moe import experts

    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    weights = {"wi_0": rng.normal(size=(2, 6, 3)), "wi_1": rng.normal(size=(2, 6, 3)), "bi_0": rng.normal(size=(2, 3)),
               "bi_1": rng.normal(size=(2, 3))}
    weights = {k: (3 * v).astype(np.float32) for k, v in weights.items()}  # past the GPT-OSS clamp of 7
    kind = experts.GPTOSSExperts()
    w = {k: v[1] for k, v in weights.items()}
    expected = kind.gate(jnp.asarray(x @ w["wi_0"] + w["bi_0"]), jnp.asarray(x @ w["wi_1"] + w["bi_1"]))
    np.testing.assert_allclose(gptq._expert_hidden(kind, x, weights, 1), expected, rtol=1e-5, atol=1e-5)
    for name in ("silu", "gelu", "relu"):
        glu = experts.GLUExperts(name)
        expected = experts.ACTIVATIONS[name](jnp.asarray(x @ w["wi_0"])) * (x @ w["wi_1"])
        np.testing.assert_allclose(gptq._expert_hidden(glu, x, weights, 1), expected, rtol=1e-5, atol=1e-5)
