"""GPT-OSS (``openai/gpt-oss-20b``, ``-120b``): grouped-query attention with biases and attention sinks, alternating
sliding-window and full layers, yarn rotary embedding by default; every layer MoE, a router with a bias whose top-k
logits are softmaxed; the experts are a clamped, biased SwiGLU stored stacked, gate and up interleaved in one
``gate_up_proj`` (MXFP4 on the hub, see quant.py)."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import GQA_RULES, NORM_RULES, Rule

LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-5)
    m.num_kv_heads = int(hf.get("num_key_value_heads", m.num_heads))
    m.head_dim = int(hf.get("head_dim") or m.d_model // m.num_heads)
    if m.d_model % m.num_heads == 0 and m.head_dim == m.d_model // m.num_heads:
        m.head_dim = 0
    params = hf.get("rope_scaling") or hf.get("rope_parameters")
    if params is None:  # transformers' default for GPT-OSS
        hf.raw["rope_parameters"] = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 4096}
    config.read_rope(hf, m, 150000.0)
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", True))
    m.attention_sinks = True
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                            for i in range(m.num_layers)]
    if len(layer_types) != m.num_layers or any(t not in LAYER_TYPES for t in layer_types):
        hf.refuse("layer_types", layer_types, f"one of {sorted(LAYER_TYPES)} per layer")
    kinds = tuple(LAYER_TYPES[t] for t in layer_types)
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
    config.read_router(m, score="softmax", softmax_before_topk=False, norm_topk_prob=False, bias=True)
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "GptOssForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s, sinks=True, sliding=True)
    s.need("attention_sinks", m.attention_sinks, "GPT-OSS always has attention sinks")
    s.need("qk_norm", not m.qk_norm, "GPT-OSS has no query/key norm")
    s.need("o_bias", m.o_bias == m.qkv_bias, "GPT-OSS has one attention_bias for q, k, v and o")
    config.write_all_moe(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "GPT-OSS has no shared experts")
    s.need("moe.expert_kind", m.moe.expert_kind == "gpt_oss", "GPT-OSS's experts are its clamped biased SwiGLU")
    r = m.moe.router
    s.need("moe.router.bias", r.bias, "GPT-OSS's router has a bias")
    s.need("moe.router.score", config.topk_renormalised(m), "GPT-OSS's weights are the softmax over the top-k "
                                                             "logits")
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


_EXPERTS = "model.layers.{i}.mlp.experts."
register(Family("gpt_oss", from_hf, to_hf, {
    **NORM_RULES, **GQA_RULES,
    "ffn/router/kernel": Rule("model.layers.{i}.mlp.router.weight", "linear"),
    "ffn/router/bias": Rule("model.layers.{i}.mlp.router.bias"),
    "ffn/experts/wi_0": Rule(_EXPERTS + "gate_up_proj", "even"),
    "ffn/experts/wi_1": Rule(_EXPERTS + "gate_up_proj", "odd"),
    "ffn/experts/bi_0": Rule(_EXPERTS + "gate_up_proj_bias", "even"),
    "ffn/experts/bi_1": Rule(_EXPERTS + "gate_up_proj_bias", "odd"),
    "ffn/experts/wo": Rule(_EXPERTS + "down_proj"),
    "ffn/experts/bo": Rule(_EXPERTS + "down_proj_bias"),
    "ffn/router_bias": Rule("", "zeros")}))
