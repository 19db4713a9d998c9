"""PhiMoE (``microsoft/Phi-3.5-MoE-instruct``): grouped-query attention with one ``attention_bias`` for q, k, v and o;
LayerNorm (a scale and a bias) before attention, before the FFN and on the output (``model.norm='layernorm'``); an
output head with a bias (``lm_head_bias``); every layer MoE, per-expert ``w1`` / ``w3`` / ``w2`` under
``block_sparse_moe`` as Mixtral stores them, routed by SparseMixer (router kind 'sparsemixer', its threshold
``router_jitter_noise``); LongRoPE (``rope_scaling`` type 'longrope'); a ``sliding_window`` on every layer when set
(the released model sets it to its whole context)."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config, rules
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import GQA_RULES, NORM_RULES, Rule, moe_rules

DEFAULT_THETA = 1e6  # transformers' PhimoeConfig.default_theta (the released model sets rope_theta 10000)


def _take_longrope(hf: HFConfig) -> dict[str, Any] | None:
    """The 'longrope' parameters of config.json (``rope_parameters`` or the hub's ``rope_scaling`` with 'type'), taken
    out of the HFConfig being read so that the shared rotary reader sees the default embedding at the same theta."""
    params = hf.raw.get("rope_scaling") or hf.raw.get("rope_parameters")
    if not isinstance(params, dict) or (params.get("rope_type") or params.get("type")) != "longrope":
        return None
    params = dict(params)
    theta = params.pop("rope_theta", None) or hf.raw.get("rope_theta") or DEFAULT_THETA
    hf.raw["rope_scaling"] = None
    hf.raw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return params


def _read_longrope(hf: HFConfig, m: ml_collections.ConfigDict, params: dict[str, Any]) -> None:
    for key in ("short_factor", "long_factor", "short_mscale", "long_mscale"):
        if not params.get(key):
            hf.refuse("rope_scaling", params, f"transformers' PhiMoE LongRoPE needs {key}")
    partial = params.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        hf.refuse("rope_scaling", params, "PhiMoE rotates every dimension of each head")
    # transformers gives the top-level field (Phi-3's) priority over the one inside the rope parameters
    original = (hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                or hf.get("max_position_embeddings"))
    m.rope_scaling.update(kind="longrope", short_factor=tuple(float(v) for v in params["short_factor"]),
                          long_factor=tuple(float(v) for v in params["long_factor"]),
                          short_mscale=float(params["short_mscale"]), long_mscale=float(params["long_mscale"]),
                          original_max_position_embeddings=int(original))


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-5)  # rms_norm_eps is the LayerNorms' eps
    m.norm = "layernorm"
    longrope = _take_longrope(hf)
    config.read_gqa(hf, m, DEFAULT_THETA)
    if longrope is not None:
        _read_longrope(hf, m, longrope)
    elif m.rope_scaling.kind != "none":
        hf.refuse("rope_scaling", hf.get("rope_scaling") or hf.get("rope_parameters"),
                  "transformers' PhiMoE scales cos and sin by short_mscale / long_mscale, which only its LongRoPE "
                  "sets: moejax maps the default embedding and 'longrope'")
    window = hf.get("sliding_window")
    if window:  # transformers masks with the window whenever sliding_window is set
        m.layer_types, m.sliding_window = ("sliding",) * m.num_layers, hf.need("sliding_window")
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.lm_head_bias = bool(hf.get("lm_head_bias", False))
    m.ffn_dim = m.moe.expert_ffn = hf.need("intermediate_size")
    m.moe.num_experts = hf.need("num_local_experts")
    hf.expect("num_experts_per_tok", lambda v: v == 2, "transformers' PhiMoE SparseMixer routes every token to two "
                                                       "experts whatever num_experts_per_tok says", 2)
    m.moe.top_k = 2
    m.moe.router.update(kind="sparsemixer", jitter_eps=float(hf.get("router_jitter_noise", 0.01)))
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    r, rs = m.moe.router, m.rope_scaling
    s.need("moe.router.kind", r.kind == "sparsemixer", "PhiMoE routes by SparseMixer")
    s.need("moe.top_k", m.moe.top_k == 2, "PhiMoE's SparseMixer selects two experts")
    s.need("norm", m.norm == "layernorm", "PhiMoE's norms are LayerNorms")
    s.need("rope_scaling.kind", rs.kind in ("none", "longrope"), "PhiMoE has the default rotary embedding or "
                                                                 "LongRoPE")
    # write_common refuses routers other than top-k and rotary scalings other than YaRN: the two above are PhiMoE's
    common = m.copy_and_resolve_references()
    common.moe.router.kind, common.rope_scaling.kind = "topk", "none"
    out = config.write_common(common, s, "PhimoeForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s, sliding=True)
    kinds = set(m.layer_types) or {"full"}
    s.need("layer_types", len(kinds) == 1, "PhiMoE's sliding window applies to every layer or to none")
    s.need("qk_norm", not m.qk_norm, "PhiMoE has no query/key norm")
    s.need("o_bias", m.o_bias == m.qkv_bias, "PhiMoE has one attention_bias for q, k, v and o")
    config.write_all_moe(m, s)
    s.need("moe.router.bias", not r.bias, "PhiMoE's router has no bias")
    s.need("moe.expert_kind", m.moe.expert_kind == "glu", "PhiMoE's experts are GLUs")
    s.need("moe.num_shared", m.moe.num_shared == 0, "PhiMoE has no shared experts")
    if rs.kind == "longrope":
        out["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(rs.short_factor),
                               "long_factor": list(rs.long_factor), "short_mscale": rs.short_mscale,
                               "long_mscale": rs.long_mscale,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
        out["original_max_position_embeddings"] = rs.original_max_position_embeddings
        out["max_position_embeddings"] = max(out["max_position_embeddings"], rs.original_max_position_embeddings)
    out.update(sliding_window=m.sliding_window if kinds == {"sliding"} else None,
               attention_bias=bool(m.qkv_bias), lm_head_bias=bool(m.lm_head_bias),
               intermediate_size=m.moe.expert_ffn, num_local_experts=m.moe.num_experts, num_experts_per_tok=2,
               router_jitter_noise=r.jitter_eps, input_jitter_noise=0.0, router_aux_loss_coef=m.moe.balance_coef)
    return out


LAYER_RULES = {**NORM_RULES, **GQA_RULES, **moe_rules("block_sparse_moe", ("w1", "w3", "w2")),
               "attn_norm/bias": Rule("model.layers.{i}.input_layernorm.bias"),
               "ffn_norm/bias": Rule("model.layers.{i}.post_attention_layernorm.bias")}
# The top-level LayerNorm bias and output-head bias, named as every family that has them names them; only the
# families whose Family.expresses holds 'norm' / 'lm_head_bias' are given a model with these parameters.
rules.TOP_RULES.setdefault("final_norm/bias", Rule("model.norm.bias"))
rules.TOP_RULES.setdefault("lm_head/bias", Rule("lm_head.bias"))
# input_jitter_noise: training only (moejax leaves PhiMoE's input jitter out); hidden_dropout: not read by
# transformers' PhiMoE
IGNORED = frozenset({"input_jitter_noise", "hidden_dropout"})

register(Family("phimoe", from_hf, to_hf, LAYER_RULES, IGNORED, expresses=frozenset({"norm", "lm_head_bias"})))
