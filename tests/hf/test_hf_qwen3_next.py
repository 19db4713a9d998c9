"""moejax.hf's Qwen3-Next family and the model pieces it brought (the Gated DeltaNet layer kind 'linear', the attention
output gate, the zero-centred RMSNorm).

Its transformers golden cases (tests/hf/golden/cases_qwen3_next.py) are checked by tests/hf/test_hf.py: logits within
1e-4 of transformers' own forward pass, greedy tokens, export then import. Here: cached decoding of a ragged batch
gives the goldens' greedy tokens (the fixtures' continuation is transformers' full forward pass); one sharded load on
8 forced host devices gives the unsharded logits; the gated delta rule against a numpy transcription of transformers'
recurrent loop; the config mapping and its refusals; the released preset against the published config.json.
"""
import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checks, generate, hf, kv_cache, linear_attention, model, speculative
from moejax.hf import rules
from tests import helpers_hf
from tests.helpers_configs import load
from tests.helpers_hf import golden_dir

# Qwen/Qwen3-Next-80B-A3B-Instruct's config.json. The architecture fields are transformers' Qwen3NextConfig defaults,
# which its docstring gives as this checkpoint's and the model card confirms (48 layers of 12 x (3 Gated DeltaNet + 1
# gated attention), 16 query / 2 KV heads of 256 with 64 rotary dims, 16 QK / 32 V linear heads of 128, 512 experts,
# 10 routed + 1 shared of 512); intermediate_size, rope_theta and max_position_embeddings as the hub file and its
# derivatives (Qwen3-Coder-Next) give them; token ids and version strings, which read_config ignores, as remembered.
QWEN3_NEXT_80B_A3B = {
    "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4,
    "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
    "mlp_only_layers": [], "model_type": "qwen3_next", "moe_intermediate_size": 512, "norm_topk_prob": True,
    "num_attention_heads": 16, "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 48,
    "num_key_value_heads": 2, "output_router_logits": False, "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000000, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 512, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0", "use_cache": True, "vocab_size": 151936,
}


def raw_of(case):
    return json.loads((golden_dir(case) / "config.json").read_text())


def test_cached_decoding_of_a_ragged_batch_gives_the_golden_greedy_tokens():
    """Row 0 is the golden prompt left-padded by two slots behind row 1's longer prompt: its padding must leave the
    linear layers' convolution window and recurrent state as they are alone (and the full layers' keys unread)."""
    directory = golden_dir("qwen3_next_a")
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory)
    prompt = golden["prompt"][0]
    prompts = np.stack([np.concatenate([prompt, [0, 0]]), np.arange(6) + 7])
    got = generate.generate(config, variables, prompts, prompt_lengths=[4, 6], max_new_tokens=golden["greedy"].shape[1])
    np.testing.assert_array_equal(got[0, 4:4 + golden["greedy"].shape[1]], golden["greedy"][0])


def test_cache_holds_the_linear_layers_fixed_state():
    """Traced only (jax.eval_shape): the linear layers' state in the cache, and bytes_per_token counting the full
    layers' keys and values alone."""
    config, variables = hf.load(golden_dir("qwen3_next_a"))
    cache = kv_cache.Cache(10, jnp.int32(0), jnp.zeros((2,), jnp.int32))
    module = model.Transformer(generate.decode_config(config))
    _, mutated = jax.eval_shape(lambda: module.apply(variables, jnp.zeros((2, 4), jnp.int32), cache=cache,
                                                     mutable=[kv_cache.COLLECTION]))
    tree = mutated[kv_cache.COLLECTION]
    state = tree["layers_0"]["attn"]
    assert state["conv_state"].shape == (2, 3, 2 * 2 * 8 + 4 * 6) and state["recurrent_state"].shape == (2, 4, 8, 6)
    assert set(tree["layers_1"]["attn"]) == {"cached_key", "cached_value"}
    assert kv_cache.bytes_per_token(tree) == 2 * 2 * 2 * 8 * 4  # 2 full layers x (k, v) x 2 KV heads x 8 x float32


def test_sharded_load_matches_unsharded():
    """qwen3_next_a on 8 devices, mesh expert=4 x tensor=2 (its linear layers' key heads split over tensor). The
    split sums differ in order: within the goldens' 1e-4 (measured: 2e-5)."""
    helpers_hf.assert_sharded_load_matches("qwen3_next_a", atol=1e-4)


# ----------------------------------------------------------------------------------------------- the layer


def numpy_gated_delta_rule(q, k, v, g, beta):
    """transformers' torch_recurrent_gated_delta_rule, transcribed: q, k [B, S, nk, dk], v [B, S, nv, dv], g, beta
    [B, S, nv] (numpy, float64) -> (o [B, S, nv, dv], the final state [B, nv, dk, dv])."""
    repeat = v.shape[2] // k.shape[2]
    q, k = (np.repeat(t / np.sqrt((t * t).sum(-1, keepdims=True) + 1e-6), repeat, axis=2) for t in (q, k))
    q = q / np.sqrt(q.shape[-1])
    batch, seq, heads, dv = v.shape
    state = np.zeros((batch, heads, k.shape[-1], dv))
    out = np.zeros(v.shape)
    for t in range(seq):
        state = state * np.exp(g[:, t])[..., None, None]
        memory = (state * k[:, t, :, :, None]).sum(-2)
        delta = (v[:, t] - memory) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        out[:, t] = (state * q[:, t, :, :, None]).sum(-2)
    return out, state


def test_gated_delta_rule_is_transformers_recurrence_and_continues_from_its_state():
    """The recurrence and the chunked form (a whole chunk of 4 and a padded one) against the numpy loop; the first
    3 positions by the recurrence, the rest by the chunked form from its state (a prefill, then more tokens)."""
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 2, 6, 2, 4))
    v = rng.normal(size=(2, 6, 4, 3))
    g, beta = -rng.uniform(0.01, 1.0, size=(2, 6, 4)), rng.uniform(size=(2, 6, 4))
    want, want_state = numpy_gated_delta_rule(q, k, v, g, beta)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta)]
    recurrent = jax.jit(linear_attention.gated_delta_rule)
    chunked = jax.jit(linear_attention.chunked_gated_delta_rule, static_argnames="chunk")
    for got, state in (recurrent(*f32), chunked(*f32, chunk=4)):
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(state, want_state, atol=1e-5)
    first, mid = recurrent(*(x[:, :3] for x in f32))
    rest, end = chunked(*(x[:, 3:] for x in f32), mid, chunk=2)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), want, atol=1e-5)
    np.testing.assert_allclose(end, want_state, atol=1e-5)


def test_conv_rule_is_the_depthwise_conv1d_layout():
    kernel = np.arange(12, dtype=np.float32).reshape(3, 4)  # [K, C]
    torch_weight = np.stack([kernel[:, c] for c in range(4)])[:, None, :]  # nn.Conv1d(groups=C).weight [C, 1, K]
    assert rules.hf_shape("conv", (3, 4)) == (4, 1, 3)
    np.testing.assert_array_equal(rules.to_hf("conv", [kernel]), torch_weight)
    np.testing.assert_array_equal(rules.to_moejax("conv", torch_weight, (3, 4)), kernel)


@pytest.mark.parametrize("field,value,match", [
    ("linear_attention.num_value_heads", 3, "multiple of model.linear_attention.num_key_heads"),
    ("linear_attention.conv_kernel", 0, "model.linear_attention.conv_kernel=0"),
    ("linear_attention.chunk_size", -1, "model.linear_attention.chunk_size=-1"),
    ("scan_layers", True, "'linear' layers are not scanned"),
    ("attention", "mla", "model.attention_gate=True is invalid: .*False with model.attention='mla'"),
    ("norm", "rms1p", "model.norm='rms1p'"),
])
def test_model_refusals_name_the_field(field, value, match):
    m = hf.families.config_from_hf(raw_of("qwen3_next_a"))[0].model
    *sections, name = field.split(".")
    target = m
    for section in sections:
        target = target[section]
    target[name] = value
    with pytest.raises(checks.ConfigError, match=match):
        model.validate(m)


def test_speculative_decoding_refuses_linear_layers():
    config, variables = hf.load(golden_dir("qwen3_next_b"))
    with pytest.raises(checks.ConfigError, match="config.model.layer_types=.*cannot be rolled back"):
        speculative.generate(config, variables, config, variables, np.zeros((1, 3), np.int32), max_new_tokens=2)


# ----------------------------------------------------------------------------------------------- config mapping


def test_config_mapping_and_transformers_defaults():
    raw = raw_of("qwen3_next_a")
    m = hf.families.config_from_hf(raw)[0].model
    assert m.layer_types == ("linear", "full", "linear", "full") and m.norm == "rms_offset" and m.attention_gate
    assert m.partial_rotary_factor == 0.25 and m.qk_norm and m.qk_norm_scope == "head"
    assert (m.moe.num_shared, m.moe.shared_gate, m.moe.shared_ffn) == (1, True, 24)
    assert dict(m.linear_attention) == dict(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=6,
                                            conv_kernel=4, chunk_size=64)
    # without layer_types transformers takes every full_attention_interval-th layer (default 4) as full attention;
    # without a partial_rotary_factor, 0.25
    bare = {k: v for k, v in raw.items() if k not in ("layer_types", "rope_parameters")}
    derived = hf.families.config_from_hf(dict(bare, num_hidden_layers=8))[0].model
    assert derived.layer_types == ("linear", "linear", "linear", "full") * 2 and derived.partial_rotary_factor == 0.25
    assert hf.families.config_from_hf(dict(bare, full_attention_interval=1))[0].model.layer_types == ()
    out = hf.families.config_to_hf(m, "qwen3_next")
    assert out["layer_types"] == raw["layer_types"] and out["partial_rotary_factor"] == 0.25


@pytest.mark.parametrize("field,value", [("layer_types", ["sliding_attention"] * 4), ("full_attention_interval", 0),
                                         ("shared_expert_intermediate_size", 0), ("hidden_act", "gelu")])
def test_reading_refuses_what_moejax_cannot_compute(field, value):
    raw = dict(raw_of("qwen3_next_b"), **{field: value})
    if field == "full_attention_interval":
        del raw["layer_types"]
    with pytest.raises(hf.HFConfigError, match=re.escape(f"{field}={value!r}")):
        hf.families.config_from_hf(raw)


@pytest.mark.parametrize("field,value", [("norm", "rms"), ("attention_gate", False), ("qk_norm", False),
                                         ("o_bias", False), ("moe.shared_gate", False)])
def test_saving_refuses_what_qwen3_next_cannot_express(field, value):
    m = hf.families.config_from_hf(raw_of("qwen3_next_b"))[0].model
    *sections, name = field.split(".")
    (m[sections[0]] if sections else m)[name] = value
    with pytest.raises(hf.HFConfigError, match=f"model.{field}={value!r} cannot be saved as qwen3_next"):
        hf.families.config_to_hf(m, "qwen3_next")


def test_other_families_refuse_the_qwen3_next_pieces():
    m = hf.families.config_from_hf(raw_of("qwen3_next_a"))[0].model
    m.norm, m.partial_rotary_factor, m.layer_types = "rms", 1.0, ()
    with pytest.raises(hf.HFConfigError, match="model.attention_gate=True cannot be saved as qwen3_moe"):
        hf.families.config_to_hf(m, "qwen3_moe")


# ----------------------------------------------------------------------------------------------- released preset


def test_preset_equals_read_config_of_the_published_config_json(tmp_path, capsys):
    from tests.hf.test_released_presets import differences

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_NEXT_80B_A3B))
    want = hf.read_config(tmp_path).model
    assert "does not know" not in capsys.readouterr().err
    preset = load("qwen3_next", "80b_a3b").model
    assert differences(preset.to_dict(), want.to_dict()) == []
    wrong = copy.deepcopy(QWEN3_NEXT_80B_A3B)
    wrong["linear_num_value_heads"] = 16
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    assert differences(preset.to_dict(), hf.read_config(tmp_path).model.to_dict()) == [
        "model.linear_attention.num_value_heads: preset 32 != read_config 16"]
    assert hf.families.config_to_hf(load("qwen3_next").model, "qwen3_next")["model_type"] == "qwen3_next"


def test_released_parameter_counts():
    """80B total and 3B activated (the model card; 79B without the embeddings): one unit of 3 linear + 1 full layer
    through jax.eval_shape (nothing allocated), times the 12 units, plus the embedding, head and final norm."""
    cfg = load("qwen3_next", "80b_a3b").model
    unit = cfg.copy_and_resolve_references()
    unit.num_layers, unit.layer_types = 4, cfg.layer_types[:4]
    shapes = jax.eval_shape(lambda: model.Transformer(unit).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    counts = model.param_counts(shapes["params"], unit)
    outside = 2 * cfg.vocab_size * cfg.d_model + cfg.d_model
    total = 12 * (counts["total"] - outside) + outside
    activated = 12 * (counts["activated"] - outside) + outside
    assert round((total - 2 * cfg.vocab_size * cfg.d_model) / 1e9) == 79 and round(total / 1e9) == 80
    assert 3.0e9 < activated - cfg.vocab_size * cfg.d_model < 3.6e9
