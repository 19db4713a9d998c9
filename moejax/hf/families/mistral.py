"""Mistral (``mistralai/Mistral-7B-v0.1``, ``Mistral-Nemo``): Llama's layout without biases, with a ``sliding_window``
on every layer when it is set (transformers' default 4096 when config.json has no such field; null: full attention)
and an optional ``head_dim``. transformers' Mistral ignores ``layer_types``."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import dense_common
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES

DEFAULT_WINDOW = 4096  # MistralConfig.sliding_window


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    dense_common.read_dense(hf, m, 1e-6)
    window = hf.get("sliding_window") if "sliding_window" in hf.raw else DEFAULT_WINDOW
    dense_common.read_windows(hf, m, window, None)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = dense_common.write_dense(m, s, "MistralForCausalLM")
    config.write_no_extras(m, s, sliding=True)
    s.need("layer_types", len(set(m.layer_types)) <= 1, "Mistral's sliding window applies to every layer or to none")
    s.need("qk_norm", not m.qk_norm, "Mistral has no query/key norm")
    s.need("qkv_bias", not m.qkv_bias, "Mistral's projections have no biases")
    s.need("o_bias", not m.o_bias, "Mistral's projections have no biases")
    out["sliding_window"] = dense_common.write_windows(m)[0]
    return out


# layer_types: not read by transformers' Mistral (it warns, and masks by sliding_window alone)
register(Family("mistral", from_hf, to_hf, {**NORM_RULES, **GQA_RULES, **DENSE_RULES}, frozenset({"layer_types"})))
