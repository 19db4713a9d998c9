"""Writes the quantised-checkpoint golden fixtures: a tiny model saved quantised by moejax, read by transformers.

    python tests/hf/golden/make_quant_goldens.py write [case ...]                 # moejax's environment
    PYTHONPATH=. /work/hfvenv/bin/python tests/hf/golden/make_quant_goldens.py golden [case ...]
                                                                   # torch, transformers, accelerate; no moejax

``write``: for every case it loads a float32 golden fixture of make_hf_goldens.py with moejax, writes it with
``moejax.hf.save(..., quantisation=...)`` to tests/hf/golden/<case>/ (config.json with its quantization_config,
model.safetensors with FP8 or MXFP4 tensors). ``golden``: it loads that directory with transformers' own quantisers
(``AutoModelForCausalLM.from_pretrained``; on a machine without a GPU transformers dequantises FP8 and MXFP4 on
load, ``dequantize=True``, which is what ``dequantize=True`` in ``QUANT_CASES`` asks for explicitly) and writes
golden.npz: the token ids, transformers' float32 logits and the dtype transformers stored the quantised weights in.
tests/hf/test_hf_quantised.py checks moejax's logits on the same directory against them.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent
# case -> (the float32 fixture it starts from, moejax.hf.save's quantisation)
QUANT_CASES: dict[str, tuple[str, str]] = {
    "quant_fp8_deepseek_v3": ("deepseek_v3_b", "fp8/16x16"),  # MLA, shared and per-expert Linears, 16x16 blocks
    "quant_fp8_qwen3_moe": ("qwen3_moe_b", "fp8/8x8"),  # grouped-query attention, per-expert Linears
    "quant_mxfp4_gpt_oss": ("gpt_oss_a", "mxfp4"),  # GPT-OSS's stacked experts
}


def _goldens():
    spec = importlib.util.spec_from_file_location("make_hf_goldens", ROOT / "make_hf_goldens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_checkpoint(case: str, out: pathlib.Path) -> pathlib.Path:
    """The case's quantised checkpoint, written by moejax to out."""
    from moejax import hf

    source, quantisation = QUANT_CASES[case]
    config, variables = hf.load(ROOT / source, dtype="float32")
    return hf.save(config, variables, out, quantisation=quantisation)


def transformers_logits(directory: pathlib.Path, tokens: np.ndarray) -> tuple[np.ndarray, str]:
    """(transformers' float32 logits of tokens on the quantised directory, the dtype of its first quantised
    weight after loading)."""
    import torch
    import transformers

    method = json.loads((directory / "config.json").read_text())["quantization_config"]["quant_method"]
    config = (transformers.FineGrainedFP8Config(dequantize=True) if method == "fp8"
              else transformers.Mxfp4Config(dequantize=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              quantization_config=config,
                                                              attn_implementation="eager").eval()
    name = "mlp.experts" if method == "mxfp4" else "self_attn.o_proj"
    dtype = next(str(p.dtype) for n, p in model.named_parameters() if name in n)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy(), dtype


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("write", "golden"):
        raise SystemExit("usage: make_quant_goldens.py write|golden [case ...]")
    cases = argv[1:] or list(QUANT_CASES)
    for case in cases:
        if case not in QUANT_CASES:
            raise SystemExit(f"unknown case {case!r}: one of {', '.join(QUANT_CASES)}")
    if argv[0] == "write":
        for case in cases:
            print(f"{case}: wrote {write_checkpoint(case, ROOT / case)}")
        return
    goldens = _goldens()
    for case in cases:
        directory = ROOT / case
        vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
        tokens = goldens.tokens_of(vocab)
        logits, dtype = transformers_logits(directory, tokens)
        np.savez(directory / "golden.npz", tokens=tokens, logits=logits, loaded_dtype=np.array(dtype))
        print(f"{case}: {directory} (transformers loaded the quantised weights as {dtype})")


if __name__ == "__main__":
    main(sys.argv[1:])
