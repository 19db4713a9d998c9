"""The steps the ``python -m moejax.posthoc`` subcommands share: open the checkpoint (``load``) and its calibration
batches (``open_data``), progress lines, the provenance every output records, flag parsing and checks that name the
flag, and writing a compressed model (``save_model``: --format, the source's tokenizer files, posthoc.json)."""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
from typing import Any

from moejax import cli

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint (cli.open_checkpoint): {'path', 'config', 'variables'}."""
    from moejax.posthoc import capture

    opened = cli.open_checkpoint(args)
    capture.check_supported(opened.config)
    return {"path": opened.path, "config": opened.config, "variables": opened.variables}


def open_data(args: argparse.Namespace, opened: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint (``load``, unless given) and its calibration batches from the --calibration_split split of
    --data: adds 'batches', 'tokenizer', 'data_config' and 'calibration_split'."""
    from moejax.posthoc import capture

    opened = dict(opened or load(args))
    split = args.calibration_split
    data_config, batches, tokenizer = capture.calibration_batches(
        opened["config"], opened["path"], split=split, data=args.data, max_tokens=args.max_tokens,
        batch_size=args.batch_size, seq_len=args.seq_len, data_dir=args.data_dir)
    shape = batches[0].shape
    say(f"{opened['path']}: {len(batches)} batches of {shape[0]} x {shape[1]} tokens from {data_config.data.name} "
         f"({split} split, tokenizer {tokenizer.spec})")
    return {**opened, "batches": batches, "tokenizer": tokenizer, "data_config": data_config,
            "calibration_split": split}


def progress(opened: dict[str, Any], what: str):
    from moejax.posthoc import capture

    total = sum(int(b.size) for b in opened["batches"])
    say(what)
    return capture.progress_bar(total)


def provenance(args: argparse.Namespace, opened: dict[str, Any], **extra: Any) -> dict[str, Any]:
    batches = opened["batches"]
    return {"checkpoint": str(opened["path"]), "step": args.step, "data": opened["data_config"].data.name,
            "calibration_split": opened["calibration_split"], "tokenizer": opened["tokenizer"].spec,
            "tokens": int(sum(b.size for b in batches)),
            "batch_size": int(batches[0].shape[0]), "seq_len": int(batches[0].shape[1]), **extra}


def check_calibration_split(args: argparse.Namespace) -> None:
    """UsageError naming --calibration_split when it is not one of ``capture.SPLITS``; reads no data."""
    from moejax.posthoc import capture

    if args.calibration_split not in capture.SPLITS:
        raise cli.flag_error("calibration_split", args.calibration_split,
                             f"allowed are {', '.join(capture.SPLITS)} (the split of --data the calibration batches "
                             "come from)")


def write_json(path: pathlib.Path, value: Any) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, allow_nan=False) + "\n")
    return path


def criteria(value: str) -> list[str]:
    from moejax.posthoc import importance

    names = list(importance.CRITERIA) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [name for name in names if name not in importance.CRITERIA]
    if bad or not names:
        raise cli.flag_error("criterion", value, f"allowed are {', '.join(importance.CRITERIA)} (comma-separated), "
                                              "or all")
    return names


def int_list(flag: str, value: str, minimum: int = 1) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < minimum:
        raise cli.flag_error(flag, value, f"must be comma-separated integers >= {minimum}")
    return out


def check_out_dir(flag: str, out: pathlib.Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise cli.flag_error(flag, str(out), "exists and is not an empty directory; choose a new one")


def save_model(args: argparse.Namespace, opened: dict[str, Any], config, variables, what: dict[str, Any]
                ) -> pathlib.Path:
    """Writes the compressed model to --out in --format, the source's tokenizer files beside it and
    posthoc.json (what was done)."""
    from moejax import hf
    from moejax.training import checkpoint

    out = pathlib.Path(args.out)
    with cli.removed_on_failure(out):
        if args.format == "hf":
            hf.save(config, variables, out, quantisation=getattr(args, "hf_quantisation", None))
        else:
            checkpoint.save_variables(out, config, variables)
        for name in TOKENIZER_FILES:
            if (opened["path"] / name).is_file():
                shutil.copy(opened["path"] / name, out / name)
        stored = stored_experts(config)
        write_json(out / "posthoc.json", {**provenance(args, opened), "format": args.format,
                                           "num_experts": config.model.moe.num_experts, "stored_experts": stored,
                                           "top_k": config.model.moe.top_k, **what})
    counts = sorted(set(stored.values()))
    detail = (f"{config.model.moe.num_experts} routed experts per MoE layer" if counts == [
        config.model.moe.num_experts] else f"{config.model.moe.num_experts} logical experts per MoE layer bound to "
        f"{counts[0]}-{counts[-1]} stored experts" if len(counts) > 1 else f"{config.model.moe.num_experts} logical "
        f"experts per MoE layer bound to {counts[0]} stored experts")
    say(f"wrote the {args.format} model ({detail}) to {out}")
    return out


def stored_experts(config) -> dict[str, int]:
    """``{MoE layer: stored routed experts}`` (moejax/moe/expert_map.py), as JSON keys."""
    from moejax import model
    from moejax.moe import expert_map

    return {str(layer): expert_map.stored_count(config.model.moe, layer) for layer in model.moe_layers(config.model)}


def check_format(args: argparse.Namespace, config, num_experts: int) -> None:
    """--format=hf: refuse, before any work, a model with num_experts routed experts per layer that no released
    family expresses (HFConfigError says why)."""
    quantisation = getattr(args, "hf_quantisation", "none")
    if quantisation not in (None, "none"):
        from moejax.hf import quantised

        if args.format != "hf":
            raise cli.flag_error("hf_quantisation", quantisation, "needs --format=hf (a moejax workdir is written "
                                                                  "unquantised; see posthoc quantise --compact)")
        try:
            scheme = quantised.parse(quantisation, "hf_quantisation")
        except ValueError as e:
            raise cli.flag_error("hf_quantisation", quantisation, f"allowed are {quantised.SCHEME_HELP}, or "
                                                                  "none") from e
    if args.format == "hf":
        import copy

        from moejax import hf

        preview = copy.deepcopy(config)
        preview.model.moe.num_experts = num_experts
        preview.model.moe.top_k = min(preview.model.moe.top_k, num_experts + preview.model.moe.num_null_experts)
        hf_config = hf.config_to_hf(preview.model)
        if quantisation not in (None, "none"):
            try:
                quantised.check(scheme, hf_config["model_type"])
            except hf.HFConfigError as e:
                raise cli.flag_error("hf_quantisation", quantisation, str(e)) from e
