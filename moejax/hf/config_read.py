"""config.json -> moejax: how each released MoE family's transformers config.json maps onto moejax's ``model``
config (configs/base.py's defaults), one ``from_<family>`` per family. Reads current ``rope_parameters`` or the hub's
older ``rope_theta`` / ``rope_scaling`` fields. A field moejax cannot represent raises ``HFConfigError`` naming it;
``HFConfig`` records which fields were read, so families.config_from_hf can report the ones nothing knows.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections


class HFConfigError(ValueError):
    """A config.json (or a moejax config being saved) with a field the other side cannot represent."""


# ----------------------------------------------------------------------------------------------- config.json -> moejax

# Fields of any transformers config that do not change the logits.
GENERIC_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "output_router_logits", "_name_or_path",
    "auto_map", "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
    "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "problem_type", "finetuning_task", "prefix", "task_specific_params", "torchscript",
    "pruned_heads", "cross_attention_hidden_size", "quantization_config", "max_position_embeddings",
    "initializer_range", "router_aux_loss_coef", "use_bfloat16", "tf_legacy_loss", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "_experts_implementation", "output_scores",
    "pretraining_tp", "layer_norm_eps", "keys_to_ignore_at_inference", "rope_parameters", "rope_scaling",
    "rope_theta",
})


class HFConfig:
    """A config.json being mapped: remembers the fields consulted so that the rest can be reported."""

    def __init__(self, raw: dict[str, Any], model_type: str):
        self.raw = dict(raw)
        self.model_type = model_type
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def get(self, name: str, default: Any = None) -> Any:
        """The field's value; ``default`` when it is absent or null."""
        self.used.add(name)
        value = self.raw.get(name)
        return default if value is None else value

    def need(self, name: str, kind: type = int) -> Any:
        """A field the mapping cannot do without."""
        value = self.get(name)
        if value is None:
            raise HFConfigError(f"{self.model_type} config.json lacks the field {name!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise HFConfigError(f"{self.model_type} config field {name}={value!r} must be an integer")
        return kind(value)

    def refuse(self, name: str, value: Any, why: str) -> None:
        raise HFConfigError(f"{self.model_type} config field {name}={value!r} cannot be represented in moejax: {why}")

    def expect(self, name: str, ok: Callable[[Any], bool], why: str, default: Any = None) -> Any:
        value = self.get(name, default)
        if not ok(value):
            self.refuse(name, value, why)
        return value

    def unused(self, ignored: frozenset[str]) -> list[str]:
        return sorted(k for k in self.raw if k not in self.used and k not in ignored and k not in GENERIC_IGNORED)


def _falsy(value: Any) -> bool:
    return not value


ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}


def _common(hf: HFConfig, m: ml_collections.ConfigDict, eps_default: float) -> None:
    m.vocab_size = hf.need("vocab_size")
    m.d_model = hf.need("hidden_size")
    m.num_layers = hf.need("num_hidden_layers")
    m.num_heads = hf.need("num_attention_heads")
    m.norm_eps = float(hf.get("rms_norm_eps", eps_default))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.init_std = float(hf.get("initializer_range", 0.02))
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        hf.refuse("hidden_act", act, f"moejax's activations are {sorted(ACTIVATIONS)} (its 'gelu' is the tanh "
                                     f"approximation; the exact 'gelu' has no moejax equivalent)")
    m.moe.activation = ACTIVATIONS[act]
    hf.expect("attention_dropout", lambda v: not v, "moejax attention has no dropout", 0.0)
    dtype = hf.raw.get("dtype") or hf.raw.get("torch_dtype") or "float32"
    m.param_dtype = m.dtype = "bfloat16" if dtype == "bfloat16" else "float32"


def _yarn_mscales(params: dict[str, Any]) -> tuple[float, float]:
    """moejax's (rope_scaling.mscale, mscale_all_dim) for transformers' yarn parameters. transformers scales cos and
    sin by mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set, else by mscale(f, 1), and DeepSeek's
    attention multiplies its softmax scale by mscale(f, mscale_all_dim)^2 whenever mscale_all_dim is set; moejax
    (moejax/attention.py) does the same with its two fields, taking the ratio only when both are non-zero. So
    mscale_all_dim alone maps to mscale 0."""
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(mscale), float(mscale_all_dim)
    return (0.0 if mscale_all_dim else 1.0), float(mscale_all_dim or 0.0)


def _rope(hf: HFConfig, m: ml_collections.ConfigDict, default_theta: float) -> None:
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        hf.refuse("rope_parameters", params, "moejax has one rotary embedding for every layer")
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", default_theta)
    m.rope_theta = float(theta)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        hf.refuse("partial_rotary_factor", partial, "moejax rotates every dimension of the rotary part")
    if rope_type == "default":
        return
    if rope_type != "yarn":
        hf.refuse("rope_scaling", {"rope_type": rope_type, **params},
                  f"rope type {rope_type!r} is not one moejax has (it has 'default' and 'yarn')")
    if params.get("attention_factor") is not None:
        hf.refuse("rope_scaling", {"rope_type": rope_type, **params},
                  "an explicit yarn attention_factor has no moejax field (moejax derives it from factor and mscale)")
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    factor = params.get("factor") or hf.get("max_position_embeddings") / original
    mscale, mscale_all_dim = _yarn_mscales(params)
    m.rope_scaling.update(kind="yarn", factor=float(factor), original_max_position_embeddings=int(original),
                          beta_fast=float(params.get("beta_fast") or 32.0),
                          beta_slow=float(params.get("beta_slow") or 1.0), mscale=mscale,
                          mscale_all_dim=mscale_all_dim, truncate=bool(params.get("truncate", True)))


def _gqa(hf: HFConfig, m: ml_collections.ConfigDict, default_theta: float) -> None:
    m.num_kv_heads = int(hf.get("num_key_value_heads", m.num_heads))
    head_dim = hf.get("head_dim") or m.d_model // m.num_heads
    m.head_dim = 0 if m.d_model % m.num_heads == 0 and head_dim == m.d_model // m.num_heads else int(head_dim)
    _rope(hf, m, default_theta)


def _no_sliding(hf: HFConfig, enabled: str | None = None) -> None:
    """Families whose sliding window moejax does not map (released checkpoints do not use one)."""
    if enabled is not None:
        hf.expect(enabled, _falsy, f"moejax does not map a {hf.model_type} sliding window", False)
    else:
        hf.expect("sliding_window", _falsy, f"moejax does not map a {hf.model_type} sliding window")
    if enabled is not None:
        hf.used.add("sliding_window")  # only read by transformers when use_sliding_window is set
    for kind in hf.get("layer_types") or ():
        if kind != "full_attention":
            hf.refuse("layer_types", hf.get("layer_types"), f"moejax does not map a {hf.model_type} sliding window")


def _router(m: ml_collections.ConfigDict, **fields: Any) -> None:
    m.moe.router.update(kind="topk", **fields)


def _layer_pattern(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    """Qwen's decoder_sparse_step s (layer i is MoE when (i + 1) % s == 0) and mlp_only_layers."""
    step = hf.get("decoder_sparse_step", 1)
    if m.moe.num_experts == 0:
        m.moe_every = 0
        m.moe.num_experts = 1  # unused: every layer dense
        return
    if not isinstance(step, int) or step < 1:
        hf.refuse("decoder_sparse_step", step, "must be an integer >= 1")
    m.first_dense_layers, m.moe_every = step - 1, step
    dense = sorted(set(hf.get("mlp_only_layers") or ()))
    if step == 1:  # a leading run of dense layers is moejax's first_dense_layers
        while dense and dense[0] == m.first_dense_layers:
            dense.pop(0)
            m.first_dense_layers += 1
    m.dense_layers = tuple(i for i in dense if i < m.num_layers)


def from_mixtral(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _common(hf, m, 1e-5)
    _gqa(hf, m, 1e6)
    _no_sliding(hf)
    m.ffn_dim = m.moe.expert_ffn = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("num_local_experts") or hf.need("num_experts"))
    m.moe.top_k = hf.need("num_experts_per_tok")
    hf.expect("router_jitter_noise", _falsy, "transformers' Mixtral jitters the whole MoE input, moejax only the "
                                             "router's", 0.0)
    _router(m, score="softmax", softmax_before_topk=True, norm_topk_prob=True)
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def _qwen_experts(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    m.ffn_dim = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)))
    m.moe.top_k = hf.need("num_experts_per_tok")
    m.moe.expert_ffn = hf.need("moe_intermediate_size")
    _router(m, score="softmax", softmax_before_topk=True, norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def from_qwen2_moe(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _common(hf, m, 1e-6)
    _gqa(hf, m, 10000.0)
    _no_sliding(hf, "use_sliding_window")
    hf.used.add("max_window_layers")
    m.qkv_bias = bool(hf.get("qkv_bias", True))
    _qwen_experts(hf, m)
    shared = hf.need("shared_expert_intermediate_size")
    m.moe.update(num_shared=1, shared_gate=True, shared_ffn=0 if shared == m.moe.expert_ffn else shared)
    _layer_pattern(hf, m)


def from_qwen3_moe(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _common(hf, m, 1e-6)
    _gqa(hf, m, 10000.0)
    _no_sliding(hf, "use_sliding_window")
    hf.used.add("max_window_layers")
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope = True, "head"
    _qwen_experts(hf, m)
    _layer_pattern(hf, m)


def from_olmoe(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _common(hf, m, 1e-5)
    _gqa(hf, m, 10000.0)
    _no_sliding(hf)
    if m.head_dim:
        hf.refuse("head_dim", m.head_dim, "transformers' OLMoE sizes its k_norm by hidden_size // num_heads")
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope = True, "proj"
    m.clip_qkv = float(hf.get("clip_qkv") or 0.0)
    m.ffn_dim = m.moe.expert_ffn = hf.need("intermediate_size")
    m.moe.num_experts = hf.need("num_experts")
    m.moe.top_k = hf.need("num_experts_per_tok")
    _router(m, score="softmax", softmax_before_topk=True, norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.01)))


def _deepseek(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _common(hf, m, 1e-6)
    m.attention = "mla"
    kv_heads = hf.get("num_key_value_heads", m.num_heads)
    if kv_heads != m.num_heads:
        hf.refuse("num_key_value_heads", kv_heads, f"Multi-head Latent Attention expands its latent to all "
                                                   f"{m.num_heads} heads")
    hf.used.update({"head_dim", "qk_head_dim"})  # transformers sets both from the MLA dimensions
    m.mla.update(q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=hf.need("kv_lora_rank"),
                 qk_nope_head_dim=hf.need("qk_nope_head_dim"), qk_rope_head_dim=hf.need("qk_rope_head_dim"),
                 v_head_dim=hf.need("v_head_dim"))
    hf.expect("attention_bias", _falsy, "moejax's MLA projections have no biases", False)
    hf.expect("mlp_bias", _falsy, "moejax's FFNs have no biases", False)
    _rope(hf, m, 10000.0)
    m.ffn_dim = hf.need("intermediate_size")
    m.moe.num_experts = hf.need("n_routed_experts")
    m.moe.top_k = hf.need("num_experts_per_tok")
    m.moe.expert_ffn = hf.need("moe_intermediate_size")
    m.moe.num_shared = int(hf.get("n_shared_experts") or 0)
    m.first_dense_layers = int(hf.get("first_k_dense_replace") or 0)
    hf.expect("moe_layer_freq", lambda v: v == 1, "transformers makes every layer from first_k_dense_replace on "
                                                  "MoE", 1)
    # Training-only fields of DeepSeek's own trainer: moejax's 'deepseek' balance loss is the same sequence-wise loss.
    alpha = hf.get("aux_loss_alpha")
    if alpha is not None:
        m.moe.update(balance_loss="deepseek", balance_coef=float(alpha),
                     balance_scope="sequence" if hf.get("seq_aux", True) else "batch")


def from_deepseek_v2(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _deepseek(hf, m)
    m.rope_interleave = True  # transformers' DeepSeek-V2 rotates interleaved pairs (complex multiplication)
    hf.expect("scoring_func", lambda v: v == "softmax", "transformers' DeepSeek-V2 router is a softmax", "softmax")
    hf.expect("norm_topk_prob", _falsy, "transformers' DeepSeek-V2 router ignores it while DeepSeek's own code "
                                        "renormalises: the two disagree, so it is refused", False)
    method = hf.expect("topk_method", lambda v: v in ("greedy", "group_limited_greedy"),
                       "transformers' DeepSeek-V2 has 'greedy' and 'group_limited_greedy'", "greedy")
    _router(m, score="softmax", softmax_before_topk=True, norm_topk_prob=False,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    if method == "group_limited_greedy":
        m.moe.router.update(num_groups=hf.need("n_group"), topk_groups=hf.need("topk_group"), group_score="max",
                            group_mask_fill=0.0)
    else:
        hf.used.update({"n_group", "topk_group"})


def from_deepseek_v3(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _deepseek(hf, m)
    m.rope_interleave = bool(hf.get("rope_interleave", True))
    hf.expect("scoring_func", lambda v: v == "sigmoid", "transformers' DeepSeek-V3 router is a sigmoid", "sigmoid")
    hf.expect("topk_method", lambda v: v == "noaux_tc", "transformers' DeepSeek-V3 routes by 'noaux_tc'", "noaux_tc")
    groups = int(hf.get("n_group") or 1)
    _router(m, score="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), num_groups=groups,
            topk_groups=int(hf.get("topk_group") or 1) if groups > 1 else 1, group_score="top2_sum",
            group_mask_fill=float("-inf"))
    hf.used.update({"topk_group", "num_nextn_predict_layers", "num_mtp_layers"})


GPT_OSS_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def from_gpt_oss(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _common(hf, m, 1e-5)
    m.num_kv_heads = int(hf.get("num_key_value_heads", m.num_heads))
    m.head_dim = int(hf.get("head_dim") or m.d_model // m.num_heads)
    if m.d_model % m.num_heads == 0 and m.head_dim == m.d_model // m.num_heads:
        m.head_dim = 0
    params = hf.get("rope_scaling") or hf.get("rope_parameters")
    if params is None:  # transformers' default for GPT-OSS
        hf.raw["rope_parameters"] = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 4096}
    _rope(hf, m, 150000.0)
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", True))
    m.attention_sinks = True
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                            for i in range(m.num_layers)]
    if len(layer_types) != m.num_layers or any(t not in GPT_OSS_LAYER_TYPES for t in layer_types):
        hf.refuse("layer_types", layer_types, f"one of {sorted(GPT_OSS_LAYER_TYPES)} per layer")
    kinds = tuple(GPT_OSS_LAYER_TYPES[t] for t in layer_types)
    window = int(hf.get("sliding_window") or 0)
    if "sliding" in kinds:
        if window <= 0:
            hf.refuse("sliding_window", window, "sliding layers need a window >= 1")
        m.layer_types, m.sliding_window = kinds, window
    m.ffn_dim = m.moe.expert_ffn = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("num_local_experts") or hf.need("num_experts"))
    m.moe.top_k = hf.need("num_experts_per_tok")
    m.moe.update(expert_kind="gpt_oss", swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                 swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)))
    hf.used.add("hidden_act")  # the experts' activation is fixed; hidden_act is read by nothing
    _router(m, score="softmax", softmax_before_topk=False, norm_topk_prob=False, bias=True)
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))
