"""Hash Layers (Roller et al., NeurIPS 2021, arXiv 2106.04426) at DeepSeekMoE-small scale (DeepSeekMoE Table 1,
column Hash Layer): every token goes to the single expert of 16 (each a full 704-wide FFN) that its input token id
hashes to, with weight 1, whatever its context; no router choice and no balance loss.

Choices: the fixed map is a multiplicative hash of the token id (a byte, or a BPE id with data.tokenizer='bpe:<V>';
moejax.moe.routers.hash_experts, seed model.moe.router.hash_seed), i.e. the paper's random hash; its
balanced-by-frequency variant is not implemented.
The routing is by the layer's input token at that position in every MoE layer (the paper's default). The router
kernel is kept (unused for the choice) so that the parameter tree matches the other configs.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.model.moe.update(num_experts=16, top_k=1, expert_ffn=704, dispatch="dropless", balance_loss="none",
                            balance_coef=0.0)
    config.model.moe.router.update(kind="hash", hash_seed=0)
    return config
