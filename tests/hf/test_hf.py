"""moejax.hf: released MoE checkpoints (transformers' layout) loaded and saved without torch.

Golden fixtures (tests/hf/golden/<case>/, written by tests/hf/golden/make_hf_goldens.py with transformers): the logits
of fixed token ids within 1e-4 and the same greedy continuation; export then import gives identical arrays and the
hub tensor names; a sharded load on 8 forced devices with mesh expert=4 gives the unsharded logits and reads each
expert tensor once; FP8 (DeepSeek-V3) and MXFP4 (GPT-OSS) dequantisation against numpy formulas and through whole
checkpoints; the error messages. A case whose model feature moejax lacks is skipped naming it. With torch and
transformers installed, a live check per case also builds the model, loads it, and saves it back for transformers.
"""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import moejax
from moejax import hf, model, parallel
from moejax.data import tokenizers
from moejax.hf import io, quant
from moejax.training.checkpoint import WorkdirError
from tests import helpers_hf
from tests.helpers_hf import CASES, flat, golden_dir, goldens, has_torch

TOL = 1e-4


def logits_of(config, variables, tokens, mesh=None) -> np.ndarray:
    module = model.Transformer(config.model, mesh)
    return np.asarray(jax.jit(module.apply)(variables, jnp.asarray(tokens, jnp.int32)))


def greedy(config, variables, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy continuation by the full forward pass (no KV cache). The sequence grows inside a fixed buffer: the
    model is causal (and every routed slot is computed), so the positions after t do not change the logits at t,
    and one compiled program serves every step."""
    apply = jax.jit(model.Transformer(config.model).apply)
    width = prompt.shape[1]
    ids = np.zeros((prompt.shape[0], width + steps), np.int32)
    ids[:, :width] = prompt
    for t in range(width, width + steps):
        ids[:, t] = np.asarray(apply(variables, jnp.asarray(ids)))[:, t - 1].argmax(-1)
    return ids[:, width:]


def rewrite(directory: pathlib.Path, change) -> None:
    """Rewrites a fixture copy's model.safetensors with change(dict of numpy arrays)."""
    ckpt = io.Checkpoint(directory)
    tensors = {key: np.array(ckpt.array(key)) for key in ckpt.keys()}
    del ckpt
    change(tensors)
    entries = [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    (directory / io.SINGLE_FILE).unlink()
    io.write_checkpoint(directory, entries, hf.MAX_SHARD_BYTES)


def copy_fixture(case: str, tmp_path) -> pathlib.Path:
    target = tmp_path / case
    shutil.copytree(golden_dir(case), target)
    (target / "golden.npz").unlink()
    return target


# ----------------------------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("case", CASES)
def test_golden_logits_and_greedy(case):
    directory = golden_dir(case)
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory)
    logits = logits_of(config, variables, golden["tokens"])
    assert logits.shape == golden["logits"].shape
    diff = float(np.abs(logits - golden["logits"]).max())
    assert diff <= TOL, f"{case}: max |logit diff| {diff}"
    np.testing.assert_array_equal(greedy(config, variables, golden["prompt"], golden["greedy"].shape[1]),
                                  golden["greedy"])


@pytest.mark.parametrize("case", CASES)
def test_export_then_import_is_identical(case, tmp_path):
    directory = golden_dir(case)
    config, variables = hf.load(directory)
    # named: a model several families express (GLM-4.5 with q/k norms and full rotary is a dots.llm1 model too) saves
    # as the newest of them by default (test_save_infers_the_family_of_moejax_configs)
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    out = hf.save(config, variables, tmp_path / "out", model_type=model_type)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == model_type
    # the hub layout: the same tensor names as transformers' save_pretrained (and the multi-token-prediction layers
    # of DeepSeek-V3 and GLM-4.5, past num_hidden_layers, as the released checkpoints have them)
    assert set(io.Checkpoint(out).keys()) == set(io.Checkpoint(directory).keys())
    config2, variables2 = hf.load(out)
    assert config2.model.to_dict() == config.model.to_dict()
    a, b = flat(variables), flat(variables2)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_moejax_load_opens_a_transformers_directory():
    directory = golden_dir("mixtral_a")
    config, variables = moejax.load(directory)
    golden = np.load(directory / "golden.npz")
    assert np.abs(logits_of(config, variables, golden["tokens"]) - golden["logits"]).max() <= TOL
    assert config.train.steps == 150 and config.data.name == "stdlib"  # data / train defaults
    with pytest.raises(WorkdirError, match="without step"):
        moejax.load(directory, step=3)


def test_sharded_save_writes_an_index(tmp_path):
    config, variables = hf.load(golden_dir("mixtral_a"))
    out = hf.save(config, variables, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / io.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / io.SINGLE_FILE).exists()
    _, variables2 = hf.load(out)
    assert all(np.array_equal(x, flat(variables2)[k]) for k, x in flat(variables).items())


def test_bfloat16_load_and_save(tmp_path):
    config, variables = hf.load(golden_dir("qwen3_moe_a"), dtype="bfloat16")
    leaves = flat(variables)
    assert leaves["params/layers_0/attn/q/kernel"].dtype == jnp.bfloat16
    assert leaves["params/layers_0/ffn/router/kernel"].dtype == np.float32  # moejax routers stay float32
    out = hf.save(config, variables, tmp_path / "out")
    ckpt = io.Checkpoint(out)
    assert ckpt.dtype("model.layers.0.self_attn.q_proj.weight") == np.dtype(ml_dtypes.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, variables2 = hf.load(out)
    assert all(np.array_equal(x, flat(variables2)[k]) for k, x in leaves.items())


def test_every_family_has_a_golden_case_and_registers_once():
    """A family is its module in moejax/hf/families/ and its case in tests/hf/golden/make_hf_goldens.py (a case is
    named after its family's model_type, which its fixture, once written, says too)."""
    from moejax.hf import registry

    assert {goldens.family(case) for case in CASES} == set(hf.SUPPORTED)
    for case in CASES:
        if (goldens.ROOT / case / "config.json").is_file():
            assert json.loads((goldens.ROOT / case / "config.json").read_text())["model_type"] == goldens.family(case)
    with pytest.raises(ValueError, match="a family of model_type 'mixtral' is registered already"):
        registry.register(registry.FAMILIES["mixtral"])


# ----------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("case", ["deepseek_v3_a", "gpt_oss_b"])
def test_sharded_load_matches_unsharded(case, monkeypatch):
    directory = golden_dir(case)
    golden = np.load(directory / "golden.npz")
    tokens = np.tile(golden["tokens"], (4, 1))  # the batch splits over data x expert = 8
    config, variables = hf.load(directory)
    reference = logits_of(config, variables, tokens)

    reads = []
    original = hf.Tensors.read
    monkeypatch.setattr(hf.Tensors, "read", lambda self, key, rows=None, dtype=np.float32:
                        reads.append((key, rows)) or original(self, key, rows, dtype))
    config.mesh.update(data=2, expert=4)
    mesh = parallel.make_mesh(config)
    config, sharded = hf.load(directory, mesh=mesh)
    experts = config.model.moe.num_experts
    for path, leaf in flat_arrays(sharded).items():
        if "/experts/" in path:
            assert leaf.sharding.spec[0] == "expert", path
            assert {s.data.shape[0] for s in leaf.addressable_shards} == {experts // 4}, path
    # each checkpoint tensor is read once (the data-parallel replicas share it); stacked experts by shard
    keys = [key for key, _ in reads]
    if case == "gpt_oss_b":
        stacked = [rows for key, rows in reads if key.endswith("experts.down_proj")]
        assert len(stacked) == 4 * config.model.num_layers
        assert all(rows.stop - rows.start == experts // 4 for rows in stacked)
    else:
        per_expert = [k for k in keys if ".experts." in k]
        moe_layers = config.model.num_layers - 1 + config.model.mtp_depth  # the MTP module's block is MoE too
        assert len(per_expert) == len(set(per_expert)) == 3 * experts * moe_layers
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), parallel.batch_sharding(mesh))
    logits = np.asarray(jax.jit(model.Transformer(config.model, mesh).apply)(sharded, batch))
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=0)


def flat_arrays(variables) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


# ----------------------------------------------------------------------------------------------- quantisation


def fp4_value(code: int) -> float:
    """FP4 E2M1 from its definition: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 subnormal."""
    sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return -magnitude if sign else magnitude


def test_fp4_table_is_e2m1():
    assert [fp4_value(c) for c in range(16)] == quant.FP4_VALUES.tolist()


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((256, 384), (128, 128)), ((20, 12), (8, 8))])
def test_fp8_dequant_matches_numpy_formula(shape, block):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.01, 10, size=(shape[0], 1))
    fp8, scale_inv = quant.quantize_fp8(weight, block)
    assert fp8.dtype == ml_dtypes.float8_e4m3fn and scale_inv.shape == quant.fp8_scale_shape(shape, block)
    rows, cols = np.indices(shape)
    expected = fp8.astype(np.float32) * scale_inv[rows // block[0], cols // block[1]]
    np.testing.assert_array_equal(quant.dequantize_fp8(fp8, scale_inv, block), expected)
    # e4m3 keeps 3 mantissa bits; its subnormals step by 2^-9 of the block's scale
    assert np.all(np.abs(expected - weight) <= 2**-4 * np.abs(weight) + 2**-10 * scale_inv[rows // block[0],
                                                                                         cols // block[1]])


def test_mxfp4_dequant_matches_numpy_formula():
    rng = np.random.default_rng(0)
    experts, rows, groups = 2, 3, 2
    blocks = rng.integers(0, 256, (experts, rows, groups, 16), dtype=np.uint8)
    scales = rng.integers(120, 135, (experts, rows, groups), dtype=np.uint8)
    expected = np.zeros((experts, groups * 32, rows), np.float32)
    for e in range(experts):
        for r in range(rows):
            for g in range(groups):
                for b in range(16):
                    byte, factor = int(blocks[e, r, g, b]), 2.0 ** (int(scales[e, r, g]) - 127)
                    expected[e, g * 32 + 2 * b, r] = fp4_value(byte & 0x0F) * factor
                    expected[e, g * 32 + 2 * b + 1, r] = fp4_value(byte >> 4) * factor
    np.testing.assert_array_equal(quant.dequantize_mxfp4(blocks, scales), expected)
    # quantising a weight [E, K, R] and back: within half an FP4 step of its group's scale
    weight = rng.normal(size=(experts, 64, rows)).astype(np.float32)
    q_blocks, q_scales = quant.quantize_mxfp4(weight)
    assert q_blocks.shape == (experts, rows, 2, 16) and q_scales.shape == (experts, rows, 2)
    step = np.repeat(np.ldexp(1.0, q_scales.astype(int) - 127), 32, axis=-1).swapaxes(1, 2)
    assert np.all(np.abs(quant.dequantize_mxfp4(q_blocks, q_scales) - weight) <= step + 1e-7)


@pytest.mark.skipif(not has_torch(), reason="needs torch and transformers")
def test_dequant_matches_transformers():
    import torch
    from transformers.integrations import finegrained_fp8, mxfp4

    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 5, 2, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (3, 5, 2), dtype=np.uint8)
    theirs = mxfp4.convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32)
    np.testing.assert_array_equal(quant.dequantize_mxfp4(blocks, scales), theirs.numpy())
    weight = rng.normal(size=(256, 384)).astype(np.float32)
    fp8, scale_inv = quant.quantize_fp8(weight)
    op = finegrained_fp8.Fp8Dequantize(None)
    theirs = op._dequantize_one(torch.tensor(fp8.view(np.uint8)).view(torch.float8_e4m3fn), torch.tensor(scale_inv),
                                output_dtype=torch.float32)
    np.testing.assert_array_equal(quant.dequantize_fp8(fp8, scale_inv, (128, 128)), theirs.numpy())


def quantized_copy(case, tmp_path, select, quantize, quantization_config):
    """(quantised checkpoint, float checkpoint of the same dequantised weights) made from a fixture."""
    qdir, fdir = copy_fixture(case, tmp_path / "q"), copy_fixture(case, tmp_path / "f")

    def change(dequantized: bool):
        def apply(tensors):
            for key in [k for k in tensors if select(k)]:
                parts, values = quantize(key, tensors.pop(key))
                if dequantized:
                    tensors[key] = values
                else:
                    tensors.update(parts)
        return apply

    rewrite(qdir, change(False))
    rewrite(fdir, change(True))
    raw = json.loads((qdir / "config.json").read_text())
    raw["quantization_config"] = quantization_config
    (qdir / "config.json").write_text(json.dumps(raw))
    return qdir, fdir


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    block = (8, 8)

    def quantize(key, weight):
        fp8, scale_inv = quant.quantize_fp8(weight, block)
        return {key: fp8, key + "_scale_inv": scale_inv}, quant.dequantize_fp8(fp8, scale_inv, block)

    select = lambda k: k.endswith("proj.weight") or k.endswith("proj_with_mqa.weight")  # noqa: E731
    qdir, fdir = quantized_copy("deepseek_v3_a", tmp_path, select, quantize,
                                {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": list(block)})
    assert io.Checkpoint(qdir).dtype("model.layers.1.mlp.experts.3.down_proj.weight") == ml_dtypes.float8_e4m3fn
    _, quantized = hf.load(qdir)
    _, reference = hf.load(fdir)
    a, b = flat(quantized), flat(reference)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_mxfp4_checkpoint_loads_dequantised(tmp_path):
    def quantize(key, weight):  # gate_up_proj [E, D, 2F], down_proj [E, F, D]: K = D or F, a multiple of 32
        blocks, scales = quant.quantize_mxfp4(weight)
        return {key + "_blocks": blocks, key + "_scales": scales}, quant.dequantize_mxfp4(blocks, scales)

    select = lambda k: k.endswith(("experts.gate_up_proj", "experts.down_proj"))  # noqa: E731
    qdir, fdir = quantized_copy("gpt_oss_a", tmp_path, select, quantize,
                                {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "model.layers.*.mlp.router",
                                                                                      "model.embed_tokens", "lm_head"]})
    assert "model.layers.0.mlp.experts.down_proj_blocks" in io.Checkpoint(qdir)
    _, quantized = hf.load(qdir)
    _, reference = hf.load(fdir)
    a, b = flat(quantized), flat(reference)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- errors


def edit_config(directory: pathlib.Path, **fields) -> None:
    raw = json.loads((directory / "config.json").read_text())
    raw.update(fields)
    (directory / "config.json").write_text(json.dumps(raw))


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    directory = copy_fixture("mixtral_a", tmp_path)
    edit_config(directory, model_type="llama4")
    with pytest.raises(hf.HFConfigError, match="'llama4'.*supported: mixtral, qwen2_moe, qwen3_moe, olmoe, "
                                               "deepseek_v2, deepseek_v3, gpt_oss, phimoe, glm4_moe"):
        hf.load(directory)


@pytest.mark.parametrize("fields,match", [
    ({"sliding_window": 4096}, r"sliding_window=4096 cannot be represented in moejax: moejax does not map a "
                               r"mixtral sliding window"),
    ({"attention_dropout": 0.1}, r"attention_dropout=0\.1 .*no dropout"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, r"rope type 'linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9, "rope_theta": 1e6}},
     r"attention_factor"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'.*exact 'gelu'"),
    ({"router_jitter_noise": 0.1}, r"router_jitter_noise=0\.1"),
    ({"num_experts_per_tok": None}, r"lacks the field 'num_experts_per_tok'"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, r"quant_method='awq' cannot be represented .* "
                                                                  r"'fp8' and 'mxfp4'"),
])
def test_unrepresentable_config_fields_are_named(tmp_path, fields, match):
    directory = copy_fixture("mixtral_a", tmp_path)
    edit_config(directory, **fields)
    with pytest.raises(hf.HFConfigError, match=match):
        hf.load(directory)


def test_family_specific_refusals():
    raw = json.loads((golden_dir("deepseek_v2_a") / "config.json").read_text())
    with pytest.raises(hf.HFConfigError, match="norm_topk_prob=True.*disagree"):
        hf.read_config({**raw, "norm_topk_prob": True})
    with pytest.raises(hf.HFConfigError, match="topk_method='noaux_tc'"):
        hf.read_config({**raw, "topk_method": "noaux_tc"})
    raw = json.loads((golden_dir("qwen3_moe_a") / "config.json").read_text())
    with pytest.raises(hf.HFConfigError, match="use_sliding_window=True"):
        hf.read_config({**raw, "use_sliding_window": True})


# config.json of the released DeepSeek-V3 in the layout of DeepSeek's own (remote) code, which the hub keeps
DEEPSEEK_V3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0,
    "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_hub_layout_config(capsys):
    m = hf.read_config(DEEPSEEK_V3_HUB).model
    assert capsys.readouterr().err == ""  # every field is known
    assert (m.attention, m.num_layers, m.first_dense_layers, m.param_dtype) == ("mla", 61, 3, "bfloat16")
    assert m.mla.to_dict() == dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                   v_head_dim=128, lora_scaling=False)
    r = m.moe.router
    assert (r.score, r.num_groups, r.topk_groups, r.group_score, r.group_mask_fill, r.routed_scaling_factor,
            r.norm_topk_prob) == ("sigmoid", 8, 4, "top2_sum", float("-inf"), 2.5, True)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn, m.moe.num_shared) == (256, 8, 2048, 1)
    assert (m.moe.balance_loss, m.moe.balance_coef, m.moe.balance_scope) == ("deepseek", 0.001, "sequence")
    assert m.rope_scaling.to_dict() == dict(kind="yarn", factor=40.0, original_max_position_embeddings=4096,
                                            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                            truncate=True, short_factor=(), long_factor=(), short_mscale=1.0,
                                            long_mscale=1.0, low_freq_factor=1.0, high_freq_factor=4.0)
    assert m.rope_interleave
    # mscale_all_dim without mscale: transformers' cos/sin factor is mscale(factor); moejax's mscale 0 says so
    legacy = {**DEEPSEEK_V3_HUB["rope_scaling"]}
    del legacy["mscale"]
    assert hf.read_config({**DEEPSEEK_V3_HUB, "rope_scaling": legacy}).model.rope_scaling.mscale == 0.0


def test_unknown_fields_are_reported(capsys):
    raw = json.loads((golden_dir("olmoe_a") / "config.json").read_text())
    hf.read_config({**raw, "mystery_scale": 3.0})
    assert "mystery_scale" in capsys.readouterr().err


@pytest.mark.parametrize("change,match", [
    (lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
     r"missing tensors:\n    model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight \(expected shape \[48, 32\], "
     r"for moejax parameter params/layers_1/ffn/experts/wi_1 \[4, 32, 48\]\)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((32, 24), np.float32)}),
     r"mis-shaped tensors:\n    model\.layers\.0\.self_attn\.q_proj\.weight has shape \[32, 24\], expected \[32, 32\]"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}),
     r"tensors the model has no parameter for:\n    model\.layers\.0\.self_attn\.q_proj\.bias"),
    (lambda t: t.update({"model.layers.2.input_layernorm.weight": np.zeros(32, np.float32)}),
     r"no parameter for:\n    model\.layers\.2\.input_layernorm\.weight"),
])
def test_bad_tensors_are_named(tmp_path, change, match):
    directory = copy_fixture("mixtral_a", tmp_path)
    rewrite(directory, change)
    with pytest.raises(hf.CheckpointError, match=match):
        hf.load(directory)


def test_fp8_weight_without_scale_is_named(tmp_path):
    directory = copy_fixture("mixtral_a", tmp_path)
    key = "model.layers.0.self_attn.o_proj.weight"
    rewrite(directory, lambda t: t.update({key: t[key].astype(ml_dtypes.float8_e4m3fn)}))
    with pytest.raises(hf.CheckpointError, match=f"FP8 tensor {key} has no {key}_scale_inv"):
        hf.load(directory)


def test_mtp_layers_load_into_the_mtp_module():
    """(their outputs and round trips: tests/hf/test_hf_mtp.py)"""
    config, variables = hf.load(golden_dir("deepseek_v3_a"))
    assert config.model.mtp_depth == 1 and set(variables["params"]["mtp_1"]) == {"enorm", "hnorm", "eh_proj",
                                                                                 "block", "norm"}


def test_save_refuses_what_the_family_cannot_express(tmp_path):
    config, variables = hf.load(golden_dir("qwen3_moe_a"))
    with pytest.raises(hf.HFConfigError, match=r"model\.qk_norm=True cannot be saved as mixtral: Mixtral has no "
                                               r"query/key norm"):
        hf.save(config, variables, tmp_path, model_type="mixtral")
    config.model.moe.router.kind = "hash"
    with pytest.raises(hf.HFConfigError, match=r"no released family can express this moejax model:\n") as refused:
        hf.save(config, variables, tmp_path)
    assert "\n  glm4_moe: " in str(refused.value) and "\n  mixtral: " in str(refused.value)  # every family tried
    config, variables = hf.load(golden_dir("mixtral_a"))
    variables["moe_state"]["layers_0"]["ffn"]["router_bias"] = jnp.ones(4)
    with pytest.raises(hf.HFConfigError, match="router_bias is not zero, and mixtral has no selection bias"):
        hf.save(config, variables, tmp_path)


def test_save_infers_the_family_of_moejax_configs(tmp_path):
    """A moejax model trained from configs/mixtral.py saves as Mixtral (softmax over the top-k logits)."""
    from moejax.configs import mixtral

    config = mixtral.get_config()
    config.model.update(d_model=32, num_layers=1, num_heads=4, vocab_size=64)
    config.model.moe.update(num_experts=4, expert_ffn=16)
    variables = model.Transformer(config.model).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    variables = {"params": variables["params"], "moe_state": variables["moe_state"]}
    out = hf.save(config, {"params": variables["params"]}, tmp_path / "out")  # no moe_state: zero biases
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    config2, variables2 = hf.load(out)
    tokens = np.arange(8)[None] % 64
    np.testing.assert_allclose(logits_of(config2, variables2, tokens), logits_of(config, variables, tokens),
                               atol=1e-5)


# ----------------------------------------------------------------------------------------------- tokenizers


def tiny_release(vocab_size: int, tokenizer: str, **data) -> tuple:
    """(config, variables): a 1-layer Mixtral-layout model of vocab_size embedding rows with random weights, its
    config naming data.tokenizer (and the other data fields given)."""
    config, variables = helpers_hf.random_mixtral(vocab_size)
    config.data.update(tokenizer=tokenizer, **data)
    return config, variables


def assert_same_tokenizer(saved: pathlib.Path, original) -> None:
    """The tokenizer hf.load gives the saved directory (and generation's lookup finds) is the original's."""
    config, _ = hf.load(saved)
    assert config.data.tokenizer == f"hf:{saved}"
    for tok in (tokenizers.from_spec(config.data.tokenizer), tokenizers.for_checkpoint(saved, config)):
        assert (tok.vocab_size, tok.eos_id) == (original.vocab_size, original.eos_id)
        assert tok.fingerprint["sha256"] == original.fingerprint["sha256"]
        assert tok.encode(helpers_hf.TEXTS[0]) == original.encode(helpers_hf.TEXTS[0])


def test_save_writes_an_hf_tokenizer(tmp_path):
    """A model of 320 rows with a 300-id tokenizer (fewer ids than rows: a padded embedding, as released models)."""
    source = helpers_hf.tokenizer_dir(tmp_path / "tokenizer")
    config, variables = tiny_release(320, f"hf:{source}")
    out = hf.save(config, variables, tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert_same_tokenizer(out, tokenizers.from_spec(f"hf:{source}"))


def test_save_writes_a_bpe_tokenizer(tmp_path):
    """A 'bpe:' run's tokenizer is the one built for its corpus in the data dir (without it beside the weights, the
    saved directory would decode as bytes)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(helpers_hf.TEXTS * 4):
        (corpus / f"f{i:02d}.txt").write_text(f"{text} {i}\n" * 5)
    config, variables = tiny_release(300, "bpe:300", name=f"text:{corpus}/*.txt", dir=str(tmp_path / "cache"))
    built = tokenizers.for_config(config)
    out = hf.save(config, variables, tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == next((tmp_path / "cache").glob("bpe300-*.json")).read_bytes()
    assert_same_tokenizer(out, built)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    source = helpers_hf.tokenizer_dir(tmp_path / "tokenizer")
    config, variables = tiny_release(256, f"hf:{source}")
    with pytest.raises(hf.HFConfigError, match=rf"config.data.tokenizer='hf:{source}': the tokenizer has 300 ids, "
                                               r"more than the model's vocab_size=256 embedding rows"):
        hf.save(config, variables, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    config.data.tokenizer = "bytes"
    out = hf.save(config, variables, tmp_path / "out")
    assert not (out / "tokenizer.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    with pytest.raises(hf.HFConfigError, match=r"the tokenizer has 300 ids, more than the model's vocab_size=256"):
        hf.load(out)


# ----------------------------------------------------------------------------------------------- live (transformers)


@pytest.mark.skipif(not has_torch(), reason="needs torch and transformers (pip install -e '.[hf]')")
@pytest.mark.parametrize("case", CASES)
def test_live_transformers_round_trip(case, tmp_path):
    """Build with transformers, save_pretrained, load with moejax, compare; save with moejax, load with
    transformers, compare."""
    import torch
    import transformers

    hf_model = goldens.build(case)
    directory = tmp_path / "hf"
    hf_model.save_pretrained(directory)
    tokens = goldens.tokens_of(hf_model.config.vocab_size)
    expected = goldens.reference(hf_model, tokens)
    config, variables = hf.load(directory)
    assert np.abs(logits_of(config, variables, tokens) - expected).max() <= TOL
    out = hf.save(config, variables, tmp_path / "moejax")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                 dtype=torch.float32)
    assert type(reloaded) is type(hf_model)
    np.testing.assert_allclose(goldens.reference(reloaded.eval(), tokens), expected, atol=1e-6, rtol=0)
