"""LongCat-Flash (Meituan LongCat Team, 2025, arXiv 2509.01322): shortcut-connected MoE with zero-computation experts.

Architecture: each of its layers holds two sublayers of Multi-head Latent Attention + dense SwiGLU FFN and one MoE
whose input is the first sublayer's normalised FFN input and whose output joins the residual stream after the second
sublayer's FFN (shortcut-connected MoE, ScMoE: the MoE's dispatch overlaps the dense computation). In moejax these
are two layers: a shortcut-connected MoE layer (``model.moe_shortcut``, ``moe_every=2``: its dense FFN
``dense_ffn`` and its MoE ``ffn`` on the same input) and a dense one that adds the MoE's output after its FFN. The
attention is MLA with a query LoRA whose queries are scaled by sqrt(d_model / q_lora_rank) and whose normalised
key/value latent is scaled by sqrt(d_model / kv_lora_rank) (``model.mla.lora_scaling``), rotating interleaved
pairs. The router scores the routed SwiGLU experts and the zero-computation experts, which return their input
(``model.moe.num_identity_experts``), by one softmax; the top-k are chosen on the probabilities plus a selection-only
bias (over both kinds; the routed experts' part is ``router_bias``, the identity experts' ``identity_bias``), and
the selected probabilities, unnormalised, are scaled by routed_scaling_factor. A token thus activates a variable
number of real experts.

Presets (``--config=configs/longcat_flash.py:<preset>``):
* ``small`` (default): the architecture at the small width (docs/methods.md#tiny-and-small-shapes), trainable on a
  CPU: d_model 256, 4 moejax layers (two LongCat layers), 4 heads of MLA (q-LoRA 64, kv-LoRA 32, 32 + 16
  query/key dims, values of 32), dense FFN 352, 32 routed experts of 176 and 16 identity experts, top-4, scale 2.0
  (choices: the release's ratios of 2 routed to 1 identity expert and of top-k 12 to 768 scaled down), byte
  vocabulary, configs/base.py's balance fields.
* ``flash``: LongCat-Flash as its config.json gives it (``moejax.hf.read_config`` of that file equals this preset's
  ``model`` field by field; tests/hf/test_hf_longcat_flash.py). Where the values come from (no network here):
  transformers' LongcatFlashConfig defaults, which its docstring names as meituan-longcat/LongCat-Flash-Chat's:
  vocabulary 131072, hidden_size 6144, num_layers 28 (56 moejax layers), 64 heads, q_lora_rank 1536, kv_lora_rank
  512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, ffn_hidden_size 12288, 512 routed experts of
  expert_ffn_hidden_size 2048, zero_expert_num 256, moe_topk 12, routed_scaling_factor 6.0, rope_theta 1e7,
  rms_norm_eps 1e-5, untied embeddings; bfloat16 (the dtype of the release, not in the class). 560.7B parameters
  (published: 560B), 31.4B activated per token without the input embedding when all 12 slots are routed experts
  (moejax.model.param_counts; published: 18.6B to 31.3B, 27B on average, as tokens pick identity experts). The
  released multi-token-prediction module (``model.mtp.*``) is not in the main model transformers loads.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "flash")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    model.update(attention="mla", rope_interleave=True, moe_every=2, moe_shortcut=True, tie_embeddings=False)
    model.mla.lora_scaling = True
    moe.update(num_shared=0, dispatch="dropless")
    moe.router.update(kind="topk", score="softmax", softmax_before_topk=True, norm_topk_prob=False)
    if preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=352)
        model.mla.update(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
        moe.update(num_experts=32, num_identity_experts=16, top_k=4, expert_ffn=176)
        moe.router.routed_scaling_factor = 2.0
    else:  # "flash"
        model.update(vocab_size=131072, d_model=6144, num_layers=56, num_heads=64, ffn_dim=12288, rope_theta=1e7,
                     norm_eps=1e-5, dtype="bfloat16", param_dtype="bfloat16")
        model.mla.update(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                         v_head_dim=128)
        moe.update(num_experts=512, num_identity_experts=256, top_k=12, expert_ffn=2048)
        moe.router.routed_scaling_factor = 6.0
    return config
