"""dots.llm1 (rednote-hilab, dots.llm1 Technical Report, 2025, arXiv 2506.05767).

Architecture: Qwen3's attention with DeepSeek-V3's MoE. Attention is multi-head (32 query and 32 key/value heads of
128 at d_model 4096) with an RMSNorm on each head's queries and keys and no biases; rotary base 10^7. The first layer
is a dense SwiGLU FFN, every later one MoE: 128 fine-grained routed experts of 1408, top-6, and two shared experts
(one GLU of 2 x 1408) every token passes through. The router is DeepSeek-V3's: sigmoid affinities, the top-6
selected by affinity plus a selection-only bias (aux-loss-free balancing, moejax's ``router_bias``), the selected
affinities renormalised to sum to 1 and scaled by 2.5. RMSNorm (eps 1e-5); untied embeddings.

Presets (``--config=configs/dots1.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers (the first dense, FFN 704), 4 heads of 64 with the per-head q/k norm, 2 shared + 64
  routed experts of 176, top-6, scaled by 2.5, byte vocabulary; the router balanced as configs/deepseek_v3.py
  balances it (bias updates at rate 1e-3 and the sequence-wise loss at 1e-4).
* ``llm1``: dots.llm1.base / .inst as their config.json gives them (``moejax.hf.read_config`` of that file equals
  this preset's ``model`` field by field; tests/hf/test_hf_families3.py). Where the values come from (no network
  here): the fields of the hub file as other projects transcribe it (hidden_size 4096, 62 layers, intermediate_size
  10944, 32 / 32 heads, rms_norm_eps 1e-5, vocabulary 152064, first_k_dense_replace 1, moe_intermediate_size 1408,
  128 routed / 2 shared experts, top-6, norm_topk_prob, routed_scaling_factor 2.5, rope_theta 1e7, no attention
  bias, untied embeddings, n_group / topk_group null), agreeing with the model card and the technical report (62
  layers, 128 + 2 experts, top-6, 142B total / 14B activated); bfloat16 as released. 142.8B parameters, 14.0B
  activated per token with the input embedding (published: 142B and 14B).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "llm1")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(qk_norm=True, qk_norm_scope="head", first_dense_layers=1, tie_embeddings=False)
    moe.update(num_shared=2, top_k=6, dispatch="dropless")
    moe.router.update(score="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, group_score="top2_sum",
                      group_mask_fill=float("-inf"))
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=4, head_dim=64, ffn_dim=704)
        moe.update(num_experts=64, expert_ffn=176, balance_loss="deepseek", balance_coef=1e-4,
                   balance_scope="sequence", bias_update_rate=1e-3)
    else:  # "llm1"
        model.update(vocab_size=152064, d_model=4096, num_layers=62, num_heads=32, num_kv_heads=32, ffn_dim=10944,
                     rope_theta=1e7, norm_eps=1e-5, dtype="bfloat16", param_dtype="bfloat16")
        moe.update(num_experts=128, expert_ffn=1408)
    return config
