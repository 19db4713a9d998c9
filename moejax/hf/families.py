"""The released MoE families: how each one's config.json maps onto moejax's ``model`` config, and back.

``config_from_hf`` maps a transformers config.json (current ``rope_parameters`` or the hub's older ``rope_theta`` /
``rope_scaling`` fields) onto configs/base.py's defaults; ``config_to_hf`` writes the config.json of a moejax model
section as one family (or the first of SAVE_ORDER that can express it). Every field one side cannot represent
raises ``HFConfigError`` naming it; the fields that do not change the logits (token ids, cache flags, loss
coefficients of other trainers) are listed per family and skipped; a field nothing knows is reported. The tensor
names and layouts of each family are in tables.py.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

from moejax.configs import base


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


# ----------------------------------------------------------------------------------------------- moejax -> config.json


class Saving:
    """Checks of a moejax model config against what one family can express; every failure names the field."""

    def __init__(self, m: ml_collections.ConfigDict, model_type: str):
        self.m, self.model_type = m, model_type

    def need(self, field: str, ok: bool, why: str) -> None:
        if not ok:
            value = self.m
            for part in field.split("."):
                value = value[part]
            raise HFConfigError(f"moejax config field model.{field}={value!r} cannot be saved as "
                                f"{self.model_type}: {why}")


def _moe_layers(m: ml_collections.ConfigDict) -> list[int]:
    dense = set(m.dense_layers)
    return [i for i in range(m.num_layers) if m.moe_every > 0 and i >= m.first_dense_layers
            and (i - m.first_dense_layers) % m.moe_every == 0 and i not in dense]


def _common_hf(m: ml_collections.ConfigDict, s: Saving, architecture: str) -> dict[str, Any]:
    s.need("scan_layers", not m.scan_layers, "save unstacked layers (scan_layers=False)")
    s.need("moe.router.kind", m.moe.router.kind == "topk", "released families route by top-k")
    s.need("moe.num_null_experts", m.moe.num_null_experts == 0, "released families have no null experts")
    s.need("moe.chain_iterations", m.moe.chain_iterations == 1, "released families route once per layer")
    s.need("moe.dispatch", m.moe.dispatch == "dropless", "transformers computes every routed slot: set "
                                                         "model.moe.dispatch='dropless' to save the model it runs")
    s.need("rope_scaling.kind", m.rope_scaling.kind in ("none", "yarn"), "allowed: 'none', 'yarn'")
    act = {"silu": "silu", "relu": "relu", "gelu": "gelu_pytorch_tanh"}
    s.need("moe.activation", m.moe.activation in act, f"allowed: {sorted(act)}")
    out: dict[str, Any] = {
        "architectures": [architecture], "model_type": s.model_type, "vocab_size": m.vocab_size,
        "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": bool(m.tie_embeddings), "initializer_range": m.init_std,
        "hidden_act": act[m.moe.activation], "attention_dropout": 0.0, "torch_dtype": m.param_dtype,
        "rope_theta": m.rope_theta, "rope_scaling": None, "max_position_embeddings": 4096,
    }
    if m.rope_scaling.kind == "yarn":
        r = m.rope_scaling
        out["rope_scaling"] = {"rope_type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast,
                               "beta_slow": r.beta_slow, "truncate": bool(r.truncate),
                               "original_max_position_embeddings": r.original_max_position_embeddings}
        if r.mscale_all_dim:  # without it moejax, like transformers, uses mscale(factor) and ignores mscale
            out["rope_scaling"]["mscale_all_dim"] = r.mscale_all_dim
            if r.mscale:
                out["rope_scaling"]["mscale"] = r.mscale
        out["max_position_embeddings"] = int(math.ceil(r.factor * r.original_max_position_embeddings))
    return out


def _gqa_hf(m: ml_collections.ConfigDict, s: Saving, out: dict[str, Any]) -> None:
    s.need("attention", m.attention == "gqa", "this family has grouped-query attention")
    s.need("rope_interleave", not m.rope_interleave, "this family rotates the two halves of each head")
    out["num_key_value_heads"] = m.num_kv_heads or m.num_heads
    out["head_dim"] = m.head_dim or m.d_model // m.num_heads


def _no_extras(m: ml_collections.ConfigDict, s: Saving, *, sinks: bool = False, sliding: bool = False,
               clip: bool = False) -> None:
    if not sinks:
        s.need("attention_sinks", not m.attention_sinks, "this family has no attention sinks")
    if not sliding:
        s.need("layer_types", all(t == "full" for t in m.layer_types), "this family has no sliding-window layers")
    if not clip:
        s.need("clip_qkv", not m.clip_qkv, "this family does not clip q, k and v")


def _topk_renormalised(m: ml_collections.ConfigDict) -> bool:
    r = m.moe.router
    return r.score == "softmax" and (r.norm_topk_prob or not r.softmax_before_topk)


def _plain_router(m: ml_collections.ConfigDict, s: Saving) -> None:
    r = m.moe.router
    s.need("moe.router.num_groups", r.num_groups == 1, "this family has no group-limited routing")
    s.need("moe.router.routed_scaling_factor", r.routed_scaling_factor == 1.0, "this family does not scale the "
                                                                                "routing weights")
    s.need("moe.router.bias", not r.bias, "this family's router has no bias")
    s.need("moe.expert_kind", m.moe.expert_kind == "glu", "this family's experts are GLUs")


def _all_moe(m: ml_collections.ConfigDict, s: Saving) -> None:
    s.need("first_dense_layers", m.first_dense_layers == 0, "every layer of this family is MoE")
    s.need("moe_every", m.moe_every == 1, "every layer of this family is MoE")
    s.need("dense_layers", not m.dense_layers, "every layer of this family is MoE")


def to_mixtral(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "MixtralForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s)
    s.need("qkv_bias", not m.qkv_bias, "Mixtral's projections have no biases")
    s.need("o_bias", not m.o_bias, "Mixtral's projections have no biases")
    s.need("qk_norm", not m.qk_norm, "Mixtral has no query/key norm")
    _all_moe(m, s)
    _plain_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "Mixtral has no shared experts")
    s.need("moe.router.score", _topk_renormalised(m), "Mixtral's weights are the softmax renormalised over the "
                                                       "top-k (score='softmax' with norm_topk_prob or "
                                                       "softmax_before_topk=False)")
    out.update(intermediate_size=m.moe.expert_ffn, num_local_experts=m.moe.num_experts,
               num_experts_per_tok=m.moe.top_k, sliding_window=None, router_jitter_noise=0.0,
               router_aux_loss_coef=m.moe.balance_coef)
    return out


def _qwen_pattern(m: ml_collections.ConfigDict, out: dict[str, Any]) -> None:
    moe_layers = _moe_layers(m)
    step = m.moe_every
    if step >= 1 and m.first_dense_layers == step - 1 and not m.dense_layers:
        out.update(decoder_sparse_step=step, mlp_only_layers=[])
    else:
        out.update(decoder_sparse_step=1, mlp_only_layers=[i for i in range(m.num_layers) if i not in moe_layers])


def _qwen_router(m: ml_collections.ConfigDict, s: Saving) -> None:
    r = m.moe.router
    _plain_router(m, s)
    s.need("moe.router.score", r.score == "softmax", "Qwen's router is a softmax")
    s.need("moe.router.softmax_before_topk", r.softmax_before_topk or r.norm_topk_prob,
           "Qwen takes the top-k of the softmax (with norm_topk_prob the two orders agree)")


def to_qwen2_moe(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "Qwen2MoeForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s)
    s.need("o_bias", not m.o_bias, "Qwen2-MoE's output projection has no bias")
    s.need("qk_norm", not m.qk_norm, "Qwen2-MoE has no query/key norm")
    _qwen_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared >= 1, "Qwen2-MoE always has a shared expert")
    s.need("moe.shared_gate", m.moe.shared_gate, "Qwen2-MoE always gates its shared expert")
    _qwen_pattern(m, out)
    out.update(qkv_bias=bool(m.qkv_bias), intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               shared_expert_intermediate_size=m.moe.shared_ffn or m.moe.num_shared * m.moe.expert_ffn,
               num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               norm_topk_prob=bool(m.moe.router.norm_topk_prob), use_sliding_window=False,
               router_aux_loss_coef=m.moe.balance_coef)
    return out


def to_qwen3_moe(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "Qwen3MoeForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "head", "Qwen3-MoE normalises each head's queries and keys")
    s.need("o_bias", m.o_bias == m.qkv_bias, "Qwen3-MoE has one attention_bias for q, k, v and o")
    _qwen_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "Qwen3-MoE has no shared experts")
    _qwen_pattern(m, out)
    out.update(attention_bias=bool(m.qkv_bias), intermediate_size=m.ffn_dim,
               moe_intermediate_size=m.moe.expert_ffn, num_experts=m.moe.num_experts,
               num_experts_per_tok=m.moe.top_k, norm_topk_prob=bool(m.moe.router.norm_topk_prob),
               use_sliding_window=False, router_aux_loss_coef=m.moe.balance_coef)
    return out


def to_olmoe(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "OlmoeForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s, clip=True)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "proj", "OLMoE normalises the whole q and k projections")
    s.need("head_dim", not m.head_dim, "OLMoE's heads are d_model // num_heads wide")
    s.need("o_bias", m.o_bias == m.qkv_bias, "OLMoE has one attention_bias for q, k, v and o")
    _qwen_router(m, s)
    _all_moe(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "OLMoE has no shared experts")
    out.pop("head_dim")
    out.update(attention_bias=bool(m.qkv_bias), clip_qkv=m.clip_qkv or None, intermediate_size=m.moe.expert_ffn,
               num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               norm_topk_prob=bool(m.moe.router.norm_topk_prob), router_aux_loss_coef=m.moe.balance_coef)
    return out


def _to_deepseek(m: ml_collections.ConfigDict, s: Saving, architecture: str) -> dict[str, Any]:
    out = _common_hf(m, s, architecture)
    s.need("attention", m.attention == "mla", "DeepSeek has Multi-head Latent Attention")
    _no_extras(m, s)
    s.need("qk_norm", not m.qk_norm, "DeepSeek has no query/key norm")
    s.need("moe.router.bias", not m.moe.router.bias, "DeepSeek's router has no bias")
    s.need("moe.expert_kind", m.moe.expert_kind == "glu", "DeepSeek's experts are GLUs")
    s.need("moe.shared_gate", not m.moe.shared_gate, "DeepSeek's shared experts are not gated")
    s.need("moe.shared_ffn", m.moe.shared_ffn in (0, m.moe.num_shared * m.moe.expert_ffn),
           "DeepSeek's shared experts are n_shared_experts * moe_intermediate_size wide")
    s.need("moe_every", m.moe_every == 1, "DeepSeek's layers from first_k_dense_replace on are all MoE")
    s.need("dense_layers", not m.dense_layers, "DeepSeek's layers from first_k_dense_replace on are all MoE")
    mla = m.mla
    out.update(num_key_value_heads=m.num_heads, q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
               qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
               v_head_dim=mla.v_head_dim, intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               n_routed_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, n_shared_experts=m.moe.num_shared,
               first_k_dense_replace=m.first_dense_layers, routed_scaling_factor=m.moe.router.routed_scaling_factor,
               attention_bias=False)
    return out


def to_deepseek_v2(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _to_deepseek(m, s, "DeepseekV2ForCausalLM")
    r = m.moe.router
    s.need("rope_interleave", m.rope_interleave, "DeepSeek-V2 rotates interleaved pairs")
    s.need("moe.router.score", r.score == "softmax" and r.softmax_before_topk and not r.norm_topk_prob,
           "DeepSeek-V2 weights are the unnormalised softmax probabilities of the selected experts")
    if r.num_groups > 1:
        s.need("moe.router.group_score", r.group_score == "max", "DeepSeek-V2 scores a group by its best expert")
        out.update(topk_method="group_limited_greedy", n_group=r.num_groups, topk_group=r.topk_groups)
    else:
        out.update(topk_method="greedy", n_group=None, topk_group=None)
    out["norm_topk_prob"] = False
    return out


def to_deepseek_v3(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _to_deepseek(m, s, "DeepseekV3ForCausalLM")
    r = m.moe.router
    s.need("moe.router.score", r.score == "sigmoid", "DeepSeek-V3's router is a sigmoid")
    if r.num_groups > 1:
        s.need("moe.router.group_score", r.group_score == "top2_sum", "DeepSeek-V3 scores a group by its two best")
        s.need("moe.router.group_mask_fill", r.group_mask_fill == float("-inf"),
               "DeepSeek-V3 masks the other groups with -inf")
    out.update(rope_interleave=bool(m.rope_interleave), n_group=r.num_groups,
               topk_group=r.topk_groups if r.num_groups > 1 else 1, norm_topk_prob=bool(r.norm_topk_prob),
               num_nextn_predict_layers=0)
    return out


def to_gpt_oss(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "GptOssForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s, sinks=True, sliding=True)
    s.need("attention_sinks", m.attention_sinks, "GPT-OSS always has attention sinks")
    s.need("qk_norm", not m.qk_norm, "GPT-OSS has no query/key norm")
    s.need("o_bias", m.o_bias == m.qkv_bias, "GPT-OSS has one attention_bias for q, k, v and o")
    _all_moe(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "GPT-OSS has no shared experts")
    s.need("moe.expert_kind", m.moe.expert_kind == "gpt_oss", "GPT-OSS's experts are its clamped biased SwiGLU")
    r = m.moe.router
    s.need("moe.router.bias", r.bias, "GPT-OSS's router has a bias")
    s.need("moe.router.score", _topk_renormalised(m), "GPT-OSS's weights are the softmax over the top-k logits")
    s.need("moe.router.num_groups", r.num_groups == 1, "GPT-OSS has no group-limited routing")
    s.need("moe.router.routed_scaling_factor", r.routed_scaling_factor == 1.0, "GPT-OSS does not scale weights")
    kinds = tuple(m.layer_types) or ("full",) * m.num_layers
    out.update(attention_bias=bool(m.qkv_bias), intermediate_size=m.moe.expert_ffn,
               num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               swiglu_limit=m.moe.swiglu_limit, swiglu_alpha=m.moe.swiglu_alpha,
               layer_types=[{"full": "full_attention", "sliding": "sliding_attention"}[k] for k in kinds],
               # transformers' GPT-OSS builds a sliding mask even when no layer slides: give it a window
               sliding_window=m.sliding_window or 128, router_aux_loss_coef=m.moe.balance_coef)
    if out["rope_scaling"] is None:
        out["rope_scaling"] = {"rope_type": "default"}  # not transformers' GPT-OSS default (yarn)
    return out


# ----------------------------------------------------------------------------------------------- the families


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    from_hf: Callable[[HFConfig, ml_collections.ConfigDict], None]
    to_hf: Callable[[ml_collections.ConfigDict, Saving], dict[str, Any]]
    # config.json fields that change nothing moejax computes at inference, with why
    ignored: frozenset[str] = frozenset()
    # checkpoint layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction modules) are skipped
    extra_layers_note: str | None = None


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", from_mixtral, to_mixtral),
    Family("qwen2_moe", from_qwen2_moe, to_qwen2_moe),
    Family("qwen3_moe", from_qwen3_moe, to_qwen3_moe),
    Family("olmoe", from_olmoe, to_olmoe),
    Family("deepseek_v2", from_deepseek_v2, to_deepseek_v2,
           frozenset({"ep_size", "seq_aux", "aux_loss_alpha", "n_group", "topk_group"})),
    Family("deepseek_v3", from_deepseek_v3, to_deepseek_v3, frozenset({"ep_size", "seq_aux", "aux_loss_alpha"}),
           extra_layers_note="multi-token-prediction layers"),
    Family("gpt_oss", from_gpt_oss, to_gpt_oss),
)}
SUPPORTED = tuple(FAMILIES)
# save infers the family from the model config in this order (the first that can express it)
SAVE_ORDER = ("gpt_oss", "deepseek_v3", "deepseek_v2", "olmoe", "qwen3_moe", "qwen2_moe", "mixtral")


def family(model_type: Any) -> Family:
    if model_type not in FAMILIES:
        raise HFConfigError(f"model_type {model_type!r} is not a family moejax reads; supported: "
                            f"{', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


def config_from_hf(raw: dict[str, Any]) -> tuple[ml_collections.ConfigDict, HFConfig]:
    """The moejax config (configs/base.py's defaults, ``model`` from config.json) of a transformers config.json, and
    the read config (its ``unused()`` fields are the ones nothing mapped)."""
    fam = family(raw.get("model_type"))
    hf = HFConfig(raw, fam.model_type)
    config = base.get_config()
    fam.from_hf(hf, config.model)
    unused = hf.unused(fam.ignored)
    if unused:
        print(f"moejax.hf: {fam.model_type} config.json fields the conversion does not know, ignored (they are "
              f"not among the fields transformers' {fam.model_type} model reads): {', '.join(unused)}",
              file=sys.stderr)
    return config, hf


def config_to_hf(m: ml_collections.ConfigDict, model_type: str | None = None) -> dict[str, Any]:
    """The config.json of a moejax model section, as ``model_type`` (default: the first family of SAVE_ORDER that
    can express it). Raises HFConfigError naming the field that the family cannot express."""
    if model_type is not None:
        return family(model_type).to_hf(m, Saving(m, model_type))
    reasons = []
    for name in SAVE_ORDER:
        try:
            return FAMILIES[name].to_hf(m, Saving(m, name))
        except HFConfigError as e:
            reasons.append(f"  {name}: {e}")
    raise HFConfigError("no released family can express this moejax model:\n" + "\n".join(reasons))

