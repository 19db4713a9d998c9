"""ERNIE 4.5 MoE (``baidu/ERNIE-4.5-21B-A3B-PT``, ``-300B-A47B-PT``): Llama's grouped-query attention with the rotary
embedding on interleaved pairs (``rope_interleave``; transformers' ERNIE 4.5 rotates pairs (x0, x1), (x2, x3), ...);
layer i is MoE when ``(i + 1) % moe_layer_interval == 0`` and ``moe_layer_start_index <= i <= moe_layer_end_index``
(moejax's first_dense_layers, moe_every and dense_layers), the others dense; a softmax router whose top-k is taken
over the probabilities plus a selection bias (``moe_statics.e_score_correction_bias`` [1, E]) and whose weights, the
selected probabilities, are renormalised (divided by max(sum, ``moe_norm_min``)); ungated shared experts of
``moe_num_shared_experts * moe_intermediate_size``; tied embeddings by default. The multi-token-prediction weights
(``mtp_*``) are skipped on load, as transformers skips them."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES, Rule, glu_rules, moe_rules

NORM_MIN_LIMIT = 1e-6  # moejax divides by sum + 1e-20: the same as max(sum, moe_norm_min) unless sum < moe_norm_min


def read_layer_range(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    """ERNIE's MoE layers (start, end, interval) as moejax's first_dense_layers, moe_every and dense_layers."""
    start = hf.expect("moe_layer_start_index", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0", 1)
    end = hf.expect("moe_layer_end_index", lambda v: isinstance(v, int) and v >= -1, "must be an integer >= -1", -1)
    every = hf.expect("moe_layer_interval", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1", 1)
    end = m.num_layers - 1 if end == -1 else end
    first = start + (-(start + 1)) % every  # the first i >= start with (i + 1) % every == 0
    if first > min(end, m.num_layers - 1):
        m.moe_every, m.moe.num_experts = 0, max(m.moe.num_experts, 1)  # every layer dense
        return
    m.first_dense_layers, m.moe_every = first, every
    m.dense_layers = tuple(range(first, m.num_layers, every)[len(range(first, end + 1, every)):])


def write_layer_range(m: ml_collections.ConfigDict, s: Saving, out: dict[str, Any]) -> None:
    if m.moe_every == 0:
        out.update(moe_layer_start_index=m.num_layers, moe_layer_end_index=-1, moe_layer_interval=1)
        return
    first, every = m.first_dense_layers, m.moe_every
    s.need("first_dense_layers", (first + 1) % every == 0, f"ERNIE 4.5's MoE layers are those i with (i + 1) % "
                                                            f"moe_layer_interval == 0 (moe_every={every})")
    pattern = range(first, m.num_layers, every)
    dense = set(m.dense_layers)
    kept = [i for i in pattern if i not in dense]
    s.need("dense_layers", bool(kept) and set(pattern[len(kept):]) == dense and list(pattern[:len(kept)]) == kept,
           "ERNIE 4.5 can only end its MoE layers early (moe_layer_end_index): the dense layers must be the last "
           "ones of the MoE pattern")
    out.update(moe_layer_start_index=first, moe_layer_end_index=kept[-1], moe_layer_interval=every)


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-5)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", True))  # Ernie4_5_MoeConfig's default
    config.read_gqa(hf, m, 500000.0)
    m.rope_interleave = True
    hf.expect("use_bias", config.falsy, "moejax's FFNs have no biases (ERNIE 4.5 puts use_bias on every projection, "
                                        "its GLUs' included; the released models set it false)", False)
    m.ffn_dim = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("moe_num_experts", 64))
    m.moe.top_k = int(hf.get("moe_k", 6))
    m.moe.expert_ffn = hf.need("moe_intermediate_size")
    m.moe.num_shared = hf.expect("moe_num_shared_experts", lambda v: isinstance(v, int) and v >= 0,
                                 "must be an integer >= 0", 2)
    hf.expect("moe_norm_min", lambda v: isinstance(v, (int, float)) and 0 <= v <= NORM_MIN_LIMIT,
              f"moejax renormalises by the sum of the selected weights (plus 1e-20), which equals transformers' "
              f"max(sum, moe_norm_min) only for a tiny moe_norm_min (<= {NORM_MIN_LIMIT})", 1e-12)
    config.read_router(m, score="softmax", softmax_before_topk=True, norm_topk_prob=True)
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    read_layer_range(hf, m)
    hf.used.update({"num_nextn_predict_layers", "num_mtp_layers"})  # their weights are skipped (mtp_*)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "Ernie4_5_MoeForCausalLM")
    s.need("rope_interleave", m.rope_interleave, "ERNIE 4.5 rotates interleaved pairs")
    gqa = m.copy_and_resolve_references()
    gqa.rope_interleave = False  # write_gqa checks the half-split layout of the other families
    config.write_gqa(gqa, s, out)
    config.write_no_extras(m, s)
    s.need("qkv_bias", not m.qkv_bias, "ERNIE 4.5's use_bias would put biases on the FFNs too, which moejax lacks")
    s.need("o_bias", not m.o_bias, "ERNIE 4.5's use_bias would put biases on the FFNs too, which moejax lacks")
    s.need("qk_norm", not m.qk_norm, "ERNIE 4.5 has no query/key norm")
    r = m.moe.router
    config.write_plain_router(m, s)
    s.need("moe.router.score", r.score == "softmax" and r.softmax_before_topk and r.norm_topk_prob,
           "ERNIE 4.5 renormalises the selected softmax probabilities")
    s.need("moe.shared_gate", not m.moe.shared_gate, "ERNIE 4.5's shared experts are not gated")
    s.need("moe.shared_ffn", m.moe.shared_ffn in (0, m.moe.num_shared * m.moe.expert_ffn),
           "ERNIE 4.5's shared experts are moe_num_shared_experts * moe_intermediate_size wide")
    write_layer_range(m, s, out)
    out.update(use_bias=False, intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               moe_num_experts=m.moe.num_experts, moe_k=m.moe.top_k, moe_num_shared_experts=m.moe.num_shared,
               moe_norm_min=1e-12, router_aux_loss_coef=m.moe.balance_coef)
    return out


LAYER_RULES = {**NORM_RULES, **GQA_RULES, **DENSE_RULES, **moe_rules("mlp"),
               **glu_rules("ffn/shared", "model.layers.{i}.mlp.shared_experts"),
               "ffn/router_bias": Rule("model.layers.{i}.mlp.moe_statics.e_score_correction_bias", "row")}

# the multi-token-prediction weights of the released checkpoints (mtp_block.0..., mtp_emb_norm.0, mtp_hidden_norm.0,
# mtp_linear_proj.0), which transformers' ERNIE 4.5 MoE skips on load (_keys_to_ignore_on_load_unexpected)
MTP_PREFIXES = ("model.mtp_",)

# fields of ERNIE's own (Paddle) trainer that transformers does not read: the dispatch capacity, whether the
# selection bias is trained, the MTP loss weight
TRAINING_ONLY = frozenset({"moe_capacity", "moe_use_aux_free", "multi_token_pred_lambda"})

register(Family("ernie4_5_moe", from_hf, to_hf, LAYER_RULES, TRAINING_ONLY, skipped_prefixes=MTP_PREFIXES))
