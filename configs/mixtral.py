"""Mixtral (Jiang et al., 2024, arXiv 2401.04088): a Mistral-style decoder whose every FFN is a sparse MoE layer.

Architecture: every layer replaces its SwiGLU FFN by 8 SwiGLU experts of the same width; a linear router scores the
8 experts per token, the two best are kept and their weights are the softmax over those two logits (the same as the
full softmax renormalised over the selected pair). No shared expert, no expert bias. Attention is grouped-query (4
query heads per key/value head) with rotary embeddings of base 1e6; RMSNorm before attention and FFN; untied input
and output embeddings; the Switch-style balance loss with the Hugging Face ``router_aux_loss_coef``.

Presets (``--config=configs/mixtral.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers, 8 query / 2 KV heads, 8 experts of 896 (Mixtral's 3.5 x d_model), top-2, byte
  vocabulary, balance coefficient 0.001.
* ``8x7b``: Mixtral-8x7B-v0.1 exactly as its released config.json gives it (``moejax.hf.read_config`` of that
  directory equals this preset's ``model`` field by field; tests/test_released_presets.py): d_model 4096, 32
  layers, 32 query / 8 KV heads of 128, 8 experts of 14336, top-2, vocabulary 32000, RMSNorm eps 1e-5, bfloat16,
  balance coefficient 0.02; 46.7B parameters, 12.9B activated per token. Load its weights with
  ``moejax.hf.load(<dir>)``; to train it, set ``model.scan_layers`` / ``model.remat`` and a mesh as needed.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "8x7b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, ffn_dim=896, rope_theta=1e6,
                     tie_embeddings=False)
        moe.update(num_experts=8, top_k=2, expert_ffn=896, dispatch="dropless", balance_loss="switch",
                   balance_coef=1e-3)
        moe.router.update(score="softmax", softmax_before_topk=False, norm_topk_prob=False)
    else:  # "8x7b"
        model.update(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim=14336,
                     rope_theta=1e6, norm_eps=1e-5, tie_embeddings=False, dtype="bfloat16",
                     param_dtype="bfloat16")
        moe.update(num_experts=8, top_k=2, expert_ffn=14336, dispatch="dropless", balance_loss="switch",
                   balance_coef=0.02)
        moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=True)
    return config
