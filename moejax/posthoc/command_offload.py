"""``python -m moejax.posthoc offload``: the command line of the expert-offloading simulator
(``moejax.posthoc.offload``): its flags, reading the traces and the device, sweeping the policies, prefetchers and
cache sizes, and writing ``offload.json`` and ``hit_rate.png`` (docs/serving.md)."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moejax.posthoc import analysis, offload
from moejax.posthoc.offload import ArgumentError
from moejax.posthoc.trace import Trace

OUTPUTS = ("offload.json", "hit_rate.png")  # what the command writes into --out


def add_flags(parser) -> None:
    """The flags of ``python -m moejax.posthoc offload`` (docs/serving.md)."""
    parser.add_argument("--trace", required=True, help="a trace directory (python -m moejax.posthoc trace)")
    parser.add_argument("--out", required=True, help=f"the directory for {' and '.join(OUTPUTS)}")
    parser.add_argument("--policy", default="lru,lfu,score,belady",
                        help=f"comma-separated, of {', '.join(offload.POLICIES)} (belady: offline MIN, the bound)")
    parser.add_argument("--cache_experts", default="", help="experts cached per MoE layer, comma-separated, each in "
                                                            "[top_k, E] (default top_k, 2 top_k, 4 top_k, ... and E)")
    parser.add_argument("--global_cache", action="store_true",
                        help="one cache of cache_experts * L experts shared by the MoE layers")
    parser.add_argument("--stream", default="document", help="document: empty caches at every document start; "
                                                             "corpus: one stream in corpus order")
    parser.add_argument("--prefetch", default="none", help=f"comma-separated, of {', '.join(offload.PREFETCH)}")
    parser.add_argument("--prefetch_experts", type=int, default=0, help="experts prefetched per token and layer "
                                                                        "(0: top_k)")
    parser.add_argument("--predictions", default="", help="pregated: a .npy [L, N, q] of predicted next-layer "
                                                          "experts (row l: for layer l + 1), N the trace's tokens")
    parser.add_argument("--calibration_trace", default="", help="affinity: estimate it on this trace (default: "
                                                                "the first --calibration_fraction of --trace)")
    parser.add_argument("--calibration_fraction", type=float, default=None,
                        help="the first fraction of the trace's tokens (cut at a document start) kept out of every "
                             "simulation, for the affinity (default 0.2 with affinity and no --calibration_trace, "
                             "else 0)")
    parser.add_argument("--first_tokens", type=int, default=0, help="offload.simulate the first N tokens only (0: all)")
    parser.add_argument("--decay", type=float, default=1.0, help="lfu and score: aging factor per token in (0, 1]")
    parser.add_argument("--score_source", default="weight", help="score: accumulate the gate weight (weight) or "
                                                                 "the router score (score: traced --with_scores)")
    parser.add_argument("--low_precision_threshold", type=float, default=0.0,
                        help="a miss of gate weight below it loads a low-precision copy (HOBBIT; 0: off)")
    parser.add_argument("--low_precision_bits", type=int, default=4, help="bits of the low-precision copies")
    parser.add_argument("--expert_bits", type=int, default=16, help="bits per weight of the experts")
    parser.add_argument("--device", default="h100-sxm", help=offload._DEVICE_HELP + " (nominal datasheet numbers)")
    parser.add_argument("--expert_bytes", type=float, default=0.0,
                        help="bytes of one expert (0: the device spec's, else --checkpoint's config, else the "
                             "trace's checkpoint)")
    parser.add_argument("--expert_flops", type=float, default=0.0, help="FLOPs of one expert per token (0: 2 per "
                                                                        "weight)")
    parser.add_argument("--checkpoint", default="", help="a moejax workdir or transformers directory whose config "
                                                         "gives the expert size")
    parser.add_argument("--no_overlap", action="store_true", help="transfers do not overlap compute (the sum, not "
                                                                  "the max)")


def _list(name: str, value: str, allowed: Sequence[str]) -> list[str]:
    values = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ArgumentError(name, value, f"comma-separated, allowed are {', '.join(allowed)}")
    return list(dict.fromkeys(values))


def _model_config(path: str):
    directory = pathlib.Path(path)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ArgumentError("checkpoint", path, f"cannot read its config.json ({e}): give a moejax workdir or a "
                                                "transformers directory, or --expert_bytes") from e
    if "model_type" in raw:
        from moejax import hf

        return hf.read_config(raw).model
    from moejax.loading import config_from_json

    return config_from_json(raw).model


def _costs(args, trace: Trace) -> tuple[offload.Costs, str]:
    device, given = offload.parse_device(args.device)
    expert_bytes, flops, source = args.expert_bytes or given.get("expert_bytes"), None, "--expert_bytes"
    if not args.expert_bytes and expert_bytes:
        source = "--device"
    checkpoint = args.checkpoint or trace.metadata.get("checkpoint") or ""
    if not expert_bytes and checkpoint and (args.checkpoint or pathlib.Path(checkpoint).is_dir()):
        expert_bytes, flops = offload.expert_size(_model_config(checkpoint), args.expert_bits)
        source = f"the config of {checkpoint}"
    if not expert_bytes:
        raise ArgumentError("expert_bytes", args.expert_bytes, "the bytes of one expert are unknown: give "
                                                               "--expert_bytes, expert_bytes in --device, or "
                                                               "--checkpoint")
    flops = args.expert_flops or given.get("expert_flops") or flops
    return offload.Costs(device, float(expert_bytes), flops, args.expert_bits, not args.no_overlap), source


def command(args, say: Callable[[str], None], progress_bar: Callable[[int, str], Callable[[int], None]]
            ) -> dict[str, Any]:
    """Runs the command of ``args`` (``add_flags``): every --policy x --prefetch x --cache_experts, then writes
    offload.json and hit_rate.png to --out. offload.ArgumentError names a bad flag."""
    from moejax.posthoc.trace import read_trace

    def open_trace(flag: str, path: str) -> Trace:
        try:
            return read_trace(path)
        except (FileNotFoundError, ValueError) as e:
            raise ArgumentError(flag, path, str(e)) from e

    trace = open_trace("trace", args.trace)
    names = _list("policy", args.policy, offload.POLICIES)
    prefetches = _list("prefetch", args.prefetch, offload.PREFETCH)
    top_k, num_experts = min(trace.top_k, trace.num_experts), trace.num_experts
    if args.cache_experts:
        try:
            sizes = sorted({int(v) for v in args.cache_experts.split(",") if v.strip()})
        except ValueError:
            sizes = []
        if not sizes:
            raise ArgumentError("cache_experts", args.cache_experts, f"comma-separated integers in [top_k, E] = "
                                                                     f"[{top_k}, {num_experts}]")
    else:
        sizes = sorted({min(top_k << i, num_experts) for i in range(num_experts.bit_length() + 1)})
    fraction = args.calibration_fraction
    if fraction is None:
        fraction = 0.2 if "affinity" in prefetches and not args.calibration_trace else 0.0
    calibration, evaluation, cut = offload.split_calibration(trace, fraction)
    if args.first_tokens > 0:
        evaluation = offload.part(evaluation, 0, min(args.first_tokens, evaluation.num_tokens))
    affinity = None
    if "affinity" in prefetches:
        source_trace = open_trace("calibration_trace", args.calibration_trace) if args.calibration_trace else (
            calibration)
        if (source_trace.num_layers, source_trace.num_experts) != (trace.num_layers, num_experts):
            raise ArgumentError("calibration_trace", args.calibration_trace, f"has {source_trace.num_layers} MoE "
                                f"layers of {source_trace.num_experts} experts, --trace {trace.num_layers} of "
                                f"{num_experts}")
        if not source_trace.num_tokens:
            raise ArgumentError("calibration_fraction", fraction, "leaves no calibration tokens for the affinity")
        affinity = analysis.inter_layer_affinity(source_trace)
    predictions = None
    if "pregated" in prefetches:
        if not args.predictions:
            raise ArgumentError("predictions", args.predictions, "--prefetch=pregated needs the predicted experts "
                                                                 "(a .npy [L, N, q]; docs/serving.md)")
        try:
            predictions = np.load(args.predictions, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ArgumentError("predictions", args.predictions, f"cannot read it as .npy: {e}") from e
        if predictions.ndim != 3 or predictions.shape[1] != trace.num_tokens:
            offload.check_predictions(predictions, trace, 1)  # raises, naming --predictions
        predictions = predictions[:, cut:cut + evaluation.num_tokens]
    options = dict(stream=args.stream, global_cache=args.global_cache, decay=args.decay,
                   score_source=args.score_source, low_precision_threshold=args.low_precision_threshold,
                   low_precision_bits=args.low_precision_bits, expert_bits=args.expert_bits)
    runs = [(name, size, pre) for pre in prefetches for name in names for size in sizes]
    p = args.prefetch_experts or top_k
    for name, size, pre in runs:  # every argument checked before the first run
        offload.check_options(evaluation, name, size, pre, p, args.stream, args.decay, args.score_source,
                      args.low_precision_threshold, args.low_precision_bits, args.expert_bits)
    costs, source = _costs(args, trace)
    say(f"simulating {len(runs)} expert caches over {evaluation.num_tokens:,} tokens of {args.trace} "
        f"({trace.num_layers} MoE layers, {num_experts} experts, top-{trace.top_k}"
        + (f"; the first {cut:,} tokens estimate the affinity" if cut else "") + f"); expert bytes from {source}")
    show = progress_bar(len(runs) * evaluation.num_tokens, "tokens")
    summaries = []
    for i, (name, size, pre) in enumerate(runs):
        offset = i * evaluation.num_tokens
        result = offload.simulate(evaluation, name, size, prefetch=pre, prefetch_experts=p, predictions=predictions,
                          affinity=affinity, progress=lambda done, offset=offset: show(offset + done), **options)
        summaries.append(offload.summary(result, costs))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"trace": str(args.trace), "num_tokens": evaluation.num_tokens, "calibration_tokens": cut,
              "calibration_trace": args.calibration_trace or None, "expert_bytes_source": source,
              "costs": offload.costs_json(costs), "runs": summaries}
    (out / OUTPUTS[0]).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    offload.plot_hit_rate(summaries, path=out / OUTPUTS[1])
    for s in summaries:
        if not s["fits_device_memory"]:
            say(f"note: {s['cache_experts']} experts x {len(s['layers'])} layers ({s['cache_bytes'] / 1e9:.3g} GB) "
                f"exceed the device's {costs.device.memory_gb:g} GB")
            break
    best = max(summaries, key=lambda s: s["hit_rate_overall"] or 0.0)
    say(f"best hit rate {best['hit_rate_overall']:.4f} ({best['policy']}, {best['cache_experts']} experts, prefetch "
        f"{best['prefetch']}); wrote {', '.join(OUTPUTS)} to {out}")
    return report
