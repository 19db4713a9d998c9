"""Golden cases of Llama 4's text model (make_hf_goldens.py loads this module beside its own CASES): the same form,
case name -> (transformers config class, fields, post-processing). Chunks of 3 positions and an attention temperature
that changes every 2 positions, so that the 12 positions of the logits and the greedy continuation cross several
chunk boundaries and temperature steps."""

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=16, intermediate_size_mlp=40, rms_norm_eps=1e-5, max_position_embeddings=64)

CASES = {
    # MoE every second layer (1, 3; the others dense of intermediate_size_mlp), NoPE every second layer (1, 3) with
    # the attention temperature, chunked attention on the rotary layers, the L2 q/k norm, Llama 3.1's frequency
    # bands with a smooth band, top-1 of 4
    "llama4_text_a": ("Llama4TextConfig", dict(COMMON, num_hidden_layers=4, interleave_moe_layer_step=2,
                                               num_local_experts=4, num_experts_per_tok=1, no_rope_layer_interval=2,
                                               attention_chunk_size=3, attn_temperature_tuning=True, floor_scale=2,
                                               attn_scale=0.5, use_qk_norm=True,
                                               rope_parameters={"rope_type": "llama3", "rope_theta": 500.0,
                                                                "factor": 8.0, "low_freq_factor": 1.0,
                                                                "high_freq_factor": 4.0,
                                                                "original_max_position_embeddings": 16}), None),
    # every layer MoE, the last layer NoPE (no_rope_layers given), no chunks, no q/k norm, q/k/v/o biases, tied
    # embeddings, Llama 4 Scout's rotary scaling (factor 16, equal band factors: no smooth band), top-1 of 6
    "llama4_text_b": ("Llama4TextConfig", dict(COMMON, num_hidden_layers=3, interleave_moe_layer_step=1,
                                               num_local_experts=6, num_experts_per_tok=1, no_rope_layers=[1, 1, 0],
                                               attention_chunk_size=None, attn_temperature_tuning=True,
                                               floor_scale=3, attn_scale=0.3, use_qk_norm=False, attention_bias=True,
                                               tie_word_embeddings=True,
                                               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                                "factor": 16.0, "low_freq_factor": 1.0,
                                                                "high_freq_factor": 1.0,
                                                                "original_max_position_embeddings": 8}), None),
}
