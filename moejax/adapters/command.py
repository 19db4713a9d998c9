"""``python -m moejax.posthoc merge-adapter``: a model with its LoRA adapters merged into the base weights
(moejax/adapters/merging.py), written as a moejax workdir or a transformers directory; ``--peft=DIR`` also writes
the adapters in PEFT's format (moejax/adapters/peft.py) before merging.

    python -m moejax.posthoc merge-adapter --checkpoint=WORKDIR [--step=N] --out=DIR [--format=moejax|hf]
        [--peft=DIR]
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
from typing import Any

from moejax import cli

FORMATS = ("moejax", "hf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def add_flags(parser: argparse.ArgumentParser) -> None:
    cli.add_checkpoint_flags(parser)
    parser.add_argument("--out", required=True, help="the merged model's directory (must not exist, or be empty)")
    parser.add_argument("--format", choices=FORMATS, default="moejax",
                        help="moejax: a workdir (moejax.load); hf: a transformers directory (moejax.hf.save)")
    parser.add_argument("--peft", default=None, help="also write the adapters in PEFT's format to this directory "
                                                     "(adapter_config.json, adapter_model.safetensors)")


def _empty_dir(flag: str, value: str | None) -> None:
    if value is None:
        return
    path = pathlib.Path(value)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise cli.flag_error(flag, value, "exists and is not an empty directory; choose a new one")


def run(args: argparse.Namespace) -> pathlib.Path:
    from moejax import hf
    from moejax.adapters import lora, merging, peft
    from moejax.posthoc import command_steps as steps
    from moejax.training import checkpoint

    _empty_dir("out", args.out)
    _empty_dir("peft", args.peft)
    opened = cli.open_checkpoint(args)
    config, variables = opened.config, opened.variables
    spec = lora.spec(config.model)
    if spec is None:
        raise cli.flag_error("checkpoint", args.checkpoint, "holds a model without LoRA adapters (its "
                                                            "model.lora.targets is empty): nothing to merge")
    if args.format == "hf":  # before any work: a model no released family expresses is refused here
        try:
            hf.config_to_hf(lora.without_adapters(config.model))
        except hf.HFConfigError as e:
            raise cli.flag_error("format", args.format, str(e)) from e
    if args.peft is not None:
        with cli.removed_on_failure(pathlib.Path(args.peft)):
            try:
                peft.save(config, variables, args.peft, base_model=str(opened.path))
            except peft.AdapterError as e:
                raise cli.flag_error("peft", args.peft, str(e)) from e
        steps.say(f"wrote the adapters in PEFT's format to {args.peft}")
    merged_config, merged = merging.merge(config, variables)
    out = pathlib.Path(args.out)
    with cli.removed_on_failure(out):
        if args.format == "hf":
            hf.save(merged_config, merged, out)
        else:
            checkpoint.save_variables(out, merged_config, merged)
        for name in TOKENIZER_FILES:
            if (opened.path / name).is_file() and not (out / name).exists():
                shutil.copy(opened.path / name, out / name)
        what: dict[str, Any] = {"checkpoint": str(opened.path), "step": args.step, "operation": "merge-adapter",
                                "format": args.format, "targets": list(spec.targets), "rank": spec.rank,
                                "alpha": spec.alpha, "rslora": spec.rslora, "experts": spec.experts}
        steps.write_json(out / "posthoc.json", what)
    steps.say(f"merged the rank-{spec.rank} adapters ({', '.join(spec.targets)}) into the base weights; wrote the "
              f"{args.format} model to {out}")
    return out
