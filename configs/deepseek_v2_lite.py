"""DeepSeek-V2-Lite (DeepSeek-AI, DeepSeek-V2, 2024, arXiv 2405.04434): Multi-head Latent Attention with DeepSeekMoE.

Architecture: attention is Multi-head Latent Attention: keys and values are expanded per head from one small shared
latent (kv-LoRA rank 512) and a single shared rotary key, so the cache holds the latent instead of every head's
keys and values; the Lite model projects queries at full rank (no q-LoRA), rotates interleaved pairs, and extends
its rotary embeddings with YaRN (x40 from 4096, with the mscale correction of the softmax scale). The first layer
keeps a dense SwiGLU FFN; every later one is a DeepSeekMoE layer: 2 always-on shared experts plus 64 narrow routed
experts, top-6 of a softmax over all 64, the selected probabilities used unrenormalised and unscaled, greedy
selection (no group limit), and the sequence-wise DeepSeekMoE balance loss with alpha 0.001.

Presets (``--config=configs/deepseek_v2_lite.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers (the first dense, FFN 1368 = V2-Lite's 5.34 x d_model), 4 MLA heads (kv-LoRA 64,
  32 + 16 query/key dims, values of 32), 2 shared + 64 routed experts of 176 (V2-Lite's 0.6875 x d_model), top-6,
  byte vocabulary, plain rotary embeddings (YaRN only extends contexts far beyond the 256 bytes trained on);
  28.5M parameters, 5.0M activated.
* ``lite``: DeepSeek-V2-Lite exactly as its released config.json gives it (``moejax.hf.read_config`` of that
  directory equals this preset's ``model`` field by field; tests/test_released_presets.py): d_model 2048, 27
  layers (1 dense, FFN 10944), 16 MLA heads (kv-LoRA 512, 128 + 64 query/key dims, values of 128), 2 shared + 64
  routed experts of 1408, top-6, vocabulary 102400, RMSNorm eps 1e-6, bfloat16; 15.7B parameters, 2.4B activated
  per token (as published: without the input embedding, which moejax.model.param_counts adds: 2.66B).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "lite")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(attention="mla", rope_interleave=True, first_dense_layers=1, norm_eps=1e-6, tie_embeddings=False)
    model.mla.q_lora_rank = 0
    moe.update(num_shared=2, top_k=6, num_experts=64, dispatch="dropless", balance_loss="deepseek",
               balance_coef=0.001, balance_scope="sequence")
    moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=False, routed_scaling_factor=1.0)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=1368)
        model.mla.update(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
        moe.update(expert_ffn=176)
    else:  # "lite"
        model.update(vocab_size=102400, d_model=2048, num_layers=27, num_heads=16, ffn_dim=10944,
                     dtype="bfloat16", param_dtype="bfloat16")
        model.mla.update(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
        model.rope_scaling.update(kind="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                  beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707, truncate=True)
        moe.update(expert_ffn=1408)
    return config
