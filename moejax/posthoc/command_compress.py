"""``python -m moejax.posthoc prune`` and ``merge``: the handlers that rank or group the routed experts, compress
the model (``moejax.posthoc.prune``, ``merge``, ``lowrank``) and write it (``command_steps.save_model``)."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

import numpy as np

from moejax import cli
from moejax.posthoc import command_steps as steps


def _check_keep(args: argparse.Namespace, config) -> None:
    from moejax import model

    num_layers, num_experts = len(model.moe_layers(config.model)), config.model.moe.num_experts
    if args.global_budget:
        low = num_layers * min(config.model.moe.top_k, num_experts)
        if not low <= args.keep <= num_layers * num_experts:
            raise cli.flag_error("keep", args.keep, f"with --global, the total number of routed experts over the "
                                                 f"{num_layers} MoE layers (each keeps at least top_k="
                                                 f"{config.model.moe.top_k}): an integer in "
                                                 f"[{low}, {num_layers * num_experts}]")
        if args.format == "hf":
            raise cli.flag_error("format", args.format, "--global keeps different numbers of experts per layer, "
                                                        "which a transformers layout cannot hold: use "
                                                        "--format=moejax")
    elif not 1 <= args.keep <= num_experts:
        raise cli.flag_error("keep", args.keep, f"routed experts kept per MoE layer: an integer in [1, {num_experts}]")


def run_prune(args: argparse.Namespace) -> pathlib.Path:
    from moejax import model
    from moejax.posthoc import importance, prune, read_trace

    if args.criterion not in importance.CRITERIA:
        raise cli.flag_error("criterion", args.criterion, f"prune ranks the experts by one criterion, one of "
                                                          f"{', '.join(importance.CRITERIA)}")
    trace = None
    if args.trace is not None:
        try:
            trace = read_trace(args.trace)
        except FileNotFoundError as e:
            raise cli.flag_error("trace", args.trace, str(e)) from e
        if args.criterion not in importance.trace_criteria(trace):
            raise cli.flag_error("criterion", args.criterion, f"a routing trace (--trace) gives only "
                                                              f"{', '.join(importance.trace_criteria(trace))}; the "
                                                              "others need a forward pass over calibration data "
                                                              "(leave out --trace)")
    steps.check_out_dir("out", pathlib.Path(args.out))
    loaded = steps.load(args)
    config, variables = loaded["config"], loaded["variables"]
    layers = model.moe_layers(config.model)
    _check_keep(args, config)
    steps.check_format(args, config, config.model.moe.num_experts if args.global_budget else args.keep)
    opened = steps.open_data(args, loaded)
    if trace is None:
        scores = importance.from_forward(config, variables, opened["batches"], args.criterion,
                                         progress=steps.progress(opened, f"expert importance ({args.criterion})"))
    else:
        scores = importance.from_trace(trace, args.criterion, config=config)
    if args.global_budget:
        keep = prune.keep_global(scores, args.keep, layers, min_per_layer=min(config.model.moe.top_k,
                                                                              config.model.moe.num_experts))
    else:
        keep = prune.keep_by_score(scores, args.keep, layers)
    new_config, new_variables = prune.prune(config, variables, keep)
    steps.say("kept experts: " + "; ".join(f"layer {layer}: {ids}" for layer, ids in keep.items()))
    _note_top_k(config, new_config)
    return steps.save_model(args, opened, new_config, new_variables,
                       {"operation": "prune", "criterion": args.criterion, "global": args.global_budget,
                        "trace": args.trace, "keep": {str(layer): ids for layer, ids in keep.items()},
                        "layers": layers, "scores": scores.tolist()})


def run_merge(args: argparse.Namespace) -> pathlib.Path:
    import tempfile

    from moejax import model, moe
    from moejax.posthoc import capture, importance, merge, read_trace

    steps.check_out_dir("out", pathlib.Path(args.out))
    loaded = steps.load(args)
    config, variables = loaded["config"], loaded["variables"]
    num_experts = config.model.moe.num_experts
    if not 1 <= args.experts <= num_experts:
        raise cli.flag_error("experts", args.experts, f"routed experts per MoE layer after merging: an integer in "
                                                   f"[1, {num_experts}]")
    steps.check_format(args, config, num_experts)  # merges bind: the router keeps its E logical experts
    opened = steps.open_data(args, loaded)
    batches = opened["batches"]
    layers = model.moe_layers(config.model)
    what: dict[str, Any] = {"operation": "merge", "method": args.method, "experts": args.experts}
    if args.method == "mcsmoe":
        with tempfile.TemporaryDirectory() as scratch:
            trace_dir = args.trace or capture.record(config, variables, batches, pathlib.Path(scratch) / "trace",
                                                     progress=steps.progress(opened, "routing frequencies (MC-SMoE)"))
            logits = None
            if args.similarity == "router_logits":
                steps.say("router logits of the calibration tokens (MC-SMoE's similarity)")
                logits = merge.router_logits(config, variables, batches)
            new_config, new_variables = merge.mcsmoe(config, variables, read_trace(trace_dir), args.experts,
                                                     align=args.align or "first", router_logits=logits,
                                                     similarity=args.similarity,
                                                     global_groups=not args.per_layer_groups)
            what.update(align=args.align or "first", similarity=args.similarity,
                        global_groups=not args.per_layer_groups)
    else:
        frequency = importance.from_forward(config, variables, batches, "frequency",
                                            progress=steps.progress(opened, "routing frequencies"))
        what["frequency"] = frequency.tolist()
        if args.method == "hcsmoe":
            outputs = importance.expert_mean_outputs(config, variables, batches,
                                                     progress=steps.progress(opened, "mean expert outputs (HC-SMoE)"))
            new_config, new_variables = merge.hcsmoe(config, variables, outputs, args.experts, linkage=args.linkage,
                                                     frequencies=frequency, layers=layers,
                                                     align="none" if args.align is None else args.align)
            what["linkage"] = args.linkage
        else:  # MC-SMoE's groups, a plain average of each (no alignment, uniform weights)
            groups = {}
            for row, (layer, (params, _)) in enumerate(model.moe_layer_variables(config.model, variables).items()):
                kernel = np.asarray(params[moe.ROUTER]["kernel"])[:, :num_experts]
                groups[layer] = merge.mcsmoe_groups(merge.similarity_from_router_weights(kernel), frequency[row],
                                                    args.experts)
            what["groups"] = {str(layer): value for layer, value in groups.items()}
            new_config, new_variables = merge.average(config, variables, groups)
    if args.low_rank:  # MC-SMoE's compress stage on the merged experts (moejax/posthoc/lowrank.py)
        from moejax.posthoc import lowrank

        new_config, new_variables, what["compress"] = lowrank.compress_experts(
            new_config, new_variables, rank=args.low_rank, density=args.sparse_density)
        steps.say(f"compressed the stored experts to rank {args.low_rank} + {args.sparse_density:g} of the "
                  f"remainder's rows: {what['compress']['ratio']:.1%} of their parameters in factored form")
    _note_top_k(config, new_config)
    return steps.save_model(args, opened, new_config, new_variables, what)


def _note_top_k(config: Any, new_config: Any) -> None:
    """Says so when compressing lowered top_k (fewer experts remain than a token took)."""
    if new_config.model.moe.top_k < config.model.moe.top_k:
        steps.say(f"top_k lowered from {config.model.moe.top_k} to {new_config.model.moe.top_k}: a token takes at most "
             "the experts that remain")
