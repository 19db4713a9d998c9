"""DeepSeek-V2 (``deepseek-ai/DeepSeek-V2``, ``-V2-Lite``) and DeepSeek-V3 (``deepseek-ai/DeepSeek-V3``, R1): Multi-head
Latent Attention; dense layers before ``first_k_dense_replace``, then MoE with ungated shared experts. V2 routes by a
softmax (``greedy`` or ``group_limited_greedy``) and rotates interleaved pairs; V3 by a sigmoid with a selection bias
(``e_score_correction_bias``) and group-limited top-k (``noaux_tc``). V3's multi-token-prediction layers, past
``num_hidden_layers``, load into moejax's MTP modules (model.mtp_depth; moejax/hf/mtp.py)."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config, mtp
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, MLA_RULES, NORM_RULES, Rule, glu_rules, moe_rules


def _from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-6)
    m.attention = "mla"
    kv_heads = hf.get("num_key_value_heads", m.num_heads)
    if kv_heads != m.num_heads:
        hf.refuse("num_key_value_heads", kv_heads, f"Multi-head Latent Attention expands its latent to all "
                                                   f"{m.num_heads} heads")
    hf.used.update({"head_dim", "qk_head_dim"})  # transformers sets both from the MLA dimensions
    m.mla.update(q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=hf.need("kv_lora_rank"),
                 qk_nope_head_dim=hf.need("qk_nope_head_dim"), qk_rope_head_dim=hf.need("qk_rope_head_dim"),
                 v_head_dim=hf.need("v_head_dim"))
    hf.expect("attention_bias", config.falsy, "moejax's MLA projections have no biases", False)
    hf.expect("mlp_bias", config.falsy, "moejax's FFNs have no biases", False)
    config.read_rope(hf, m, 10000.0)
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


def _to_hf(m: ml_collections.ConfigDict, s: Saving, architecture: str) -> dict[str, Any]:
    out = config.write_common(m, s, architecture)
    s.need("attention", m.attention == "mla", "DeepSeek has Multi-head Latent Attention")
    config.write_no_extras(m, s)
    s.need("qk_norm", not m.qk_norm, "DeepSeek has no query/key norm")
    config.write_deepseek_moe_layout(m, s, "DeepSeek", shared_required=False)
    mla = m.mla
    out.update(num_key_value_heads=m.num_heads, q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
               qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
               v_head_dim=mla.v_head_dim, intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               n_routed_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, n_shared_experts=m.moe.num_shared,
               first_k_dense_replace=m.first_dense_layers, routed_scaling_factor=m.moe.router.routed_scaling_factor,
               attention_bias=False)
    return out


def from_v2(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _from_hf(hf, m)
    m.rope_interleave = True  # transformers' DeepSeek-V2 rotates interleaved pairs (complex multiplication)
    hf.expect("scoring_func", lambda v: v == "softmax", "transformers' DeepSeek-V2 router is a softmax", "softmax")
    hf.expect("norm_topk_prob", config.falsy, "transformers' DeepSeek-V2 router ignores it while DeepSeek's own "
                                              "code renormalises: the two disagree, so it is refused", False)
    method = hf.expect("topk_method", lambda v: v in ("greedy", "group_limited_greedy"),
                       "transformers' DeepSeek-V2 has 'greedy' and 'group_limited_greedy'", "greedy")
    config.read_router(m, score="softmax", softmax_before_topk=True, norm_topk_prob=False,
                       routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    if method == "group_limited_greedy":
        m.moe.router.update(num_groups=hf.need("n_group"), topk_groups=hf.need("topk_group"), group_score="max",
                            group_mask_fill=0.0)
    else:
        hf.used.update({"n_group", "topk_group"})


def to_v2(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _to_hf(m, s, "DeepseekV2ForCausalLM")
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


def from_v3(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    _from_hf(hf, m)
    m.rope_interleave = bool(hf.get("rope_interleave", True))
    hf.expect("scoring_func", lambda v: v == "sigmoid", "transformers' DeepSeek-V3 router is a sigmoid", "sigmoid")
    hf.expect("topk_method", lambda v: v == "noaux_tc", "transformers' DeepSeek-V3 routes by 'noaux_tc'", "noaux_tc")
    config.read_grouped_sigmoid_router(hf, m)
    mtp.read(hf, m)


def to_v3(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _to_hf(m, s, "DeepseekV3ForCausalLM")
    out.update(rope_interleave=bool(m.rope_interleave), **config.write_grouped_sigmoid_router(m, s, "DeepSeek-V3"))
    out.update(mtp.write(m))
    return out


V2_RULES = {**NORM_RULES, **MLA_RULES, **DENSE_RULES, **moe_rules("mlp"),
            **glu_rules("ffn/shared", "model.layers.{i}.mlp.shared_experts")}
TRAINING_ONLY = frozenset({"ep_size", "seq_aux", "aux_loss_alpha"})  # fields of DeepSeek's own trainer

register(Family("deepseek_v2", from_v2, to_v2, V2_RULES, TRAINING_ONLY | {"n_group", "topk_group"}))
register(Family("deepseek_v3", from_v3, to_v3,
                {**V2_RULES, "ffn/router_bias": Rule("model.layers.{i}.mlp.gate.e_score_correction_bias")},
                TRAINING_ONLY, expresses=frozenset({"mtp_depth"})))
