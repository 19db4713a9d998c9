"""OLMoE (``allenai/OLMoE-1B-7B-0924``): grouped-query attention with an RMSNorm over the whole q and k projections
and optional clipping of q, k and v; every layer MoE with Qwen's softmax top-k router; no shared experts."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import qwen2_moe
from moejax.hf.registry import Family, register
from moejax.hf.rules import GQA_RULES, NORM_RULES, moe_rules


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-5)
    config.read_gqa(hf, m, 10000.0)
    config.read_no_sliding(hf)
    if m.head_dim:
        hf.refuse("head_dim", m.head_dim, "transformers' OLMoE sizes its k_norm by hidden_size // num_heads")
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope = True, "proj"
    m.clip_qkv = float(hf.get("clip_qkv") or 0.0)
    m.ffn_dim = m.moe.expert_ffn = hf.need("intermediate_size")
    m.moe.num_experts = hf.need("num_experts")
    m.moe.top_k = hf.need("num_experts_per_tok")
    config.read_router(m, score="softmax", softmax_before_topk=True,
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.01)))


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "OlmoeForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s, clip=True)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "proj", "OLMoE normalises the whole q and k projections")
    s.need("head_dim", not m.head_dim, "OLMoE's heads are d_model // num_heads wide")
    s.need("o_bias", m.o_bias == m.qkv_bias, "OLMoE has one attention_bias for q, k, v and o")
    qwen2_moe.write_router(m, s)
    config.write_all_moe(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "OLMoE has no shared experts")
    out.pop("head_dim")
    out.update(attention_bias=bool(m.qkv_bias), clip_qkv=m.clip_qkv or None, intermediate_size=m.moe.expert_ffn,
               num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               norm_topk_prob=bool(m.moe.router.norm_topk_prob), router_aux_loss_coef=m.moe.balance_coef)
    return out


register(Family("olmoe", from_hf, to_hf, {**NORM_RULES, **GQA_RULES, **moe_rules("mlp")}))
