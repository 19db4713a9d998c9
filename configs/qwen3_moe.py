"""Qwen3-MoE (Qwen Team, Qwen3 Technical Report, 2025, arXiv 2505.09388): fine-grained experts without a shared one.

Architecture: every layer is MoE with 128 narrow SwiGLU experts; the router takes the softmax over all 128 logits,
keeps the 8 most probable experts and renormalises their weights to sum to 1 (``norm_topk_prob``). Attention is
grouped-query with an RMSNorm over each head's queries and keys before the rotary embedding (base 1e6), and the
heads are wider than d_model / num_heads. The balance loss (coefficient 0.001) is computed over the global batch.

Presets (``--config=configs/qwen3_moe.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers, 8 query / 2 KV heads of 32, 128 experts of 96, top-8, byte vocabulary.
* ``30b_a3b``: Qwen3-30B-A3B exactly as its released config.json gives it (``moejax.hf.read_config`` of that
  directory equals this preset's ``model`` field by field; tests/test_released_presets.py): d_model 2048, 48
  layers, 32 query / 4 KV heads of 128, 128 experts of 768, top-8, vocabulary 151936, RMSNorm eps 1e-6, bfloat16;
  30.5B parameters, 3.3B activated per token.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "30b_a3b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(rope_theta=1e6, qk_norm=True, qk_norm_scope="head")
    moe.update(num_experts=128, top_k=8, dispatch="dropless", balance_loss="switch", balance_coef=1e-3,
               balance_scope="batch")
    moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=True)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, ffn_dim=768)
        moe.update(expert_ffn=96)
    else:  # "30b_a3b"
        model.update(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                     ffn_dim=6144, norm_eps=1e-6, tie_embeddings=False, dtype="bfloat16", param_dtype="bfloat16")
        moe.update(expert_ffn=768)
    return config
