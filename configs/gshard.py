"""GShard top-2 (Lepikhin et al., 2020, arXiv 2006.16668) at DeepSeekMoE-small scale: top-2 of 16 experts of the
full 704-wide FFN with the two weights renormalised (DeepSeekMoE Table 1 and Figure 3, column GShard), Switch/
GShard balance loss alpha = 0.01. Dropless, as DeepSeekMoE trains every arm of its comparison without dropping;
set model.moe.dispatch='capacity' (capacity_factor 2.0) for GShard's original capacity-limited dispatch.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=16, top_k=2, expert_ffn=704, capacity_factor=2.0, balance_loss="switch",
                            balance_coef=0.01)
    config.model.moe.router.update(score="softmax", norm_topk_prob=True)
    return config
