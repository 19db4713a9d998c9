"""PhiMoE (Phi-3.5-MoE: Abdin et al., Phi-3 Technical Report, 2024, arXiv 2404.14219; its router: Liu et al., GRIN:
GRadient-INformed MoE, 2024, arXiv 2409.12136).

Architecture: every layer is MoE with 16 SwiGLU experts routed by SparseMixer (moejax.moe.routers.sparsemixer): each
token takes its best expert, weighted by the softmax over the experts whose logit lies within 2 * 0.01 (relative) of
that expert's, then its second best the same way among the others; the two weights are not renormalised. In
training SparseMixer samples each slot's expert within that softmax and scales the weight by Heun's third-order
midpoint factor. Grouped-query attention with biases on q, k, v and o; LayerNorm (a scale and a bias) before
attention, before the FFN and on the output; an output head with a bias; no shared expert; untied embeddings.

Presets (``--config=configs/phimoe.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers, 8 query / 2 KV heads of 32, 16 experts of 400 (Phi-3.5-MoE's 1.5625 x d_model),
  top-2, byte vocabulary, plain rotary embeddings, no sliding window, balance coefficient 0.001.
* ``3_5_moe``: Phi-3.5-MoE-instruct as its released config.json gives it (``moejax.hf.read_config`` of that
  directory equals this preset's ``model`` field by field, tests/hf/test_released_presets.py, but for the two
  LongRoPE factor lists): d_model 4096, 32 layers, 32 query / 8 KV heads of 128, 16 experts of 6400, top-2,
  vocabulary 32064, LayerNorm eps 1e-5, bfloat16, LongRoPE from 4096 positions (rope_theta 10000, both mscales
  1.243163121016122), a sliding window of 131072 (the whole context) on every layer, balance coefficient 0 (the
  release's router_aux_loss_coef); 41.9B parameters, 6.6B activated per token. ``STANDIN_FACTORS``: the release's
  64 short and 64 long LongRoPE factors are not written here (1.0 each instead), so this preset's rotary embedding
  is not the release's; the released directory's config.json carries them, and moejax.hf.load reads them.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "3_5_moe")

# The LongRoPE factors of the 3_5_moe preset: 1.0 for each of the 64 rotary pairs, standing in for the released lists
STANDIN_FACTORS = (1.0,) * 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(norm="layernorm", norm_eps=1e-5, qkv_bias=True, o_bias=True, lm_head_bias=True, tie_embeddings=False)
    moe.update(num_experts=16, top_k=2, dispatch="dropless", balance_loss="switch")
    moe.router.update(kind="sparsemixer", jitter_eps=0.01)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, ffn_dim=400)
        moe.update(expert_ffn=400, balance_coef=1e-3)
    else:  # "3_5_moe"
        model.update(vocab_size=32064, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim=6400,
                     rope_theta=10000.0, layer_types=("sliding",) * 32, sliding_window=131072, dtype="bfloat16",
                     param_dtype="bfloat16")
        model.rope_scaling.update(kind="longrope", short_factor=STANDIN_FACTORS, long_factor=STANDIN_FACTORS,
                                  short_mscale=1.243163121016122, long_mscale=1.243163121016122,
                                  original_max_position_embeddings=4096)
        moe.update(expert_ffn=6400, balance_coef=0.0)
    return config
