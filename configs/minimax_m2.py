"""MiniMax-M2 (MiniMax, 2025; released with a model card and no paper: no arXiv report describes its architecture,
which transformers' modeling_minimax_m2.py gives).

Architecture: grouped-query attention (48 query / 8 key-value heads of 128 at d_model 3072, no biases) whose queries
and keys are RMS-normalised over all heads at once (moejax's ``qk_norm_scope='proj'``), the rotary embedding (base
5 x 10^6) on the first 64 dims of each head (``partial_rotary_factor`` 0.5); every layer MoE with 256 fine-grained
SwiGLU experts of 1536, top-8, no shared expert, routed by sigmoid scores with a selection-only bias (aux-loss-free
balancing, moejax's ``router_bias``), the selected scores renormalised to sum to 1. RMSNorm (eps 1e-6); untied
embeddings.

Presets (``--config=configs/minimax_m2.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers, 8 query / 2 KV heads of 64, half of each rotated, the q/k norm over all heads, 64
  experts of 176, top-8, byte vocabulary; the router balanced by bias updates at rate 1e-3 with the switch loss at
  1e-3 (transformers' router_aux_loss_coef).
* ``m2``: MiniMax-M2 as its config.json gives it (``moejax.hf.read_config`` of that file equals this preset's
  ``model`` field by field; tests/hf/test_hf_families3.py). Where the values come from (no network here): the hub
  file's fields as other projects transcribe it (vocabulary 200064, hidden_size 3072, intermediate_size 1536, 62
  layers, 48 / 8 heads of head_dim 128, rotary_dim 64, 256 local experts, top-8, scoring_func sigmoid,
  use_routing_bias, use_qk_norm with qk_norm_type 'per_layer', rope_theta 5e6, rms_norm_eps 1e-6, untied embeddings,
  three MTP modules that transformers does not load), agreeing with transformers' MiniMaxM2Config defaults;
  bfloat16 compute (the release stores FP8 weights with 128 x 128 block scales, dequantised on load). 228.7B
  parameters, 10.4B activated per token without the input embedding (published: 230B total, 10B activated).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "m2")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(qk_norm=True, qk_norm_scope="proj", partial_rotary_factor=0.5, rope_theta=5e6, tie_embeddings=False)
    moe.update(top_k=8, dispatch="dropless", balance_loss="switch", balance_coef=1e-3)
    moe.router.update(score="sigmoid", norm_topk_prob=True)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, ffn_dim=176)
        moe.update(num_experts=64, expert_ffn=176, bias_update_rate=1e-3)
    else:  # "m2"
        model.update(vocab_size=200064, d_model=3072, num_layers=62, num_heads=48, num_kv_heads=8, head_dim=128,
                     ffn_dim=1536, dtype="bfloat16", param_dtype="bfloat16")
        moe.update(num_experts=256, expert_ffn=1536)
    return config
