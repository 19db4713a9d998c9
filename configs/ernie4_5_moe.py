"""ERNIE 4.5 MoE (Baidu ERNIE Team, ERNIE 4.5 Technical Report, 2025; published with the models at
ernie.baidu.com, not on arXiv).

Architecture: Llama's grouped-query attention (20 query / 4 key-value heads of 128 at d_model 2560) with the rotary
embedding (base 500000) on interleaved pairs; the first layer a dense SwiGLU FFN of 12288, every later one MoE: 64
routed experts of 1536, top-6, and two shared experts (one GLU of 2 x 1536) every token passes through. The router
is a softmax whose top-6 is taken over the probabilities plus a selection-only bias (aux-loss-free balancing,
moejax's ``router_bias``); the selected probabilities are renormalised to sum to 1. RMSNorm (eps 1e-5); the output
head tied to the embedding.

Presets (``--config=configs/ernie4_5_moe.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers (the first dense, FFN 704), 4 query / 2 KV heads of 64 rotated in interleaved pairs,
  2 shared + 64 routed experts of 176, top-6, tied embeddings, byte vocabulary; the router balanced by bias updates
  at rate 1e-3 with the switch loss at 1e-3 (transformers' router_aux_loss_coef).
* ``21b_a3b``: ERNIE-4.5-21B-A3B(-PT) as its config.json gives it (``moejax.hf.read_config`` of that file equals this
  preset's ``model`` field by field; tests/hf/test_hf_families3.py). Where the values come from (no network here):
  transformers' Ernie4_5_MoeConfig, whose defaults its docstring gives as this model's (vocabulary 103424, d_model
  2560, FFN 12288, 28 layers, 20 / 4 heads, RMSNorm eps 1e-5, tied embeddings, rope_theta 500000, no biases, experts
  of 1536, top-6 of 64, 2 shared, MoE from layer 1 to the last, every layer), agreeing with the model card (21B
  total, 3B activated, 28 layers, 64 experts, top-6, 2 shared); bfloat16 as released. 21.8B parameters, 3.1B
  activated per token without the (tied) embedding (published: 21B and 3B).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "21b_a3b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(rope_interleave=True, rope_theta=500000.0, first_dense_layers=1, tie_embeddings=True, norm_eps=1e-5)
    moe.update(num_shared=2, top_k=6, num_experts=64, dispatch="dropless", balance_loss="switch", balance_coef=1e-3)
    moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=True)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, ffn_dim=704)
        moe.update(expert_ffn=176, bias_update_rate=1e-3)
    else:  # "21b_a3b"
        model.update(vocab_size=103424, d_model=2560, num_layers=28, num_heads=20, num_kv_heads=4, ffn_dim=12288,
                     dtype="bfloat16", param_dtype="bfloat16")
        moe.update(expert_ffn=1536)
    return config
