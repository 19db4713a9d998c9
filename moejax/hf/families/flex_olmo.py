"""FlexOlmo (``allenai/FlexOlmo-7x7B-1T``, arXiv 2507.07024): OLMo 2's block (attention with an RMSNorm over the
whole q and k projections, one ``attention_bias`` for q, k, v and o; the norms after attention and after the FFN,
before each residual add: ``model.norm_position='post'``) with OLMoE's MoE in every layer: a softmax top-k router,
``norm_topk_prob`` optional, SwiGLU experts of ``intermediate_size``, no shared expert."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import qwen2_moe
from moejax.hf.families.olmo2 import POST_NORM_RULES
from moejax.hf.registry import Family, register
from moejax.hf.rules import GQA_RULES, moe_rules


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-6)
    config.read_gqa(hf, m, 500000.0)
    config.read_no_sliding(hf)
    m.norm_position = "post"
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope = True, "proj"
    m.ffn_dim = m.moe.expert_ffn = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("num_experts") or hf.need("num_local_experts"))
    m.moe.top_k = hf.need("num_experts_per_tok")
    config.read_router(m, score="softmax", softmax_before_topk=True,
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.01)))


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "FlexOlmoForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s)
    s.need("norm_position", m.norm_position == "post", "FlexOlmo normalises each block's attention and FFN outputs")
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "proj", "FlexOlmo normalises the whole q and k projections")
    s.need("o_bias", m.o_bias == m.qkv_bias, "FlexOlmo has one attention_bias for q, k, v and o")
    qwen2_moe.write_router(m, s)
    config.write_all_moe(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "FlexOlmo has no shared experts")
    out.update(attention_bias=bool(m.qkv_bias), intermediate_size=m.moe.expert_ffn, num_experts=m.moe.num_experts,
               num_experts_per_tok=m.moe.top_k, norm_topk_prob=bool(m.moe.router.norm_topk_prob),
               router_aux_loss_coef=m.moe.balance_coef)
    return out


register(Family("flex_olmo", from_hf, to_hf, {**POST_NORM_RULES, **GQA_RULES, **moe_rules("mlp")},
                expresses=frozenset({"norm_position"})))
