"""Golden cases of dots.llm1, ERNIE 4.5 MoE, MiniMax-M2, LongCat-Flash and FlexOlmo (make_hf_goldens.py loads this
module beside its own CASES): the same form, case name -> (transformers config class, fields, post-processing)."""

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
              num_hidden_layers=2, rms_norm_eps=1e-6, max_position_embeddings=64)

CASES = {
    # a first dense layer, groups, q/k/v/o biases, 8-wide heads, the last layer sliding over 4 positions
    "dots1_a": ("Dots1Config", dict(COMMON, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                                    n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                                    attention_bias=True, head_dim=8, sliding_window=4, max_window_layers=2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0}), None),
    # every layer MoE, no groups, unnormalised weights, two shared experts, no window
    "dots1_b": ("Dots1Config", dict(COMMON, n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
                                    n_shared_experts=2, first_k_dense_replace=0, norm_topk_prob=False,
                                    sliding_window=None), None),
}
CASES.update({
    # MoE layers 1 and 2 of 4 (moe_layer_end_index 2: the last layer dense), two shared experts, tied embeddings,
    # the selection bias of transformers' own init drawn at random like every buffer
    "ernie4_5_moe_a": ("Ernie4_5_MoeConfig", dict(COMMON, num_hidden_layers=4, moe_num_experts=8, moe_k=2,
                                                  moe_intermediate_size=16, moe_num_shared_experts=2,
                                                  moe_layer_start_index=1, moe_layer_end_index=2,
                                                  moe_layer_interval=1, tie_word_embeddings=True), None),
    # every second layer MoE (layers 1 and 3), no shared expert, untied, 4 of 8 heads' width per KV head
    "ernie4_5_moe_b": ("Ernie4_5_MoeConfig", dict(COMMON, num_hidden_layers=4, moe_num_experts=6, moe_k=3,
                                                  moe_intermediate_size=16, moe_num_shared_experts=0,
                                                  moe_layer_start_index=0, moe_layer_interval=2,
                                                  tie_word_embeddings=False,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 800.0}),
                       None),
})
CASES.update({
    # half of each 16-wide head rotated, the q/k RMSNorm over all heads, a selection bias, top-2 of 8
    "minimax_m2_a": ("MiniMaxM2Config", dict(COMMON, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                             intermediate_size=16,
                                             rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                                              "partial_rotary_factor": 0.5}), None),
    # the released config's legacy rotary_dim (24 of 32-wide... here 4 of 8), three layers, top-3 of 6, tied embeddings
    "minimax_m2_b": ("MiniMaxM2Config", dict(COMMON, head_dim=8, num_hidden_layers=3, num_local_experts=6,
                                             num_experts_per_tok=3, intermediate_size=24, tie_word_embeddings=True,
                                             rotary_dim=4), "rotary_dim"),
})


def _rotary_dim(directory) -> None:
    """config.json as the released MiniMax-M2 writes its partial rotary embedding: a top-level rotary_dim (of
    head_dim) and rope_theta, no rope_parameters."""
    import json

    raw = json.loads((directory / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params["rope_theta"]
    raw["rotary_dim"] = int(raw["head_dim"] * params["partial_rotary_factor"])
    (directory / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


POST = {"rotary_dim": _rotary_dim}
CASES.update({
    # OLMo 2's post-norm block with OLMoE's MoE: unnormalised top-2 of 6 (pad_token_id unset: FlexOlmoConfig's
    # default lies past the tiny vocabulary)
    "flex_olmo_a": ("FlexOlmoConfig", dict(COMMON, num_experts=6, num_experts_per_tok=2, intermediate_size=16,
                                           norm_topk_prob=False, rms_norm_eps=1e-6, pad_token_id=None,
                                           rope_parameters={"rope_type": "default", "rope_theta": 500.0}), None),
    # q/k/v/o biases, renormalised top-3 of 8, multi-head attention, tied embeddings, three layers
    "flex_olmo_b": ("FlexOlmoConfig", dict(COMMON, num_experts=8, num_experts_per_tok=3, intermediate_size=16,
                                           num_hidden_layers=3, num_key_value_heads=4, norm_topk_prob=True,
                                           pad_token_id=None,
                                           attention_bias=True, tie_word_embeddings=True), None),
})
