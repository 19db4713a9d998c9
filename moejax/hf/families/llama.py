"""Llama (``meta-llama/Llama-3.1-8B``, Llama 2, and the many checkpoints in its layout): grouped-query attention with
one optional ``attention_bias`` for q, k, v and o; a dense SwiGLU in every layer; RMSNorm before attention and the
MLP; the rotary embedding with Llama 3.1's frequency-band scaling ('llama3'), linear position interpolation, YaRN or
LongRoPE; optionally tied embeddings. ``mlp_bias`` (biases on the MLP's projections) has no moejax equivalent."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import dense_common
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    dense_common.read_dense(hf, m, 1e-6)
    config.read_no_sliding(hf)
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    hf.expect("mlp_bias", config.falsy, "moejax's dense GLU has no biases", False)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = dense_common.write_dense(m, s, "LlamaForCausalLM")
    config.write_no_extras(m, s)
    s.need("qk_norm", not m.qk_norm, "Llama has no query/key norm")
    s.need("o_bias", m.o_bias == m.qkv_bias, "Llama has one attention_bias for q, k, v and o")
    out.update(attention_bias=bool(m.qkv_bias), mlp_bias=False)
    return out


register(Family("llama", from_hf, to_hf, {**NORM_RULES, **GQA_RULES, **DENSE_RULES}))
