"""Dynamic top-p routing ("Harder Tasks Need More Experts", Huang et al., ACL 2024, arXiv 2403.07652) at
DeepSeekMoE-small scale (docs/methods.md#dynamic-top-p-routing): 16 experts of the full 704-wide FFN, each token
takes the fewest highest-probability experts whose cumulative softmax probability reaches p = 0.4 (the expert
crossing the threshold included, raw probabilities as weights, no renormalisation), balance loss alpha = 1e-2 and the
dynamic (router entropy) loss beta = 1e-4. Reproduces the top-p vs top-2 comparison: loss and mean activated experts,
logged per MoE layer as 'layers_<i>_experts_per_token'.

Choices: at most top_k = 4 experts per token (a static slot bound the paper does not have; raise it to 16 to
remove it); the balance loss normalises f_i by top_k * T slots (the library's Switch loss), i.e. the paper's
N * sum_i f_i Q_i divided by top_k; MoE in every layer (the paper uses every other layer:
--config.model.moe_every=2).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=16, top_k=4, expert_ffn=704, dispatch="dropless", balance_loss="switch",
                            balance_coef=1e-2, entropy_loss_coef=1e-4)
    config.model.moe.router.update(kind="top_p", top_p=0.4)
    return config
