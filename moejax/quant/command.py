"""``python -m moejax.posthoc quantise``: quantise a checkpoint's weights, write the quantised model, its compact form
and the metrics against the original.

    python -m moejax.posthoc quantise --checkpoint=DIR --method=rtn|gptq|eaquant --bits=4 [--group_size=128]
                                      [--targets=experts,shared] [--rules='experts=int4/g128;attention=fp8']
                                      [--mixed_bits=2,4,8 --budget=4 --criterion=soft_count]
                                      [--min_tokens=32 --percdamp=0.01] [--alpha=0.6 --balance=2 --no_smoothing]
                                      --out=DIR [--metrics=FILE]

Writes to --out the quantised model (fake-quantised weights in the parameters' dtype: a moejax workdir, or with
--format=hf a transformers directory), ``quantised.safetensors`` (the compact form: codes and scales,
``moejax.quant.transform.save_tensors``; with --compact the workdir's checkpoint holds the codes and scales in place
of the quantised floats, and ``quantised.json`` their layout: moejax/quant/compact.py), ``posthoc.json`` (what was
done) and the metrics JSON (default
``<out>/quantise_metrics.json``): loss and bits per byte of both models on the evaluation windows, routing flips and
router KL per MoE layer on the calibration batches, per-expert weight errors, model bytes.
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from moejax import cli

METHODS = ("rtn", "gptq", "eaquant")
METRICS_FILE = "quantise_metrics.json"
TENSORS_FILE = "quantised.safetensors"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The quantise flags (the data, --out and --format flags come from the posthoc parser)."""
    from moejax.posthoc import importance
    from moejax.quant import formats, gptq, rules

    parser.add_argument("--method", default="rtn", help=f"{' | '.join(METHODS)}: round to nearest, GPTQ on the MoE "
                                                        "layers' matrices (routed experts on their own tokens), or "
                                                        "EAQuant (expert-aware smoothing, router alignment, clipping)")
    parser.add_argument("--bits", type=int, default=4, help="int bits (2..8) of the --targets weights (symmetric)")
    parser.add_argument("--group_size", type=int, default=0, help="inputs per scale (0: one scale per output channel)")
    parser.add_argument("--targets", default="experts,shared",
                        help=f"the weights --bits quantises, comma-separated among {', '.join(rules.TARGETS)}")
    parser.add_argument("--rules", default="", help="TARGET=FORMAT[@LAYERS];... instead of --bits/--group_size/"
                                                    f"--targets; FORMAT: {formats.FORMAT_HELP}")
    parser.add_argument("--mixed_bits", default="", help="per-expert mixed precision of the routed experts: the bit "
                                                         "widths to choose from, e.g. 2,4,8 (16: kept)")
    parser.add_argument("--budget", type=float, default=None, help="with --mixed_bits: the mean bits per routed-expert "
                                                                   "weight")
    parser.add_argument("--criterion", default="soft_count",
                        help=f"with --mixed_bits: the importance score, one of {', '.join(importance.CRITERIA)}")
    parser.add_argument("--per_layer_budget", action="store_true", help="with --mixed_bits: the budget holds in every "
                                                                        "MoE layer (default over all)")
    parser.add_argument("--min_tokens", type=int, default=gptq.DEFAULT_MIN_TOKENS,
                        help="gptq: an expert routed fewer calibration tokens is rounded to nearest")
    parser.add_argument("--percdamp", type=float, default=0.01, help="gptq: the damping, a fraction of the mean "
                                                                     "Hessian diagonal")
    parser.add_argument("--blocksize", type=int, default=128, help="gptq: columns per lazy update block")
    parser.add_argument("--alpha", type=float, default=0.6, help="eaquant: the smoothing strength in [0, 1]")
    parser.add_argument("--balance", type=float, default=2.0, help="eaquant: an expert's calibration tokens at most "
                                                                    "balance x the mean tokens per expert")
    parser.add_argument("--no_smoothing", action="store_true", help="eaquant: skip the smoothing aggregation")
    parser.add_argument("--metrics", default=None, help=f"the metrics JSON (default <out>/{METRICS_FILE})")
    parser.add_argument("--compact", action="store_true",
                        help="a moejax workdir whose checkpoint stores the quantised matrices as codes and scales "
                             "(moejax/quant/compact.py) instead of fake-quantised floats; moejax.load dequantises")
    parser.add_argument("--mesh", default="", help="run the calibration and routing passes on a device mesh, e.g. "
                                                   "data=2,expert=4 (axis=size among data, fsdp, expert, tensor; "
                                                   "default one device)")


def _rules(args: argparse.Namespace) -> list[Any]:
    from moejax.quant import formats, rules

    try:
        if args.rules:
            return rules.parse(args.rules, "rules")
        if args.bits not in formats.INT_BITS:
            raise cli.flag_error("bits", args.bits, f"int bits in {formats.INT_BITS.start}..{formats.INT_BITS.stop - 1}"
                                                    " (other formats through --rules)")
        if args.group_size < 0:
            raise cli.flag_error("group_size", args.group_size, "inputs per scale: an integer >= 1, or 0 per channel")
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        bad = [t for t in targets if t not in rules.TARGETS]
        if bad or not targets:
            raise cli.flag_error("targets", args.targets, f"comma-separated among {', '.join(rules.TARGETS)}")
        fmt = formats.int_format(args.bits, args.group_size).name
        return [rules.Rule(target, fmt) for target in targets]
    except ValueError as e:
        if isinstance(e, cli.UsageError):
            raise
        raise cli.flag_error("rules", args.rules, str(e)) from e


def mesh_of(text: str) -> Any:
    """The device mesh of --mesh (axis=size,...; the axes moejax.parallel.MESH_AXES, the sizes' product the number
    of devices), or None for ''."""
    import jax

    from moejax import parallel

    if not text:
        return None
    sizes = dict.fromkeys(parallel.MESH_AXES, 1)
    try:
        for item in text.split(","):
            axis, size = item.split("=")
            if axis.strip() not in sizes or int(size) < 1:
                raise ValueError(item)
            sizes[axis.strip()] = int(size)
    except ValueError:
        raise cli.flag_error("mesh", text, f"comma-separated axis=size with axes among {', '.join(parallel.MESH_AXES)}"
                                           " and sizes >= 1, e.g. data=2,expert=4") from None
    count = 1
    for size in sizes.values():
        count *= size
    if count != jax.device_count():
        raise cli.flag_error("mesh", text, f"the axis sizes multiply to {count}, not the {jax.device_count()} devices")
    return jax.make_mesh(tuple(sizes[a] for a in parallel.MESH_AXES), parallel.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(parallel.MESH_AXES))


def _check(args: argparse.Namespace) -> tuple[list[Any], list[int] | None]:
    from moejax.posthoc import importance
    from moejax.quant import mixed

    if args.method not in METHODS:
        raise cli.flag_error("method", args.method, f"allowed are {', '.join(METHODS)}")
    rules = _rules(args)
    choices = None
    if args.mixed_bits:
        try:
            choices = mixed.check_choices([int(v) for v in args.mixed_bits.split(",") if v.strip()], "mixed_bits")
        except ValueError as e:
            raise cli.flag_error("mixed_bits", args.mixed_bits, f"comma-separated int bit widths in 2..8, or "
                                                                f"{mixed.KEEP_BITS} (kept)") from e
        if args.budget is None or not choices[0] <= args.budget:
            raise cli.flag_error("budget", args.budget, f"with --mixed_bits, the mean bits per routed-expert weight: a "
                                                        f"number >= {choices[0]}")
        if args.criterion not in importance.CRITERIA:
            raise cli.flag_error("criterion", args.criterion, f"allowed are {', '.join(importance.CRITERIA)}")
    elif args.budget is not None:
        raise cli.flag_error("budget", args.budget, "needs --mixed_bits (the bit widths to choose from)")
    if args.min_tokens < 1:
        raise cli.flag_error("min_tokens", args.min_tokens, "an integer >= 1")
    if not args.percdamp > 0:
        raise cli.flag_error("percdamp", args.percdamp, "a number > 0")
    if args.blocksize < 1:
        raise cli.flag_error("blocksize", args.blocksize, "an integer >= 1")
    if not 0 <= args.alpha <= 1:
        raise cli.flag_error("alpha", args.alpha, "the smoothing strength, a number in [0, 1]")
    if not args.balance > 0:
        raise cli.flag_error("balance", args.balance, "a number > 0")
    return rules, choices


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The subcommand: returns the metrics it wrote."""
    from moejax import data as data_lib
    from moejax import evaluate
    from moejax.posthoc import command_steps as steps
    from moejax.posthoc import importance
    from moejax.quant import eaquant, gptq, metrics, mixed, rules, transform

    rule_list, choices = _check(args)
    mesh = mesh_of(args.mesh)
    if args.compact and args.format != "moejax":
        raise cli.flag_error("compact", True, "stores a moejax workdir (--format=moejax); a transformers directory "
                                              "takes --hf_quantisation")
    out = pathlib.Path(args.out)
    steps.check_out_dir("out", out)
    metrics_path = pathlib.Path(args.metrics) if args.metrics else out / METRICS_FILE
    loaded = steps.load(args)
    config, variables = loaded["config"], loaded["variables"]
    if not args.rules:  # --targets: the targets this model has (a model without shared experts skips 'shared')
        present = {matrix.target for matrix in rules.matrices(config, variables["params"])}
        absent = [rule.target for rule in rule_list if rule.target not in present]
        rule_list = [rule for rule in rule_list if rule.target in present]
        if not rule_list:
            raise cli.flag_error("targets", args.targets, f"this model has none of them (it has "
                                                          f"{', '.join(sorted(present))})")
        if absent:
            steps.say(f"--targets: this model has no {', '.join(absent)} weights")
    try:
        assignment = rules.assign(config, variables["params"], rule_list)
    except ValueError as e:
        raise cli.flag_error("rules" if args.rules else "targets", args.rules or args.targets, str(e)) from e
    if choices is not None:
        group = {fmt.tile[0] for matrix, chosen in assignment.values() if matrix.target == "experts"
                 for fmt in chosen if fmt is not None and fmt.kind == "int"}
        if not group:
            raise cli.flag_error("mixed_bits", args.mixed_bits, "per-expert bits replace the routed experts' int "
                                                                "format: quantise the experts target to int<b>")
    steps.check_format(args, config, config.model.moe.num_experts)
    opened = steps.open_data(args, loaded)
    batches = opened["batches"]
    what: dict[str, Any] = {"operation": "quantise", "method": args.method,
                            "rules": [{"target": r.target, "format": r.format, "layers": r.layers} for r in rule_list]}
    expert_bits = None
    if choices is not None:
        scores = importance.from_forward(config, variables, batches, args.criterion,
                                         progress=steps.progress(opened, f"expert importance ({args.criterion})"),
                                         mesh=mesh)
        expert_bits = mixed.from_importance(config, variables, scores, choices, args.budget,
                                            group_size=min(group), per_layer=args.per_layer_budget)
        what["mixed"] = {"choices": choices, "budget": args.budget, "criterion": args.criterion,
                         "per_layer": args.per_layer_budget,
                         "expert_bits": {str(layer): bits.tolist() for layer, bits in expert_bits.items()}}
    if args.method == "rtn":
        steps.say("rounding to nearest")
        new, tensors = transform.quantize(config, variables, rule_list, expert_bits=expert_bits)
    elif args.method == "eaquant":
        new, tensors, report = eaquant.quantize(config, variables, rule_list, batches, expert_bits=expert_bits,
                                                alpha=args.alpha, balance=args.balance,
                                                smoothing=not args.no_smoothing, progress=steps.say,
                                                batch_progress=lambda: steps.progress(opened, "calibration pass"))
        variables = report.pop("smoothed")  # the reference of the metrics: the same function, smoothed weights
        what["eaquant"] = {"alpha": args.alpha, "balance": args.balance, **report}
    else:
        new, tensors, report = gptq.quantize(config, variables, rule_list, batches, expert_bits=expert_bits,
                                             min_tokens=args.min_tokens, percdamp=args.percdamp,
                                             blocksize=args.blocksize, progress=steps.say,
                                             batch_progress=lambda: steps.progress(opened, "calibration pass"),
                                             mesh=mesh)
        what["gptq"] = {"min_tokens": args.min_tokens, "percdamp": args.percdamp, "blocksize": args.blocksize,
                        "layers": {layer: {"tokens": r["tokens"], "rtn_experts": r["rtn_experts"]}
                                   for layer, r in report["layers"].items()}}
    evaluation = data_lib.eval_batches(opened["data_config"])
    steps.say("metrics: routing against the original on the calibration batches, loss on the evaluation windows")
    result = metrics.compare(config, variables, new, tensors, calibration=batches, evaluation_batches=evaluation,
                             bytes_table=evaluate.text_bytes_table(opened["tokenizer"], config.model.vocab_size),
                             progress=steps.progress(opened, "routing of both models"), mesh=mesh)
    result = {**steps.provenance(args, opened), **what, "metrics": result}
    with cli.removed_on_failure(out):
        if args.compact:  # the codes and scales in the checkpoint itself (no separate compact file)
            from moejax.quant import compact

            params, layout = compact.to_tree(new["params"], tensors)
            steps.save_model(args, opened, config, {**new, "params": params},
                             {**what, "tensors": compact.LAYOUT_FILE, "metrics": str(metrics_path)})
            compact.write_layout(out, layout)
        else:
            steps.save_model(args, opened, config, new, {**what, "tensors": TENSORS_FILE,
                                                          "metrics": str(metrics_path)})
            transform.save_tensors(tensors, out / TENSORS_FILE, metadata={"method": args.method,
                                                                          "rules": what["rules"]})
        steps.write_json(metrics_path, result)
    ev, size = result["metrics"]["evaluation"], result["metrics"]["bytes"]
    flips = result["metrics"]["routing"]["flips"]
    steps.say(f"loss {ev['original']['loss']:.4f} -> {ev['quantised']['loss']:.4f}, bits/byte "
              f"{ev['original']['bits_per_byte']:.4f} -> {ev['quantised']['bits_per_byte']:.4f}; routing flips per "
              f"MoE layer {', '.join(f'{f:.1%}' for f in flips)}; {size['original']:,} -> {size['quantised']:,} bytes; "
              f"wrote {out} and {metrics_path}")
    return result
