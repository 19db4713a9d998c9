"""Dense baseline with the activated FFN width of DeepSeekMoE-small: a 1408-wide SwiGLU = (1 shared + 7 routed)
x 176, so its activated parameters equal configs/deepseekmoe.py:small's (DeepSeekMoE Table 1, column Dense,
at equal activated rather than equal FLOPs-per-2K-tokens budget). Same training budget as the MoE configs.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=1408, moe_every=0)
    return config
