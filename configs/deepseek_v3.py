"""DeepSeek-V3 (arXiv 2412.19437) MoE recipe at tiny scale (docs/methods.md#deepseek-v3): sigmoid affinities,
group-limited routing (8 groups, the 4 best by the sum of their top-2 scores, others masked to 0 before the top-k as
in the released code), the aux-loss-free selection bias (u = 1e-3), weights renormalised over the selected experts
and scaled by 2.5, a tiny sequence-wise balance loss alpha = 1e-4, 1 shared expert, and the first layer dense.
Reproduces the section 4.5.3 comparison (sequence-wise aux vs aux-loss-free vs batch-wise) with
--config.model.moe.balance_scope and --config.model.moe.bias_update_rate; MaxVio is logged per layer.

Choices: 64 routed experts of width 176 with top-8 (V3's 256 / top-8 scaled down), 5 layers so that 4 stay MoE
after the dense first layer (V3 has 3 dense of 61), dense FFN 704.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=5, num_heads=4, ffn_dim=704, first_dense_layers=1)
    config.model.moe.update(num_experts=64, top_k=8, expert_ffn=176, num_shared=1, dispatch="dropless",
                            balance_loss="deepseek", balance_coef=1e-4, balance_scope="sequence",
                            bias_update_rate=1e-3)
    config.model.moe.router.update(score="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, num_groups=8,
                                   topk_groups=4, group_score="top2_sum", group_mask_fill=0.0)
    return config
