"""``python -m moejax.hf check <dir>``: load a transformers checkpoint directory with moejax, run a few tokens through
it and, where torch and transformers are installed, through transformers on the same weights, and print the largest
logit difference, the mean KL between the two next-token distributions and whether the greedy tokens agree (the check
MaxText's checkpoint checker does). Without torch it runs moejax alone and says so.

    python -m moejax.hf check DIR [--tokens 32] [--batch 2] [--seed 0] [--out FILE.json]
"""
from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from moejax import cli


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Max |logit difference|, mean KL(theirs || ours) per position (nats), greedy agreement (fraction)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    p_log, q_log = _log_softmax(theirs), _log_softmax(ours)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    return {"max_abs_logit_diff": float(np.abs(ours - theirs).max()), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "greedy_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}


def _transformers_logits(directory: pathlib.Path, tokens: np.ndarray) -> np.ndarray | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf_model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def check(directory: str | pathlib.Path, *, tokens: int = 32, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """The check's result: the family, the token ids' shape, moejax's logits statistics and, with transformers,
    ``compare``'s numbers (else ``transformers: None`` and why)."""
    import jax.numpy as jnp

    from moejax import hf, model

    directory = pathlib.Path(directory)
    config, variables = hf.load(directory, dtype="float32")
    ids = np.random.default_rng(seed).integers(0, config.model.vocab_size, (batch, tokens)).astype(np.int32)
    ours = np.asarray(model.Transformer(config.model).apply(variables, jnp.asarray(ids)), np.float32)
    result: dict[str, Any] = {"directory": str(directory), "model_type": json.loads(
        (directory / "config.json").read_text()).get("model_type"), "tokens": list(ids.shape),
        "moejax_finite": bool(np.isfinite(ours).all()), "moejax_logit_std": float(ours.std())}
    theirs = _transformers_logits(directory, ids)
    if theirs is None:
        result["transformers"] = None
        result["why"] = "torch and transformers are not installed (pip install -e '.[hf]' to compare)"
    else:
        result["transformers"] = compare(ours, theirs)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = cli.ArgumentParser(prog="python -m moejax.hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("check", help="compare moejax's logits on a transformers directory with transformers'")
    p.add_argument("directory", help="a transformers checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per row")
    p.add_argument("--batch", type=int, default=2, help="rows of random token ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    for flag in ("tokens", "batch"):
        if getattr(args, flag) < 1:
            raise cli.flag_error(flag, getattr(args, flag), "must be an integer >= 1")
    if not (pathlib.Path(args.directory) / "config.json").is_file():
        raise cli.flag_error("directory", args.directory, "is not a transformers checkpoint directory (no config.json)")
    result = check(args.directory, tokens=args.tokens, batch=args.batch, seed=args.seed)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    if result["transformers"] is not None and result["transformers"]["greedy_agreement"] < 1.0:
        cli.warn("the greedy tokens of moejax and transformers differ on some positions")
    return result


if __name__ == "__main__":
    cli.run(main)
