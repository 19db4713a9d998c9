"""Qwen2 / Qwen2.5 (``Qwen/Qwen2.5-7B``): grouped-query attention with biases on q, k and v (not o); a dense SwiGLU
in every layer; sliding windows on the layers from ``max_window_layers`` on when ``use_sliding_window`` is set (or
as ``layer_types`` says). Also the Qwen window reading that qwen3.py reuses."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import dense_common
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES


def read_qwen_windows(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    """transformers' Qwen2Config: the window is sliding_window when use_sliding_window is set (else none); without
    layer_types, layer i slides when there is a window and i >= max_window_layers."""
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    hf.used.update({"sliding_window", "max_window_layers"})
    kinds = hf.get("layer_types")
    if kinds is None:
        first = hf.get("max_window_layers", 28)
        kinds = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(m.num_layers)]
    dense_common.read_windows(hf, m, window, list(kinds))


def write_qwen_windows(m: ml_collections.ConfigDict, out: dict[str, Any]) -> None:
    window, kinds = dense_common.write_windows(m)
    full = [i for i, k in enumerate(kinds) if k == "full_attention"]
    out.update(use_sliding_window=window is not None, sliding_window=window, layer_types=kinds,
               max_window_layers=len(full) if full == list(range(len(full))) else m.num_layers)


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    dense_common.read_dense(hf, m, 1e-6)
    read_qwen_windows(hf, m)
    m.qkv_bias, m.o_bias = True, False


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = dense_common.write_dense(m, s, "Qwen2ForCausalLM")
    config.write_no_extras(m, s, sliding=True)
    s.need("qkv_bias", m.qkv_bias, "Qwen2 has biases on q, k and v")
    s.need("o_bias", not m.o_bias, "Qwen2's output projection has no bias")
    s.need("qk_norm", not m.qk_norm, "Qwen2 has no query/key norm")
    write_qwen_windows(m, out)
    return out


register(Family("qwen2", from_hf, to_hf, {**NORM_RULES, **GQA_RULES, **DENSE_RULES}))
