"""Switch Transformer (Fedus et al., 2021, arXiv 2101.03961) at DeepSeekMoE-small scale: top-1 of 16 experts of
the full 704-wide FFN (DeepSeekMoE Table 1, column Switch), capacity factor 1.25 in training and 2.0 in eval,
dropped tokens pass through the residual, router input jitter 0.01, Switch load-balance loss alpha = 0.01.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=16, top_k=1, expert_ffn=704, dispatch="capacity", capacity_factor=1.25,
                            eval_capacity_factor=2.0, balance_loss="switch", balance_coef=0.01)
    config.model.moe.router.update(score="softmax", norm_topk_prob=False, jitter=0.01)
    return config
