"""Auxiliary-loss-free load balancing (Wang et al., 2024, arXiv 2408.15664) on the DeepSeekMoE-tiny model: a
per-expert bias added to the sigmoid scores for the top-k selection only, updated after every step by
b_i += u * sign(mean load - load_i) with u = 1e-3, no auxiliary loss. Reproduces the paper's Table 2 comparison
(docs/methods.md#loss-free-balancing) against the auxiliary loss, --config.model.moe.bias_update_rate=0
--config.model.moe.balance_loss=deepseek --config.model.moe.balance_coef=1e-3: similar or better loss with a much
lower MaxVio (max load / mean load - 1, logged per MoE layer as 'layers_<i>_maxvio' in training and evaluation).

Choices: the gate is the paper's main-run sigmoid, renormalised over the selected experts (as in DeepSeek-V3); the
load c_i counts the routed slots of the whole global batch of the previous step.
"""
import ml_collections
from moejax.configs import base, deepseekmoe

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = deepseekmoe.get_config("tiny")
    config.model.moe.update(balance_loss="none", balance_coef=0.0, bias_update_rate=1e-3)
    config.model.moe.router.update(score="sigmoid", norm_topk_prob=True)
    return config
