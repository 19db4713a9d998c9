"""Qwen3 (``Qwen/Qwen3-8B``): Qwen2's layout and sliding windows with a per-head query/key RMSNorm, one
``attention_bias`` for q, k, v and o (off in the released models), and heads ``head_dim`` wide (transformers'
default 128 when config.json has none)."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import dense_common, qwen2
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES

DEFAULT_HEAD_DIM = 128  # Qwen3Config.head_dim


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    if hf.raw.get("head_dim") is None:
        hf.raw["head_dim"] = DEFAULT_HEAD_DIM
    dense_common.read_dense(hf, m, 1e-6)
    qwen2.read_qwen_windows(hf, m)
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope = True, "head"


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = dense_common.write_dense(m, s, "Qwen3ForCausalLM")
    config.write_no_extras(m, s, sliding=True)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "head", "Qwen3 normalises each head's queries and keys")
    s.need("o_bias", m.o_bias == m.qkv_bias, "Qwen3 has one attention_bias for q, k, v and o")
    qwen2.write_qwen_windows(m, out)
    out["attention_bias"] = bool(m.qkv_bias)
    return out


register(Family("qwen3", from_hf, to_hf, {**NORM_RULES, **GQA_RULES, **DENSE_RULES}))
