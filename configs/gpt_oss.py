"""GPT-OSS (OpenAI, gpt-oss-120b & gpt-oss-20b Model Card, 2025, arXiv 2508.10925).

Architecture: layers alternate between banded attention over the last 128 positions and full causal attention; both
are grouped-query attention (8 query heads per key/value head, heads of 64 independent of d_model) with biases on
every projection and a learned per-head "sink" logit that joins each softmax's denominator, so a head can attend to
nothing. Rotary embeddings of base 150000 are extended with YaRN (x32 from 4096, without rounding the correction
range). Every FFN is MoE: a router with a bias picks the top-4 experts by logit and weights them by the softmax over
those four; each expert is a biased SwiGLU of width d_model whose gate is clamped above at 7 and whose up projection
is clamped to [-7, 7], combined as (up + 1) * gate * sigmoid(1.702 * gate). No shared expert; untied embeddings.

Presets (``--config=configs/gpt_oss.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers alternating sliding (window 128) and full attention, 8 query / 2 KV heads of 32 with
  sinks and biases, 32 experts of 256, top-4, byte vocabulary, plain rotary embeddings (YaRN only extends
  contexts far beyond the 256 bytes trained on), balance coefficient 0.01; 26.1M parameters, 4.0M activated.
* ``20b``: gpt-oss-20b exactly as its released config.json gives it (``moejax.hf.read_config`` of that directory
  equals this preset's ``model`` field by field; tests/test_released_presets.py): d_model 2880, 24 layers, 64 query
  / 8 KV heads of 64, 32 experts of 2880, top-4, vocabulary 201088, RMSNorm eps 1e-5; 20.9B parameters, 3.6B
  activated per token (as published: without the input embedding; moejax.model.param_counts: 4.19B). The experts
  are stored in MXFP4 and dequantised on load.
* ``120b``: gpt-oss-120b, the same with 36 layers and 128 experts; 116.8B parameters, 5.1B activated
  (5.71B with the input embedding).
The released config.json files carry no dtype, so read_config (and these presets) compute in float32; pass
``dtype='bfloat16'`` to moejax.hf.load (or set model.dtype / model.param_dtype) for the checkpoint's own precision.
Their router_aux_loss_coef is 0.9, which these presets keep.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "20b", "120b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(qkv_bias=True, o_bias=True, attention_sinks=True, rope_theta=150000.0, tie_embeddings=False)
    moe.update(top_k=4, expert_kind="gpt_oss", swiglu_limit=7.0, swiglu_alpha=1.702, dispatch="dropless",
               balance_loss="switch")
    moe.router.update(score="softmax", softmax_before_topk=False, norm_topk_prob=False, bias=True)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, ffn_dim=256, sliding_window=128,
                     layer_types=("sliding", "full") * 2)
        moe.update(num_experts=32, expert_ffn=256, balance_coef=0.01)
    else:  # "20b" | "120b"
        layers = 24 if preset == "20b" else 36
        model.update(vocab_size=201088, d_model=2880, num_layers=layers, num_heads=64, num_kv_heads=8, head_dim=64,
                     ffn_dim=2880, norm_eps=1e-5, sliding_window=128, layer_types=("sliding", "full") * (layers // 2),
                     dtype="float32", param_dtype="float32")
        model.rope_scaling.update(kind="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                  beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0, truncate=False)
        moe.update(num_experts=32 if preset == "20b" else 128, expert_ffn=2880, balance_coef=0.9)
    return config
