"""Serving study: expert offloading (simulated from routing traces) and expert placement with replicas, on the tiny
DeepSeekMoE trained with several seeds; writes experiments/results/serving.{md,json,png}.

    python -m experiments.serving_study [--checkpoints runs/posthoc_pages/seed0,runs/posthoc_pages/seed1,...]
        [--max_tokens 32768] [--out experiments/results] [--render_only]

Per checkpoint (each a training seed):

1. A routing trace of ``--max_tokens`` tokens of the validation split (``capture.calibration_batches(split=
   'validation')``, ``capture.record``), cached in ``<checkpoint>/serving/trace``.
2. Offloading (``moejax.posthoc.offload``) on the trace's last 80% (the first 20% estimates ExFlow's inter-layer
   affinity): every policy (LRU, LFU, accumulated gate weight, Belady's MIN) at caches of k, 2k, 4k experts per
   layer (k = top_k), and LRU with affinity and oracle prefetching; hit rate, experts moved per token and a latency
   per token priced with DeepSeek-V2-Lite's expert size (2048 x 1408 GLU, bfloat16: 17.3 MB) on the RTX 4090
   preset's nominal numbers (``offload.DEVICES``), that is, this model's routing as if its experts were that size.
   Beside them, the segment cache best hit rate SCH(m = 256, rho) of arXiv 2505.16056 (``locality``), rho = 1, 2.
3. Placement (``moejax.posthoc.placement``): EPLB planned on the trace's first half for 8 devices with 9 redundant
   experts (72 physical), slots per device (max over mean) measured on the second half with the layer's own
   replica choice, against the plain placement (63 experts, 8 per device and 7 on the last: E is not a multiple).
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import time
from typing import Any

import numpy as np

from experiments import posthoc_common as common

NAME = "serving"
POLICIES = ("lru", "lfu", "score", "belady")
PREFETCH = ("affinity", "oracle")
MULTIPLES = (1, 2, 4)
DEVICES, REDUNDANT = 8, 9
LITE_EXPERT_BYTES = 2048 * 1408 * 3 * 2  # DeepSeek-V2-Lite's routed expert in bfloat16
PLACEHOLDER = "(not written yet)"
say = common.speaker(NAME)


def record_trace(checkpoint: pathlib.Path, max_tokens: int) -> pathlib.Path:
    import moejax
    from moejax.posthoc import capture

    out = checkpoint / NAME / "trace"
    if (out / "manifest.json").exists():
        return out
    config, variables = moejax.load(checkpoint)
    _, batches, _ = capture.calibration_batches(config, checkpoint, split="validation", max_tokens=max_tokens)
    capture.record(config, variables, batches, out, overwrite=True)
    return out


def device_slots(trace, phy2stored: np.ndarray | None, num_devices: int) -> np.ndarray:
    """[L, D] slots per device on ``trace`` with the layer's replica choice (token index mod count)."""
    from moejax.moe import placement as placement_lib

    num_stored = trace.num_experts
    out = []
    for layer in range(trace.num_layers):
        ids = np.asarray(trace.experts[layer])
        if phy2stored is None:
            width = -(-num_stored // num_devices) * num_devices  # padded as the expert-parallel layer pads
            physical = ids
        else:
            width = phy2stored.shape[1]
            replicas, counts = placement_lib.tables(phy2stored[layer], num_stored)
            physical = np.asarray(placement_lib.to_physical(ids, replicas, counts, num_stored, width))
        flat = physical.reshape(-1)
        per_slot = np.bincount(flat[flat < width], minlength=width)
        out.append(per_slot.reshape(num_devices, -1).sum(-1))
    return np.stack(out)


def study(checkpoint: pathlib.Path, max_tokens: int) -> dict[str, Any]:
    from moejax.posthoc import analysis, locality, offload, placement, read_trace

    trace = read_trace(record_trace(checkpoint, max_tokens))
    k = trace.top_k
    calibration, rest, _ = offload.split_calibration(trace, 0.2)
    affinity = analysis.inter_layer_affinity(calibration)
    device, _ = offload.parse_device("rtx-4090")
    costs = offload.Costs(device, expert_bytes=float(LITE_EXPERT_BYTES), overlap=True)
    runs = []
    for policy in POLICIES:
        for m in MULTIPLES:
            t0 = time.perf_counter()
            runs.append(offload.summary(offload.simulate(rest, policy, m * k), costs))
            say(f"{checkpoint.name}: {policy} cache {m}k {runs[-1]['hit_rate_overall']:.3f} "
                f"({time.perf_counter() - t0:.1f}s)")
    for prefetch in PREFETCH:
        for m in MULTIPLES:
            runs.append(offload.summary(offload.simulate(rest, "lru", m * k, prefetch=prefetch, affinity=affinity),
                                        costs))
    sch = locality.model_cache_hit_rate(rest, [256], (1, 2))[0].tolist()
    sch_layers = locality.segment_cache_hit_rate(rest, [256], (1, 2))[:, 0, :].tolist()
    half = trace.num_tokens // 2
    first, second = offload.part(trace, 0, half), offload.part(trace, half, trace.num_tokens)
    load = np.stack([np.bincount(np.asarray(first.experts[layer]).reshape(-1)[np.asarray(
        first.experts[layer]).reshape(-1) < trace.num_experts], minlength=trace.num_experts)
        for layer in range(trace.num_layers)]).astype(np.float64)
    physical = trace.num_experts + REDUNDANT
    phy2log, _, count = placement.rebalance_experts(load, physical, num_gpus=DEVICES)
    before, after = device_slots(second, None, DEVICES), device_slots(second, phy2log, DEVICES)
    return {"checkpoint": str(checkpoint), "num_tokens": trace.num_tokens, "simulated_tokens": rest.num_tokens,
            "top_k": k, "num_experts": trace.num_experts, "layers": trace.layers.tolist(), "runs": runs,
            "sch_model": sch, "sch_layers": sch_layers, "costs": offload.costs_json(costs),
            "placement": {"devices": DEVICES, "physical": physical, "replicas_max": int(count.max()),
                          "before": placement.imbalance(before).tolist(),
                          "after": placement.imbalance(after).tolist(),
                          "predicted_after": placement.imbalance(
                              placement.device_loads(load, phy2log, DEVICES)).tolist()}}


def _run(seed: dict, policy: str, multiple: int, prefetch: str = "none") -> dict:
    return next(r for r in seed["runs"] if r["policy"] == policy and r["prefetch"] == prefetch
                and r["cache_experts"] == multiple * seed["top_k"])


def render(payload: dict[str, Any], findings: str) -> str:
    seeds = payload["seeds"]
    lines = ["# Serving the tiny DeepSeekMoE: expert offloading and expert placement", "",
             f"Generated by `experiments/serving_study.py` on {payload['machine']}; {len(seeds)} training seeds "
             f"(the models of `experiments/posthoc_pages.py`), {seeds[0]['num_tokens']:,} validation tokens traced per "
             f"model, the first 20% estimating ExFlow's affinity and {seeds[0]['simulated_tokens']:,} simulated.",
             "", "Command: `" + payload["command"] + "`", "", "<!-- findings:begin -->", findings.strip(),
             "<!-- findings:end -->", "", "## Hit rate per policy and cache size (mean over seeds, min-max)", "",
             "| policy | prefetch | " + " | ".join(f"cache {m}k" for m in MULTIPLES) + " |",
             "|---|---|" + "---|" * len(MULTIPLES)]
    combos = [(p, "none") for p in POLICIES] + [("lru", f) for f in PREFETCH]
    for policy, prefetch in combos:
        cells = []
        for m in MULTIPLES:
            values = [_run(s, policy, m, prefetch)["hit_rate_overall"] for s in seeds]
            cells.append(f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        lines.append(f"| {policy} | {prefetch} | " + " | ".join(cells) + " |")
    sch = np.array([s["sch_model"] for s in seeds])
    lines += ["", f"SCH(m = 256), the look-ahead cache of arXiv 2505.16056 pooled over the model: rho = 1 (cache k) "
              f"{sch[:, 0].mean():.3f}, rho = 2 (cache 2k) {sch[:, 1].mean():.3f} (mean over seeds; its cache is one "
              "pool over every layer's experts, not one cache per layer, so it is a reference, not a bound on the "
              "per-layer caches above; Belady's MIN is the per-layer bound).", "",
              "## Latency per token, priced as DeepSeek-V2-Lite experts on the RTX 4090 preset", "",
              "| policy | prefetch | " + " | ".join(f"cache {m}k: ms, experts moved" for m in MULTIPLES) + " |",
              "|---|---|" + "---|" * len(MULTIPLES)]
    for policy, prefetch in combos:
        cells = []
        for m in MULTIPLES:
            runs = [_run(s, policy, m, prefetch) for s in seeds]
            cells.append(f"{1e3 * np.mean([r['latency']['mean_s'] for r in runs]):.2f} ms, "
                         f"{np.mean([r['experts_moved_per_token'] for r in runs]):.2f}")
        lines.append(f"| {policy} | {prefetch} | " + " | ".join(cells) + " |")
    ref = _run(seeds[0], "lru", 1)
    lines += ["", f"References (seed 0): all experts resident {1e3 * ref['latency_resident']['mean_s']:.2f} ms, no "
              f"cache {1e3 * ref['latency_no_cache']['mean_s']:.2f} ms per token. The formula and the presets' "
              "nominal numbers are in docs/serving.md.", "",
              f"## Placement over {DEVICES} devices (EPLB, {seeds[0]['placement']['physical']} physical experts)", "",
              "Slots per device, max over mean per MoE layer, measured on the trace's second half (the plan from its "
              "first half):", "", "| seed | plain | EPLB (measured) | EPLB (predicted) |", "|---|---|---|---|"]
    for i, s in enumerate(seeds):
        p = s["placement"]
        lines.append(f"| {i} | {np.mean(p['before']):.3f} | {np.mean(p['after']):.3f} | "
                     f"{np.mean(p['predicted_after']):.3f} |")
    lines += ["", "![hit rate](serving.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=",".join(f"runs/posthoc_pages/seed{s}" for s in range(3)))
    parser.add_argument("--max_tokens", type=int, default=32768)
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--render_only", action="store_true")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.render_only:
        return common.rerender(out, NAME, render, PLACEHOLDER)
    seeds = [study(pathlib.Path(c), args.max_tokens) for c in args.checkpoints.split(",") if c]
    payload = {"seeds": seeds, "machine": f"{platform.machine()} ({platform.processor() or 'cpu'})",
               "command": "python -m experiments.serving_study " + " ".join(argv or [])}
    from moejax.posthoc import offload

    offload.plot_hit_rate(seeds[0]["runs"], path=out / f"{NAME}.png")
    common.write_page(out, NAME, payload, render, PLACEHOLDER)
    return payload


if __name__ == "__main__":
    main()
