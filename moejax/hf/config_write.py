"""moejax -> config.json: the config.json of a moejax model section written as one released family, one
``to_<family>`` per family. ``Saving`` checks the model config against what the family can express; every field it
cannot express raises ``HFConfigError`` naming the field, its value and why.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections

from moejax.hf.config_read import HFConfigError


class Saving:
    """Checks of a moejax model config against what one family can express; every failure names the field."""

    def __init__(self, m: ml_collections.ConfigDict, model_type: str):
        self.m, self.model_type = m, model_type

    def need(self, field: str, ok: bool, why: str) -> None:
        if not ok:
            value = self.m
            for part in field.split("."):
                value = value[part]
            raise HFConfigError(f"moejax config field model.{field}={value!r} cannot be saved as "
                                f"{self.model_type}: {why}")


def _moe_layers(m: ml_collections.ConfigDict) -> list[int]:
    dense = set(m.dense_layers)
    return [i for i in range(m.num_layers) if m.moe_every > 0 and i >= m.first_dense_layers
            and (i - m.first_dense_layers) % m.moe_every == 0 and i not in dense]


def _common_hf(m: ml_collections.ConfigDict, s: Saving, architecture: str) -> dict[str, Any]:
    s.need("scan_layers", not m.scan_layers, "save unstacked layers (scan_layers=False)")
    s.need("moe.router.kind", m.moe.router.kind == "topk", "released families route by top-k")
    s.need("moe.num_null_experts", m.moe.num_null_experts == 0, "released families have no null experts")
    s.need("moe.chain_iterations", m.moe.chain_iterations == 1, "released families route once per layer")
    s.need("moe.dispatch", m.moe.dispatch == "dropless", "transformers computes every routed slot: set "
                                                         "model.moe.dispatch='dropless' to save the model it runs")
    s.need("rope_scaling.kind", m.rope_scaling.kind in ("none", "yarn"), "allowed: 'none', 'yarn'")
    act = {"silu": "silu", "relu": "relu", "gelu": "gelu_pytorch_tanh"}
    s.need("moe.activation", m.moe.activation in act, f"allowed: {sorted(act)}")
    out: dict[str, Any] = {
        "architectures": [architecture], "model_type": s.model_type, "vocab_size": m.vocab_size,
        "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": bool(m.tie_embeddings), "initializer_range": m.init_std,
        "hidden_act": act[m.moe.activation], "attention_dropout": 0.0, "torch_dtype": m.param_dtype,
        "rope_theta": m.rope_theta, "rope_scaling": None, "max_position_embeddings": 4096,
    }
    if m.rope_scaling.kind == "yarn":
        r = m.rope_scaling
        out["rope_scaling"] = {"rope_type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast,
                               "beta_slow": r.beta_slow, "truncate": bool(r.truncate),
                               "original_max_position_embeddings": r.original_max_position_embeddings}
        if r.mscale_all_dim:  # without it moejax, like transformers, uses mscale(factor) and ignores mscale
            out["rope_scaling"]["mscale_all_dim"] = r.mscale_all_dim
            if r.mscale:
                out["rope_scaling"]["mscale"] = r.mscale
        out["max_position_embeddings"] = int(math.ceil(r.factor * r.original_max_position_embeddings))
    return out


def _gqa_hf(m: ml_collections.ConfigDict, s: Saving, out: dict[str, Any]) -> None:
    s.need("attention", m.attention == "gqa", "this family has grouped-query attention")
    s.need("rope_interleave", not m.rope_interleave, "this family rotates the two halves of each head")
    out["num_key_value_heads"] = m.num_kv_heads or m.num_heads
    out["head_dim"] = m.head_dim or m.d_model // m.num_heads


def _no_extras(m: ml_collections.ConfigDict, s: Saving, *, sinks: bool = False, sliding: bool = False,
               clip: bool = False) -> None:
    if not sinks:
        s.need("attention_sinks", not m.attention_sinks, "this family has no attention sinks")
    if not sliding:
        s.need("layer_types", all(t == "full" for t in m.layer_types), "this family has no sliding-window layers")
    if not clip:
        s.need("clip_qkv", not m.clip_qkv, "this family does not clip q, k and v")


def _topk_renormalised(m: ml_collections.ConfigDict) -> bool:
    r = m.moe.router
    return r.score == "softmax" and (r.norm_topk_prob or not r.softmax_before_topk)


def _plain_router(m: ml_collections.ConfigDict, s: Saving) -> None:
    r = m.moe.router
    s.need("moe.router.num_groups", r.num_groups == 1, "this family has no group-limited routing")
    s.need("moe.router.routed_scaling_factor", r.routed_scaling_factor == 1.0, "this family does not scale the "
                                                                                "routing weights")
    s.need("moe.router.bias", not r.bias, "this family's router has no bias")
    s.need("moe.expert_kind", m.moe.expert_kind == "glu", "this family's experts are GLUs")


def _all_moe(m: ml_collections.ConfigDict, s: Saving) -> None:
    s.need("first_dense_layers", m.first_dense_layers == 0, "every layer of this family is MoE")
    s.need("moe_every", m.moe_every == 1, "every layer of this family is MoE")
    s.need("dense_layers", not m.dense_layers, "every layer of this family is MoE")


def to_mixtral(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "MixtralForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s)
    s.need("qkv_bias", not m.qkv_bias, "Mixtral's projections have no biases")
    s.need("o_bias", not m.o_bias, "Mixtral's projections have no biases")
    s.need("qk_norm", not m.qk_norm, "Mixtral has no query/key norm")
    _all_moe(m, s)
    _plain_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "Mixtral has no shared experts")
    s.need("moe.router.score", _topk_renormalised(m), "Mixtral's weights are the softmax renormalised over the "
                                                       "top-k (score='softmax' with norm_topk_prob or "
                                                       "softmax_before_topk=False)")
    out.update(intermediate_size=m.moe.expert_ffn, num_local_experts=m.moe.num_experts,
               num_experts_per_tok=m.moe.top_k, sliding_window=None, router_jitter_noise=0.0,
               router_aux_loss_coef=m.moe.balance_coef)
    return out


def _qwen_pattern(m: ml_collections.ConfigDict, out: dict[str, Any]) -> None:
    moe_layers = _moe_layers(m)
    step = m.moe_every
    if step >= 1 and m.first_dense_layers == step - 1 and not m.dense_layers:
        out.update(decoder_sparse_step=step, mlp_only_layers=[])
    else:
        out.update(decoder_sparse_step=1, mlp_only_layers=[i for i in range(m.num_layers) if i not in moe_layers])


def _qwen_router(m: ml_collections.ConfigDict, s: Saving) -> None:
    r = m.moe.router
    _plain_router(m, s)
    s.need("moe.router.score", r.score == "softmax", "Qwen's router is a softmax")
    s.need("moe.router.softmax_before_topk", r.softmax_before_topk or r.norm_topk_prob,
           "Qwen takes the top-k of the softmax (with norm_topk_prob the two orders agree)")


def to_qwen2_moe(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "Qwen2MoeForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s)
    s.need("o_bias", not m.o_bias, "Qwen2-MoE's output projection has no bias")
    s.need("qk_norm", not m.qk_norm, "Qwen2-MoE has no query/key norm")
    _qwen_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared >= 1, "Qwen2-MoE always has a shared expert")
    s.need("moe.shared_gate", m.moe.shared_gate, "Qwen2-MoE always gates its shared expert")
    _qwen_pattern(m, out)
    out.update(qkv_bias=bool(m.qkv_bias), intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               shared_expert_intermediate_size=m.moe.shared_ffn or m.moe.num_shared * m.moe.expert_ffn,
               num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               norm_topk_prob=bool(m.moe.router.norm_topk_prob), use_sliding_window=False,
               router_aux_loss_coef=m.moe.balance_coef)
    return out


def to_qwen3_moe(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "Qwen3MoeForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "head", "Qwen3-MoE normalises each head's queries and keys")
    s.need("o_bias", m.o_bias == m.qkv_bias, "Qwen3-MoE has one attention_bias for q, k, v and o")
    _qwen_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "Qwen3-MoE has no shared experts")
    _qwen_pattern(m, out)
    out.update(attention_bias=bool(m.qkv_bias), intermediate_size=m.ffn_dim,
               moe_intermediate_size=m.moe.expert_ffn, num_experts=m.moe.num_experts,
               num_experts_per_tok=m.moe.top_k, norm_topk_prob=bool(m.moe.router.norm_topk_prob),
               use_sliding_window=False, router_aux_loss_coef=m.moe.balance_coef)
    return out


def to_olmoe(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "OlmoeForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s, clip=True)
    s.need("qk_norm", m.qk_norm and m.qk_norm_scope == "proj", "OLMoE normalises the whole q and k projections")
    s.need("head_dim", not m.head_dim, "OLMoE's heads are d_model // num_heads wide")
    s.need("o_bias", m.o_bias == m.qkv_bias, "OLMoE has one attention_bias for q, k, v and o")
    _qwen_router(m, s)
    _all_moe(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "OLMoE has no shared experts")
    out.pop("head_dim")
    out.update(attention_bias=bool(m.qkv_bias), clip_qkv=m.clip_qkv or None, intermediate_size=m.moe.expert_ffn,
               num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               norm_topk_prob=bool(m.moe.router.norm_topk_prob), router_aux_loss_coef=m.moe.balance_coef)
    return out


def _to_deepseek(m: ml_collections.ConfigDict, s: Saving, architecture: str) -> dict[str, Any]:
    out = _common_hf(m, s, architecture)
    s.need("attention", m.attention == "mla", "DeepSeek has Multi-head Latent Attention")
    _no_extras(m, s)
    s.need("qk_norm", not m.qk_norm, "DeepSeek has no query/key norm")
    s.need("moe.router.bias", not m.moe.router.bias, "DeepSeek's router has no bias")
    s.need("moe.expert_kind", m.moe.expert_kind == "glu", "DeepSeek's experts are GLUs")
    s.need("moe.shared_gate", not m.moe.shared_gate, "DeepSeek's shared experts are not gated")
    s.need("moe.shared_ffn", m.moe.shared_ffn in (0, m.moe.num_shared * m.moe.expert_ffn),
           "DeepSeek's shared experts are n_shared_experts * moe_intermediate_size wide")
    s.need("moe_every", m.moe_every == 1, "DeepSeek's layers from first_k_dense_replace on are all MoE")
    s.need("dense_layers", not m.dense_layers, "DeepSeek's layers from first_k_dense_replace on are all MoE")
    mla = m.mla
    out.update(num_key_value_heads=m.num_heads, q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
               qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
               v_head_dim=mla.v_head_dim, intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               n_routed_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, n_shared_experts=m.moe.num_shared,
               first_k_dense_replace=m.first_dense_layers, routed_scaling_factor=m.moe.router.routed_scaling_factor,
               attention_bias=False)
    return out


def to_deepseek_v2(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _to_deepseek(m, s, "DeepseekV2ForCausalLM")
    r = m.moe.router
    s.need("rope_interleave", m.rope_interleave, "DeepSeek-V2 rotates interleaved pairs")
    s.need("moe.router.score", r.score == "softmax" and r.softmax_before_topk and not r.norm_topk_prob,
           "DeepSeek-V2 weights are the unnormalised softmax probabilities of the selected experts")
    if r.num_groups > 1:
        s.need("moe.router.group_score", r.group_score == "max", "DeepSeek-V2 scores a group by its best expert")
        out.update(topk_method="group_limited_greedy", n_group=r.num_groups, topk_group=r.topk_groups)
    else:
        out.update(topk_method="greedy", n_group=None, topk_group=None)
    out["norm_topk_prob"] = False
    return out


def to_deepseek_v3(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _to_deepseek(m, s, "DeepseekV3ForCausalLM")
    r = m.moe.router
    s.need("moe.router.score", r.score == "sigmoid", "DeepSeek-V3's router is a sigmoid")
    if r.num_groups > 1:
        s.need("moe.router.group_score", r.group_score == "top2_sum", "DeepSeek-V3 scores a group by its two best")
        s.need("moe.router.group_mask_fill", r.group_mask_fill == float("-inf"),
               "DeepSeek-V3 masks the other groups with -inf")
    out.update(rope_interleave=bool(m.rope_interleave), n_group=r.num_groups,
               topk_group=r.topk_groups if r.num_groups > 1 else 1, norm_topk_prob=bool(r.norm_topk_prob),
               num_nextn_predict_layers=0)
    return out


def to_gpt_oss(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = _common_hf(m, s, "GptOssForCausalLM")
    _gqa_hf(m, s, out)
    _no_extras(m, s, sinks=True, sliding=True)
    s.need("attention_sinks", m.attention_sinks, "GPT-OSS always has attention sinks")
    s.need("qk_norm", not m.qk_norm, "GPT-OSS has no query/key norm")
    s.need("o_bias", m.o_bias == m.qkv_bias, "GPT-OSS has one attention_bias for q, k, v and o")
    _all_moe(m, s)
    s.need("moe.num_shared", m.moe.num_shared == 0, "GPT-OSS has no shared experts")
    s.need("moe.expert_kind", m.moe.expert_kind == "gpt_oss", "GPT-OSS's experts are its clamped biased SwiGLU")
    r = m.moe.router
    s.need("moe.router.bias", r.bias, "GPT-OSS's router has a bias")
    s.need("moe.router.score", _topk_renormalised(m), "GPT-OSS's weights are the softmax over the top-k logits")
    s.need("moe.router.num_groups", r.num_groups == 1, "GPT-OSS has no group-limited routing")
    s.need("moe.router.routed_scaling_factor", r.routed_scaling_factor == 1.0, "GPT-OSS does not scale weights")
    kinds = tuple(m.layer_types) or ("full",) * m.num_layers
    out.update(attention_bias=bool(m.qkv_bias), intermediate_size=m.moe.expert_ffn,
               num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               swiglu_limit=m.moe.swiglu_limit, swiglu_alpha=m.moe.swiglu_alpha,
               layer_types=[{"full": "full_attention", "sliding": "sliding_attention"}[k] for k in kinds],
               # transformers' GPT-OSS builds a sliding mask even when no layer slides: give it a window
               sliding_window=m.sliding_window or 128, router_aux_loss_coef=m.moe.balance_coef)
    if out["rope_scaling"] is None:
        out["rope_scaling"] = {"rope_type": "default"}  # not transformers' GPT-OSS default (yarn)
    return out
