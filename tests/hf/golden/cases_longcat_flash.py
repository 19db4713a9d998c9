"""Golden cases of LongCat-Flash (make_hf_goldens.py loads this module beside its own CASES): the same form, case
name -> (transformers config class, fields, post-processing). Each checkpoint layer is two moejax layers (two MLA +
dense-FFN sublayers and one shortcut-connected MoE); the router scores the routed and the zero-computation experts
together. head_dim is the rotary width (transformers' rotary embedding reads it)."""

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, rms_norm_eps=1e-6,
              max_position_embeddings=64, qk_nope_head_dim=8, qk_rope_head_dim=4, head_dim=4, v_head_dim=8)

CASES = {
    # two layers (four sublayers), 8 routed + 4 identity experts, top-3, q/kv LoRA ranks 16 / 8, a selection bias
    # drawn at random like every buffer (so identity experts are picked), scaling 2.0
    "longcat_flash_a": ("LongcatFlashConfig", dict(COMMON, num_layers=2, n_routed_experts=8, zero_expert_num=4,
                                                   moe_topk=3, expert_ffn_hidden_size=16, q_lora_rank=16,
                                                   kv_lora_rank=8, routed_scaling_factor=2.0,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                        None),
    # one layer, 6 routed + 6 identity experts, top-4, the released scaling 6.0, tied embeddings,
    # YaRN (its mscale_all_dim also scales the softmax)
    "longcat_flash_b": ("LongcatFlashConfig", dict(COMMON, num_layers=1, n_routed_experts=6, zero_expert_num=6,
                                                   moe_topk=4, expert_ffn_hidden_size=24, q_lora_rank=12,
                                                   kv_lora_rank=16, routed_scaling_factor=6.0,
                                                   tie_word_embeddings=True,
                                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                    "factor": 4.0, "mscale_all_dim": 0.707,
                                                                    "original_max_position_embeddings": 16}),
                        None),
}

