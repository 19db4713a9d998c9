"""GLM-4.5 (``zai-org/GLM-4.5``, ``-Air``): grouped-query attention with q/k/v biases (``attention_bias``; the output
projection has none), an optional per-head query/key RMSNorm (``use_qk_norm``) and the rotary embedding on the first
``partial_rotary_factor`` of each head (transformers' default 0.5); dense layers before ``first_k_dense_replace``,
then MoE with ungated shared experts and DeepSeek-V3's router: a sigmoid with a selection bias
(``e_score_correction_bias``), group-limited top-k (groups scored by their two best), ``norm_topk_prob`` and
``routed_scaling_factor``. The multi-token-prediction layers (``num_nextn_predict_layers``), past
``num_hidden_layers``, load into moejax's MTP modules as DeepSeek-V3's do (moejax/hf/mtp.py)."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config, mtp
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES, Rule, glu_rules, moe_rules

DEFAULT_PARTIAL = 0.5  # Glm4MoeConfig sets partial_rotary_factor to 0.5 when config.json has none


def _take_partial(hf: HFConfig) -> float:
    """partial_rotary_factor (inside the rope parameters first, as transformers reads it, else top level), taken out
    of the HFConfig being read: the shared rotary reader refuses a partial rotary embedding."""
    params = hf.raw.get("rope_scaling") or hf.raw.get("rope_parameters")
    partial = None
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        params = dict(params)
        partial = params.pop("partial_rotary_factor")
        hf.raw["rope_scaling" if hf.raw.get("rope_scaling") else "rope_parameters"] = params
    if partial is None:
        partial = hf.raw.get("partial_rotary_factor")
    hf.raw.pop("partial_rotary_factor", None)
    hf.used.add("partial_rotary_factor")
    return float(DEFAULT_PARTIAL if partial is None else partial)


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-5)
    m.partial_rotary_factor = _take_partial(hf)
    config.read_gqa(hf, m, 10000.0)
    m.qkv_bias, m.o_bias = bool(hf.get("attention_bias", False)), False
    if hf.get("use_qk_norm", False):
        m.qk_norm, m.qk_norm_scope = True, "head"
    m.ffn_dim = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("n_routed_experts") or hf.need("num_local_experts"))
    m.moe.top_k = hf.need("num_experts_per_tok")
    m.moe.expert_ffn = hf.need("moe_intermediate_size")
    m.moe.num_shared = hf.expect("n_shared_experts", lambda v: isinstance(v, int) and v >= 1,
                                 "transformers' GLM-4.5 always has a shared expert block of n_shared_experts * "
                                 "moe_intermediate_size", 1)
    m.first_dense_layers = int(hf.get("first_k_dense_replace", 1))
    config.read_grouped_sigmoid_router(hf, m)
    mtp.read(hf, m)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "Glm4MoeForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s)
    s.need("o_bias", not m.o_bias, "GLM-4.5's output projection has no bias")
    s.need("qk_norm", not m.qk_norm or m.qk_norm_scope == "head", "GLM-4.5 normalises each head's queries and keys")
    r = m.moe.router
    router_fields = config.write_grouped_sigmoid_router(m, s, "GLM-4.5")
    config.write_deepseek_moe_layout(m, s, "GLM-4.5", shared_required=True)
    out.update(partial_rotary_factor=m.partial_rotary_factor, attention_bias=bool(m.qkv_bias),
               use_qk_norm=bool(m.qk_norm), intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               n_routed_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               n_shared_experts=m.moe.num_shared, first_k_dense_replace=m.first_dense_layers,
               routed_scaling_factor=r.routed_scaling_factor, **router_fields)
    out.update(mtp.write(m))
    return out


LAYER_RULES = {**NORM_RULES, **GQA_RULES, **DENSE_RULES, **moe_rules("mlp"),
               **glu_rules("ffn/shared", "model.layers.{i}.mlp.shared_experts"),
               "ffn/router_bias": Rule("model.layers.{i}.mlp.gate.e_score_correction_bias")}

register(Family("glm4_moe", from_hf, to_hf, LAYER_RULES,
                expresses=frozenset({"partial_rotary_factor", "mtp_depth"})))
