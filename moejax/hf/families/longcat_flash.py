"""LongCat-Flash (``meituan-longcat/LongCat-Flash-Chat``, arXiv 2509.01322). Each checkpoint layer holds two
sublayers of MLA attention + dense SwiGLU and one MoE whose input is the first sublayer's normalised FFN input and
whose output joins after the second sublayer's FFN: in moejax two layers, the first a shortcut-connected MoE layer
(``model.moe_shortcut``, ``moe_every=2``: its MoE at ``ffn``, its dense FFN at ``dense_ffn``), the second dense.
Checkpoint layer l, sublayer s is moejax layer 2l + s (``{pair}`` / ``{sub}`` in the rule table). The attention is
DeepSeek's MLA with a q-LoRA, the queries scaled by sqrt(hidden_size / q_lora_rank) and the normalised latent by
sqrt(hidden_size / kv_lora_rank) (``model.mla.lora_scaling``), rotating interleaved pairs. The router scores the
``n_routed_experts`` GLU experts and ``zero_expert_num`` zero-computation experts that return their input
(``model.moe.num_identity_experts``) by one softmax, selects by the probabilities plus ``e_score_correction_bias``
(over all E + z), and weights by the selected probabilities times ``routed_scaling_factor``, unnormalised. The
multi-token-prediction weights (``model.mtp.*``) are skipped on load, as transformers skips them."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import Rule, fused_rules, glu_rules

_LAYER = "model.layers.{pair}."
_ATTN = _LAYER + "self_attn.{sub}."
_MOE = _LAYER + "mlp."


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    layers = hf.need("num_layers")
    derived = hf.get("num_hidden_layers", 2 * layers)
    if derived != 2 * layers:
        hf.refuse("num_hidden_layers", derived, f"transformers derives it as 2 * num_layers = {2 * layers}")
    hf.raw["num_hidden_layers"] = 2 * layers  # moejax's layers are the checkpoint's sublayers
    config.read_common(hf, m, 1e-5)
    m.attention, m.rope_interleave = "mla", True
    kv_heads = hf.get("num_key_value_heads", m.num_heads)
    if kv_heads != m.num_heads:
        hf.refuse("num_key_value_heads", kv_heads, f"Multi-head Latent Attention expands its latent to all "
                                                   f"{m.num_heads} heads")
    q_rank = hf.need("q_lora_rank")
    if q_rank < 1:
        hf.refuse("q_lora_rank", q_rank, "transformers' LongCat-Flash always has the query LoRA")
    nope, rot = hf.need("qk_nope_head_dim"), hf.need("qk_rope_head_dim")
    m.mla.update(q_lora_rank=q_rank, kv_lora_rank=hf.need("kv_lora_rank"), qk_nope_head_dim=nope,
                 qk_rope_head_dim=rot, v_head_dim=hf.need("v_head_dim"), lora_scaling=True)
    hf.expect("qk_head_dim", lambda v: v == nope + rot, f"must be qk_nope_head_dim + qk_rope_head_dim = {nope + rot}",
              nope + rot)
    # transformers' rotary embedding takes its width from head_dim, and rotates the qk_rope_head_dim dims with it
    hf.expect("head_dim", lambda v: v == rot, f"transformers rotates the {rot} rotary dims with frequencies of "
                                              f"head_dim: they must be equal", rot)
    hf.expect("attention_bias", config.falsy, "moejax's MLA projections have no biases", False)
    config.read_rope(hf, m, 10000000.0)
    m.ffn_dim = hf.need("ffn_hidden_size")
    m.moe_every, m.first_dense_layers, m.moe_shortcut = 2, 0, True
    m.moe.update(num_experts=hf.need("n_routed_experts"), top_k=hf.need("moe_topk"),
                 expert_ffn=hf.need("expert_ffn_hidden_size"), num_shared=0,
                 num_identity_experts=hf.need("zero_expert_num"))
    if m.moe.num_identity_experts < 1:
        hf.refuse("zero_expert_num", m.moe.num_identity_experts, "moejax reads LongCat-Flash with zero-computation "
                                                                 "experts (the released model has 256)")
    hf.expect("router_bias", config.falsy, "transformers' LongCat-Flash creates the router's classifier bias but "
                                           "computes the logits without it, so a checkpoint with one is refused", False)
    config.read_router(m, score="softmax", softmax_before_topk=True, norm_topk_prob=False,
                       routed_scaling_factor=float(hf.get("routed_scaling_factor", 6.0)))


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "LongcatFlashForCausalLM")
    s.need("attention", m.attention == "mla", "LongCat-Flash has Multi-head Latent Attention")
    s.need("rope_interleave", m.rope_interleave, "LongCat-Flash rotates interleaved pairs")
    mla = m.mla
    s.need("mla.q_lora_rank", mla.q_lora_rank > 0, "LongCat-Flash always has the query LoRA")
    s.need("mla.lora_scaling", mla.get("lora_scaling", False), "LongCat-Flash scales the queries and the latent")
    config.write_no_extras(m, s)
    s.need("o_bias", not m.o_bias, "LongCat-Flash's projections have no biases")
    s.need("moe_shortcut", m.get("moe_shortcut", False), "LongCat-Flash's MoE is shortcut-connected")
    s.need("moe_every", m.moe_every == 2, "every LongCat-Flash layer is one MoE sublayer and one dense sublayer")
    s.need("first_dense_layers", m.first_dense_layers == 0, "LongCat-Flash's first sublayer has the MoE")
    s.need("dense_layers", not m.dense_layers, "every LongCat-Flash layer has its MoE")
    s.need("num_layers", m.num_layers % 2 == 0, "LongCat-Flash's layers hold two sublayers each")
    r = m.moe.router
    s.need("moe.router.score", r.score == "softmax" and r.softmax_before_topk and not r.norm_topk_prob,
           "LongCat-Flash weights are the unnormalised softmax probabilities of the selected experts")
    s.need("moe.router.num_groups", r.num_groups == 1, "LongCat-Flash has no group-limited routing")
    s.need("moe.expert_kind", m.moe.expert_kind == "glu", "LongCat-Flash's experts are GLUs")
    s.need("moe.num_shared", m.moe.num_shared == 0, "LongCat-Flash has no shared experts")
    s.need("moe.router.bias", not r.bias, "LongCat-Flash's router logits have no bias")
    s.need("moe.num_identity_experts", m.moe.get("num_identity_experts", 0) > 0, "moejax writes LongCat-Flash with "
           "zero-computation experts (zero_expert_num > 0), whose selection bias rows follow the routed experts'")
    out.update(num_layers=m.num_layers // 2, num_key_value_heads=m.num_heads, q_lora_rank=mla.q_lora_rank,
               kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
               qk_rope_head_dim=mla.qk_rope_head_dim, head_dim=mla.qk_rope_head_dim,
               qk_head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
               ffn_hidden_size=m.ffn_dim, expert_ffn_hidden_size=m.moe.expert_ffn,
               n_routed_experts=m.moe.num_experts, moe_topk=m.moe.top_k,
               zero_expert_num=m.moe.get("num_identity_experts", 0),
               routed_scaling_factor=r.routed_scaling_factor, router_bias=False, attention_bias=False)
    del out["num_hidden_layers"]  # transformers derives it from num_layers
    return out


LAYER_RULES = {
    "attn_norm/scale": Rule(_LAYER + "input_layernorm.{sub}.weight"),
    "ffn_norm/scale": Rule(_LAYER + "post_attention_layernorm.{sub}.weight"),
    "attn/q_a/kernel": Rule(_ATTN + "q_a_proj.weight", "linear"),
    "attn/q_a_norm/scale": Rule(_ATTN + "q_a_layernorm.weight"),
    "attn/q_b/kernel": Rule(_ATTN + "q_b_proj.weight", "linear"),
    "attn/kv_a/kernel": Rule(_ATTN + "kv_a_proj_with_mqa.weight", "linear"),
    "attn/kv_a_norm/scale": Rule(_ATTN + "kv_a_layernorm.weight"),
    "attn/kv_b/kernel": Rule(_ATTN + "kv_b_proj.weight", "linear"),
    "attn/o/kernel": Rule(_ATTN + "o_proj.weight", "linear2"),
    **glu_rules("ffn", _LAYER + "mlps.{sub}"),  # the second sublayer's dense FFN (sub = 1)
    **glu_rules("dense_ffn", _LAYER + "mlps.{sub}"),  # the first's, beside the MoE (sub = 0)
    "ffn/router/kernel": Rule(_MOE + "router.classifier.weight", "linear"),
    **glu_rules("ffn/experts", _MOE + "experts.{j}"),
    # the selection bias over E + z: the routed experts' rows, then the identity experts'
    **fused_rules(_MOE + "router.e_score_correction_bias", ("ffn/router_bias", "ffn/identity_bias"), "copy"),
}

register(Family("longcat_flash", from_hf, to_hf, LAYER_RULES, skipped_prefixes=("model.mtp.",),
                expresses=frozenset({"moe_shortcut", "mla.lora_scaling", "moe.num_identity_experts"})))
