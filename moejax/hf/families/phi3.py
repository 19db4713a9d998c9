"""Phi-3 / Phi-4-mini (``microsoft/Phi-3-mini-4k-instruct``, ``microsoft/Phi-4-mini-instruct``): grouped-query
attention whose q, k and v projections are one fused ``qkv_proj`` and whose MLP gate and up projections are one fused
``gate_up_proj`` (split on load, concatenated on save); no biases; LongRoPE (``rope_scaling`` 'longrope', the hub's
'su' / 'yarn' read as it) on the first ``partial_rotary_factor`` of each head; a ``sliding_window`` on every layer
when set. Heads are hidden_size // num_attention_heads wide."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import dense_common
from moejax.hf.registry import Family, register
from moejax.hf.rules import NORM_RULES, Rule, fused_rules

_ATTN, _MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."


def _take_partial(hf: HFConfig) -> float:
    """partial_rotary_factor (inside the rope parameters first, as transformers' Phi3Config reads it, else top
    level; default 1), taken out of the HFConfig being read: the shared rotary reader refuses a partial one."""
    partial = None
    for field in ("rope_scaling", "rope_parameters"):
        params = hf.raw.get(field)
        if isinstance(params, dict):
            params = hf.raw[field] = dict(params)
            if (params.get("rope_type") or params.get("type")) in ("su", "yarn"):  # Phi3Config reads both as longrope
                params.pop("type", None)
                params["rope_type"] = "longrope"
            if partial is None and params.get("partial_rotary_factor") is not None:
                partial = params["partial_rotary_factor"]
            params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = hf.raw.get("partial_rotary_factor")
    hf.raw.pop("partial_rotary_factor", None)
    hf.used.add("partial_rotary_factor")
    return float(1.0 if partial is None else partial)


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    partial = _take_partial(hf)
    dense_common.read_dense(hf, m, 1e-5, rope_kinds=("longrope",))
    hf.used.add("original_max_position_embeddings")
    if m.head_dim:
        hf.refuse("head_dim", m.head_dim, "transformers' Phi-3 rotary embedding sizes heads by hidden_size // "
                                          "num_attention_heads")
    m.partial_rotary_factor = partial
    dense_common.read_windows(hf, m, hf.get("sliding_window"), None)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = dense_common.write_dense(m, s, "Phi3ForCausalLM", rope_kinds=("longrope",))
    config.write_no_extras(m, s, sliding=True)
    s.need("layer_types", len(set(m.layer_types)) <= 1, "Phi-3's sliding window applies to every layer or to none")
    s.need("qk_norm", not m.qk_norm, "Phi-3 has no query/key norm")
    s.need("qkv_bias", not m.qkv_bias, "Phi-3's projections have no biases")
    s.need("o_bias", not m.o_bias, "Phi-3's projections have no biases")
    s.need("head_dim", not m.head_dim, "Phi-3's heads are d_model // num_heads wide")
    out.pop("head_dim")
    rope = out.get("rope_scaling")
    if rope is not None:  # Phi3Config prefers the top-level original_max_position_embeddings
        out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        rope["partial_rotary_factor"] = m.partial_rotary_factor
    out.update(partial_rotary_factor=m.partial_rotary_factor, sliding_window=dense_common.write_windows(m)[0],
               resid_pdrop=0.0, embd_pdrop=0.0,
               pad_token_id=None)  # Phi3Config's default padding row 32000 is past a smaller vocabulary
    return out


LAYER_RULES = {
    **NORM_RULES,
    **fused_rules(f"{_ATTN}qkv_proj.weight", ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel")),
    "attn/o/kernel": Rule(f"{_ATTN}o_proj.weight", "linear2"),
    **fused_rules(f"{_MLP}gate_up_proj.weight", ("ffn/wi_0", "ffn/wi_1")),
    "ffn/wo": Rule(f"{_MLP}down_proj.weight", "linear"),
}
# resid_pdrop, embd_pdrop: dropout, training only
register(Family("phi3", from_hf, to_hf, LAYER_RULES, frozenset({"resid_pdrop", "embd_pdrop"}),
                expresses=frozenset({"partial_rotary_factor"})))
