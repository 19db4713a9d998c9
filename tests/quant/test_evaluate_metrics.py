"""moejax.evaluate on a quantised model against its original (``quantise=`` / ``--quantise``, ``against=`` /
``--against``): the loss against a numpy cross-entropy of the numpy-quantised model's logits, the routing flips and
router KL per MoE layer against a numpy count over both models' router inputs, the per-expert weight errors and
bytes against their formulas; the command writes the same metrics either way, and names its flags' errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import cli, evaluate, hf
from moejax.posthoc import capture
from moejax.quant import rules as rules_lib
from moejax.quant import transform
from tests import helpers_hf
from tests.quant.test_qat import np_int
from tests.reference import cross_entropy

RULES = "router=int2;experts=int4"
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Box:\n    def __init__(self):\n        self.items = []\n"


def numpy_quantised(config, params):
    """params with the router kernels (int2) and routed experts (int4) rounded per output channel in numpy."""
    out = jax.tree.map(np.array, params)
    for matrix in rules_lib.matrices(config, params):
        bits = {"router": 2, "experts": 4}.get(matrix.target)
        if bits is None:
            continue
        node = out
        for key in matrix.path[:-1]:
            node = node[key]
        node[matrix.path[-1]] = np_int(matrix.view(np.asarray(node[matrix.path[-1]], np.float32)), bits)[0].reshape(
            matrix.shape)
    return out


def numpy_reference(config, variables, batches):
    """(the mean cross-entropy of the model's logits over the batches [B, S + 1]; per MoE layer the top-k expert
    sets [T, k], sorted, and the log-softmax of the router logits [T, E], in float64 from the layer's captured input
    and its router kernel: Mixtral's router, top-k of the logits, no bias) over every batch's input tokens."""
    forward = jax.jit(lambda v, t: (lambda c: (c.logits, [(x.inputs, x.params["router"]["kernel"]) for x in c.layers]))(
        capture.forward(config, v, t)))
    tokens = jnp.asarray(np.concatenate([b[:, :-1] for b in batches]))
    logits, layers = forward(variables, tokens)
    loss = cross_entropy(logits, np.concatenate([b[:, 1:] for b in batches]))
    routing = []
    for inputs, kernel in layers:
        scores = np.asarray(inputs, np.float64) @ np.asarray(kernel, np.float64)
        top = np.sort(np.argsort(-scores, axis=-1)[:, :config.model.moe.top_k], axis=-1)
        routing.append((top, scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)))
    return loss, routing


def test_quantise_reports_the_metrics_of_the_numpy_quantised_model():
    config, variables = helpers_hf.random_mixtral(vocab_size=64, num_layers=2)
    batches = [np.random.default_rng(i).integers(0, 64, (2, 17)).astype(np.int32) for i in range(2)]
    result = evaluate.evaluate(config, variables, batches, quantise=RULES)
    quantised = {"params": numpy_quantised(config, variables["params"])}
    q = result["quantisation"]
    (loss_a, a), (loss_b, b) = (numpy_reference(config, v, batches) for v in (variables, quantised))
    assert result["loss"] == pytest.approx(loss_b, abs=2e-5)
    assert q["original"]["loss"] == pytest.approx(loss_a, abs=2e-5)
    assert q["delta_loss"] == pytest.approx(result["loss"] - q["original"]["loss"], abs=1e-12)
    assert q["delta_loss"] != 0 and "layers_0_router_entropy" in result  # the usual numbers are the quantised model's
    # routing: a numpy count of changed top-k sets and the KL of the router softmaxes, over every evaluated token
    tokens = sum(x[:, :-1].size for x in batches)
    flips = [np.mean(np.any(ta != tb, axis=-1)) for (ta, _), (tb, _) in zip(a, b, strict=True)]
    kl = [np.mean(np.sum(np.exp(la) * (la - lb), axis=-1)) for (_, la), (_, lb) in zip(a, b, strict=True)]
    assert q["routing"]["layers"] == [0, 1] and q["routing"]["tokens"] == tokens
    np.testing.assert_allclose(q["routing"]["flips"], flips, atol=1 / tokens + 1e-12)
    assert min(flips) > 0
    np.testing.assert_allclose(q["routing"]["kl"], kl, rtol=1e-3)
    # per-expert weight error ||W_q - W|| / ||W|| over the expert's three matrices; the bytes of codes and scales
    for row, layer in enumerate(("layers_0", "layers_1")):
        w = variables["params"][layer]["ffn"]["experts"]
        wq = quantised["params"][layer]["ffn"]["experts"]
        diff = sum(((np.float64(wq[n]) - np.float64(w[n])) ** 2).sum((1, 2)) for n in ("wi_0", "wi_1", "wo"))
        norm = sum((np.float64(w[n]) ** 2).sum((1, 2)) for n in ("wi_0", "wi_1", "wo"))
        np.testing.assert_allclose(q["weights"]["experts"][row], np.sqrt(diff / norm), rtol=1e-6)
    weights = 2 * (3 * 4 * 32 * 16 + 32 * 4)  # 2 layers: 3 expert matrices of 4 x 32 x 16, a router 32 x 4
    scales = 2 * (4 * (16 + 16 + 32) + 4)  # float32, one per output channel
    assert q["bytes"]["quantised"] == q["bytes"]["original"] - 4 * weights + weights // 2 + 4 * scales


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(checkpoint dir, data flags, config, variables): a 1-layer Mixtral-layout release and a text corpus read in
    one batch of 2 x 32 tokens."""
    root = tmp_path_factory.mktemp("evaluate_quantised")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.py").write_text(TEXT.replace("add", f"add_{i}") * 8)
    config, variables = helpers_hf.random_mixtral(vocab_size=256, num_layers=1)
    directory = hf.save(config, variables, root / "release")
    flags = [f"--checkpoint={directory}", f"--data=text:{corpus}/*.py", f"--data_dir={root / 'data'}",
             "--batch_size=2", "--seq_len=32", "--max_tokens=64", "--compile_cache=off"]
    return directory, flags, config, variables


def test_the_command_quantises_or_compares_against_the_original(release, tmp_path):
    directory, flags, config, variables = release
    quantised = evaluate.main([*flags, "--quantise=experts=int4/g8", f"--out={tmp_path / 'q.json'}"])
    assert json.loads((tmp_path / "q.json").read_text()) == json.loads(json.dumps(quantised))
    new, _ = transform.quantize(config, variables, rules_lib.parse("experts=int4/g8"))
    saved = hf.save(config, new, tmp_path / "quantised")
    against = evaluate.main([*flags[:1], f"--checkpoint={saved}", *flags[1:], f"--against={directory}",
                             f"--out={tmp_path / 'a.json'}"])
    a, b = quantised["quantisation"], against["quantisation"]
    assert b["delta_loss"] == pytest.approx(a["delta_loss"], abs=1e-6) and a["delta_loss"] != 0
    assert b["routing"]["flips"] == a["routing"]["flips"] and b["routing"]["kl"] == pytest.approx(a["routing"]["kl"])
    np.testing.assert_allclose(b["weights"]["experts"], a["weights"]["experts"], rtol=1e-6)
    assert b["bytes"] is None  # a transformers directory holds no compact form
    assert a["bytes"]["quantised"] < a["bytes"]["original"] and a["rules"][0]["format"] == "int4/g8"


@pytest.mark.parametrize("extra,match", [
    (["--quantise=mlp=int4"], r"--quantise='mlp=int4': .*target='mlp' is invalid"),
    (["--against=/nonexistent/original"], r"--against='/nonexistent/original': the directory .* does not exist"),
    (["--quantise=experts=int4", "--against=."], r"--against='.': --quantise quantises the checkpoint itself")])
def test_flag_errors_are_named_before_loading(release, extra, match):
    with pytest.raises(cli.UsageError, match=match):
        evaluate.main([*release[1], *extra, "--out=/nonexistent/never.json"])
