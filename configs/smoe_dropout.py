"""SMoE-Dropout ("Sparse MoE as the New Dropout", Chen et al., ICLR 2023, arXiv 2303.01610) at DeepSeekMoE-small
width (docs/methods.md#smoe-dropout): each 704-wide FFN is split into 16 expert slices of 44, routed by a randomly
initialised, frozen linear router (no gradient, no weight decay) to the top-k(t) slices with weights softmax over
the selected logits; k grows linearly from 8 to 16 over training, k(t) = 8 + round(8 t / T), so that training ends
on the full dense FFN. No balance loss. Reproduces Table 1's comparison against a directly trained dense model of
the same total parameters (configs/dense.py --config.model.ffn_dim=704) and a learned-router SMoE
(--config.model.moe.router.frozen=False --config.model.moe.router.k_start=0 --config.model.moe.top_k=2); the
"self-slimmable" curve of validation loss against the experts used at inference comes from
--config.model.moe.router.eval_top_k=<k> (0: all 16).

Choices: the paper's code runs Transformer-XL with dropout; this model has neither memory nor dropout. Slots
past k(t) are null and cost nothing, so early steps are cheaper than late ones. The MoE replaces the FFN of every
layer, as in the paper's 4-layer enwik8 model.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=16, top_k=16, expert_ffn=44, dispatch="dropless", balance_loss="none",
                            balance_coef=0.0)
    config.model.moe.router.update(kind="smoe_dropout", k_start=8, eval_top_k=0, frozen=True)
    return config
