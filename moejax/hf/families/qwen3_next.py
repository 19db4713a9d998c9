"""Qwen3-Next (``Qwen/Qwen3-Next-80B-A3B-Instruct``, ``-Thinking``): linear-attention layers (the Gated DeltaNet,
moejax's layer kind 'linear': moejax/linear_attention.py) between full-attention layers (``layer_types``, or every
``full_attention_interval``-th layer), the full-attention layers with a sigmoid output gate per head from a q
projection twice as wide (``attention_gate``), a per-head query/key RMSNorm and the rotary embedding on the first
``partial_rotary_factor`` of each head (transformers' default 0.25); every RMSNorm but the linear attention's gated
one zero-centred (its weight an offset from 1: ``model.norm='rms_offset'``); Qwen2-MoE's layer pattern, softmax
top-k router and sigmoid-gated shared expert. The released checkpoints' multi-token-prediction weights (``mtp.*``),
which transformers skips, are skipped on load with a note."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import qwen2_moe
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES, Rule, glu_rules, moe_rules

DEFAULT_PARTIAL = 0.25  # Qwen3NextConfig's partial_rotary_factor when config.json has none
DEFAULT_INTERVAL = 4  # Qwen3NextConfig's full_attention_interval when config.json has no layer_types
KINDS = {"linear_attention": "linear", "full_attention": "full"}
LINEAR_FIELDS = {"linear_num_key_heads": "num_key_heads", "linear_num_value_heads": "num_value_heads",
                 "linear_key_head_dim": "key_head_dim", "linear_value_head_dim": "value_head_dim",
                 "linear_conv_kernel_dim": "conv_kernel"}


def _take_partial(hf: HFConfig) -> float:
    """partial_rotary_factor (inside the rope parameters first, else top level, else 0.25)."""
    partial = config.take_partial_rotary(hf)
    return float(DEFAULT_PARTIAL if partial is None else partial)


def _layer_types(hf: HFConfig, layers: int) -> tuple[str, ...]:
    kinds = hf.get("layer_types")
    interval = hf.get("full_attention_interval", DEFAULT_INTERVAL)
    if kinds is None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            hf.refuse("full_attention_interval", interval, "must be an integer >= 1")
        kinds = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    if len(kinds) != layers or any(kind not in KINDS for kind in kinds):
        hf.refuse("layer_types", kinds, f"must be {layers} entries, each one of {sorted(KINDS)}")
    return tuple(KINDS[kind] for kind in kinds)


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-6)
    m.partial_rotary_factor = _take_partial(hf)
    config.read_gqa(hf, m, 10000.0)
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope, m.norm, m.attention_gate = True, "head", "rms_offset", True
    kinds = _layer_types(hf, m.num_layers)
    m.layer_types = () if all(kind == "full" for kind in kinds) else kinds
    for field, name in LINEAR_FIELDS.items():
        m.linear_attention[name] = hf.need(field)
    qwen2_moe.read_experts(hf, m)
    shared = hf.expect("shared_expert_intermediate_size", lambda v: isinstance(v, int) and v >= 1,
                       "transformers' Qwen3-Next always has a sigmoid-gated shared expert of this width")
    m.moe.update(num_shared=1, shared_gate=True, shared_ffn=0 if shared == m.moe.expert_ffn else shared)
    qwen2_moe.read_layer_pattern(hf, m)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "Qwen3NextForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s, sliding=True)
    s.need("layer_types", all(kind in ("full", "linear") for kind in m.layer_types),
           "Qwen3-Next's layers are 'linear' or 'full'")
    s.need("norm", m.norm == "rms_offset", "Qwen3-Next's RMSNorm weights are offsets from 1")
    s.need("attention_gate", bool(m.get("attention_gate", False)), "Qwen3-Next gates each attention head's output")
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "head", "Qwen3-Next normalises each head's queries and keys")
    s.need("o_bias", m.o_bias == m.qkv_bias, "Qwen3-Next has one attention_bias for q, k, v and o")
    qwen2_moe.write_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared >= 1, "Qwen3-Next always has a shared expert")
    s.need("moe.shared_gate", m.moe.shared_gate, "Qwen3-Next always gates its shared expert")
    qwen2_moe.write_layer_pattern(m, out)
    kinds = m.layer_types or ("full",) * m.num_layers
    out.update(partial_rotary_factor=m.partial_rotary_factor, attention_bias=bool(m.qkv_bias),
               layer_types=[{"linear": "linear_attention", "full": "full_attention"}[kind] for kind in kinds],
               **{field: int(m.linear_attention[name]) for field, name in LINEAR_FIELDS.items()},
               intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               shared_expert_intermediate_size=m.moe.shared_ffn or m.moe.num_shared * m.moe.expert_ffn,
               num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               norm_topk_prob=bool(m.moe.router.norm_topk_prob), router_aux_loss_coef=m.moe.balance_coef)
    return out


_LINEAR = "model.layers.{i}.linear_attn."
LINEAR_RULES = {
    "attn/in_proj_qkvz/kernel": Rule(f"{_LINEAR}in_proj_qkvz.weight", "linear"),
    "attn/in_proj_ba/kernel": Rule(f"{_LINEAR}in_proj_ba.weight", "linear"),
    "attn/conv1d/kernel": Rule(f"{_LINEAR}conv1d.weight", "conv"),
    "attn/dt_bias": Rule(f"{_LINEAR}dt_bias"),
    "attn/A_log": Rule(f"{_LINEAR}A_log"),
    "attn/norm/scale": Rule(f"{_LINEAR}norm.weight"),
    "attn/out_proj/kernel": Rule(f"{_LINEAR}out_proj.weight", "linear2"),
}

register(Family("qwen3_next", from_hf, to_hf, {
    **NORM_RULES, **GQA_RULES, **LINEAR_RULES, **DENSE_RULES, **moe_rules("mlp"),
    **glu_rules("ffn/shared", "model.layers.{i}.mlp.shared_expert"),
    "ffn/shared_gate/kernel": Rule("model.layers.{i}.mlp.shared_expert_gate.weight", "linear")},
    ignored=frozenset({"full_attention_interval"}), skipped_prefixes=("mtp.",),
    expresses=frozenset({"norm", "partial_rotary_factor", "attention_gate"})))
