"""``python -m moejax.posthoc place``: plan an expert placement with replicas (DeepSeek's EPLB,
``moejax.posthoc.placement``) from the routing loads of a trace or of the calibration batches, and write the placed
model (``model.moe.expert_placement``) with ``placement.json`` (the plan and the per-device loads it predicts).

    python -m moejax.posthoc place --checkpoint=DIR [--trace=DIR] --devices=8 --redundant=8 [--groups=G --nodes=N]
        --out=DIR
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

import numpy as np

from moejax import cli
from moejax.posthoc import command_steps as steps


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default=None, help="take the loads from this routing trace of the model instead "
                                                      "of a forward pass over the calibration batches")
    parser.add_argument("--devices", type=int, required=True, help="the devices the experts are split over "
                                                                   "(mesh.expert)")
    parser.add_argument("--redundant", type=int, default=0, help="extra physical experts (replicas of hot ones); "
                                                                 "stored experts + redundant must divide by --devices")
    parser.add_argument("--groups", type=int, default=1, help="expert groups (EPLB's hierarchical policy when "
                                                              "--nodes divides it)")
    parser.add_argument("--nodes", type=int, default=1, help="server nodes (--devices must be a multiple)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moejax import model
    from moejax.moe import expert_map
    from moejax.posthoc import importance, placement, read_trace

    for flag in ("devices", "groups", "nodes"):
        if getattr(args, flag) < 1:
            raise cli.flag_error(flag, getattr(args, flag), "must be a positive integer")
    if args.redundant < 0:
        raise cli.flag_error("redundant", args.redundant, "must be an integer >= 0")
    if args.format != "moejax":
        raise cli.flag_error("format", args.format, "a placement holds replicas that a transformers layout has no "
                                                    "place for: use --format=moejax")
    steps.check_out_dir("out", pathlib.Path(args.out))
    loaded = steps.load(args)
    config, variables = loaded["config"], loaded["variables"]
    layers = model.moe_layers(config.model)
    stored = {expert_map.stored_count(config.model.moe, layer) for layer in layers}
    if len(stored) > 1:
        raise cli.flag_error("checkpoint", args.checkpoint, f"its MoE layers store different numbers of experts "
                                                            f"({sorted(stored)}): a placement needs one count")
    num_stored = stored.pop()
    physical = num_stored + args.redundant
    if physical % args.devices or args.devices % args.nodes:
        raise cli.flag_error("redundant", args.redundant, f"{num_stored} stored experts + {args.redundant} must be "
                                                          f"a multiple of --devices={args.devices}, itself a multiple "
                                                          f"of --nodes={args.nodes}")
    opened = loaded
    if args.trace is not None:
        try:
            load = placement.expert_loads(config, read_trace(args.trace))
        except FileNotFoundError as e:
            raise cli.flag_error("trace", args.trace, str(e)) from e
    else:
        opened = steps.open_data(args, loaded)
        counts = importance.from_forward(config, variables, opened["batches"], "frequency",
                                         progress=steps.progress(opened, "routing loads"))
        load = placement.expert_loads(config, counts)
    phy2log, _, count = placement.rebalance_experts(load, physical, args.groups, args.nodes, args.devices)
    before = placement.device_loads(load, np.tile(np.arange(num_stored), (len(layers), 1)), args.devices) \
        if num_stored % args.devices == 0 else None
    after = placement.device_loads(load, phy2log, args.devices)
    new_config, new_variables = placement.place(config, variables, phy2log)
    what = {"operation": "place", "devices": args.devices, "redundant": args.redundant, "groups": args.groups,
            "nodes": args.nodes, "trace": args.trace, "physical_to_stored": phy2log.tolist(),
            "replicas": count.tolist(), "loads": load.tolist(),
            "max_over_mean_before": None if before is None else placement.imbalance(before).tolist(),
            "max_over_mean_after": placement.imbalance(after).tolist()}
    out = steps.save_model(args, opened, new_config, new_variables, what)
    steps.write_json(out / "placement.json", what)
    said = "" if before is None else f"{placement.imbalance(before).mean():.3f} -> "
    steps.say(f"slots per device, max over mean (mean over layers): {said}{placement.imbalance(after).mean():.3f}")
    return what
