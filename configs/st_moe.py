"""ST-MoE (Zoph et al., 2022, arXiv 2202.08906), its stability recipe at DeepSeekMoE-small scale: top-2 of 16 experts
of the full 704-wide FFN, capacity factor 1.25 in training and 2.0 in eval, balance loss c_B = 1e-2 and the router
z-loss c_z = 1e-3 (L_z = mean_t (logsumexp_j z_tj)^2), router in float32. Reproduces the z-loss row of ST-MoE's
stability ablations (docs/methods.md#st-moe-router-z-loss): same or better loss than without it, much smaller router
logits; compare with --config.model.moe.z_loss_coef=0.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=16, top_k=2, expert_ffn=704, dispatch="capacity", capacity_factor=1.25,
                            eval_capacity_factor=2.0, balance_loss="switch", balance_coef=1e-2, z_loss_coef=1e-3)
    config.model.moe.router.update(score="softmax", norm_topk_prob=True)
    return config
