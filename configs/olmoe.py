"""OLMoE (Muennighoff et al., OLMoE: Open Mixture-of-Experts Language Models, 2024, arXiv 2409.02060).

Architecture: a fully open decoder whose every FFN is a layer of 64 fine-grained SwiGLU experts (each half the model
width), top-8 token choice with the softmax probabilities of the selected experts used as they are (no
renormalisation, ``norm_topk_prob`` false), no shared expert, dropless. Attention is plain multi-head attention with
an RMSNorm over the whole query and the whole key projection (before they are split into heads; moejax's
``qk_norm_scope='proj'``), rotary embeddings of base 10000, untied embeddings, and the Switch-style balance loss
with coefficient 0.01 (the paper also adds a router z-loss in training, which config.json does not record).

Presets (``--config=configs/olmoe.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers, 4 heads, 64 experts of 128 (half the width, as in OLMoE), top-8, byte vocabulary;
  26.4M parameters, 4.4M activated.
* ``1b_7b``: OLMoE-1B-7B-0924 exactly as its released config.json gives it (``moejax.hf.read_config`` of that
  directory equals this preset's ``model`` field by field; tests/test_released_presets.py): d_model 2048, 16
  layers, 16 heads of 128, 64 experts of 1024, top-8, vocabulary 50304, RMSNorm eps 1e-5, float32 (as the release
  is stored); 6.9B parameters, 1.3B activated per token.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "1b_7b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(qk_norm=True, qk_norm_scope="proj", rope_theta=10000.0, tie_embeddings=False)
    moe.update(num_experts=64, top_k=8, dispatch="dropless", balance_loss="switch", balance_coef=0.01)
    moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=False)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=128)
        moe.update(expert_ffn=128)
    else:  # "1b_7b"
        model.update(vocab_size=50304, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=16, ffn_dim=1024,
                     norm_eps=1e-5, dtype="float32", param_dtype="float32")
        moe.update(expert_ffn=1024)
    return config
