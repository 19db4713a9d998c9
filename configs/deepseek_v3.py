"""DeepSeek-V3 (DeepSeek-AI, 2024, arXiv 2412.19437): sigmoid routing with group limits and aux-loss-free balance.

Architecture: Multi-head Latent Attention (queries through a low-rank bottleneck, keys and values expanded from one
compressed latent plus a single shared rotary key, YaRN-extended rotary embeddings in the interleaved layout); the
first layers keep a dense SwiGLU FFN and all later ones are DeepSeekMoE layers (one always-on shared expert plus
many narrow routed experts). The router scores each expert with a sigmoid; experts are split into groups, only the
groups with the best sum of their two top scores stay eligible, the top-k experts are chosen on the scores plus a
selection-only bias (moejax's ``moe_state`` router_bias, adjusted after each step from the observed load instead of a
large balance loss), and the chosen sigmoid scores are renormalised to sum to 1 and scaled.

Presets (``--config=configs/deepseek_v3.py:<preset>``):
* ``small`` (default): the routing recipe at the small width (docs/methods.md#deepseek-v3): sigmoid affinities,
  8 groups of which the 4 best (by the sum of their top-2 scores) stay eligible, the others masked to 0 before the
  top-k as in the released code, the aux-loss-free selection bias (u = 1e-3), weights renormalised over the selected
  experts and scaled by 2.5, a tiny sequence-wise balance loss alpha = 1e-4, 1 shared expert, the first layer dense.
  Reproduces the section 4.5.3 comparison (sequence-wise aux vs aux-loss-free vs batch-wise) with
  --config.model.moe.balance_scope and --config.model.moe.bias_update_rate; MaxVio is logged per layer. Choices: 64
  routed experts of width 176 with top-8 (V3's 256 / top-8 scaled down), 5 layers so that 4 stay MoE after the
  dense first layer (V3 has 3 dense of 61), dense FFN 704, multi-head attention instead of MLA.
* ``small_mtp``: ``small`` with DeepSeek-V3's multi-token prediction (section 2.2): one MTP module (depth D = 1)
  predicting the token after next, trained with weight lambda = 0.3 (the paper's first 10T tokens; 0.1 after);
  ``--config.model.mtp_depth`` and ``--config.model.mtp_loss_weight`` change them. The loss of each depth is logged
  as ``mtp_loss_k``.
* ``671b``: DeepSeek-V3 exactly as its released config.json gives it (``moejax.hf.read_config`` of that directory
  equals this preset's ``model`` field by field; tests/test_released_presets.py): d_model 7168, 61 layers (3
  dense), 128 heads of MLA (q-LoRA 1536, kv-LoRA 512, 128 + 64 query/key dims, values of 128, YaRN x40 from 4096),
  1 shared + 256 routed experts of 2048, top-8 within 4 of 8 groups (masked to -inf, as transformers does), scale
  2.5, dense FFN 18432, vocabulary 129280, bfloat16; 671B parameters, 37B activated per token (36.6B without the
  input embedding, 37.6B with it as moejax.model.param_counts counts). The released config.json names no training
  recipe, so the balance fields are configs/base.py's (as read_config gives them); the paper's are
  --config.model.moe.bias_update_rate=1e-3 --config.model.moe.balance_loss=deepseek
  --config.model.moe.balance_coef=1e-4 --config.model.moe.balance_scope=sequence. One multi-token-prediction
  module (num_nextn_predict_layers 1; mtp_depth 1, the checkpoint's layer 61, 14B parameters besides the 671B),
  trained with configs/base.py's mtp_loss_weight 0.3 (the paper's first 10T tokens).
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("small", "small_mtp", "671b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="small")
    config = base.get_config()
    model, moe = config.model, config.model.moe
    moe.update(num_shared=1, dispatch="dropless")
    moe.router.update(score="sigmoid", softmax_before_topk=True, norm_topk_prob=True, routed_scaling_factor=2.5,
                      num_groups=8, topk_groups=4, group_score="top2_sum")
    if preset in ("small", "small_mtp"):
        model.update(d_model=256, num_layers=5, num_heads=4, ffn_dim=704, first_dense_layers=1)
        moe.update(num_experts=64, top_k=8, expert_ffn=176, balance_loss="deepseek", balance_coef=1e-4,
                   balance_scope="sequence", bias_update_rate=1e-3)
        moe.router.group_mask_fill = 0.0
        if preset == "small_mtp":  # section 2.2: one MTP module, lambda 0.3 (0.1 for the last 4.8T tokens)
            model.update(mtp_depth=1, mtp_loss_weight=0.3)
    else:  # "671b"
        model.update(vocab_size=129280, d_model=7168, num_layers=61, num_heads=128, ffn_dim=18432,
                     first_dense_layers=3, attention="mla", rope_interleave=True, norm_eps=1e-6,
                     tie_embeddings=False, dtype="bfloat16", param_dtype="bfloat16", mtp_depth=1)
        model.mla.update(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                         v_head_dim=128)
        model.rope_scaling.update(kind="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                  beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, truncate=True)
        moe.update(num_experts=256, top_k=8, expert_ffn=2048)
        moe.router.group_mask_fill = float("-inf")
    return config
