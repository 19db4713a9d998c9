"""moejax.hf's dots.llm1, ERNIE 4.5 MoE and MiniMax-M2 families, and the model pieces they brought.

Their transformers golden cases (tests/hf/golden/cases_moe_round2.py) are checked by tests/hf/test_hf.py: logits
within 1e-4 of transformers' own forward pass, greedy tokens, export then import. Here: decoding with the KV cache
gives the goldens' greedy tokens (the fixtures' greedy continuation is transformers' full forward pass); one sharded
load on 8 forced host devices gives the unsharded logits; the config mappings and their refusals; the new pieces
against numpy transcriptions of the transformers code they follow.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import generate, hf, model
from moejax.hf import io
from tests import helpers_hf
from tests.helpers_configs import load
from tests.helpers_hf import golden_dir, logits_of

# one case per family (the full forward pass of every case is tests/hf/test_hf.py's): dots1_a has a sliding layer,
# groups and a dense layer, ernie4_5_moe_a its layer range and shared experts, minimax_m2_a the partial rotary
# embedding, flex_olmo_b the post-norm block with biases
FAMILY_CASES = ["dots1_a", "ernie4_5_moe_a", "minimax_m2_a", "flex_olmo_b"]


def counts(cfg) -> dict[str, int]:
    """moejax.model.param_counts from jax.eval_shape of the scanned model's init (nothing allocated)."""
    cfg = cfg.copy_and_resolve_references()
    cfg.scan_layers, cfg.layer_types = True, ()
    shapes = jax.eval_shape(lambda: model.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return model.param_counts(shapes["params"], cfg)


def read(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw, indent=2))
    return hf.read_config(tmp_path).model


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_cached_decoding_gives_the_golden_greedy_tokens(case):
    directory = golden_dir(case)
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory)
    prompt = golden["prompt"]
    got = generate.generate(config, variables, prompt, max_new_tokens=golden["greedy"].shape[1])
    np.testing.assert_array_equal(got[:, prompt.shape[1]:], golden["greedy"])


def test_sharded_load_matches_unsharded():
    """dots1_a on 8 devices, mesh expert=4 x tensor=2 (its sliding layer, groups and shared expert included)."""
    helpers_hf.assert_sharded_load_matches("dots1_a", atol=1e-5)


# ----------------------------------------------------------------------------------------------- dots.llm1


def test_dots1_config_mapping(tmp_path):
    raw = json.loads((golden_dir("dots1_a") / "config.json").read_text())
    config, _ = hf.families.config_from_hf(raw)
    m = config.model
    assert m.layer_types == ("full", "full", "sliding") and m.sliding_window == 4
    assert m.qk_norm and m.qk_norm_scope == "head" and m.qkv_bias and m.o_bias and m.first_dense_layers == 1
    assert (m.moe.router.score, m.moe.router.num_groups, m.moe.router.group_score) == ("sigmoid", 2, "top2_sum")
    # without layer_types, transformers derives them from max_window_layers
    derived = {k: v for k, v in raw.items() if k != "layer_types"}
    assert hf.families.config_from_hf(derived)[0].model.layer_types == m.layer_types
    no_window = dict(derived, sliding_window=None)
    assert hf.families.config_from_hf(no_window)[0].model.layer_types == ()
    with pytest.raises(hf.HFConfigError, match="n_shared_experts=0"):
        hf.families.config_from_hf(dict(raw, n_shared_experts=0))
    m.o_bias = False
    with pytest.raises(hf.HFConfigError, match="model.o_bias=False cannot be saved as dots1"):
        hf.families.config_to_hf(m, "dots1")


def test_dots1_layer_types_round_trip(tmp_path):
    config, variables = hf.load(golden_dir("dots1_b"))
    assert config.model.layer_types == ()
    out = json.loads((hf.save(config, variables, tmp_path / "out") / "config.json").read_text())
    assert out["layer_types"] == ["full_attention"] * 2 and out["sliding_window"] is None



# ----------------------------------------------------------------------------------------------- ERNIE 4.5 MoE


@pytest.mark.parametrize("fields,moe_layers", [
    (dict(moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1), [1, 2]),
    (dict(moe_layer_start_index=0, moe_layer_end_index=-1, moe_layer_interval=2), [1, 3, 5]),
    (dict(moe_layer_start_index=2, moe_layer_end_index=4, moe_layer_interval=2), [3]),
    (dict(moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=3), [2]),
    (dict(moe_layer_start_index=6, moe_layer_end_index=-1, moe_layer_interval=1), []),
])
def test_ernie_moe_layer_range_is_transformers(fields, moe_layers):
    """transformers' rule, layer i MoE when (i + 1) % interval == 0 and start <= i <= end (end -1: the last layer),
    against moejax's layer pattern, and back: the saved fields give the same layers."""
    raw = dict(json.loads((golden_dir("ernie4_5_moe_a") / "config.json").read_text()), num_hidden_layers=6, **fields)
    m = hf.families.config_from_hf(raw)[0].model
    end = 5 if fields["moe_layer_end_index"] == -1 else fields["moe_layer_end_index"]
    want = [i for i in range(6) if (i + 1) % fields["moe_layer_interval"] == 0
            and fields["moe_layer_start_index"] <= i <= end]
    assert want == moe_layers and model.moe_layers(m) == moe_layers
    out = hf.families.config_to_hf(m, "ernie4_5_moe")
    assert model.moe_layers(hf.families.config_from_hf(dict(raw, **{k: out[k] for k in fields}))[0].model) == want


def test_ernie_refusals_and_defaults():
    raw = json.loads((golden_dir("ernie4_5_moe_b") / "config.json").read_text())
    with pytest.raises(hf.HFConfigError, match="use_bias=True"):
        hf.families.config_from_hf(dict(raw, use_bias=True))
    with pytest.raises(hf.HFConfigError, match="moe_norm_min=0.01"):
        hf.families.config_from_hf(dict(raw, moe_norm_min=0.01))
    defaults = {k: v for k, v in raw.items() if k not in ("tie_word_embeddings", "rope_parameters")}
    m = hf.families.config_from_hf(defaults)[0].model
    assert m.tie_embeddings and m.rope_theta == 500000.0 and m.rope_interleave  # Ernie4_5_MoeConfig's defaults
    m = hf.families.config_from_hf(raw)[0].model
    m.first_dense_layers = 0  # MoE at layers 0, 2: (i + 1) % 2 != 0
    with pytest.raises(hf.HFConfigError, match="model.first_dense_layers=0 cannot be saved as ernie4_5_moe"):
        hf.families.config_to_hf(m, "ernie4_5_moe")
    m.first_dense_layers, m.dense_layers = 1, (1,)  # a dense layer before a MoE one
    with pytest.raises(hf.HFConfigError, match="model.dense_layers=.* cannot be saved as ernie4_5_moe"):
        hf.families.config_to_hf(m, "ernie4_5_moe")


def test_ernie_mtp_weights_are_skipped_with_a_note(tmp_path, capsys):
    """The released checkpoints carry a multi-token-prediction block (model.mtp_*) that transformers skips."""
    directory = tmp_path / "ernie"
    shutil.copytree(golden_dir("ernie4_5_moe_a"), directory)
    ckpt = io.Checkpoint(directory)
    tensors = {key: np.array(ckpt.array(key)) for key in ckpt.keys()}
    del ckpt
    tensors["model.mtp_emb_norm.0.weight"] = np.ones(32, np.float32)
    tensors["model.mtp_linear_proj.0.weight"] = np.ones((32, 64), np.float32)
    (directory / io.SINGLE_FILE).unlink()
    io.write_checkpoint(directory, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()], 1 << 30)
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory)
    assert "skipped 2 checkpoint tensors transformers' ernie4_5_moe skips too" in capsys.readouterr().err
    assert np.abs(logits_of(config, variables, golden["tokens"]) - golden["logits"]).max() <= 1e-4


def test_row_rule_is_the_leading_unit_axis():
    from moejax.hf import rules

    bias = np.arange(6, dtype=np.float32)
    assert rules.hf_shape("row", (6,)) == (1, 6)
    np.testing.assert_array_equal(rules.to_hf("row", [bias]), bias[None])
    np.testing.assert_array_equal(rules.to_moejax("row", bias[None], (6,)), bias)


# ----------------------------------------------------------------------------------------------- MiniMax-M2


def test_minimax_m2_rotary_fraction_as_transformers_reads_it():
    """rope_parameters' partial_rotary_factor wins over the legacy rotary_dim, which wins over nothing (1.0): the
    order of transformers' MiniMaxM2Config (a setdefault from rotary_dim); saving writes rotary_dim."""
    raw = json.loads((golden_dir("minimax_m2_b") / "config.json").read_text())
    assert raw["rotary_dim"] == 4 and "rope_parameters" not in raw
    m = hf.families.config_from_hf(raw)[0].model
    assert m.partial_rotary_factor == 0.5 and m.qk_norm_scope == "proj"
    params = {"rope_type": "default", "rope_theta": 10.0, "partial_rotary_factor": 0.25}
    assert hf.families.config_from_hf(dict(raw, rope_parameters=params))[0].model.partial_rotary_factor == 0.25
    bare = {k: v for k, v in raw.items() if k != "rotary_dim"}
    assert hf.families.config_from_hf(bare)[0].model.partial_rotary_factor == 1.0
    assert hf.families.config_to_hf(m, "minimax_m2")["rotary_dim"] == 4
    m.partial_rotary_factor = 0.3  # 2.4 of 8 dims
    with pytest.raises(hf.HFConfigError, match="model.partial_rotary_factor=0.3 cannot be saved as minimax_m2"):
        hf.families.config_to_hf(m, "minimax_m2")


@pytest.mark.parametrize("field,value", [("qk_norm_type", "per_head"), ("use_qk_norm", False),
                                         ("scoring_func", "softmax"), ("use_routing_bias", False),
                                         ("shared_intermediate_size", 512), ("router_jitter_noise", 0.1),
                                         ("attention_bias", True)])
def test_minimax_m2_refuses_what_transformers_does_not_compute(field, value):
    raw = json.loads((golden_dir("minimax_m2_a") / "config.json").read_text())
    with pytest.raises(hf.HFConfigError, match=f"{field}={value!r}"):
        hf.families.config_from_hf(dict(raw, **{field: value}))


def test_minimax_m2_released_fields_are_known(tmp_path, capsys):
    """Every field of the released config.json is mapped, checked or known to change nothing (no 'do not know'
    note), and its FP8 quantization_config is accepted."""
    read(tmp_path, MINIMAX_M2)
    assert "does not know" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- FlexOlmo


def test_flex_olmo_config_mapping_and_refusals():
    raw = json.loads((golden_dir("flex_olmo_b") / "config.json").read_text())
    m = hf.families.config_from_hf(raw)[0].model
    assert (m.norm_position, m.qk_norm_scope, m.qkv_bias, m.o_bias) == ("post", "proj", True, True)
    assert m.moe.router.norm_topk_prob and m.moe.num_experts == 8 and m.moe.top_k == 3 and m.tie_embeddings
    m.norm_position = "pre"
    with pytest.raises(hf.HFConfigError, match="model.norm_position='pre' cannot be saved as flex_olmo"):
        hf.families.config_to_hf(m, "flex_olmo")
    m.norm_position, m.moe.num_shared = "post", 1
    with pytest.raises(hf.HFConfigError, match="model.moe.num_shared=1 cannot be saved as flex_olmo"):
        hf.families.config_to_hf(m, "flex_olmo")
    # OLMoE's moejax model (pre-norm) is not a FlexOlmo one: the family inferred on save stays olmoe
    olmoe = hf.families.config_from_hf(json.loads((golden_dir("olmoe_a") / "config.json").read_text()))[0].model
    assert hf.families.config_to_hf(olmoe)["model_type"] == "olmoe"

# rednote-hilab/dots.llm1.base (and .inst): the hub config.json as other projects transcribe it (configs/dots1.py)
DOTS1_LLM1 = {
    "architectures": ["Dots1ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 10944, "max_position_embeddings": 32768, "max_window_layers": 62, "model_type": "dots1",
    "moe_intermediate_size": 1408, "n_group": None, "n_routed_experts": 128, "n_shared_experts": 2,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts_per_tok": 6, "num_hidden_layers": 62,
    "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000000,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "sliding_window": None, "tie_word_embeddings": False,
    "topk_group": None, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}
# baidu/ERNIE-4.5-21B-A3B-PT: transformers' Ernie4_5_MoeConfig defaults (its docstring's model), with the fields of
# ERNIE's own trainer the hub file carries (configs/ernie4_5_moe.py)
ERNIE_21B_A3B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 12288, "max_position_embeddings": 131072,
    "model_type": "ernie4_5_moe", "moe_capacity": [64, 64, 64], "moe_intermediate_size": 1536, "moe_k": 6,
    "moe_layer_end_index": 27, "moe_layer_interval": 1, "moe_layer_start_index": 1, "moe_num_experts": 64,
    "moe_num_shared_experts": 2, "moe_use_aux_free": True, "num_attention_heads": 20, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "num_nextn_predict_layers": 1, "pad_token_id": 0, "rms_norm_eps": 1e-05,
    "rope_theta": 500000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_bias": False,
    "use_cache": False, "vocab_size": 103424,
}
# MiniMaxAI/MiniMax-M2: the hub config.json as other projects transcribe it (configs/minimax_m2.py)
MINIMAX_M2 = {
    "architectures": ["MiniMaxM2ForCausalLM"], "attention_dropout": 0.0, "attn_type_list": [1] * 62,
    "bos_token_id": 200034, "eos_token_id": 200020, "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 196608,
    "model_type": "minimax_m2", "mtp_transformer_layers": 1, "num_attention_heads": 48, "num_experts_per_tok": 8,
    "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256, "num_mtp_modules": 3,
    "output_router_logits": False, "qk_norm_type": "per_layer", "rms_norm_eps": 1e-06, "rope_theta": 5000000,
    "rotary_dim": 64, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "scoring_func": "sigmoid",
    "shared_intermediate_size": 0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_mtp": True, "use_qk_norm": True, "use_routing_bias": True, "vocab_size": 200064,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
}
# allenai/FlexOlmo-7x7B-1T: transformers' FlexOlmoConfig defaults as save_pretrained writes them (configs/flex_olmo.py)
FLEX_OLMO_7X7B = {
    "architectures": ["FlexOlmoForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "flex_olmo", "norm_topk_prob": False,
    "num_attention_heads": 32, "num_experts": 7, "num_experts_per_tok": 5, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "output_router_logits": False, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 100352,
}
# name -> (config file, preset, config.json, published (total, activated), tolerance, activated counts the
# input embedding)
RELEASED = {
    "dots1_llm1": ("dots1", "llm1", DOTS1_LLM1, (142e9, 14e9), 1e9, True),
    "ernie4_5_moe_21b_a3b": ("ernie4_5_moe", "21b_a3b", ERNIE_21B_A3B, (21e9, 3e9), 1e9, False),
    "minimax_m2": ("minimax_m2", "m2", MINIMAX_M2, (230e9, 10e9), 1.5e9, False),
    "flex_olmo_7x7b": ("flex_olmo", "7x7b", FLEX_OLMO_7X7B, None, 0, True),  # no published count at hand
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_preset_equals_read_config_and_the_published_size(name, tmp_path):
    file, preset, raw, published, unit, with_embedding = RELEASED[name]
    got = load(file, preset).model
    assert got.to_dict() == read(tmp_path, raw).to_dict()
    model.validate(got)
    if published is None:
        return
    total, activated = published
    n = counts(got)
    n["activated"] -= 0 if with_embedding else got.vocab_size * got.d_model
    assert abs(n["total"] - total) < unit and abs(n["activated"] - activated) < unit, n


@pytest.mark.parametrize("file,family", [("dots1", "dots1"), ("ernie4_5_moe", "ernie4_5_moe"),
                                         ("minimax_m2", "minimax_m2"), ("flex_olmo", "flex_olmo")])
def test_small_default_is_a_model_of_the_released_family(file, family):
    assert hf.families.config_to_hf(load(file).model, family)["model_type"] == family
