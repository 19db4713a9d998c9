"""GLM-4.5 (GLM-4.5 Team, GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation Models, 2025, arXiv 2508.06471).

Architecture: DeepSeek-V3's MoE layout on grouped-query attention. The first layer is a dense SwiGLU FFN, every
later one MoE: 128 fine-grained routed experts, top-8, and one shared expert every token passes through. The router
is DeepSeek-V3's: sigmoid affinities, the top-8 selected by affinity plus a selection-only bias (aux-loss-free
balancing, moejax's ``router_bias``), the selected affinities renormalised to sum to 1. Attention has many wide
heads (96 query / 8 KV heads of 128 at d_model 4096) with biases on q, k and v (not o), and the rotary embedding
(base 10^6) turns only the first half of each head (``partial_rotary_factor`` 0.5). RMSNorm; untied embeddings.

Presets (``--config=configs/glm4_moe.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers (the first dense, FFN 704), 8 query / 2 KV heads of 64, half of each rotated, 1 shared
  + 64 routed experts of 176, top-8, byte vocabulary; the router is balanced as configs/deepseek_v3.py balances it
  (bias updates at rate 1e-3 and the sequence-wise loss at 1e-4).
* ``air``: GLM-4.5-Air exactly as its released config.json gives it (``moejax.hf.read_config`` of that directory
  equals this preset's ``model`` field by field; tests/hf/test_released_presets.py): d_model 4096, 46 layers (the
  first dense, FFN 10944), 96 query / 8 KV heads of 128, 1 shared + 128 routed experts of 1408, top-8, one group,
  routed_scaling_factor 1, vocabulary 151552, RMSNorm eps 1e-5, bfloat16; 106.9B parameters, 12.8B activated per
  token without the input embedding (published: 106B and 12B), not counting its one multi-token-prediction
  module (mtp_depth 1: layer 46 of the checkpoint), which moejax.hf.load reads.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "air")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(partial_rotary_factor=0.5, qkv_bias=True, first_dense_layers=1, tie_embeddings=False)
    moe.update(num_shared=1, top_k=8, dispatch="dropless")
    moe.router.update(score="sigmoid", norm_topk_prob=True, group_score="top2_sum", group_mask_fill=float("-inf"))
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, ffn_dim=704)
        moe.update(num_experts=64, expert_ffn=176, balance_loss="deepseek", balance_coef=1e-4,
                   balance_scope="sequence", bias_update_rate=1e-3)
    else:  # "air"
        model.update(vocab_size=151552, d_model=4096, num_layers=46, num_heads=96, num_kv_heads=8, head_dim=128,
                     ffn_dim=10944, rope_theta=1e6, norm_eps=1e-5, dtype="bfloat16", param_dtype="bfloat16",
                     mtp_depth=1)
        moe.update(num_experts=128, expert_ffn=1408)
    return config
