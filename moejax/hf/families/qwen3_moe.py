"""Qwen3-MoE (``Qwen/Qwen3-30B-A3B``, ``Qwen/Qwen3-235B-A22B``): Qwen2-MoE's layer pattern and router with a per-head
query/key RMSNorm, one ``attention_bias`` for q, k, v and o, and no shared expert."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import qwen2_moe
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES, moe_rules


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-6)
    config.read_gqa(hf, m, 10000.0)
    config.read_no_sliding(hf, "use_sliding_window")
    hf.used.add("max_window_layers")
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope = True, "head"
    qwen2_moe.read_experts(hf, m)
    qwen2_moe.read_layer_pattern(hf, m)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "Qwen3MoeForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "head", "Qwen3-MoE normalises each head's queries and keys")
    s.need("o_bias", m.o_bias == m.qkv_bias, "Qwen3-MoE has one attention_bias for q, k, v and o")
    qwen2_moe.write_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "Qwen3-MoE has no shared experts")
    qwen2_moe.write_layer_pattern(m, out)
    out.update(attention_bias=bool(m.qkv_bias), intermediate_size=m.ffn_dim,
               moe_intermediate_size=m.moe.expert_ffn, num_experts=m.moe.num_experts,
               num_experts_per_tok=m.moe.top_k, norm_topk_prob=bool(m.moe.router.norm_topk_prob),
               use_sliding_window=False, router_aux_loss_coef=m.moe.balance_coef)
    return out


register(Family("qwen3_moe", from_hf, to_hf, {**NORM_RULES, **GQA_RULES, **DENSE_RULES, **moe_rules("mlp")}))
