"""config.json <-> moejax ``model`` config: the two records a family's mapping works with, and the field groups
several families share (each family's own mapping is in its module, moejax/hf/families/).

``HFConfig`` is a config.json being read: it records which fields were consulted, so that the rest can be reported.
``Saving`` checks a moejax model config against what one family can express. A field one side cannot represent
raises ``HFConfigError`` naming it, its value and why. Reading accepts current ``rope_parameters`` or the hub's older
``rope_theta`` / ``rope_scaling`` fields.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_collections


class HFConfigError(ValueError):
    """A config.json (or a moejax config being saved) with a field the other side cannot represent."""


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


def falsy(value: Any) -> bool:
    return not value


# ----------------------------------------------------------------------------------------------- every family

ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}


def read_common(hf: HFConfig, m: ml_collections.ConfigDict, eps_default: float) -> None:
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


def write_common(m: ml_collections.ConfigDict, s: Saving, architecture: str) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------- attention


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


def read_rope(hf: HFConfig, m: ml_collections.ConfigDict, default_theta: float) -> None:
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


def read_gqa(hf: HFConfig, m: ml_collections.ConfigDict, default_theta: float) -> None:
    m.num_kv_heads = int(hf.get("num_key_value_heads", m.num_heads))
    head_dim = hf.get("head_dim") or m.d_model // m.num_heads
    m.head_dim = 0 if m.d_model % m.num_heads == 0 and head_dim == m.d_model // m.num_heads else int(head_dim)
    read_rope(hf, m, default_theta)


def write_gqa(m: ml_collections.ConfigDict, s: Saving, out: dict[str, Any]) -> None:
    s.need("attention", m.attention == "gqa", "this family has grouped-query attention")
    s.need("rope_interleave", not m.rope_interleave, "this family rotates the two halves of each head")
    out["num_key_value_heads"] = m.num_kv_heads or m.num_heads
    out["head_dim"] = m.head_dim or m.d_model // m.num_heads


def read_no_sliding(hf: HFConfig, enabled: str | None = None) -> None:
    """Families whose sliding window moejax does not map (released checkpoints do not use one)."""
    if enabled is not None:
        hf.expect(enabled, falsy, f"moejax does not map a {hf.model_type} sliding window", False)
    else:
        hf.expect("sliding_window", falsy, f"moejax does not map a {hf.model_type} sliding window")
    if enabled is not None:
        hf.used.add("sliding_window")  # only read by transformers when use_sliding_window is set
    for kind in hf.get("layer_types") or ():
        if kind != "full_attention":
            hf.refuse("layer_types", hf.get("layer_types"), f"moejax does not map a {hf.model_type} sliding window")


def write_no_extras(m: ml_collections.ConfigDict, s: Saving, *, sinks: bool = False, sliding: bool = False,
                    clip: bool = False) -> None:
    """Refuses the attention features the family lacks (all but the ones passed True)."""
    if not sinks:
        s.need("attention_sinks", not m.attention_sinks, "this family has no attention sinks")
    if not sliding:
        s.need("layer_types", all(t == "full" for t in m.layer_types), "this family has no sliding-window layers")
    if not clip:
        s.need("clip_qkv", not m.clip_qkv, "this family does not clip q, k and v")


# ----------------------------------------------------------------------------------------------- routing


def read_router(m: ml_collections.ConfigDict, **fields: Any) -> None:
    m.moe.router.update(kind="topk", **fields)


def read_grouped_sigmoid_router(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    """DeepSeek-V3's router as its config.json gives it (also GLM-4.5's): a sigmoid, group-limited top-k with the
    groups scored by their two best and the others masked to -inf, renormalised and scaled; the MTP-layer counts read
    (their layers are skipped on load)."""
    groups = int(hf.get("n_group") or 1)
    read_router(m, score="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), num_groups=groups,
                topk_groups=int(hf.get("topk_group") or 1) if groups > 1 else 1, group_score="top2_sum",
                group_mask_fill=float("-inf"))
    hf.used.update({"topk_group", "num_nextn_predict_layers", "num_mtp_layers"})


def write_grouped_sigmoid_router(m: ml_collections.ConfigDict, s: Saving, name: str) -> dict[str, Any]:
    """The config.json fields of ``read_grouped_sigmoid_router``'s router, after Saving checks naming ``name`` (the
    family) for what it cannot express."""
    r = m.moe.router
    s.need("moe.router.score", r.score == "sigmoid", f"{name}'s router is a sigmoid")
    if r.num_groups > 1:
        s.need("moe.router.group_score", r.group_score == "top2_sum", f"{name} scores a group by its two best")
        s.need("moe.router.group_mask_fill", r.group_mask_fill == float("-inf"),
               f"{name} masks the other groups with -inf")
    return dict(n_group=r.num_groups, topk_group=r.topk_groups if r.num_groups > 1 else 1,
                norm_topk_prob=bool(r.norm_topk_prob), num_nextn_predict_layers=0)


def write_deepseek_moe_layout(m: ml_collections.ConfigDict, s: Saving, name: str, *, shared_required: bool) -> None:
    """Saving checks of DeepSeekMoE's layout, naming ``name`` (the family): an unbiased router, GLU experts, ungated
    shared experts n_shared_experts * moe_intermediate_size wide (at least one where ``shared_required``), and every
    layer from first_k_dense_replace on MoE."""
    s.need("moe.router.bias", not m.moe.router.bias, f"{name}'s router has no bias")
    s.need("moe.expert_kind", m.moe.expert_kind == "glu", f"{name}'s experts are GLUs")
    if shared_required:
        s.need("moe.num_shared", m.moe.num_shared >= 1, f"{name} always has shared experts")
    s.need("moe.shared_gate", not m.moe.shared_gate, f"{name}'s shared experts are not gated")
    s.need("moe.shared_ffn", m.moe.shared_ffn in (0, m.moe.num_shared * m.moe.expert_ffn),
           f"{name}'s shared experts are n_shared_experts * moe_intermediate_size wide")
    s.need("moe_every", m.moe_every == 1, f"{name}'s layers from first_k_dense_replace on are all MoE")
    s.need("dense_layers", not m.dense_layers, f"{name}'s layers from first_k_dense_replace on are all MoE")


def topk_renormalised(m: ml_collections.ConfigDict) -> bool:
    r = m.moe.router
    return r.score == "softmax" and (r.norm_topk_prob or not r.softmax_before_topk)


def write_plain_router(m: ml_collections.ConfigDict, s: Saving) -> None:
    r = m.moe.router
    s.need("moe.router.num_groups", r.num_groups == 1, "this family has no group-limited routing")
    s.need("moe.router.routed_scaling_factor", r.routed_scaling_factor == 1.0, "this family does not scale the "
                                                                                "routing weights")
    s.need("moe.router.bias", not r.bias, "this family's router has no bias")
    s.need("moe.expert_kind", m.moe.expert_kind == "glu", "this family's experts are GLUs")


def write_all_moe(m: ml_collections.ConfigDict, s: Saving) -> None:
    s.need("first_dense_layers", m.first_dense_layers == 0, "every layer of this family is MoE")
    s.need("moe_every", m.moe_every == 1, "every layer of this family is MoE")
    s.need("dense_layers", not m.dense_layers, "every layer of this family is MoE")


def take_partial_rotary(hf: HFConfig) -> float | None:
    """partial_rotary_factor taken out of the HFConfig being read (the shared rotary reader refuses a partial rotary
    embedding): the rope parameters' (rope_scaling or rope_parameters) first, else the top-level one, else None;
    both places are marked read."""
    key = "rope_scaling" if hf.raw.get("rope_scaling") else "rope_parameters"
    params = hf.raw.get(key)
    partial = None
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        params = dict(params)
        partial = params.pop("partial_rotary_factor")
        hf.raw[key] = params
    if partial is None:
        partial = hf.raw.get("partial_rotary_factor")
    hf.raw.pop("partial_rotary_factor", None)
    hf.used.add("partial_rotary_factor")
    return partial
