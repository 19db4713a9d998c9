"""Post-hoc research on any checkpoint from the command line: routing traces and their analyses, expert importance,
pruning, merging and super experts.

    python -m moejax.posthoc trace         --checkpoint=DIR --out=TRACE_DIR [--with_scores]
    python -m moejax.posthoc analyze       --trace=TRACE_DIR --out=DIR
    python -m moejax.posthoc importance    --checkpoint=DIR --criterion=reap[,easy_ep|all] --out=FILE.json
    python -m moejax.posthoc prune         --checkpoint=DIR --criterion=reap --keep=N [--global] --out=DIR
                                           [--format=moejax|hf] [--trace=TRACE_DIR]
    python -m moejax.posthoc merge         --checkpoint=DIR --method=mcsmoe|hcsmoe|average --experts=N --out=DIR
                                           [--format=moejax|hf]
    python -m moejax.posthoc super-experts --checkpoint=DIR --out=DIR [--rule=paper|percentile|top_n]
    python -m moejax.posthoc steer         --checkpoint=DIR --marker=TEXT [--experts=top2-npmi]
                                           [--mode=reinforce|dampen|silence] --out=FILE.json
    python -m moejax.posthoc assemble      --sources=DIR,DIR --recipe=dume|btx|flexolmo [--domains=C,C] --out=DIR
    python -m moejax.posthoc merge-adapter --checkpoint=DIR --out=DIR [--format=moejax|hf] [--peft=DIR]
    python -m moejax.posthoc place         --checkpoint=DIR --devices=N [--redundant=R] [--trace=TRACE_DIR] --out=DIR
    python -m moejax.posthoc offload       --trace=TRACE_DIR --out=DIR [--policy=lru,lfu,score,belady]
                                           [--cache_experts=N,...] [--prefetch=none|affinity|pregated|oracle]
                                           [--device=h100-sxm|FILE.json|key=value,...]
    python -m moejax.posthoc quantise      --checkpoint=DIR --method=rtn|gptq --bits=4 --out=DIR [--rules=...]

Every subcommand that runs the model opens ``--checkpoint`` with ``moejax.load`` (a moejax workdir, ``--step`` for
another checkpoint than the newest, or a transformers directory) and reads calibration data shaped like
``python -m moejax.evaluate``'s: ``--data`` (stdlib | text:<glob> | tfds:<name>; default the checkpoint config's),
its ``--calibration_split`` (train, the default: windows disjoint from the validation windows the evaluator
scores; or validation), ``--max_tokens`` (rounded up to whole batches), ``--batch_size`` / ``--seq_len`` (default
the config's), ``--data_dir`` (where corpora are cached), with the checkpoint's tokenizer
(``capture.calibration_batches``). What each subcommand writes records the split (``calibration_split``).
Progress goes to stderr; ``main(argv)`` returns what the subcommand wrote (tests call it in-process). Flags are
checked before the checkpoint loads; errors, Ctrl-C and exit status as moejax/cli.py describes. A subcommand that
fails or is stopped removes what it had written of its output (an unclosed trace, a model directory half written),
so the same command can run again.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from moejax import cli
from moejax.posthoc import command_steps as steps

FORMATS = ("moejax", "hf")
METHODS = ("mcsmoe", "hcsmoe", "average")
ANALYSIS_FILES = ("analysis.json", "frequency.png", "affinity.png", "local_consistency.png")  # what analyze writes


def run_trace(args: argparse.Namespace) -> pathlib.Path:
    """Records the trace to --out; --overwrite replaces a trace there and the analyses (analyze --out) stored in its
    subdirectories. A trace left unclosed (a failure, Ctrl-C) is removed."""
    from moejax.posthoc import capture, trace

    out = pathlib.Path(args.out)
    existing = trace.trace_files(out)
    if existing and not args.overwrite:
        raise cli.flag_error("out", args.out, f"already holds a routing trace ({', '.join(existing)}); pass "
                                              f"--overwrite to replace it")
    opened = steps.open_data(args)
    if args.overwrite:
        _remove_analyses(out)
    progress = steps.progress(opened, f"recording the routing trace to {out}")
    try:
        path = capture.record(opened["config"], opened["variables"], opened["batches"], out,
                              with_scores=args.with_scores, eos_id=opened["tokenizer"].eos_id,
                              overwrite=args.overwrite, metadata=steps.provenance(args, opened), progress=progress)
    except BaseException:
        trace.remove_trace_files(out)
        raise
    steps.say(f"wrote the routing trace to {path}")
    return path


def _remove_analyses(trace_dir: pathlib.Path) -> None:
    """Removes what ``analyze`` wrote into the subdirectories of trace_dir (the analyses of the trace there), and
    each such subdirectory that is then empty."""
    for directory in (trace_dir.iterdir() if trace_dir.is_dir() else ()):
        if directory.is_dir() and (directory / ANALYSIS_FILES[0]).is_file():
            for name in ANALYSIS_FILES:
                (directory / name).unlink(missing_ok=True)
            if not any(directory.iterdir()):
                directory.rmdir()
            steps.say(f"removed the analysis of the previous trace in {directory}")


def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from moejax.posthoc import analysis, read_trace, trace_report

    try:
        trace = read_trace(args.trace)
    except FileNotFoundError as e:
        raise cli.flag_error("trace", args.trace, str(e)) from e
    lengths = steps.int_list("lengths", args.lengths) if args.lengths else None  # None: the authors' 4,16,64,256
    sizes = steps.int_list("cache_sizes", args.cache_sizes, minimum=0) if args.cache_sizes else None
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps.say(f"analysing {args.trace}: {trace.num_tokens:,} tokens, {trace.num_layers} MoE layers, "
         f"{trace.num_experts} experts")
    summary = trace_report.summary(trace, lengths, sizes)
    result = {"trace": str(args.trace), "summary": summary,
              "expert_frequency": trace_report.jsonable(analysis.expert_frequency(trace)),
              "gate_mass": trace_report.jsonable(analysis.gate_mass(trace))}
    analysis_json, frequency_png, affinity_png, consistency_png = ANALYSIS_FILES
    steps.write_json(out / analysis_json, result)
    written = [analysis_json]
    trace_report.plot_frequency(trace, path=out / frequency_png)
    written.append(frequency_png)
    if trace.num_layers > 1:
        trace_report.plot_affinity(trace, path=out / affinity_png)
        written.append(affinity_png)
    trace_report.plot_local_consistency(trace, lengths, sizes, path=out / consistency_png, summary=summary)
    written.append(consistency_png)
    steps.say(f"wrote {', '.join(written)} to {out}")
    return result


def run_importance(args: argparse.Namespace) -> dict[str, Any]:
    from moejax.posthoc import importance

    names = steps.criteria(args.criterion)
    opened = steps.open_data(args)
    progress = steps.progress(opened, f"expert importance ({', '.join(names)})")
    scores = importance.from_forward(opened["config"], opened["variables"], opened["batches"], names,
                                     progress=progress)
    from moejax import model

    result = {**steps.provenance(args, opened), "layers": model.moe_layers(opened["config"].model),
              "num_experts": opened["config"].model.moe.num_experts,
              "scores": {name: value.tolist() for name, value in scores.items()}}
    out = steps.write_json(pathlib.Path(args.out), result)
    steps.say(f"wrote {out}")
    return result


def run_super_experts(args: argparse.Namespace) -> dict[str, Any]:
    from moejax.posthoc import super_experts

    try:
        super_experts._check_rule(args.rule, args.percentile, args.fraction, args.top_n)
    except ValueError as e:
        raise cli.UsageError(f"--{str(e).split('=')[0]}: {e}") from e
    out = pathlib.Path(args.out)
    opened = steps.open_data(args)
    found = super_experts.find(opened["config"], opened["variables"], opened["batches"], rule=args.rule,
                               percentile=args.percentile, fraction=args.fraction, top_n=args.top_n,
                               progress=steps.progress(opened, "profiling the experts' down-projection outputs"))
    result = {**steps.provenance(args, opened), **found.to_json()}
    steps.write_json(out / "super_experts.json", result)
    super_experts.plot(found, path=out / "super_experts.png")
    steps.say(f"super experts ({args.rule}): {found.super_experts or 'none'}; wrote super_experts.json and "
         f"super_experts.png to {out}")
    return result


def run_steer(args: argparse.Namespace) -> dict[str, Any]:
    import re

    from moejax import data as data_lib
    from moejax import evaluate
    from moejax.posthoc import steer

    match = re.fullmatch(r"top(\d+)-npmi", args.experts)
    if not match or int(match.group(1)) < 1:
        raise cli.flag_error("experts", args.experts, "must be top<N>-npmi, N >= 1 (the N experts of highest nPMI with "
                                                   "the marker)")
    if args.mode not in steer.MODES:
        raise cli.flag_error("mode", args.mode, f"allowed are {steer.MODES}")
    opened = steps.open_data(args)
    tokenizer = opened["tokenizer"]
    ids = [args.marker_id] if args.marker_id is not None else tokenizer.encode(args.marker or "")
    if not ids or any(not 0 <= i < opened["config"].model.vocab_size for i in ids):
        raise cli.flag_error("marker", args.marker if args.marker_id is None else args.marker_id,
                          "must be text that encodes to token ids of the model (or --marker_id=<id>)")
    evaluation = data_lib.eval_batches(opened["data_config"])
    steps.say(f"marker ids {ids}; choosing {args.experts} experts on the calibration batches, then evaluating with and "
         f"without '{args.mode}'")
    result = steer.steer(opened["config"], opened["variables"], opened["batches"], evaluation, ids,
                         n=int(match.group(1)), mode=args.mode, scale=args.scale, per_layer=args.per_layer,
                         eos_id=tokenizer.eos_id,
                         bytes_table=evaluate.text_bytes_table(tokenizer, opened["config"].model.vocab_size))
    result = {**steps.provenance(args, opened, marker=args.marker, marker_ids=ids, experts=args.experts), **result}
    steps.write_json(pathlib.Path(args.out), result)
    base, new = result["baseline"], result["steered"]
    prob = result["marker_probability"]
    steps.say(f"experts {result['chosen']['experts']}: loss {base['loss']:.4f} -> {new['loss']:.4f}, bits/byte "
         f"{base['bits_per_byte']:.4f} -> {new['bits_per_byte']:.4f}, p(marker) {prob['baseline']:.4g} -> "
         f"{prob['steered']:.4g}; wrote {args.out}")
    return result


def run_quantise(args: argparse.Namespace) -> dict[str, Any]:
    from moejax.quant import command

    return command.run(args)


def run_offload(args: argparse.Namespace) -> dict[str, Any]:
    from moejax.posthoc import capture, command_offload, offload

    try:
        return command_offload.command(args, steps.say, capture.progress_bar)
    except offload.ArgumentError as e:
        raise cli.flag_error(e.name, e.value, e.why) from e


# ------------------------------------------------------------------------------------------------------ parser

def _data_flags(parser: argparse.ArgumentParser) -> None:
    cli.add_checkpoint_flags(parser)
    cli.add_data_flags(parser)
    parser.add_argument("--calibration_split", default="train",
                        help="the split of --data the calibration batches come from: train (windows disjoint from the "
                             "validation windows python -m moejax.evaluate scores) or validation")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the new model's directory (must not exist, or be empty)")
    parser.add_argument("--format", choices=FORMATS, default="moejax",
                        help="moejax: a workdir (moejax.load); hf: a transformers directory (moejax.hf.save)")
    parser.add_argument("--hf_quantisation", default="none",
                        help="with --format=hf: none, fp8 (DeepSeek-V3's FP8 with 128x128 block scales), "
                             "fp8/<b0>x<b1> or mxfp4 (GPT-OSS's MXFP4 experts); see moejax/hf/quantised.py")


def parser() -> argparse.ArgumentParser:
    from moejax.adapters import command as adapter_command
    from moejax.posthoc import (
        command_assemble,
        command_compress,
        command_offload,
        command_place,
        importance,
        super_experts,
    )

    top = cli.ArgumentParser(prog="python -m moejax.posthoc", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("trace", help="record a routing trace (moejax.posthoc.capture.record)")
    _data_flags(p)
    p.add_argument("--out", required=True, help="the trace directory")
    p.add_argument("--with_scores", action="store_true", help="also store the router scores [L, N, E]")
    p.add_argument("--overwrite", action="store_true", help="replace a trace already at --out")
    p.set_defaults(run=run_trace)

    p = commands.add_parser("analyze", help="analyses of a routing trace: JSON and PNG plots")
    p.add_argument("--trace", required=True, help="a trace directory (python -m moejax.posthoc trace)")
    p.add_argument("--out", required=True, help="the directory for analysis.json and the plots")
    p.add_argument("--lengths", default="", help="segment lengths for SRP/SCH, comma-separated (default the "
                                                 "authors' 4,16,64,256)")
    p.add_argument("--cache_sizes", default="", help="cache sizes for SCH, comma-separated (default k,2k)")
    p.set_defaults(run=run_analyze)

    p = commands.add_parser("importance", help="expert importance per MoE layer (JSON)")
    _data_flags(p)
    p.add_argument("--criterion", default="all", help=f"{', '.join(importance.CRITERIA)} (comma-separated) or all")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.set_defaults(run=run_importance)

    p = commands.add_parser("prune", help="remove the least important routed experts, write the smaller model")
    _data_flags(p)
    p.add_argument("--criterion", required=True, help=f"one of {', '.join(importance.CRITERIA)}")
    p.add_argument("--keep", type=int, required=True, help="routed experts kept per MoE layer (with --global: in "
                                                           "total, a multiple of the MoE layers)")
    p.add_argument("--global", dest="global_budget", action="store_true",
                   help="--keep is a budget over all MoE layers (moejax.posthoc.prune.keep_global)")
    p.add_argument("--trace", default=None, help="take the importance from this routing trace (python -m "
                                                 "moejax.posthoc trace) instead of a forward pass; criteria from the "
                                                 "routing alone (and the router scores, when traced with them)")
    _model_flags(p)
    p.set_defaults(run=command_compress.run_prune)

    p = commands.add_parser("merge", help="merge routed experts into fewer, write the smaller model")
    _data_flags(p)
    p.add_argument("--method", choices=METHODS, required=True,
                   help="mcsmoe (MC-SMoE), hcsmoe (HC-SMoE), average (MC-SMoE's groups, plain averages)")
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer after merging")
    p.add_argument("--linkage", default="average", help="hcsmoe: the hierarchical clustering linkage")
    p.add_argument("--trace", default=None, help="mcsmoe: take the routing frequencies from this trace instead of "
                                                 "recording one")
    p.add_argument("--align", choices=("none", "first", "dominant"), default=None,
                   help="neuron alignment before averaging: first (every expert to the layer's first, MC-SMoE's "
                        "default), dominant (to the group's dominant), none (HC-SMoE's default)")
    p.add_argument("--similarity", choices=("router_logits", "router_weight"), default="router_logits",
                   help="mcsmoe: router_logits (cosine of the router-logit columns over the calibration tokens, the "
                        "authors' default) or router_weight (the router kernel's columns, no data)")
    p.add_argument("--low_rank", type=int, default=0,
                   help="MC-SMoE's compress stage: each merged expert matrix becomes rank --low_rank (the authors "
                        "use 32) + a structured-sparse remainder (0: off)")
    p.add_argument("--sparse_density", type=float, default=0.1,
                   help="the compress stage: the fraction of the remainder's rows kept (the authors' 0.10)")
    p.add_argument("--per_layer_groups", action="store_true",
                   help="mcsmoe: --experts groups in every layer (default: the authors' global assignment, --experts "
                        "on average, uneven per layer)")
    _model_flags(p)
    p.set_defaults(run=command_compress.run_merge)

    p = commands.add_parser("super-experts", help="profile the experts' down-projection outputs, flag super experts")
    _data_flags(p)
    p.add_argument("--out", required=True, help="the directory for super_experts.json and super_experts.png")
    p.add_argument("--rule", choices=super_experts.RULES, default="paper",
                   help="paper: above --percentile and --fraction of the largest; percentile: above --percentile; "
                        "top_n: the --top_n largest")
    p.add_argument("--percentile", type=float, default=99.5,
                   help="rules paper and percentile: the percentile of every expert's largest output to pass")
    p.add_argument("--fraction", type=float, default=0.1, help="rule paper: also above this fraction of the max")
    p.add_argument("--top_n", type=int, default=None, help="rule top_n: how many")
    p.set_defaults(run=run_super_experts)
    p = commands.add_parser("steer", help="reinforce, dampen or silence the experts most associated with a marker "
                                          "(RICE) and evaluate with and without")
    _data_flags(p)
    p.add_argument("--marker", default=None, help="the marker text (its token ids: the tokenizer's encoding)")
    p.add_argument("--marker_id", type=int, default=None, help="the marker as one token id, instead of --marker")
    p.add_argument("--experts", default="top2-npmi", help="top<N>-npmi: the N (layer, expert) pairs of highest nPMI")
    p.add_argument("--per_layer", action="store_true", help="the N best experts of every MoE layer")
    p.add_argument("--mode", default="reinforce", help="reinforce | dampen | silence")
    p.add_argument("--scale", type=float, default=2.0, help="the routing-weight factor (reinforce > 1, dampen < 1)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.set_defaults(run=run_steer)

    p = commands.add_parser("assemble", help="an MoE from several dense models (DUME, BTX, FlexOlmo), write it")
    command_assemble.add_flags(p)
    p.set_defaults(run=command_assemble.run)
    p = commands.add_parser("merge-adapter", help="merge a model's LoRA adapters into its base weights, write it")
    adapter_command.add_flags(p)
    p.set_defaults(run=adapter_command.run)
    p = commands.add_parser("place", help="plan replicas and device placement of the experts (EPLB), write the model")
    _data_flags(p)
    command_place.add_flags(p)
    _model_flags(p)
    p.set_defaults(run=command_place.run)
    p = commands.add_parser("offload", help="simulate expert offloading (caches, prefetching) over a routing trace")
    command_offload.add_flags(p)
    p.set_defaults(run=run_offload)

    from moejax.quant import command as quantise

    p = commands.add_parser("quantise", help="quantise the weights (RTN or GPTQ), write the model and its metrics")
    _data_flags(p)
    quantise.add_flags(p)
    _model_flags(p)
    p.set_defaults(run=run_quantise)
    return top


def main(argv: Sequence[str] | None = None) -> Any:
    """``python -m moejax.posthoc`` with argv (default sys.argv[1:]): what the subcommand wrote."""
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if hasattr(args, "max_tokens"):
        cli.check_data_flags(args)
        steps.check_calibration_split(args)
    return args.run(args)


if __name__ == "__main__":
    cli.run(main)
