"""Qwen3-MoE (Qwen3 technical report, arXiv 2505.09388) architecture at small width, for later checkpoint import:
every layer MoE, 128 experts, top-8, softmax router with the top-8 weights renormalised (norm_topk_prob=true), no
shared expert, grouped-query attention with RMSNorm on queries and keys (qk_norm), rope theta 1e6, global-batch
balance loss 0.001 (Qwen3-30B-A3B: d_model 2048, 48 layers, 32/4 heads of 128, expert FFN 768).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, ffn_dim=768, rope_theta=1e6,
                        qk_norm=True)
    config.model.moe.update(num_experts=128, top_k=8, expert_ffn=96, dispatch="dropless", balance_loss="switch",
                            balance_coef=1e-3, balance_scope="batch")
    config.model.moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=True)
    return config
