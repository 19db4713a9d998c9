"""Qwen2-MoE (``Qwen/Qwen1.5-MoE-A2.7B``, ``Qwen/Qwen2-57B-A14B``): grouped-query attention with q/k/v biases; MoE
layers by ``decoder_sparse_step`` and ``mlp_only_layers``, the others dense; a softmax top-k router; one sigmoid-gated
shared expert. Also the Qwen pieces that qwen3_moe.py (and olmoe.py, for the router) reuse."""
from __future__ import annotations

from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.hf.registry import Family, register
from moejax.hf.rules import DENSE_RULES, GQA_RULES, NORM_RULES, Rule, glu_rules, moe_rules


def read_experts(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    m.ffn_dim = hf.need("intermediate_size")
    m.moe.num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)))
    m.moe.top_k = hf.need("num_experts_per_tok")
    m.moe.expert_ffn = hf.need("moe_intermediate_size")
    config.read_router(m, score="softmax", softmax_before_topk=True,
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    m.moe.update(balance_loss="switch", balance_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def read_layer_pattern(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    """Qwen's decoder_sparse_step s (layer i is MoE when (i + 1) % s == 0) and mlp_only_layers."""
    step = hf.get("decoder_sparse_step", 1)
    if m.moe.num_experts == 0:
        m.moe_every = 0
        m.moe.num_experts = 1  # unused: every layer dense
        return
    if not isinstance(step, int) or step < 1:
        hf.refuse("decoder_sparse_step", step, "must be an integer >= 1")
    m.first_dense_layers, m.moe_every = step - 1, step
    dense = sorted(set(hf.get("mlp_only_layers") or ()))
    if step == 1:  # a leading run of dense layers is moejax's first_dense_layers
        while dense and dense[0] == m.first_dense_layers:
            dense.pop(0)
            m.first_dense_layers += 1
    m.dense_layers = tuple(i for i in dense if i < m.num_layers)


def write_layer_pattern(m: ml_collections.ConfigDict, out: dict[str, Any]) -> None:
    step = m.moe_every
    if step >= 1 and m.first_dense_layers == step - 1 and not m.dense_layers:
        out.update(decoder_sparse_step=step, mlp_only_layers=[])
        return
    dense = set(m.dense_layers)
    moe_layers = [i for i in range(m.num_layers) if m.moe_every > 0 and i >= m.first_dense_layers
                  and (i - m.first_dense_layers) % m.moe_every == 0 and i not in dense]
    out.update(decoder_sparse_step=1, mlp_only_layers=[i for i in range(m.num_layers) if i not in moe_layers])


def write_router(m: ml_collections.ConfigDict, s: Saving) -> None:
    r = m.moe.router
    config.write_plain_router(m, s)
    s.need("moe.router.score", r.score == "softmax", "Qwen's router is a softmax")
    s.need("moe.router.softmax_before_topk", r.softmax_before_topk or r.norm_topk_prob,
           "Qwen takes the top-k of the softmax (with norm_topk_prob the two orders agree)")


def from_hf(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    config.read_common(hf, m, 1e-6)
    config.read_gqa(hf, m, 10000.0)
    config.read_no_sliding(hf, "use_sliding_window")
    hf.used.add("max_window_layers")
    m.qkv_bias = bool(hf.get("qkv_bias", True))
    read_experts(hf, m)
    shared = hf.need("shared_expert_intermediate_size")
    m.moe.update(num_shared=1, shared_gate=True, shared_ffn=0 if shared == m.moe.expert_ffn else shared)
    read_layer_pattern(hf, m)


def to_hf(m: ml_collections.ConfigDict, s: Saving) -> dict[str, Any]:
    out = config.write_common(m, s, "Qwen2MoeForCausalLM")
    config.write_gqa(m, s, out)
    config.write_no_extras(m, s)
    s.need("o_bias", not m.o_bias, "Qwen2-MoE's output projection has no bias")
    s.need("qk_norm", not m.qk_norm, "Qwen2-MoE has no query/key norm")
    write_router(m, s)
    s.need("moe.num_shared", m.moe.num_shared >= 1, "Qwen2-MoE always has a shared expert")
    s.need("moe.shared_gate", m.moe.shared_gate, "Qwen2-MoE always gates its shared expert")
    write_layer_pattern(m, out)
    out.update(qkv_bias=bool(m.qkv_bias), intermediate_size=m.ffn_dim, moe_intermediate_size=m.moe.expert_ffn,
               shared_expert_intermediate_size=m.moe.shared_ffn or m.moe.num_shared * m.moe.expert_ffn,
               num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               norm_topk_prob=bool(m.moe.router.norm_topk_prob), use_sliding_window=False,
               router_aux_loss_coef=m.moe.balance_coef)
    return out


register(Family("qwen2_moe", from_hf, to_hf, {
    **NORM_RULES, **GQA_RULES, **DENSE_RULES, **moe_rules("mlp"),
    **glu_rules("ffn/shared", "model.layers.{i}.mlp.shared_expert"),
    "ffn/shared_gate/kernel": Rule("model.layers.{i}.mlp.shared_expert_gate.weight", "linear")}))
