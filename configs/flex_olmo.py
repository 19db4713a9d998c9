"""FlexOlmo (Shi et al., FlexOlmo: Open Language Models for Flexible Data Use, 2025, arXiv 2507.07024).

Architecture: OLMo 2's blocks with an MoE FFN in every layer. Each expert is a whole OLMo 2 7B FFN (a SwiGLU of
11008) trained on its own data; the experts join one model whose router is a softmax top-k over them. Attention is
multi-head (32 heads of 128 at d_model 4096) with an RMSNorm over the whole q and k projections; the norms sit after
attention and after the FFN, before each residual add (``model.norm_position='post'``), with no norm on the block's
input. Rotary base 500000, RMSNorm eps 1e-6, untied embeddings.

Presets (``--config=configs/flex_olmo.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers, 4 heads of 64, 7 experts of 704, top-5, unnormalised weights, byte vocabulary, the
  switch balance loss at 0.01 (transformers' router_aux_loss_coef).
* ``7x7b``: FlexOlmo-7x7B-1T as transformers' FlexOlmoConfig gives it (its defaults are this checkpoint's, the one its
  docstring names; ``moejax.hf.read_config`` of that config.json equals this preset's ``model`` field by field,
  tests/hf/test_hf_families3.py): vocabulary 100352, d_model 4096, 32 layers, 32 heads, 7 experts of 11008, top-5,
  unnormalised, rope_theta 500000; no network here, so the hub file itself was not compared. 33.3B parameters, 24.6B
  activated per token with the embeddings (moejax.model.param_counts).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "7x7b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(norm_position="post", qk_norm=True, qk_norm_scope="proj", rope_theta=500000.0, tie_embeddings=False)
    moe.update(num_experts=7, top_k=5, dispatch="dropless", balance_loss="switch", balance_coef=0.01)
    moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=False)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
        moe.update(expert_ffn=704)
    else:  # "7x7b"
        model.update(vocab_size=100352, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_dim=11008,
                     dtype="bfloat16", param_dtype="bfloat16")
        moe.update(expert_ffn=11008)
    return config
