"""Qwen3-Next (Qwen Team, Qwen3-Next, 2025: Qwen3's MoE with hybrid linear attention): Gated DeltaNet layers (Yang,
Kautz and Hatamizadeh, Gated Delta Networks, arXiv 2412.06464) between gated full-attention layers, and a very sparse
MoE.

Architecture: three of every four layers are linear attention (moejax's layer kind 'linear': a short causal
convolution, the gated delta rule over a fixed-size state per head, a gated RMSNorm on the output;
moejax/linear_attention.py), the fourth grouped-query attention with a sigmoid output gate per head, a per-head
query/key RMSNorm and the rotary embedding (base 10^7) on a quarter of each head. Every RMSNorm but the linear
attention's is zero-centred (its weight an offset from 1, ``model.norm='rms_offset'``, decayed towards 0 in
training). Every layer is MoE: 512 experts, top-10 of a softmax renormalised, and one shared expert behind a sigmoid
gate. Balance loss 0.001 over the global batch.

Presets (``--config=configs/qwen3_next.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers (3 linear, then 1 full), 8 query / 2 KV heads of 64 (16 dims rotated), 4 key / 8 value
  linear-attention heads of 32, 1 shared + 64 routed experts of 64, top-4, byte vocabulary.
* ``80b_a3b``: Qwen3-Next-80B-A3B (Instruct and Thinking share it) as its released config.json gives it
  (``moejax.hf.read_config`` of that file equals this preset's ``model`` field by field;
  tests/hf/test_hf_qwen3_next.py): d_model 2048, 48 layers (12 x 3 linear + 1 full), 16 query / 2 KV heads of 256,
  16 key / 32 value linear-attention heads of 128 with a 4-wide convolution, 1 shared + 512 routed experts of 512,
  top-10, vocabulary 151936, RMSNorm eps 1e-6, bfloat16. The values are transformers' Qwen3NextConfig defaults (its
  docstring names this checkpoint) but for three the class does not give as released: intermediate_size 5120 (no
  layer is dense: unused), rope_theta 1e7 and the 262144 positions of the model card (the latter not a moejax
  field); 81.3B parameters, 3.9B activated per token with the input embedding (published: 80B total, 3B
  activated, 79B without the embeddings).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "80b_a3b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(qk_norm=True, qk_norm_scope="head", norm="rms_offset", attention_gate=True,
                 partial_rotary_factor=0.25, rope_theta=1e7)
    moe.update(num_shared=1, shared_gate=True, dispatch="dropless", balance_loss="switch", balance_coef=1e-3,
               balance_scope="batch")
    moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=True)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, ffn_dim=704,
                     layer_types=("linear", "linear", "linear", "full"))
        model.linear_attention.update(num_key_heads=4, num_value_heads=8, key_head_dim=32, value_head_dim=32)
        moe.update(num_experts=64, top_k=4, expert_ffn=64)
    else:  # "80b_a3b"
        model.update(vocab_size=151936, d_model=2048, num_layers=48, num_heads=16, num_kv_heads=2, head_dim=256,
                     ffn_dim=5120, norm_eps=1e-6, tie_embeddings=False, dtype="bfloat16", param_dtype="bfloat16",
                     layer_types=("linear", "linear", "linear", "full") * 12)
        model.linear_attention.update(num_key_heads=16, num_value_heads=32, key_head_dim=128, value_head_dim=128,
                                      conv_kernel=4)
        moe.update(num_experts=512, top_k=10, expert_ffn=512)
    return config
