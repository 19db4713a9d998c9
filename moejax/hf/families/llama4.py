"""Llama 4's text model (``Llama4ForCausalLM``, model_type ``llama4_text``; the language model of
``meta-llama/Llama-4-Scout-17B-16E`` and ``-Maverick-17B-128E``): grouped-query attention rotating interleaved pairs
(transformers multiplies complex pairs (x0, x1), (x2, x3), ...: moejax's ``rope_interleave``) with Llama 3.1's
frequency bands; NoPE layers without a rotary embedding (``no_rope_layers`` 0: moejax's ``nope_layers``) whose
queries get the attention temperature ``1 + attn_scale * log(1 + floor((p + 1) / floor_scale))`` when
``attn_temperature_tuning`` (moejax's ``attn_temperature_scale`` / ``_floor``); on the rotary layers, chunked
attention (``layer_types`` 'chunked_attention', ``attention_chunk_size``: moejax's 'chunked' layers) and, with
``use_qk_norm``, an RMSNorm without a scale of each query and key head after the rotary embedding (moejax's
``qk_norm_scope='l2'``). MoE layers by ``moe_layers`` or ``interleave_moe_layer_step``, the others a dense SwiGLU of
``intermediate_size_mlp``; a MoE layer routes each token to its top-1 expert by logit, and the expert's input is the
token times the sigmoid of that logit (moejax's ``moe.scale_expert_input``), plus an ungated shared expert of
``intermediate_size``; the experts are stored stacked, gate and up concatenated in ``gate_up_proj`` [E, D, 2F]."""
from __future__ import annotations

import math
from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import dense_common
from moejax.hf.registry import Family, register
from moejax.hf.rules import GQA_RULES, NORM_RULES, Rule, glu_rules
from moejax.layout import moe_layers

LAYER_TYPES = {"full_attention": "full", "chunked_attention": "chunked"}


def _read_moe_layers(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    """transformers' MoE layers (``moe_layers``, else every ``interleave_moe_layer_step``-th from step - 1) as
    moejax's first_dense_layers, moe_every and dense_layers."""
    step = hf.expect("interleave_moe_layer_step", lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1",
                     1)
    layers = hf.get("moe_layers")
    if layers is None:
        layers = list(range(step - 1, m.num_layers, step))
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        hf.refuse("moe_layers", layers, "must be a list of layer indices")
    wanted = sorted({i for i in layers if 0 <= i < m.num_layers})
    if not wanted:
        m.moe_every, m.moe.num_experts = 0, max(m.moe.num_experts, 1)  # every layer dense
        return
    pattern = list(range(wanted[0], m.num_layers, step))
    if step > 1 and wanted == pattern:
        m.first_dense_layers, m.moe_every = wanted[0], step
        return
    m.first_dense_layers, m.moe_every = wanted[0], 1
    m.dense_layers = tuple(i for i in range(wanted[0], m.num_layers) if i not in wanted)


def _read_attention(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    m.num_kv_heads = int(hf.get("num_key_value_heads", m.num_heads))
    head_dim = int(hf.get("head_dim", 128))  # Llama4TextConfig's default, whatever hidden_size / heads
    m.head_dim = 0 if m.d_model % m.num_heads == 0 and head_dim == m.d_model // m.num_heads else head_dim
    scaled = dense_common._take_scaling(hf, 500000.0, ("llama3",))
    config.read_rope(hf, m, 500000.0)
    if scaled is not None:
        dense_common._read_scaling(hf, m, scaled)
    m.rope_interleave = True
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    if hf.get("use_qk_norm", True):
        m.qk_norm, m.qk_norm_scope = True, "l2"
    rope = hf.get("no_rope_layers")
    if not rope:  # transformers' default: a NoPE layer every no_rope_layer_interval layers
        interval = hf.expect("no_rope_layer_interval", lambda v: isinstance(v, int) and v >= 1,
                             "must be an integer >= 1", 4)
        rope = [int((i + 1) % interval != 0) for i in range(m.num_layers)]
    else:
        hf.used.add("no_rope_layer_interval")
    if not isinstance(rope, list) or len(rope) < m.num_layers or any(v not in (0, 1) for v in rope):
        hf.refuse("no_rope_layers", rope, f"must give 1 (rotary) or 0 (NoPE) for each of the {m.num_layers} layers")
    m.nope_layers = tuple(i for i in range(m.num_layers) if not rope[i])
    chunk = hf.get("attention_chunk_size")
    kinds = hf.get("layer_types")
    if kinds is None:
        kinds = ["chunked_attention" if rope[i] and chunk is not None else "full_attention"
                 for i in range(m.num_layers)]
    if len(kinds) != m.num_layers or any(k not in LAYER_TYPES for k in kinds):
        hf.refuse("layer_types", kinds, f"one of {sorted(LAYER_TYPES)} per layer")
    if "chunked_attention" in kinds:
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            hf.refuse("attention_chunk_size", chunk, "chunked layers need an integer chunk >= 1")
        m.layer_types, m.attention_chunk_size = tuple(LAYER_TYPES[k] for k in kinds), chunk
    if hf.get("attn_temperature_tuning", True):  # the released configs write 4: any true value turns it on
        floor = hf.get("floor_scale", 8192)
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 1:
            hf.refuse("floor_scale", floor, "moejax's attn_temperature_floor is an integer >= 1")
        m.attn_temperature_scale = float(hf.get("attn_scale", 0.1))
        m.attn_temperature_floor = floor
    else:
        hf.used.update({"floor_scale", "attn_scale"})


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-5)
    _read_attention(hf, m)
    m.ffn_dim = int(hf.get("intermediate_size_mlp", 16384))
    m.moe.num_experts = int(hf.get("num_local_experts", 16))
    m.moe.top_k = hf.expect("num_experts_per_tok", lambda v: v == 1, "moejax scales the routed expert's input by "
                            "its weight for one expert per token only (the released models route to one)", 1)
    m.moe.expert_ffn = int(hf.get("intermediate_size", 8192))
    config.read_router(m, score="sigmoid", norm_topk_prob=False)
    m.moe.update(scale_expert_input=True, num_shared=1, shared_ffn=0, balance_loss="switch",
                 balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    _read_moe_layers(hf, m)


def _write_attention(m: ml_collections.ConfigDict, s: Saving, out: dict[str, Any]) -> None:
    s.need("attention", m.attention == "gqa", "Llama 4 has grouped-query attention")
    s.need("rope_interleave", m.rope_interleave, "Llama 4 rotates interleaved pairs")
    s.need("rope_scaling.kind", m.rope_scaling.kind in ("none", "llama3"), "Llama 4's rotary scalings in moejax: "
                                                                          "'none', 'llama3'")
    config.write_no_extras(m, s, sliding=True)
    s.need("layer_types", all(k in ("full", "chunked") for k in m.layer_types), "Llama 4's layers are full or "
                                                                              "chunked")
    s.need("qk_norm", not m.qk_norm or m.qk_norm_scope == "l2", "Llama 4's query/key norm has no scale and follows "
                                                               "the rotary embedding (qk_norm_scope='l2')")
    s.need("o_bias", m.o_bias == m.qkv_bias, "Llama 4 has one attention_bias for q, k, v and o")
    rs = m.rope_scaling
    if rs.kind == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
        out["max_position_embeddings"] = int(math.ceil(rs.factor * rs.original_max_position_embeddings))
    nope = set(m.nope_layers)
    kinds = tuple(m.layer_types) or ("full",) * m.num_layers
    out.update(num_key_value_heads=m.num_kv_heads or m.num_heads, head_dim=m.head_dim or m.d_model // m.num_heads,
               attention_bias=bool(m.qkv_bias), use_qk_norm=bool(m.qk_norm),
               no_rope_layers=[int(i not in nope) for i in range(m.num_layers)],
               layer_types=[{"full": "full_attention", "chunked": "chunked_attention"}[k] for k in kinds],
               attention_chunk_size=m.attention_chunk_size if "chunked" in kinds else None,
               attn_temperature_tuning=bool(m.attn_temperature_scale), attn_scale=m.attn_temperature_scale,
               floor_scale=m.attn_temperature_floor)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    common = m.copy_and_resolve_references()  # write_common writes 'none' and 'yarn'; llama3 is written here
    if m.rope_scaling.kind == "llama3":
        common.rope_scaling.kind = "none"
    out = config.write_common(common, s, "Llama4ForCausalLM")
    _write_attention(m, s, out)
    layers = moe_layers(m)
    if layers:
        moe, r = m.moe, m.moe.router
        s.need("moe.scale_expert_input", moe.scale_expert_input, "Llama 4's routing weight scales the expert's "
                                                                 "input")
        config.write_plain_router(m, s)
        s.need("moe.router.score", r.score == "sigmoid" and not r.norm_topk_prob, "Llama 4's weight is the sigmoid "
                                                                                 "of the selected logit")
        s.need("moe.num_shared", moe.num_shared == 1, "Llama 4 has one shared expert")
        s.need("moe.shared_ffn", moe.shared_ffn in (0, moe.expert_ffn), "Llama 4's shared expert is "
                                                                        "intermediate_size wide, as its experts")
        s.need("moe.shared_gate", not moe.shared_gate, "Llama 4's shared expert is not gated")
    step = m.moe_every
    interleave = step if layers and layers == list(range(step - 1, m.num_layers, step)) else 1
    out.update(intermediate_size=m.moe.expert_ffn, intermediate_size_mlp=m.ffn_dim,
               num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, moe_layers=layers,
               interleave_moe_layer_step=interleave, router_aux_loss_coef=m.moe.balance_coef)
    return out


_FFN = "model.layers.{i}.feed_forward"
LAYER_RULES = {
    **NORM_RULES, **GQA_RULES,
    **glu_rules("ffn", _FFN),
    "ffn/router/kernel": Rule(f"{_FFN}.router.weight", "linear"),
    "ffn/experts/wi_0": Rule(f"{_FFN}.experts.gate_up_proj", "first"),
    "ffn/experts/wi_1": Rule(f"{_FFN}.experts.gate_up_proj", "second"),
    "ffn/experts/wo": Rule(f"{_FFN}.experts.down_proj"),
    **glu_rules("ffn/shared", f"{_FFN}.shared_expert"),
    "ffn/router_bias": Rule("", "zeros"),
}

# fields transformers' Llama 4 text model does not read: the router noise of its training, the generation cache's
# kind, a flag of the released configs for an external compressor
IGNORED = frozenset({"router_jitter_noise", "cache_implementation", "for_llm_compressor"})

register(Family("llama4_text", from_hf, to_hf, LAYER_RULES, IGNORED,
                expresses=frozenset({"nope_layers", "attention_chunk_size", "attn_temperature_scale",
                                     "moe.scale_expert_input"})))
