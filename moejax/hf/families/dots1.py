"""dots.llm1 (``rednote-hilab/dots.llm1.base``, ``.inst``): Qwen3's attention (a per-head query/key RMSNorm, one
``attention_bias`` for q, k, v and o) with DeepSeek-V3's MoE: dense layers before ``first_k_dense_replace``, then
routed experts behind a sigmoid router with a selection bias (``e_score_correction_bias``), group-limited top-k
(groups scored by their two best), ``norm_topk_prob`` and ``routed_scaling_factor``, and ungated shared experts of
``n_shared_experts * moe_intermediate_size``. Layers from ``max_window_layers`` on slide over ``sliding_window``
positions (``layer_types``; the released model's window starts past its last layer, so no layer slides)."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES, Rule, glu_rules, moe_rules

LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def read_layer_types(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    """``layer_types`` as config.json lists them, else as transformers derives them: 'sliding_attention' from
    ``max_window_layers`` on when ``sliding_window`` is set."""
    window = hf.get("sliding_window")
    start = hf.get("max_window_layers", m.num_layers)
    kinds = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= start else "full_attention"
                                      for i in range(m.num_layers)]
    if len(kinds) != m.num_layers or any(k not in LAYER_TYPES for k in kinds):
        hf.refuse("layer_types", kinds, f"one of {sorted(LAYER_TYPES)} per layer ({m.num_layers} layers)")
    if "sliding_attention" in kinds:
        if not isinstance(window, int) or window < 1:
            hf.refuse("sliding_window", window, "sliding layers need a window >= 1")
        m.layer_types, m.sliding_window = tuple(LAYER_TYPES[k] for k in kinds), window


def write_layer_types(m: ml_collections.ConfigDict, out: dict[str, Any]) -> None:
    kinds = tuple(m.layer_types) or ("full",) * m.num_layers
    names = {v: k for k, v in LAYER_TYPES.items()}
    out.update(layer_types=[names[k] for k in kinds], sliding_window=m.sliding_window or None,
               max_window_layers=m.num_layers)


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-6)
    config.read_gqa(hf, m, 10000.0)
    read_layer_types(hf, m)
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope = True, "head"
    m.ffn_dim = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("n_routed_experts") or hf.need("num_local_experts"))
    m.moe.top_k = hf.need("num_experts_per_tok")
    m.moe.expert_ffn = hf.need("moe_intermediate_size")
    m.moe.num_shared = hf.expect("n_shared_experts", lambda v: isinstance(v, int) and v >= 1,
                                 "transformers' dots.llm1 always has a shared expert block of n_shared_experts * "
                                 "moe_intermediate_size")
    m.first_dense_layers = int(hf.get("first_k_dense_replace") or 0)
    hf.expect("scoring_func", lambda v: v == "sigmoid", "transformers' dots.llm1 router is a sigmoid", "sigmoid")
    config.read_grouped_sigmoid_router(hf, m)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "Dots1ForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s, sliding=True)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "head", "dots.llm1 normalises each head's queries and keys")
    s.need("o_bias", m.o_bias == m.qkv_bias, "dots.llm1 has one attention_bias for q, k, v and o")
    r = m.moe.router
    router_fields = config.write_grouped_sigmoid_router(m, s, "dots.llm1")
    config.write_deepseek_moe_layout(m, s, "dots.llm1", shared_required=True)
    write_layer_types(m, out)
    router_fields.pop("num_nextn_predict_layers")
    out.update(attention_bias=bool(m.qkv_bias), intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               n_routed_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               n_shared_experts=m.moe.num_shared, first_k_dense_replace=m.first_dense_layers,
               routed_scaling_factor=r.routed_scaling_factor, **router_fields)
    return out


LAYER_RULES = {**NORM_RULES, **GQA_RULES, **DENSE_RULES, **moe_rules("mlp"),
               **glu_rules("ffn/shared", "model.layers.{i}.mlp.shared_experts"),
               "ffn/router_bias": Rule("model.layers.{i}.mlp.gate.e_score_correction_bias")}

# use_sliding_window: in the released config.json, not read by transformers' dots.llm1 (layer_types decide)
register(Family("dots1", from_hf, to_hf, LAYER_RULES, frozenset({"use_sliding_window"})))
