"""moejax.hf's Llama 4 text family (llama4_text) and the model pieces it brought: chunked attention, NoPE layers with
the attention temperature, the L2 q/k norm, the expert input scaled by the routing weight.

Its transformers golden cases (tests/hf/golden/cases_llama4.py) are checked by tests/hf/test_hf.py: logits within
1e-4 of transformers' own forward pass, greedy tokens, export then import (turning any one of the new pieces off
moves llama4_text_a's logits by 0.5 to 3.5, docs/families.md). Here: cached decoding of a left-padded row (a ring of
one chunk per chunked layer) gives the goldens' greedy tokens; one sharded load on 8 forced host devices gives the
unsharded logits; the config mapping, its refusals and the released presets; the pieces against transcriptions of
transformers' code.
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import attention, generate, hf, kv_cache, model, rope_kinds
from tests import helpers_hf
from tests.helpers_configs import load
from tests.helpers_hf import golden_dir


def raw_config(case="llama4_text_a"):
    return json.loads((golden_dir(case) / "config.json").read_text())


def test_cached_decoding_gives_the_golden_greedy_tokens_in_a_ragged_batch():
    """The golden prompt (4 tokens) left-padded by 3 in a batch beside a 7-token prompt: its chunks of 3 and its
    temperatures count from its own first token, and the cache of each chunked layer is a ring of one chunk, so it
    gets transformers' greedy tokens (its full forward pass, unpadded)."""
    directory = golden_dir("llama4_text_a")
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory)
    steps = golden["greedy"].shape[1]
    prompts = np.zeros((2, 7), np.int32)
    prompts[0], prompts[1, :4] = golden["tokens"][1, :7], golden["prompt"][0]
    got = generate.generate(config, variables, prompts, max_new_tokens=steps, prompt_lengths=[7, 4])
    np.testing.assert_array_equal(got[1, 4:4 + steps], golden["greedy"][0])


def test_speculative_decoding_refuses_the_chunk_ring():
    """Speculative decoding overwrites rejected proposals' slots, which a ring of one chunk cannot give back."""
    from moejax import checks, speculative

    config, variables = hf.load(golden_dir("llama4_text_a"))
    with pytest.raises(checks.ConfigError, match=r"config.model='sliding windows or chunks \[3\]'"):
        speculative.generate(config, variables, config, variables, np.zeros((1, 4), np.int32), max_new_tokens=4)


def test_sharded_load_matches_unsharded():
    """llama4_text_a on 8 devices, mesh expert=4 x tensor=2: the scaled expert inputs travel through the
    expert-parallel layer."""
    helpers_hf.assert_sharded_load_matches("llama4_text_a", atol=1e-5)


# ----------------------------------------------------------------------------------------------- the mapping


def test_config_mapping_as_transformers_derives_it():
    """Llama4TextConfig's derivations: moe_layers from interleave_moe_layer_step, no_rope_layers from
    no_rope_layer_interval, layer_types (chunked where rotary and a chunk is set); saving writes them explicitly."""
    raw = raw_config()
    m = hf.families.config_from_hf(raw)[0].model
    assert model.moe_layers(m) == [1, 3] and m.ffn_dim == 40 and m.moe.expert_ffn == 16
    assert m.nope_layers == (1, 3) and m.layer_types == ("chunked", "full", "chunked", "full")
    assert (m.qk_norm_scope, m.rope_interleave, m.attn_temperature_scale, m.attn_temperature_floor) == \
        ("l2", True, 0.5, 2)
    derived = {k: v for k, v in raw.items() if k not in ("moe_layers", "no_rope_layers", "layer_types")}
    assert hf.families.config_from_hf(derived)[0].model.to_dict() == m.to_dict()
    irregular = hf.families.config_from_hf(dict(raw, moe_layers=[0, 3]))[0].model
    assert model.moe_layers(irregular) == [0, 3]
    out = hf.families.config_to_hf(irregular, "llama4_text")
    assert out["moe_layers"] == [0, 3] and out["interleave_moe_layer_step"] == 1
    unchunked = hf.families.config_from_hf(dict(derived, attention_chunk_size=None))[0].model
    assert unchunked.layer_types == () and unchunked.attention_chunk_size == 0
    off = hf.families.config_from_hf(dict(raw, attn_temperature_tuning=False, use_qk_norm=False))[0].model
    assert off.attn_temperature_scale == 0.0 and not off.qk_norm
    assert hf.families.config_to_hf(m)["model_type"] == "llama4_text"  # the only family that expresses it


@pytest.mark.parametrize("field,value", [("num_experts_per_tok", 2), ("no_rope_layers", [1, 0]),
                                         ("layer_types", ["sliding_attention"] * 4), ("floor_scale", 0.5),
                                         ("hidden_act", "gelu")])
def test_refuses_what_moejax_cannot_compute(field, value):
    with pytest.raises(hf.HFConfigError, match=re.escape(f"{field}={value!r}")):
        hf.families.config_from_hf(dict(raw_config(), **{field: value}))


def test_saving_refusals_and_other_families_refuse_llama4():
    m = hf.families.config_from_hf(raw_config())[0].model
    for family in ("mixtral", "ernie4_5_moe", "gpt_oss", "llama"):
        with pytest.raises(hf.HFConfigError):
            hf.families.config_to_hf(m, family)
    m.moe.scale_expert_input = False
    with pytest.raises(hf.HFConfigError, match="model.moe.scale_expert_input=False cannot be saved as llama4_text"):
        hf.families.config_to_hf(m, "llama4_text")
    m.moe.scale_expert_input, m.qk_norm_scope = True, "head"
    with pytest.raises(hf.HFConfigError, match="model.qk_norm=True cannot be saved as llama4_text"):
        hf.families.config_to_hf(m, "llama4_text")


# ----------------------------------------------------------------------------------------------- the presets

# meta-llama/Llama-4-Scout-17B-16E: the text_config of the hub's config.json, as transformers' Llama4TextConfig
# defaults and other projects' transcriptions give it (configs/llama4.py), saved as the text model's own config.json
SCOUT = {
    "architectures": ["Llama4ForCausalLM"], "attention_bias": False, "attention_chunk_size": 8192,
    "attention_dropout": 0.0, "attn_scale": 0.1, "attn_temperature_tuning": 4, "bos_token_id": 200000,
    "cache_implementation": "hybrid", "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192,
    "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760, "model_type": "llama4_text",
    "moe_layers": list(range(48)), "no_rope_layers": [], "num_attention_heads": 40, "num_experts_per_tok": 1,
    "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16, "output_router_logits": False,
    "pad_token_id": 200018, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
}
# meta-llama/Llama-4-Maverick-17B-128E: Scout's fields but these
MAVERICK = dict(SCOUT, interleave_moe_layer_step=2, moe_layers=list(range(1, 48, 2)), num_local_experts=128,
                use_qk_norm=False, rope_scaling=None, max_position_embeddings=1048576)


@pytest.mark.parametrize("preset,raw,published", [("scout", SCOUT, (109e9, 17e9)),
                                                  ("maverick", MAVERICK, (400e9, 17e9))])
def test_released_preset_equals_read_config_and_the_published_size(preset, raw, published, capsys):
    got = load("llama4", preset).model
    assert got.to_dict() == hf.families.config_from_hf(raw)[0].model.to_dict()
    assert "does not know" not in capsys.readouterr().err  # every released field mapped or known to change nothing
    model.validate(got)
    cfg = got.copy_and_resolve_references()  # the parameters do not depend on chunks, NoPE or which layers are MoE
    cfg.update(scan_layers=True, layer_types=(), nope_layers=(), first_dense_layers=0)
    shapes = jax.eval_shape(lambda: model.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    n = model.param_counts(shapes["params"], cfg)
    total, activated = published  # Scout's published total has its vision encoder too
    assert abs(n["total"] - total) < 1.5e9 and abs(n["activated"] - activated) < 0.5e9, n


def test_small_default_is_a_llama4_model():
    assert hf.families.config_to_hf(load("llama4").model, "llama4_text")["model_type"] == "llama4_text"


# ----------------------------------------------------------------------------------------------- the pieces


def test_chunked_cache_mask_counts_chunks_from_each_rows_first_token():
    """kv_cache.Cache.visible against transformers' chunked_overlay and causal mask: (kv - pad) // chunk == (q - pad)
    // chunk and kv <= q, the padding masked (masking_utils.py, written out here)."""
    chunk, length = 3, 11
    start = np.array([0, 2], np.int32)
    cache = kv_cache.Cache(length, jnp.asarray(4, jnp.int32), jnp.asarray(start))
    got = np.asarray(cache.visible(5, 0, jnp.arange(length, dtype=jnp.int32), chunk=chunk))
    for b, pad in enumerate(start):
        for t in range(5):
            q = 4 + t
            want = [kv >= pad and kv <= q and (kv - pad) // chunk == (q - pad) // chunk for kv in range(length)]
            assert got[b, t].tolist() == want, (b, t)


def test_attention_temperature_and_l2_norm_are_transformers():
    """attention.temperature and attention.l2_norm against modeling_llama4.py's formulas written in numpy."""
    cfg = load("llama4").model
    cfg.update(attn_temperature_scale=0.3, attn_temperature_floor=3)
    q = np.random.default_rng(0).normal(size=(2, 7, 4, 8)).astype(np.float32)
    positions = np.arange(7, dtype=np.float32) + 5
    scales = np.log1p(np.floor((positions + 1.0) / 3)) * 0.3 + 1.0
    got = attention.temperature(cfg, jnp.asarray(q), jnp.asarray(np.tile(positions, (2, 1))))
    np.testing.assert_allclose(np.asarray(got), q * scales[None, :, None, None], rtol=1e-6)
    want = q / np.sqrt(np.mean(q * q, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(attention.l2_norm(jnp.asarray(q), 1e-5)), want, rtol=1e-5)


def test_llama3_bands_with_equal_factors_are_transformers():
    """Scout's scaling (low_freq_factor == high_freq_factor: no smooth band) against _compute_llama3_parameters."""
    rs = load("llama4", "scout").model.rope_scaling
    rope_kinds.validate(rs)
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2, dtype=np.float32) / 128)
    wavelen = 2 * np.pi / base
    want = np.where(wavelen > 8192, base / 16, base)
    np.testing.assert_allclose(rope_kinds.inv_freq(128, 500000.0, rs), want, rtol=1e-6)
