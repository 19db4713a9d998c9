"""AdaMoE (Zeng et al., Findings of EMNLP 2024, arXiv 2406.13233) at DeepSeekMoE-small scale
(docs/methods.md#adamoe-null-experts): 8 real experts of the full 704-wide FFN plus m = 8 null experts that return
zero at no cost, top-k' = 3 over all 16 (up from top-2), weights renormalised over the real experts a token picked,
and the Switch-style balance loss over the 16 experts with the null experts' loads pooled (only their total use is
balanced). Reproduces the tiny ablation "top-2 of 8 vs AdaMoE (m, k') in {(8, 3), (8, 4), (16, 4)}": loss and mean
real experts per token ('layers_<i>_experts_per_token'); the routed-expert FLOPs saved are 1 - experts_per_token / 3
relative to top-3 (and vs top-2: 1 - experts_per_token / 2).

Choices: trained from scratch, so the null router rows start random (the paper copies real rows when
fine-tuning Mixtral); balance coefficient 1e-2 (the paper's fine-tuning run used 1e-3).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=8, num_null_experts=8, top_k=3, expert_ffn=704, dispatch="dropless",
                            balance_loss="switch", balance_coef=1e-2)
    config.model.moe.router.update(kind="adamoe")
    return config
