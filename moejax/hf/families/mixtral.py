"""Mixtral (``mistralai/Mixtral-8x7B``): grouped-query attention; every layer MoE, per-expert ``w1`` / ``w3`` / ``w2``
under ``block_sparse_moe``; the softmax of the top-k router logits as weights; no shared experts."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import GQA_RULES, NORM_RULES, moe_rules


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-5)
    config.read_gqa(hf, m, 1e6)
    config.read_no_sliding(hf)
    m.ffn_dim = m.moe.expert_ffn = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("num_local_experts") or hf.need("num_experts"))
    m.moe.top_k = hf.need("num_experts_per_tok")
    hf.expect("router_jitter_noise", config.falsy, "transformers' Mixtral jitters the whole MoE input, moejax only "
                                                   "the router's", 0.0)
    config.read_router(m, score="softmax", softmax_before_topk=True, norm_topk_prob=True)
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "MixtralForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s)
    s.need("qkv_bias", not m.qkv_bias, "Mixtral's projections have no biases")
    s.need("o_bias", not m.o_bias, "Mixtral's projections have no biases")
    s.need("qk_norm", not m.qk_norm, "Mixtral has no query/key norm")
    config.write_all_moe(m, s)
    config.write_plain_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "Mixtral has no shared experts")
    s.need("moe.router.score", config.topk_renormalised(m), "Mixtral's weights are the softmax renormalised over "
                                                             "the top-k (score='softmax' with norm_topk_prob or "
                                                             "softmax_before_topk=False)")
    out.update(intermediate_size=m.moe.expert_ffn, num_local_experts=m.moe.num_experts,
               num_experts_per_tok=m.moe.top_k, sliding_window=None, router_jitter_noise=0.0,
               router_aux_loss_coef=m.moe.balance_coef)
    return out


register(Family("mixtral", from_hf, to_hf, {**NORM_RULES, **GQA_RULES,
                                            **moe_rules("block_sparse_moe", ("w1", "w3", "w2"))}))
