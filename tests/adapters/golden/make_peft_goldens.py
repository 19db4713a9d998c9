"""Writes the PEFT golden fixtures: LoRA adapters written by moejax in PEFT's format on a transformers golden model
(tests/hf/golden), and what peft.PeftModel computes with them.

    python tests/adapters/golden/make_peft_goldens.py write [case ...]                # moejax's environment
    /work/hfvenv/bin/python tests/adapters/golden/make_peft_goldens.py golden [case ...]
                                                                    # torch, transformers, peft; no moejax

``write``: for every case it loads the base golden model with moejax, adds adapters on the case's targets (rank 4,
alpha 8, A and B drawn from N(0, 0.2^2) by numpy with a fixed seed) and writes them with
``moejax.adapters.save_peft`` to tests/adapters/golden/<case>/ (adapter_config.json, adapter_model.safetensors).
``golden``: it loads the base with ``transformers.AutoModelForCausalLM.from_pretrained(tests/hf/golden/<base>)``,
applies ``peft.PeftModel.from_pretrained(base, tests/adapters/golden/<case>)`` and writes golden.npz: the token
ids and PEFT's float32 logits (the base golden's tokens), a prompt and its greedy continuation (the full forward
pass on the growing sequence, argmax of the last position), and the modules PEFT wrapped. tests/adapters/
test_peft.py checks moejax's logits (the base golden plus the adapter directory read by moejax's PEFT reader)
against them.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent
BASES = ROOT.parent.parent / "hf" / "golden"
RANK, ALPHA, SCALE = 4, 8.0, 0.2
# case -> (the base golden of tests/hf/golden, moejax's model.lora.targets, other model.lora fields)
PEFT_CASES: dict[str, tuple[str, tuple[str, ...], dict]] = {
    # attention, the router and every routed expert's w1, w3, w2 (one adapter per expert)
    "peft_mixtral": ("mixtral_a", ("attn/(q|k|v|o)/kernel", "router/kernel", "experts/(wi_0|wi_1|wo)"),
                     {"experts": "per_expert"}),
    # a dense model (its head tied to the embedding): attention and the MLP
    "peft_llama": ("llama_a", ("attn/(q|k|v|o)/kernel", "ffn/(wi_0|wi_1|wo)"), {}),
}


def _goldens():
    spec = importlib.util.spec_from_file_location("make_hf_goldens", BASES / "make_hf_goldens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_adapters(case: str, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """The case's adapters, written by moejax in PEFT's format to out."""
    import jax

    from moejax import hf, model
    from moejax.adapters import lora, peft

    base, targets, fields = PEFT_CASES[case]
    config, variables = hf.load(BASES / base, dtype="float32")
    config.model.lora.update(targets=targets, rank=RANK, alpha=ALPHA, **fields)
    model.validate(config.model)
    rng = np.random.default_rng(seed)
    shapes = lora.split(hf.abstract_variables(config.model)["params"])[1]
    adapters = jax.tree.map(lambda leaf: rng.normal(0, SCALE, leaf.shape).astype(np.float32), shapes)
    params = jax.tree.map(np.asarray, variables["params"])
    return peft.save(config, {**variables, "params": lora.join(params, adapters)}, out,
                     base_model=f"tests/hf/golden/{base}")


def peft_model(case: str):
    """peft.PeftModel of the case (float32, eval mode) and the names of the modules PEFT wrapped (from transformers 5
    on, PEFT turns the per-expert adapters of the file into adapters on the fused expert parameters
    ``experts.gate_up_proj`` and ``experts.down_proj``, and a router's onto its bare ``gate.weight``: its config's
    target_parameters)."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(BASES / PEFT_CASES[case][0], dtype=torch.float32,
                                                             attn_implementation="eager")
    adapted = peft.PeftModel.from_pretrained(base, ROOT / case).eval()
    wrapped = sorted(name[len("base_model.model."):] for name, module in adapted.named_modules()
                     if hasattr(module, "lora_A") and len(module.lora_A) > 0)
    return adapted, wrapped


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("write", "golden"):
        raise SystemExit("usage: make_peft_goldens.py write|golden [case ...]")
    cases = argv[1:] or list(PEFT_CASES)
    for case in cases:
        if case not in PEFT_CASES:
            raise SystemExit(f"unknown case {case!r}: one of {', '.join(PEFT_CASES)}")
    if argv[0] == "write":
        for case in cases:
            print(f"{case}: wrote {write_adapters(case, ROOT / case)}")
        return
    goldens = _goldens()
    for case in cases:
        adapted, wrapped = peft_model(case)
        config = adapted.peft_config["default"]
        parameters = sorted(config.target_parameters or ())
        tokens = goldens.tokens_of(adapted.config.vocab_size)
        prompt = tokens[:1, :goldens.PROMPT]
        np.savez(ROOT / case / "golden.npz", tokens=tokens, logits=goldens.reference(adapted, tokens),
                 prompt=prompt, greedy=goldens.greedy(adapted, prompt), wrapped=np.array(wrapped),
                 target_parameters=np.array(parameters, dtype=str))
        print(f"{case}: {ROOT / case} (PEFT wrapped {len(wrapped)} modules; target_parameters {parameters}; "
              f"rank_pattern {dict(config.rank_pattern)}; alpha_pattern {dict(config.alpha_pattern)})")


if __name__ == "__main__":
    main(sys.argv[1:])
