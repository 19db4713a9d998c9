"""Llama 4 (Meta, 2025; released with a model card and no paper: no arXiv report describes its architecture, which
transformers' modeling_llama4.py gives). Its parts have papers: the NoPE layers (Kazemnejad et al., 2023, arXiv
2305.19466), their attention temperature after Scalable-Softmax (Nakanishi, 2025, arXiv 2501.19399), the shared
expert (DeepSeekMoE, arXiv 2401.06066).

Architecture (the text model): grouped-query attention (40 query / 8 key-value heads of 128 at d_model 5120, no
biases) whose rotary embedding (base 500000) turns interleaved pairs; every fourth layer is a NoPE layer (no rotary
embedding, full causal attention) whose queries at position p are scaled by 1 + 0.1 * log(1 + floor((p + 1) / 8192));
the other layers attend within chunks of 8192 positions and, in Scout, RMS-normalise each query and key head without
a scale after the rotary embedding (moejax's ``qk_norm_scope='l2'``). MoE layers route each token to one expert by
its logit and multiply the expert's input (not its output) by the sigmoid of that logit (``moe.scale_expert_input``);
an ungated shared expert of the experts' width runs beside them. RMSNorm (eps 1e-5); untied embeddings.

Presets (``--config=configs/llama4.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 layers (MoE every second layer, from layer 1, as Maverick; the others dense of 352), 8 query /
  2 KV heads of 32, one NoPE layer in four as released (here layer 1) with the attention temperature (floor 64), the
  rotary layers chunked by 64 with the q/k norm, 8 experts of 176, top-1, byte vocabulary, the switch balance loss
  at 1e-3 (transformers' router_aux_loss_coef).
* ``scout``: Llama-4-Scout-17B-16E's text model as its config.json gives it (``moejax.hf.read_config`` of that file's
  ``text_config`` equals this preset's ``model`` field by field; tests/hf/test_hf_llama4.py). Where the values come
  from (no network here): transformers' Llama4TextConfig defaults, which its docstring names as this checkpoint's
  (vocabulary 202048, hidden_size 5120, intermediate_size 8192, intermediate_size_mlp 16384, 48 layers, 40 / 8 heads
  of head_dim 128, 16 local experts, top-1, interleave_moe_layer_step 1, use_qk_norm, a NoPE layer every 4,
  attention_chunk_size 8192, attn_temperature_tuning with floor_scale 8192 and attn_scale 0.1, rms_norm_eps 1e-5,
  rope_theta 500000), and the hub file's rope_scaling as remembered and as other projects transcribe it ('llama3',
  factor 16, low_freq_factor 1, high_freq_factor 1, original_max_position_embeddings 8192: one step at wavelength
  8192, no smooth band); bfloat16. 107.8B parameters, 17.2B activated per token with both embeddings (published:
  109B total with the vision encoder, 17B activated).
* ``maverick``: Llama-4-Maverick-17B-128E's text model the same way: Scout's shapes with 128 local experts on every
  second layer (interleave_moe_layer_step 2: layers 1, 3, ...; the others dense of 16384), no q/k norm (transformers'
  modelling code: "the 128E model does not use qk_norm") and no rotary scaling, as its config.json gives them;
  bfloat16. 400.7B parameters, 17.2B activated per token with both embeddings (published: 400B total, 17B
  activated).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "scout", "maverick")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(rope_interleave=True, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False, qk_norm=True,
                 qk_norm_scope="l2", attn_temperature_scale=0.1)
    moe.update(top_k=1, num_shared=1, shared_ffn=0, scale_expert_input=True, dispatch="dropless",
               balance_loss="switch", balance_coef=1e-3)
    moe.router.update(score="sigmoid", norm_topk_prob=False)
    if preset == "small":
        layers = 4
        model.update(d_model=256, num_layers=layers, num_heads=8, num_kv_heads=2, head_dim=32, ffn_dim=352,
                     first_dense_layers=1, moe_every=2, attention_chunk_size=64, attn_temperature_floor=64)
        moe.update(num_experts=8, expert_ffn=176)
    else:  # "scout", "maverick": 48 layers, NoPE every fourth
        layers = 48
        model.update(vocab_size=202048, d_model=5120, num_layers=layers, num_heads=40, num_kv_heads=8,
                     ffn_dim=16384, attention_chunk_size=8192, attn_temperature_floor=8192, dtype="bfloat16",
                     param_dtype="bfloat16")
        moe.update(expert_ffn=8192)
        if preset == "scout":
            model.rope_scaling.update(kind="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                      original_max_position_embeddings=8192)
            moe.num_experts = 16
        else:  # "maverick"
            model.update(qk_norm=False, qk_norm_scope="head", first_dense_layers=1, moe_every=2)
            moe.num_experts = 128
    model.nope_layers = (1,) if preset == "small" else tuple(i for i in range(layers) if (i + 1) % 4 == 0)
    model.layer_types = tuple("full" if i in model.nope_layers else "chunked" for i in range(layers))
    return config
