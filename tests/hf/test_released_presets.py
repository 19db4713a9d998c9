"""The released-model presets equal what moejax.hf.read_config makes of each model's published config.json, field by
field, and their parameter counts match the published totals.

The config.json files below are the hub's files written out by hand, key for key. Every field read_config maps was
cross-checked against transformers' config classes (whose defaults are the released values for DeepSeek-V3 and
gpt-oss-120b), its OLMoE conversion script (which saves float32) and other projects' transcriptions of the hub
files; version strings and token ids, which read_config ignores, are as remembered. Nothing here allocates weights:
parameter counts come from jax.eval_shape of the model's init.
"""
import copy
import json

import jax
import jax.numpy as jnp
import pytest
from moejax.configs import phimoe

from moejax import hf, model
from tests.helpers_configs import load

YARN_V2 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
           "original_max_position_embeddings": 4096, "type": "yarn"}
YARN_V3 = {**YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}
DEEPSEEK_AUTO_MAP = {"AutoConfig": "configuration_deepseek.{v}Config", "AutoModel": "modeling_deepseek.{v}Model",
                     "AutoModelForCausalLM": "modeling_deepseek.{v}ForCausalLM"}


def _auto_map(version):
    return {k: v.format(v=version) for k, v in DEEPSEEK_AUTO_MAP.items()}


# mistralai/Mixtral-8x7B-v0.1
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}

# Qwen/Qwen3-30B-A3B
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}

# allenai/OLMoE-1B-7B-0924
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
}

# deepseek-ai/DeepSeek-V2-Lite
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": _auto_map("DeepseekV2"), "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_scaling": YARN_V2, "rope_theta": 10000,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}

# deepseek-ai/DeepSeek-V3
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": _auto_map("DeepseekV3"), "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": YARN_V3, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128,
    "vocab_size": 129280,
}


def _gpt_oss(layers, experts):
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2), "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": layers,
        "num_key_value_heads": 8, "num_local_experts": experts, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"],
                                "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    }


GPT_OSS_20B = _gpt_oss(24, 32)  # openai/gpt-oss-20b
GPT_OSS_120B = _gpt_oss(36, 128)  # openai/gpt-oss-120b

# microsoft/Phi-3.5-MoE-instruct. Every scalar field as a published listing of the hub's config.json gives it
# (architecture, token ids, transformers_version 4.43.3, the rope_scaling keys and both mscales) and as transformers'
# PhimoeConfig documents its checkpoint; the auto_map entries as the hub's remote code names its classes. The two
# 64-value LongRoPE factor lists were not among the sources available here: configs/phimoe.py's STANDIN_FACTORS (1.0
# each) stand in for them on both sides, so the comparison covers every other field.
PHI_3_5_MOE = {
    "_name_or_path": "Phi-3.5-MoE-instruct", "architectures": ["PhiMoEForCausalLM"], "attention_bias": True,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_phimoe.PhiMoEConfig",
                 "AutoModelForCausalLM": "modeling_phimoe.PhiMoEForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 4096,
    "initializer_range": 0.02, "input_jitter_noise": 0.01, "intermediate_size": 6400, "lm_head_bias": True,
    "max_position_embeddings": 131072, "model_type": "phimoe", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 16,
    "original_max_position_embeddings": 4096, "output_router_logits": False, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": list(phimoe.STANDIN_FACTORS), "long_mscale": 1.243163121016122,
                     "original_max_position_embeddings": 4096, "short_factor": list(phimoe.STANDIN_FACTORS),
                     "short_mscale": 1.243163121016122, "type": "longrope"},
    "rope_theta": 10000.0, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True,
    "vocab_size": 32064,
}

# zai-org/GLM-4.5-Air, as transformers 4.54.1 prints the Glm4MoeConfig it reads from the hub's config.json (a
# Megatron-conversion log of ZhipuAI/GLM-4.5-Air); the values transformers' Glm4MoeConfig defaults to agree
# (hidden_size, moe_intermediate_size, n_routed_experts, num_key_value_heads, vocab_size, ...).
GLM_4_5_AIR = {
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338], "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 131072,
    "model_type": "glm4_moe", "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 128,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8,
    "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "pad_token_id": 151329,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "routed_scaling_factor": 1.0, "tie_word_embeddings": False, "topk_group": 1, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.1", "use_cache": True, "use_qk_norm": False, "vocab_size": 151552,
}

# name: (config file, preset, published config.json)
RELEASED = {
    "mixtral_8x7b": ("mixtral", "8x7b", MIXTRAL_8X7B),
    "qwen3_30b_a3b": ("qwen3_moe", "30b_a3b", QWEN3_30B_A3B),
    "olmoe_1b_7b": ("olmoe", "1b_7b", OLMOE_1B_7B),
    "deepseek_v2_lite": ("deepseek_v2_lite", "lite", DEEPSEEK_V2_LITE),
    "deepseek_v3_671b": ("deepseek_v3", "671b", DEEPSEEK_V3),
    "gpt_oss_20b": ("gpt_oss", "20b", GPT_OSS_20B),
    "gpt_oss_120b": ("gpt_oss", "120b", GPT_OSS_120B),
    "phi_3_5_moe": ("phimoe", "3_5_moe", PHI_3_5_MOE),
    "glm_4_5_air": ("glm4_moe", "air", GLM_4_5_AIR),
}

# name: (published total, published activated, the unit of their last published digit, whether the activated count
# includes the input embedding). Sources: Mistral's Mixtral announcement (46.7B, 12.9B per token); the Qwen3-30B-A3B
# model card (30.5B, 3.3B); OLMoE, arXiv 2409.02060 (6.9B, 1.3B); DeepSeek-V2, arXiv 2405.04434, and the
# DeepSeek-V2-Lite model card (15.7B, 2.4B); DeepSeek-V3, arXiv 2412.19437 (671B, 37B, without the 14B
# multi-token-prediction module, which moejax skips); the gpt-oss model card, arXiv 2508.10925 (20.91B / 3.61B and
# 116.83B / 5.13B, "active" there counting the unembedding but not the embedding); the Phi-3.5-MoE-instruct model
# card (41.9B, 6.6B active "when using 2 experts"); the GLM-4.5-Air model card and arXiv 2508.06471 (106B, 12B
# active, without the multi-token-prediction layer, which moejax skips).
PUBLISHED = {
    "mixtral_8x7b": (46.7e9, 12.9e9, 0.1e9, True),
    "qwen3_30b_a3b": (30.5e9, 3.3e9, 0.1e9, True),
    "olmoe_1b_7b": (6.9e9, 1.3e9, 0.1e9, True),
    "deepseek_v2_lite": (15.7e9, 2.4e9, 0.1e9, False),
    "deepseek_v3_671b": (671e9, 37e9, 1e9, False),
    "gpt_oss_20b": (20.91e9, 3.61e9, 0.01e9, False),
    "gpt_oss_120b": (116.83e9, 5.13e9, 0.01e9, False),
    "phi_3_5_moe": (41.9e9, 6.6e9, 0.1e9, True),
    "glm_4_5_air": (106e9, 12e9, 1e9, False),
}


def differences(got, want, path="model"):
    """Every field where two (nested) config dicts differ, as 'path: got != want' lines."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = []
        for key in sorted(got.keys() | want.keys()):
            if key not in got or key not in want:
                out.append(f"{path}.{key}: only in {'preset' if key in got else 'read_config'}")
            else:
                out.extend(differences(got[key], want[key], f"{path}.{key}"))
        return out
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        got, want = list(got), list(want)
    if got == want and (type(got) is type(want) or {type(got), type(want)} <= {int, float}):
        return []
    return [f"{path}: preset {got!r} != read_config {want!r}"]


def read(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw, indent=2))
    return hf.read_config(tmp_path).model


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_equals_read_config_of_the_published_config_json(name, tmp_path):
    file, preset, raw = RELEASED[name]
    got = load(file, preset).model.to_dict()
    want = read(tmp_path, raw).to_dict()
    assert differences(got, want) == []
    model.validate(load(file, preset).model)


def test_comparison_catches_a_wrong_field(tmp_path):
    """The check above fails for a preset whose expert count (or a nested router field) is off."""
    raw = copy.deepcopy(MIXTRAL_8X7B)
    raw["num_local_experts"] = 16
    assert differences(load("mixtral", "8x7b").model.to_dict(), read(tmp_path, raw).to_dict()) == [
        "model.moe.num_experts: preset 8 != read_config 16"]
    raw = copy.deepcopy(DEEPSEEK_V3)
    raw["topk_group"] = 3
    assert differences(load("deepseek_v3", "671b").model.to_dict(), read(tmp_path, raw).to_dict()) == [
        "model.moe.router.topk_groups: preset 4 != read_config 3"]


@pytest.mark.parametrize("file,family", [("mixtral", "mixtral"), ("qwen3_moe", "qwen3_moe"), ("olmoe", "olmoe"),
                                         ("deepseek_v2_lite", "deepseek_v2"), ("gpt_oss", "gpt_oss"),
                                         ("phimoe", "phimoe"), ("glm4_moe", "glm4_moe")])
def test_small_default_is_a_model_of_the_released_family(file, family):
    """The trainable default preset is the same architecture at a small width: moejax.hf.save can write it as its
    family (configs/deepseek_v3.py's small recipe has multi-head attention instead of MLA, so it is not one)."""
    assert hf.families.config_to_hf(load(file).model, family)["model_type"] == family


def counts(cfg, scan=True):
    """moejax.model.param_counts of the model of cfg, from jax.eval_shape of its init (nothing allocated). With scan,
    the layers are counted through nn.scan (the same parameters, stacked; one layer traced instead of 61)."""
    cfg = cfg.copy_and_resolve_references()
    cfg.mtp_depth = 0  # the published counts leave the multi-token-prediction modules out
    if scan:
        cfg.scan_layers, cfg.layer_types = True, ()  # sliding and full layers hold the same parameters
    shapes = jax.eval_shape(lambda: model.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return model.param_counts(shapes["params"], cfg)


def test_scanned_count_equals_the_layer_by_layer_count():
    cfg = load("olmoe", "1b_7b").model
    assert counts(cfg) == counts(cfg, scan=False)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_parameter_counts_match_the_published_ones(name):
    """The total and activated counts (routed experts at k/E; the input embedding left out where the publication
    leaves it out) lie within one unit of the last digit published: the publications round, and Qwen's truncates
    (3.35B activated is its '3.3B')."""
    file, preset, _ = RELEASED[name]
    total, activated, unit, with_embedding = PUBLISHED[name]
    cfg = load(file, preset).model
    got = counts(cfg)
    got_activated = got["activated"] - (0 if with_embedding else cfg.vocab_size * cfg.d_model)
    assert abs(got["total"] - total) < unit, (got["total"], total)
    assert abs(got_activated - activated) < unit, (got_activated, activated)
