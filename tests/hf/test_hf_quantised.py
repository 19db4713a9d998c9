"""Quantised transformers checkpoints written by ``moejax.hf.save(..., quantisation=...)`` (moejax/hf/quantised.py).

The stored tensors against numpy transcriptions of DeepSeek-V3's FP8 block format and GPT-OSS's MXFP4 format (codes
from ml_dtypes' own casts), the values moejax reads back, which tensors stay unquantised, the quantization_config;
the committed golden fixtures (tests/hf/golden/quant_*, written by make_quant_goldens.py: moejax wrote them,
transformers 5.25 read them and stored its logits) against moejax's logits on the same directories; a live check
with transformers where torch is installed; the errors.
"""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moejax import hf, model
from moejax.hf import io
from tests.helpers_hf import has_torch, random_mixtral

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
QUANT_CASES = ["quant_fp8_deepseek_v3", "quant_fp8_qwen3_moe", "quant_mxfp4_gpt_oss"]
TOL = 1e-4


def logits_of(config, variables, tokens) -> np.ndarray:
    return np.asarray(jax.jit(model.Transformer(config.model).apply)(variables, jnp.asarray(tokens, jnp.int32)))


def fp8_reference(w: np.ndarray, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's block format of a [out, in] weight (both multiples of the block): (float8 codes, scale_inv
    [out / b0, in / b1] = block amax / 448), written out block by block."""
    out, inp = w.shape
    codes = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    scales = np.zeros((out // b0, inp // b1), np.float32)
    for i in range(out // b0):
        for j in range(inp // b1):
            block = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].astype(np.float32)
            amax = np.float32(np.abs(block).max())
            scale = np.float32(amax / np.float32(448.0)) if amax > 0 else np.float32(1.0)
            scales[i, j] = scale
            codes[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (block / scale).astype(ml_dtypes.float8_e4m3fn)
    return codes, scales


E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def mxfp4_reference(w: np.ndarray) -> np.ndarray:
    """GPT-OSS's MXFP4 of one expert's [in, out] weight, dequantised: per output row and group of 32 inputs, the
    scale 2^ceil(log2(amax / 6)) and each value / scale to the nearest E2M1 value, ties to the even code."""
    rows = w.T.astype(np.float32)
    out = np.zeros_like(rows)
    for r in range(rows.shape[0]):
        for g in range(rows.shape[1] // 32):
            group = rows[r, g * 32:(g + 1) * 32]
            amax = float(np.abs(group).max())
            exponent = int(np.ceil(np.log2(amax / 6.0))) if amax > 0 else 0
            scaled = group / np.float32(2.0 ** exponent)
            distance = np.abs(scaled[:, None] - E2M1[None, :8] * np.sign(scaled + 0.0)[:, None])
            best = np.array([min(np.flatnonzero(d == d.min()), key=lambda c: c % 2) for d in distance])
            out[r, g * 32:(g + 1) * 32] = np.sign(scaled) * E2M1[best] * np.float32(2.0 ** exponent)
    return out.T


@pytest.fixture(scope="module")
def mixtral_fp8(tmp_path_factory):
    config, variables = random_mixtral(vocab_size=64, num_layers=2)
    directory = hf.save(config, variables, tmp_path_factory.mktemp("fp8") / "model", quantisation="fp8/16x16")
    return config, variables, directory


def test_fp8_tensors_match_the_block_format_and_reload(mixtral_fp8):
    config, variables, directory = mixtral_fp8
    raw = json.loads((directory / "config.json").read_text())
    assert raw["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16],
        "modules_to_not_convert": ["model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate",
                                   "lm_head"]}
    ckpt = io.Checkpoint(directory)
    params = variables["params"]
    fp8 = {k for k in ckpt.keys() if ckpt.dtype(k) == np.dtype(ml_dtypes.float8_e4m3fn)}
    # the attention projections and every expert Linear; embeddings, norms, routers and the head stay float32
    assert len(fp8) == 2 * (4 + 4 * 3)
    assert {k for k in ckpt.keys() if k.endswith("_scale_inv")} == {k + "_scale_inv" for k in fp8}
    _, reloaded = hf.load(directory)
    for layer in range(2):
        p, r = params[f"layers_{layer}"], reloaded["params"][f"layers_{layer}"]
        name = f"model.layers.{layer}.block_sparse_moe.experts.1.w2.weight"  # wo [F, D] of expert 1 as [D, F]
        codes, scales = fp8_reference(np.asarray(p["ffn"]["experts"]["wo"][1]).T, 16, 16)
        np.testing.assert_array_equal(np.asarray(ckpt.array(name)).view(np.uint8), codes.view(np.uint8))
        np.testing.assert_array_equal(np.asarray(ckpt.array(name + "_scale_inv")), scales)
        expected = codes.astype(np.float32) * np.repeat(np.repeat(scales, 16, 0), 16, 1)
        np.testing.assert_array_equal(np.asarray(r["ffn"]["experts"]["wo"][1]).T, expected)
        q = np.asarray(p["attn"]["q"]["kernel"])
        codes, scales = fp8_reference(q.reshape(q.shape[0], -1).T, 16, 16)
        expected = (codes.astype(np.float32) * np.repeat(np.repeat(scales, 16, 0), 16, 1)).T.reshape(q.shape)
        np.testing.assert_array_equal(np.asarray(r["attn"]["q"]["kernel"]), expected)
        for kept in (("ffn", "router", "kernel"), ("attn_norm", "scale")):
            a, b = p, r
            for key in kept:
                a, b = a[key], b[key]
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    for key in ("embed", "lm_head"):
        np.testing.assert_array_equal(jax.tree.leaves(reloaded["params"][key])[0],
                                      jax.tree.leaves(params[key])[0])


def test_fp8_leaves_partial_blocks_unquantised(tmp_path):
    """Widths that are not multiples of the block stay in full precision (transformers' dequantisation derives
    the block from the scale grid), and are named in modules_to_not_convert."""
    config, variables = random_mixtral(vocab_size=64, num_layers=1)
    directory = hf.save(config, variables, tmp_path / "m", quantisation="fp8/24x24")  # 16- and 32-wide: none fit
    raw = json.loads((directory / "config.json").read_text())
    ckpt = io.Checkpoint(directory)
    assert {str(ckpt.dtype(k)) for k in ckpt.keys()} == {"float32"}
    assert "model.layers.0.block_sparse_moe.experts" in raw["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.0.self_attn.q_proj" in raw["quantization_config"]["modules_to_not_convert"]


def test_mxfp4_experts_match_gpt_oss_format_and_reload(tmp_path):
    source = GOLDEN / "gpt_oss_a"
    config, variables = hf.load(source)
    directory = hf.save(config, variables, tmp_path / "m", quantisation="mxfp4")
    raw = json.loads((directory / "config.json").read_text())
    assert raw["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    ckpt = io.Checkpoint(directory)
    assert ckpt.shape("model.layers.0.mlp.experts.gate_up_proj_blocks") == (4, 64, 1, 16)
    assert ckpt.shape("model.layers.0.mlp.experts.down_proj_scales") == (4, 32, 1)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in ckpt
    _, reloaded = hf.load(directory)
    p, r = variables["params"]["layers_1"]["ffn"]["experts"], reloaded["params"]["layers_1"]["ffn"]["experts"]
    for name in ("wi_0", "wi_1", "wo"):
        for e in (0, 3):
            np.testing.assert_array_equal(np.asarray(r[name][e]), mxfp4_reference(np.asarray(p[name][e])))
    for name in ("bi_0", "bo"):  # biases, attention and router stay as they were
        np.testing.assert_array_equal(np.asarray(r[name]), np.asarray(p[name]))
    np.testing.assert_array_equal(np.asarray(reloaded["params"]["layers_0"]["attn"]["q"]["kernel"]),
                                  np.asarray(variables["params"]["layers_0"]["attn"]["q"]["kernel"]))


@pytest.mark.parametrize("case", QUANT_CASES)
def test_quantised_goldens_match_transformers(case):
    """moejax's logits on the directory moejax wrote quantised and transformers read (golden.npz: its logits)."""
    directory = GOLDEN / case
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory, dtype="float32")
    logits = logits_of(config, variables, golden["tokens"])
    assert str(golden["loaded_dtype"]) == "torch.float32"  # transformers dequantised the weights on load
    assert np.abs(logits - golden["logits"]).max() <= TOL
    method = json.loads((directory / "config.json").read_text())["quantization_config"]["quant_method"]
    assert method in case


def test_quantisation_errors(tmp_path):
    config, variables = random_mixtral(vocab_size=64)
    with pytest.raises(hf.HFConfigError, match=r"quantisation='int4' is not a checkpoint quantisation: allowed"):
        hf.save(config, variables, tmp_path / "a", quantisation="int4")
    with pytest.raises(hf.HFConfigError, match=r"quantisation='mxfp4' is written for the gpt_oss family only"):
        hf.save(config, variables, tmp_path / "b", quantisation="mxfp4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(not has_torch() or importlib.util.find_spec("accelerate") is None,
                    reason="needs torch, transformers and accelerate (transformers' FP8 loader imports it)")
@pytest.mark.parametrize("quantisation", ["fp8/16x16", "mxfp4"])
def test_live_transformers_reads_quantised_save(quantisation, tmp_path):
    import torch
    import transformers

    config, variables = hf.load(GOLDEN / ("gpt_oss_a" if quantisation == "mxfp4" else "qwen3_moe_a"))
    directory = hf.save(config, variables, tmp_path / "m", quantisation=quantisation)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 10))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(tokens)).logits.float().numpy()
    config, variables = hf.load(directory)
    assert np.abs(logits_of(config, variables, tokens) - expected).max() <= TOL
