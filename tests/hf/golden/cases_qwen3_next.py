"""Golden cases of Qwen3-Next (make_hf_goldens.py loads this module beside its own CASES): the same form, case
name -> (transformers config class, fields, post-processing)."""

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
              num_hidden_layers=4, rms_norm_eps=1e-6, max_position_embeddings=64)

CASES = {
    # layers linear, full, linear, full (full_attention_interval 2), 2 key heads for 4 value heads of another width,
    # 2 of 8 head dims rotated (transformers' 0.25), every layer MoE with a shared expert wider than the experts
    "qwen3_next_a": ("Qwen3NextConfig", dict(COMMON, head_dim=8, full_attention_interval=2, linear_num_key_heads=2,
                                             linear_num_value_heads=4, linear_key_head_dim=8,
                                             linear_value_head_dim=6, linear_conv_kernel_dim=4, num_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=24, norm_topk_prob=True), None),
    # explicit layer_types (full first), one key head per value head, a 3-wide convolution, q/k/v/o biases, half of
    # 16 head dims rotated, MoE on layers 1 and 3 (decoder_sparse_step 2), unnormalised top-3 of 6, tied embeddings.
    # (transformers' float32 forward runs the delta rule in chunks, whose triangular solve drifted from its own
    # float64 forward by 1.3e-4 on these logits with 8 experts, past the tests' 1e-4; with 6 by 1.1e-5)
    "qwen3_next_b": ("Qwen3NextConfig", dict(COMMON, head_dim=16, layer_types=["full_attention", "linear_attention",
                                                                               "linear_attention", "full_attention"],
                                             linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                                             linear_value_head_dim=8, linear_conv_kernel_dim=3, num_experts=6,
                                             num_experts_per_tok=3, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=16, norm_topk_prob=False,
                                             decoder_sparse_step=2, attention_bias=True, tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                              "partial_rotary_factor": 0.5}), None),
}
