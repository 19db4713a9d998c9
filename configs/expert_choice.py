"""Expert Choice routing (Zhou et al., NeurIPS 2022, arXiv 2202.09368) at DeepSeekMoE-small scale
(docs/methods.md#expert-choice): 16 experts of the full 704-wide FFN; in training each expert takes its top
C = 2 * T / 16 tokens of the batch by softmax score (capacity factor c = 2, i.e. 2 experts per token on average, some
tokens 0, some many), weighted by their scores; no balance loss (balanced by construction). Reproduces the paper's
EC (c = 2) vs top-2 token choice comparison at matched FLOPs (--config=configs/gshard.py), with the experts-per-token
histogram logged as layers_<i>_experts_per_token (its mean).

Causal LM: an expert's choice among the T tokens of the batch depends on later positions, so training leaks future
information (Loss-Free Balancing, arXiv 2408.15664, Appendix D: up to about K log2((1-R)/R) bits per token) and the
training loss can look too good. moejax keeps the paper's batch-level choice in training and evaluates with token
choice (top_k = 2 of the same scores), which is causal, so the reported validation loss is honest; expect a gap
between the two that the leak explains.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=16, top_k=2, expert_ffn=704, dispatch="dropless", balance_loss="none",
                            balance_coef=0.0)
    config.model.moe.router.update(kind="expert_choice", ec_capacity=2.0)
    return config
