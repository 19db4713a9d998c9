"""Writes the transformers golden fixtures that tests/hf/test_hf.py checks moejax.hf against (no torch needed there).

Run after ``pip install -e ".[hf]"``:

    python tests/hf/golden/make_hf_goldens.py [case ...]      # default: every case

For every case (two or more per family, varying expert count, top-k, groups, the dense-layer pattern,
norm_topk_prob, biases, head width, rope) it builds a tiny random model with transformers' own config class, draws
every parameter and buffer at random (norm scales around 1, so that swapped norms show), saves it with
save_pretrained in float32 to tests/hf/golden/<case>/ (config.json, model.safetensors: a few hundred KB), and
writes golden.npz beside it: the float32 logits of fixed token ids and a greedy continuation (the full forward pass
on the growing sequence, argmax of the last position). ``build(case)`` and ``reference(model, tokens)`` are what
the live check of tests/hf/test_hf.py uses when torch and transformers import.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent
BATCH, SEQ = 2, 12  # the logits' token ids
PROMPT, NEW_TOKENS = 4, 8  # the greedy continuation
COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
              num_hidden_layers=2, rms_norm_eps=1e-6, max_position_embeddings=64)

# case name -> (transformers config class name, config fields, post-processing of the saved directory or None)
CASES: dict[str, tuple[str, dict, str | None]] = {
    "mixtral_a": ("MixtralConfig", dict(COMMON, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5), None),
    "mixtral_b": ("MixtralConfig", dict(COMMON, num_local_experts=8, num_experts_per_tok=3, num_hidden_layers=3,
                                        intermediate_size=24,
                                        head_dim=12, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 500.0}), None),
    "qwen2_moe_a": ("Qwen2MoeConfig", dict(COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                           shared_expert_intermediate_size=40, norm_topk_prob=False), None),
    "qwen2_moe_b": ("Qwen2MoeConfig", dict(COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=16, norm_topk_prob=True,
                                           num_hidden_layers=4, mlp_only_layers=[0, 2], qkv_bias=False), None),
    "qwen3_moe_a": ("Qwen3MoeConfig", dict(COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                           norm_topk_prob=True), None),
    "qwen3_moe_b": ("Qwen3MoeConfig", dict(COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                           norm_topk_prob=False, head_dim=12, attention_bias=True,
                                           num_hidden_layers=4, decoder_sparse_step=2), None),
    "qwen3_moe_yarn": ("Qwen3MoeConfig", dict(COMMON, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=24, norm_topk_prob=True,
                                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                               "factor": 4.0,
                                                               "original_max_position_embeddings": 8}), None),
    "olmoe_a": ("OlmoeConfig", dict(COMMON, num_experts=4, num_experts_per_tok=2, num_key_value_heads=4,
                                    norm_topk_prob=False, rms_norm_eps=1e-5), None),
    "olmoe_b": ("OlmoeConfig", dict(COMMON, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                    clip_qkv=0.3, attention_bias=True, tie_word_embeddings=True), None),
    "deepseek_v2_a": ("DeepseekV2Config", dict(COMMON, num_key_value_heads=4, n_routed_experts=4,
                                               num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                                               first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                               qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                                               topk_method="greedy"), None),
    "deepseek_v2_b": ("DeepseekV2Config", dict(COMMON, num_key_value_heads=4, n_routed_experts=8,
                                               num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
                                               first_k_dense_replace=0, num_hidden_layers=3, kv_lora_rank=16,
                                               q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                               v_head_dim=8, topk_method="group_limited_greedy", n_group=4,
                                               topk_group=2, routed_scaling_factor=2.0,
                                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                "factor": 4.0, "mscale": 0.707,
                                                                "mscale_all_dim": 0.707,
                                                                "original_max_position_embeddings": 8}),
                      "legacy_rope"),
    "deepseek_v3_a": ("DeepseekV3Config", dict(COMMON, num_key_value_heads=4, n_routed_experts=8,
                                               num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                                               first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16,
                                               q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                               n_group=2, topk_group=1, norm_topk_prob=True,
                                               routed_scaling_factor=2.5, rope_interleave=True), "mtp_layer"),
    "deepseek_v3_b": ("DeepseekV3Config", dict(COMMON, num_key_value_heads=4, n_routed_experts=6,
                                               num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
                                               first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                                               qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_group=1,
                                               topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                                               rope_interleave=False,
                                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                "factor": 8.0, "mscale": 1.0,
                                                                "mscale_all_dim": 1.0, "beta_fast": 32.0,
                                                                "beta_slow": 1.0,
                                                                "original_max_position_embeddings": 8}), None),
    "gpt_oss_a": ("GptOssConfig", dict(COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=12,
                                       intermediate_size=32,
                                       sliding_window=4, rms_norm_eps=1e-5, swiglu_limit=0.5,
                                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                        "original_max_position_embeddings": 16}), None),
    "gpt_oss_b": ("GptOssConfig", dict(COMMON, num_local_experts=8, num_experts_per_tok=3, head_dim=8,
                                       attention_bias=False, sliding_window=8, swiglu_alpha=1.0,
                                       layer_types=["full_attention", "full_attention"],
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), None),
    "phimoe_a": ("PhimoeConfig", dict(COMMON, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                                      attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), None),
    # LongRoPE within its short regime (12 positions <= 16), a sliding window, a wide SparseMixer threshold, the
    # hub's rope fields (rope_theta, rope_scaling with 'type')
    "phimoe_b": ("PhimoeConfig", dict(COMMON, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=3,
                                      intermediate_size=24, rms_norm_eps=1e-5, router_jitter_noise=0.3,
                                      sliding_window=4,
                                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                       "short_factor": [1.0, 1.1, 1.7, 2.5],
                                                       "long_factor": [1.5, 3.0, 6.0, 9.0], "short_mscale": 1.2,
                                                       "long_mscale": 1.3, "original_max_position_embeddings": 16}),
                 "legacy_rope"),
    # half of each 16-wide head rotated (transformers' default), groups, q/k/v biases, a first dense layer, a
    # multi-token-prediction layer after the last
    "glm4_moe_a": ("Glm4MoeConfig", dict(COMMON, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                                         num_hidden_layers=3, n_group=2, topk_group=1, norm_topk_prob=True,
                                         routed_scaling_factor=2.5, attention_bias=True, rms_norm_eps=1e-5),
                   "mtp_layer"),
    "glm4_moe_b": ("Glm4MoeConfig", dict(COMMON, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         n_shared_experts=2, first_k_dense_replace=0, n_group=1, topk_group=1,
                                         norm_topk_prob=False, use_qk_norm=True, attention_bias=False,
                                         rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                          "partial_rotary_factor": 1.0}), None),
}


def _more_cases() -> None:
    """Cases kept in sibling modules ``cases_*.py`` (each defines ``CASES`` in the same form, and may define ``POST``
    functions): a family round adds its own module instead of growing this one."""
    import importlib.util

    for path in sorted(ROOT.glob("cases_*.py")):
        spec = importlib.util.spec_from_file_location(f"_golden_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        clash = set(module.CASES) & set(CASES)
        if clash:
            raise SystemExit(f"{path.name} redefines cases {sorted(clash)}")
        CASES.update(module.CASES)
        POST.update(getattr(module, "POST", {}))


def family(case: str) -> str:
    return case.rsplit("_", 1)[0]


def build(case: str, seed: int = 0):
    """The random float32 transformers model of a case (eager attention, eval mode)."""
    import torch
    import transformers

    class_name, fields, _ = CASES[case]
    config = getattr(transformers, class_name)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name:
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias") or "sinks" in name:
                value = (0.3 if "sinks" in name else 0.1) * noise
            elif "embed_tokens" in name:  # smaller when tied: else each position predicts its own token
                value = noise * (0.1 if model.config.tie_word_embeddings else 1.0)
            else:
                fan_in = tensor.shape[-2] if name.endswith(("gate_up_proj", "down_proj")) and tensor.ndim == 3 \
                    else tensor.shape[-1]
                value = noise * fan_in ** -0.5
            tensor.copy_(value)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def reference(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def greedy(model, prompt: np.ndarray, steps: int = NEW_TOKENS) -> np.ndarray:
    ids = np.asarray(prompt)
    for _ in range(steps):
        next_id = reference(model, ids)[:, -1].argmax(-1)
        ids = np.concatenate([ids, next_id[:, None]], axis=1)
    return ids[:, prompt.shape[1]:]


def tokens_of(vocab: int) -> np.ndarray:
    return np.random.RandomState(1234).randint(0, vocab, (BATCH, SEQ))


def _legacy_rope(directory: pathlib.Path) -> None:
    """config.json with the pre-v5 rope fields (rope_theta, rope_scaling with 'type') that hub checkpoints have."""
    raw = json.loads((directory / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    raw["rope_scaling"] = params
    (directory / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _mtp_layer(directory: pathlib.Path) -> None:
    """A multi-token-prediction layer after the last one (as the released DeepSeek-V3 and GLM-4.5 checkpoints have):
    layer num_hidden_layers, a decoder block (the last layer's, its weights perturbed) with the MTP tensors enorm,
    hnorm, eh_proj, shared_head.norm and the copies shared_head.head (of lm_head) and embed_tokens. transformers
    ignores it (the goldens are the main model's); moejax loads it into its MTP module."""
    from safetensors.numpy import load_file, save_file

    raw = json.loads((directory / "config.json").read_text())
    layers = raw["num_hidden_layers"]
    tensors = load_file(directory / "model.safetensors")
    last = f"model.layers.{layers - 1}."
    for key in [k for k in tensors if k.startswith(last)]:
        tensors[f"model.layers.{layers}." + key[len(last):]] = tensors[key].copy()
    width = raw["hidden_size"]
    rng = np.random.RandomState(7)
    for key in [k for k in tensors if k.startswith(f"model.layers.{layers}.")]:
        noise = rng.randn(*tensors[key].shape).astype(np.float32)
        tensors[key] = tensors[key] + np.float32(0.1) * noise * np.abs(tensors[key]).mean()
    mtp = f"model.layers.{layers}."
    tensors[mtp + "enorm.weight"] = (1 + 0.2 * rng.randn(width)).astype(np.float32)
    tensors[mtp + "hnorm.weight"] = (1 + 0.2 * rng.randn(width)).astype(np.float32)
    tensors[mtp + "eh_proj.weight"] = (rng.randn(width, 2 * width) / np.sqrt(2 * width)).astype(np.float32)
    tensors[mtp + "shared_head.norm.weight"] = (1 + 0.2 * rng.randn(width)).astype(np.float32)
    tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].copy()
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    raw["num_nextn_predict_layers"] = 1
    (directory / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


POST = {"legacy_rope": _legacy_rope, "mtp_layer": _mtp_layer}
_more_cases()


def write(case: str, root: pathlib.Path = ROOT) -> pathlib.Path:
    model = build(case)
    directory = root / case
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    model.save_pretrained(directory)
    (directory / "generation_config.json").unlink(missing_ok=True)
    post = CASES[case][2]
    if post:
        POST[post](directory)
    tokens = tokens_of(model.config.vocab_size)
    np.savez(directory / "golden.npz", tokens=tokens, logits=reference(model, tokens),
             prompt=tokens[:1, :PROMPT], greedy=greedy(model, tokens[:1, :PROMPT]))
    return directory


def main(argv: list[str]) -> None:
    cases = argv or list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    for case in cases:
        directory = write(case)
        size = sum(f.stat().st_size for f in directory.iterdir())
        print(f"{case:16s} {size / 1024:7.1f} KB  {directory}")


if __name__ == "__main__":
    main(sys.argv[1:])
