"""Golden cases of the dense released families (llama, mistral, qwen2, qwen3, olmo2, phi3), in make_hf_goldens.py's
form: (transformers config class name, config fields, post-processing of the saved directory or None). Two tiny
cases per family vary tied embeddings, biases, head width, sliding windows and the rotary scalings."""
NO_TOKENS = dict(pad_token_id=None, eos_token_id=None)  # Phi3Config's defaults (32000) are past the tiny vocabulary
COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
              num_hidden_layers=2, rms_norm_eps=1e-6, max_position_embeddings=64)

CASES: dict[str, tuple[str, dict, str | None]] = {
    # q/k/v/o biases, tied embeddings
    "llama_a": ("LlamaConfig", dict(COMMON, attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-5), None),
    # Llama 3.1's rotary scaling (12-wide heads: one frequency kept, one in the smoothed band, four divided)
    "llama_b": ("LlamaConfig", dict(COMMON, head_dim=12, num_hidden_layers=3,
                                    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16}), None),
    # a 4-token sliding window on every layer, 16-wide heads
    "mistral_a": ("MistralConfig", dict(COMMON, sliding_window=4, head_dim=16), None),
    # a window as long as the sequence, multi-head attention, the hub's rope fields (with no window a Mistral model
    # is a Llama one, and saves as llama)
    "mistral_b": ("MistralConfig", dict(COMMON, sliding_window=12, num_key_value_heads=4,
                                        rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                  "legacy_rope"),
    # q/k/v biases; a sliding window from layer 1 on (max_window_layers=1)
    "qwen2_a": ("Qwen2Config", dict(COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1), None),
    # tied embeddings, linear position interpolation in the hub's rope fields
    "qwen2_b": ("Qwen2Config", dict(COMMON, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
                "legacy_rope"),
    # per-head q/k norms on 12-wide heads
    "qwen3_a": ("Qwen3Config", dict(COMMON, head_dim=12), None),
    # attention_bias on q/k/v/o, a sliding window on every layer, YaRN
    "qwen3_b": ("Qwen3Config", dict(COMMON, head_dim=8, attention_bias=True, use_sliding_window=True,
                                    sliding_window=5, max_window_layers=0,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                     "original_max_position_embeddings": 16}), None),
    # post-norm blocks, q/k norms over the whole projections
    "olmo2_a": ("Olmo2Config", dict(COMMON, rms_norm_eps=1e-6), None),
    # attention_bias, multi-head attention, tied embeddings
    "olmo2_b": ("Olmo2Config", dict(COMMON, attention_bias=True, num_key_value_heads=4, tie_word_embeddings=True),
                None),
    # fused qkv_proj / gate_up_proj, a sliding window, LongRoPE (short regime: 12 positions <= 16) on half of each
    # head (partial_rotary_factor 0.5)
    "phi3_a": ("Phi3Config", dict(COMMON, **NO_TOKENS, sliding_window=4, original_max_position_embeddings=16,
                                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5, "short_factor": [1.0, 1.7],
                                                   "long_factor": [3.0, 9.0],
                                                   "original_max_position_embeddings": 16}), None),
    # the default rotary embedding on 6 of each head's 8 dims (Phi-4-mini's 0.75), no window, tied embeddings
    "phi3_b": ("Phi3Config", dict(COMMON, **NO_TOKENS, num_key_value_heads=4, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.75}), None),
}
