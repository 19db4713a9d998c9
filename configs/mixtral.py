"""Mixtral (Jiang et al., 2024, arXiv 2401.04088) architecture at small width, for later checkpoint import: every
layer MoE with 8 experts, top-2, softmax over the two selected logits (= renormalised top-2 softmax), grouped-query
attention (4 query heads per KV head), rope theta 1e6, untied embeddings, the Switch-style balance loss with
HF's router_aux_loss_coef 0.001 (Mixtral-8x7B: d_model 4096, 32 layers, 32/8 heads, expert FFN 14336).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, ffn_dim=896, rope_theta=1e6,
                        tie_embeddings=False)
    config.model.moe.update(num_experts=8, top_k=2, expert_ffn=896, dispatch="dropless", balance_loss="switch",
                            balance_coef=1e-3)
    config.model.moe.router.update(score="softmax", softmax_before_topk=False, norm_topk_prob=False)
    return config
