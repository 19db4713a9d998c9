"""MiniMax-M2 (``MiniMaxAI/MiniMax-M2``): grouped-query attention without biases whose queries and keys are
RMS-normalised over all heads at once (``q_norm`` [H * Dh], ``k_norm`` [KV * Dh]: moejax's qk_norm_scope 'proj'), the
rotary embedding on the first ``partial_rotary_factor`` of each head (the released config.json gives it as
``rotary_dim`` of ``head_dim``); every layer MoE with Mixtral's per-expert ``w1`` / ``w3`` / ``w2`` under
``block_sparse_moe``, routed by a sigmoid whose top-k is taken over the scores plus a selection bias
(``e_score_correction_bias``), the selected scores renormalised to sum to 1; no shared experts."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import GQA_RULES, NORM_RULES, Rule, moe_rules


def _take_partial(hf: HFConfig, head_dim: int) -> float:
    """The rotated fraction of each head, taken out of the HFConfig being read: the rope parameters'
    partial_rotary_factor, else the top-level one, else rotary_dim / head_dim (transformers' MiniMaxM2Config sets the
    factor from rotary_dim only when none is given), else 1."""
    partial = config.take_partial_rotary(hf)
    rotary_dim = hf.get("rotary_dim")
    if partial is None and rotary_dim is not None:
        partial = rotary_dim / head_dim
    return float(1.0 if partial is None else partial)


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-6)
    head_dim = int(hf.get("head_dim") or m.d_model // m.num_heads)
    m.partial_rotary_factor = _take_partial(hf, head_dim)
    config.read_gqa(hf, m, 5e6)
    config.read_no_sliding(hf)
    hf.expect("attention_bias", config.falsy, "transformers' MiniMax-M2 projections have no biases", False)
    m.qk_norm, m.qk_norm_scope = True, "proj"
    hf.expect("use_qk_norm", lambda v: v is True, "transformers' MiniMax-M2 always normalises queries and keys", True)
    hf.expect("qk_norm_type", lambda v: v == "per_layer", "transformers' MiniMax-M2 normalises the whole q and k "
                                                          "projections ('per_layer')", "per_layer")
    m.ffn_dim = m.moe.expert_ffn = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("num_local_experts") or hf.need("num_experts"))
    m.moe.top_k = hf.need("num_experts_per_tok")
    hf.expect("scoring_func", lambda v: v == "sigmoid", "transformers' MiniMax-M2 router is a sigmoid", "sigmoid")
    hf.expect("use_routing_bias", lambda v: v is True, "transformers' MiniMax-M2 always has the selection bias", True)
    hf.expect("shared_intermediate_size", config.falsy, "transformers' MiniMax-M2 has no shared experts", 0)
    hf.expect("router_jitter_noise", config.falsy, "transformers' MiniMax-M2 jitters the whole MoE input in "
                                                   "training, moejax only the router's", 0.0)
    config.read_router(m, score="sigmoid", norm_topk_prob=True)
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "MiniMaxM2ForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "proj", "MiniMax-M2 normalises the whole q and k projections")
    s.need("qkv_bias", not m.qkv_bias, "MiniMax-M2's projections have no biases")
    s.need("o_bias", not m.o_bias, "MiniMax-M2's projections have no biases")
    rotary = out["head_dim"] * m.partial_rotary_factor
    s.need("partial_rotary_factor", rotary == int(rotary), f"MiniMax-M2 gives a whole rotary_dim of the "
                                                           f"{out['head_dim']}-wide heads")
    r = m.moe.router
    config.write_plain_router(m, s)
    s.need("moe.router.score", r.score == "sigmoid" and r.norm_topk_prob, "MiniMax-M2 renormalises the selected "
                                                                          "sigmoid scores")
    s.need("moe.num_shared", m.moe.num_shared == 0, "MiniMax-M2 has no shared experts")
    config.write_all_moe(m, s)
    out.update(rotary_dim=int(rotary), intermediate_size=m.moe.expert_ffn, num_local_experts=m.moe.num_experts,
               num_experts_per_tok=m.moe.top_k, router_jitter_noise=0.0, router_aux_loss_coef=m.moe.balance_coef,
               use_qk_norm=True, qk_norm_type="per_layer", scoring_func="sigmoid", use_routing_bias=True)
    return out


LAYER_RULES = {**NORM_RULES, **GQA_RULES, **moe_rules("block_sparse_moe", ("w1", "w3", "w2")),
               "ffn/router_bias": Rule("model.layers.{i}.block_sparse_moe.e_score_correction_bias")}
# Fields of the released config.json that transformers' MiniMax-M2 does not read: its multi-token-prediction modules
# and the attention kind per layer (1, full attention, in every layer of M2)
IGNORED = frozenset({"use_mtp", "num_mtp_modules", "mtp_transformer_layers", "attn_type_list"})

register(Family("minimax_m2", from_hf, to_hf, LAYER_RULES, IGNORED, expresses=frozenset({"partial_rotary_factor"})))
