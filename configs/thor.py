"""THOR, Transformer with stochastic experts ("Taming Sparsely Activated Transformer with Stochastic Experts",
Zuo et al., ICLR 2022, arXiv 2110.04260) at DeepSeekMoE-small width (docs/methods.md#thor): MoE in every other
layer with 2 experts of the full 704-wide FFN and no router; in training each MoE layer sends the whole batch to one
expert drawn uniformly at random, every batch runs twice with independent draws, and the loss is
CE_1 + CE_2 + alpha * 1/2 [KL(p_1 || p_2) + KL(p_2 || p_1)] with alpha = 5.0 (IWSLT14 De-En). Reproduces the
ablations THOR vs dense vs Switch of equal parameters (configs/switch.py) and alpha = 0 vs 5
(--config.train.consistency_coef=0 still draws random experts but runs each batch once).

Choices: evaluation averages the outputs of the 2 experts (the deterministic ensemble) instead of the paper's
random expert per sentence, so that validation losses do not depend on a draw; the KL, like the cross-entropy, is
averaged over positions (the paper sums both over tokens, which has the same ratio); the logged train loss is
(CE_1 + CE_2) / 2. No balance loss: random routing is balanced in expectation.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704, moe_every=2)
    config.model.moe.update(num_experts=2, top_k=1, expert_ffn=704, dispatch="dropless", balance_loss="none",
                            balance_coef=0.0)
    config.model.moe.router.update(kind="thor")
    config.train.consistency_coef = 5.0
    return config
