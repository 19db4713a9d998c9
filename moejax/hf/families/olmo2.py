"""OLMo 2 (``allenai/OLMo-2-1124-7B``, arXiv 2501.00656): grouped-query attention with an RMSNorm over the whole q
and k projections (``qk_norm_scope='proj'``) and one ``attention_bias`` for q, k, v and o; a dense SwiGLU in every
layer; the block's norms after attention and after the MLP, before each residual add (``model.norm_position='post'``:
``post_attention_layernorm``, ``post_feedforward_layernorm``), with no norm on the block's input. Heads are
hidden_size // num_attention_heads wide."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.families import dense_common
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, Rule

# the post-norm layout's block norms (model.norm_position='post'), as OLMo 2 (and FlexOlmo) name them
POST_NORM_RULES = {
    "post_attn_norm/scale": Rule("model.layers.{i}.post_attention_layernorm.weight"),
    "post_ffn_norm/scale": Rule("model.layers.{i}.post_feedforward_layernorm.weight"),
}


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    dense_common.read_dense(hf, m, 1e-5)
    config.read_no_sliding(hf)
    if m.head_dim:
        hf.refuse("head_dim", m.head_dim, "transformers' OLMo 2 sizes its q/k norms by hidden_size // num_heads")
    m.norm_position = "post"
    m.qkv_bias = m.o_bias = bool(hf.get("attention_bias", False))
    m.qk_norm, m.qk_norm_scope = True, "proj"


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = dense_common.write_dense(m, s, "Olmo2ForCausalLM")
    config.write_no_extras(m, s)
    s.need("norm_position", m.norm_position == "post", "OLMo 2 normalises each block's attention and MLP outputs")
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "proj", "OLMo 2 normalises the whole q and k projections")
    s.need("head_dim", not m.head_dim, "OLMo 2's heads are d_model // num_heads wide")
    s.need("o_bias", m.o_bias == m.qkv_bias, "OLMo 2 has one attention_bias for q, k, v and o")
    out.pop("head_dim")
    out["attention_bias"] = bool(m.qkv_bias)
    return out


register(Family("olmo2", from_hf, to_hf, {**POST_NORM_RULES, **GQA_RULES, **DENSE_RULES},
                expresses=frozenset({"norm_position"})))
