"""Chain-of-Experts ("Chain-of-Experts: Unlocking the Communication Power of Mixture-of-Experts Models", Wang et al.,
2025, arXiv 2506.18945) at DeepSeekMoE-small width (docs/methods.md#chain-of-experts): each MoE layer passes its
tokens C = 2 times through the same 63 routed experts (width 176) and shared expert, each pass with its own router
(K = 4 experts per pass: the compute of the K = 8 MoE baseline), inner residual x_c = x_{c-1} + f_c(x_{c-1}); DeepSeek
sequence-wise balance loss alpha = 1e-3 at every pass, softmax gate without renormalisation. Reproduces the README
table's comparison CoE(C=2, K=4) vs MoE(K=8) (--config.model.moe.chain_iterations=1 --config.model.moe.top_k=8), and
the variants shared gate (--config.model.moe.chain_shared_router=True), outer residual
(--config.model.moe.chain_residual=outer) and inner + outer (--config.model.moe.chain_residual=inner_outer).

Choices: chain_residual='inner' reproduces the released code's quirk (inner_residual=True, outer_residual=False):
the layer's output x_C replaces the residual stream, so the block does not add its input back. Attention is the
library's multi-head attention, not MLA. The logged experts_per_token counts both passes (C * K = 8).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=63, top_k=4, expert_ffn=176, num_shared=1, dispatch="dropless",
                            balance_loss="deepseek", balance_coef=1e-3, balance_scope="sequence",
                            chain_iterations=2, chain_residual="inner")
    config.model.moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=False)
    return config
