"""Expert offloading simulated over a routing trace: per-layer (or global) expert caches on the device, experts
loaded from host memory on a miss, prefetching and low-precision loads, and a latency estimate from a device spec.
Trace-driven: nothing runs the model; ``python -m moejax.posthoc offload`` is the command line (docs/serving.md).

    from moejax.posthoc import offload, read_trace
    trace = read_trace("traces/run1")
    result = offload.simulate(trace, "lru", cache_experts=16, prefetch="oracle")
    costs = offload.Costs(offload.parse_device("h100-sxm"), expert_bytes=2 * 3 * 2048 * 1408)
    offload.summary(result, costs)                 # hit rates, bytes per token, latency: JSON-serialisable

The tokens are served one at a time in corpus order (batch 1 decoding), each through the MoE layers in order; with
``stream='document'`` (default) every cache starts empty at each document start (``trace.doc_starts``), with
``'corpus'`` the caches carry over. The caches and policies are ``offload_policies``'s (LRU, LFU with aging,
accumulated gate weight or router score, Belady's offline MIN). Prefetching, after layer l of a token, loads
predicted experts of layer l + 1 into its cache:

* ``affinity``: ExFlow's inter-layer affinity (arXiv 2401.08383), A[l, i, j] = P(expert j at l + 1 | expert i at
  l) estimated on a calibration trace (``analysis.inter_layer_affinity``); the p experts j of highest
  sum_{i in S} A[l, i, j] over the token's experts S at layer l (zero-probability ones left out);
* ``pregated``: Pre-gated MoE (arXiv 2308.12066), the next layer's router applied to the current layer's hidden
  state; given as ``predictions`` [L, N, q] (row l: experts of layer l + 1 in order of preference; [L - 1, N, q]
  accepted), computed from ``capture`` (docs/serving.md shows how); the first p are prefetched;
* ``oracle``: the token's actual experts at layer l + 1 (the first p of its slots): an upper bound.

Costs (``Costs``, per token t and MoE layer l, an expert's weights of B bytes at ``expert_bits`` bits):

    compute[l, t]  = a[l, t] * max(F / device FLOP/s, B / device memory bandwidth)
    transfer[l, t] = (m[l, t] + f[l, t]) * B / host-device bandwidth
    step[l, t]     = max(compute, transfer)   (overlap=True: transfers run during the layer's compute)
                   = compute + transfer       (overlap=False: nothing overlaps)
    latency[t]     = sum_l step[l, t]

with a the distinct experts the token demands at layer l, m the experts loaded for them (a low-precision copy counts
low_bits / expert_bits), f the experts prefetched after layer l (for layer l + 1) and F the expert's FLOPs per token
(default 2 B * 8 / expert_bits: two per weight). Only the routed experts are costed (attention, dense and shared
layers are left out), and overlap=True is optimistic (a missed expert's compute waits for its own load), overlap=False
pessimistic. The device numbers of the presets (``DEVICES``) are nominal datasheet figures, not measurements.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moejax.posthoc import analysis
from moejax.posthoc import offload_policies as policies
from moejax.posthoc.trace import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

POLICIES = policies.POLICIES
PREFETCH = ("none", "affinity", "pregated", "oracle")
STREAMS = ("document", "corpus")


class ArgumentError(ValueError):
    """A bad argument: its name (the command line's flag), its value and what is allowed."""

    def __init__(self, name: str, value: Any, why: str):
        self.name, self.value, self.why = name, value, why
        super().__init__(f"{name}={value!r}: {why}")


# ---------------------------------------------------------------------------------------------- devices, costs

@dataclasses.dataclass(frozen=True)
class Device:
    """An accelerator behind a host link. host_bandwidth_gbs: host-to-device GB/s (1e9 bytes/s, one direction);
    memory_gb: device memory (1e9 bytes); tflops: dense 16-bit matmul TFLOP/s; hbm_bandwidth_gbs: device memory
    GB/s (0: no memory-bound term)."""

    name: str
    host_bandwidth_gbs: float
    memory_gb: float
    tflops: float
    hbm_bandwidth_gbs: float = 0.0


# Nominal datasheet numbers (dense BF16 tensor TFLOP/s without sparsity; the host link's nominal rate per direction:
# PCIe 4.0 x16 32 GB/s, PCIe 5.0 x16 64 GB/s, GH200's NVLink-C2C 450 GB/s); measured rates are lower.
DEVICES = {
    "a100-80gb": Device("a100-80gb", 32.0, 80.0, 312.0, 2039.0),
    "h100-pcie": Device("h100-pcie", 64.0, 80.0, 756.0, 2000.0),
    "h100-sxm": Device("h100-sxm", 64.0, 80.0, 989.0, 3350.0),
    "h200": Device("h200", 64.0, 141.0, 989.0, 4800.0),
    "gh200": Device("gh200", 450.0, 96.0, 989.0, 4000.0),
    "rtx-4090": Device("rtx-4090", 32.0, 24.0, 165.0, 1008.0),
}
EXPERT_FIELDS = ("expert_bytes", "expert_flops")  # what a device spec may also give about the experts
_DEVICE_HELP = (f"a preset ({', '.join(DEVICES)}), a JSON file or object, or key=value pairs separated by commas "
                f"(optionally after a preset); keys: {', '.join(f.name for f in dataclasses.fields(Device))}, "
                f"{', '.join(EXPERT_FIELDS)}")


def parse_device(spec: str | Mapping[str, Any]) -> tuple[Device, dict[str, float]]:
    """(Device, the expert fields it gives) of a preset name, a JSON file, a JSON object (text or mapping), or
    'preset,key=value,...' / 'key=value,...'. ArgumentError('device', ...) says what is wrong."""
    fields: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        fields = dict(spec)
    elif spec.strip().startswith("{") or spec.endswith(".json"):
        try:
            fields = json.loads(pathlib.Path(spec).read_text() if spec.endswith(".json") else spec)
        except (OSError, ValueError) as e:
            raise ArgumentError("device", spec, f"cannot read the JSON ({e}); give {_DEVICE_HELP}") from e
        if not isinstance(fields, dict):
            raise ArgumentError("device", spec, f"the JSON is not an object; give {_DEVICE_HELP}")
    else:
        for i, part in enumerate(p.strip() for p in spec.split(",")):
            if "=" in part:
                key, value = part.split("=", 1)
                fields[key.strip()] = value.strip()
            elif i == 0 and part in DEVICES:
                fields = dataclasses.asdict(DEVICES[part])
            else:
                raise ArgumentError("device", spec, f"{part!r} is neither a preset nor key=value; give "
                                                    f"{_DEVICE_HELP}")
    if "preset" in fields:
        base = fields.pop("preset")
        if base not in DEVICES:
            raise ArgumentError("device", spec, f"unknown preset {base!r}; give {_DEVICE_HELP}")
        fields = {**dataclasses.asdict(DEVICES[base]), **fields}
    known = [f.name for f in dataclasses.fields(Device)] + list(EXPERT_FIELDS)
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ArgumentError("device", spec, f"unknown keys {unknown}; give {_DEVICE_HELP}")
    values = {}
    for key, value in fields.items():
        if key == "name":
            continue
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            values[key] = math.nan
        low = 0.0 if key in ("hbm_bandwidth_gbs", "expert_flops") else None
        if not math.isfinite(values[key]) or (values[key] < 0 if low == 0.0 else values[key] <= 0):
            raise ArgumentError("device", spec, f"{key}={value!r} must be a number {'>=' if low == 0.0 else '>'} 0")
    missing = [name for name in ("host_bandwidth_gbs", "memory_gb", "tflops") if name not in values]
    if missing:
        raise ArgumentError("device", spec, f"missing {', '.join(missing)}; give {_DEVICE_HELP}")
    device = Device(str(fields.get("name", "custom")), values["host_bandwidth_gbs"], values["memory_gb"],
                    values["tflops"], values.get("hbm_bandwidth_gbs", 0.0))
    return device, {key: values[key] for key in EXPERT_FIELDS if key in values}


@dataclasses.dataclass(frozen=True)
class Costs:
    """The cost model (module docstring): a device, the bytes B of one expert's weights at ``expert_bits`` bits and
    its FLOPs per token (None: 2 per weight), and whether transfers overlap compute."""

    device: Device
    expert_bytes: float
    expert_flops: float | None = None
    expert_bits: int = 16
    overlap: bool = True

    def __post_init__(self) -> None:
        if not (self.expert_bytes > 0 and math.isfinite(self.expert_bytes)):
            raise ArgumentError("expert_bytes", self.expert_bytes, "must be a number > 0 (bytes of one expert)")

    @property
    def flops(self) -> float:
        return 2 * self.expert_bytes * 8 / self.expert_bits if self.expert_flops is None else self.expert_flops

    @property
    def compute_s(self) -> float:
        """Seconds of one expert on one token: max(FLOPs / FLOP/s, bytes / device memory bandwidth)."""
        memory = self.expert_bytes / (self.device.hbm_bandwidth_gbs * 1e9) if self.device.hbm_bandwidth_gbs else 0.0
        return max(self.flops / (self.device.tflops * 1e12), memory)

    @property
    def transfer_s(self) -> float:
        """Seconds to move one expert (full precision) from host to device."""
        return self.expert_bytes / (self.device.host_bandwidth_gbs * 1e9)

    def latency(self, active: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """[n] seconds per token from active [L, n] (experts computed) and moved [L, n] (experts transferred)."""
        compute = np.asarray(active, np.float64) * self.compute_s
        transfer = np.asarray(moved, np.float64) * self.transfer_s
        return (np.maximum(compute, transfer) if self.overlap else compute + transfer).sum(0)


def expert_size(model_config, bits: int = 16) -> tuple[float, float]:
    """(bytes, FLOPs per token) of one routed expert of a moejax model config section (``config.model``) with its
    weights at ``bits`` bits: the expert kind's parameters (moejax/moe/experts.py) of one expert, 2 FLOPs each."""
    from moejax.moe import experts

    kind = experts.EXPERT_KINDS[model_config.moe.expert_kind].from_config(model_config.moe)
    shapes = kind.param_shapes(1, model_config.d_model, model_config.moe.expert_ffn)
    params = sum(math.prod(shape) for shape in shapes.values())
    return params * bits / 8, 2.0 * params


# ------------------------------------------------------------------------------------------------ trace inputs

def _first(predictions: np.ndarray, p: int) -> np.ndarray:
    """The first p valid ids of each row (-1 padded), order kept."""
    order = np.argsort(predictions < 0, axis=-1, kind="stable")
    out = np.take_along_axis(predictions, order, -1)[..., :p]
    pad = p - out.shape[-1]
    return np.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, pad)], constant_values=-1) if pad > 0 else out


def part(trace: Trace, start: int, end: int) -> Trace:
    """The tokens [start, end) of trace as a trace (views of its arrays; the document starts inside, shifted)."""
    starts = trace.doc_starts[(trace.doc_starts >= start) & (trace.doc_starts < end)] - start
    return Trace(experts=trace.experts[:, start:end], weights=trace.weights[:, start:end],
                 scores=None if trace.scores is None else trace.scores[:, start:end],
                 token_ids=trace.token_ids[start:end], layers=trace.layers, num_experts=trace.num_experts,
                 doc_starts=starts, metadata=trace.metadata)


def split_calibration(trace: Trace, fraction: float) -> tuple[Trace, Trace, int]:
    """(calibration part, the rest, the token where the rest starts): the first ``fraction`` of the tokens, cut at
    the first document start at or after fraction * N (at fraction * N itself when no document starts there)."""
    if not 0 <= fraction < 1:
        raise ArgumentError("calibration_fraction", fraction, "must be a number in [0, 1)")
    target = int(round(fraction * trace.num_tokens))
    later = trace.doc_starts[trace.doc_starts >= target]
    cut = int(later[0]) if target and len(later) else target
    if fraction > 0 and not 0 < cut < trace.num_tokens:
        raise ArgumentError("calibration_fraction", fraction, f"leaves no tokens on one side of the cut in a trace "
                                                              f"of {trace.num_tokens} tokens")
    return part(trace, 0, cut), part(trace, cut, trace.num_tokens), cut


def affinity_predictions(trace: Trace, affinity: np.ndarray, p: int, block: int = 1 << 14) -> np.ndarray:
    """[L, N, p] int64: after layer l, the p experts j of layer l + 1 of highest sum_{i in S} affinity[l, i, j]
    over the token's experts S at layer l (ties to the lower id; score 0 and the last layer's row: -1)."""
    num_experts = trace.num_experts
    affinity = np.asarray(affinity, np.float64)
    if affinity.shape != (max(trace.num_layers - 1, 0), num_experts, num_experts):
        raise ArgumentError("affinity", list(affinity.shape), f"must be [L - 1, E, E] = "
                                                              f"{[trace.num_layers - 1, num_experts, num_experts]}")
    out = np.full((trace.num_layers, trace.num_tokens, p), -1, np.int64)
    for layer in range(trace.num_layers - 1):
        for start in range(0, trace.num_tokens, block):
            ids = policies.clean(np.asarray(trace.experts[layer, start:start + block]), num_experts)
            onehot = np.zeros((len(ids), num_experts + 1))
            onehot[np.arange(len(ids))[:, None], np.where(ids < 0, num_experts, ids)] = 1.0  # ids distinct per row
            score = onehot[:, :num_experts] @ affinity[layer]
            best = np.argsort(-score, axis=1, kind="stable")[:, :p]
            out[layer, start:start + block] = np.where(np.take_along_axis(score, best, 1) > 0, best, -1)
    return out


def oracle_predictions(trace: Trace, p: int) -> np.ndarray:
    """[L, N, p]: after layer l, the token's actual experts at layer l + 1 (the first p of its slots)."""
    out = np.full((trace.num_layers, trace.num_tokens, p), -1, np.int64)
    for layer in range(trace.num_layers - 1):
        out[layer] = _first(policies.clean(np.asarray(trace.experts[layer + 1]), trace.num_experts), p)
    return out


def check_predictions(predictions: np.ndarray, trace: Trace, p: int) -> np.ndarray:
    """Pre-gated predictions [L, N, q] or [L - 1, N, q] (row l: experts of layer l + 1, best first) as [L, N, p]."""
    predictions = np.asarray(predictions)
    layers, tokens = trace.num_layers, trace.num_tokens
    if (predictions.ndim != 3 or predictions.shape[0] not in (layers, layers - 1) or predictions.shape[1] != tokens
            or not np.issubdtype(predictions.dtype, np.integer)):
        raise ArgumentError("predictions", f"{predictions.dtype}{list(predictions.shape)}",
                            f"must be integer [L, N, q] or [L - 1, N, q] with L = {layers}, N = {tokens}")
    out = np.full((layers, tokens, p), -1, np.int64)
    out[:layers - 1] = _first(policies.clean(predictions[:layers - 1], trace.num_experts), p)
    return out


# -------------------------------------------------------------------------------------------------- simulation

@dataclasses.dataclass
class Result:
    """One simulation: ``options`` (its arguments), per layer [L] the demand ``accesses`` (distinct experts per
    token), ``hits``, ``compulsory`` misses (first demand since the reset), ``low_slots`` (served by a
    low-precision copy), ``prefetch_loads`` and ``prefetch_useful`` (by the layer prefetched for), and per step
    [L, n] ``demand`` and ``prefetched`` (experts moved; prefetches by the layer that issued them) and ``active``."""

    options: dict[str, Any]
    layers: list[int]
    num_tokens: int
    accesses: np.ndarray
    hits: np.ndarray
    compulsory: np.ndarray
    low_slots: np.ndarray
    prefetch_loads: np.ndarray
    prefetch_useful: np.ndarray
    demand: np.ndarray
    prefetched: np.ndarray
    active: np.ndarray


def check_options(trace: Trace, policy: str, cache_experts: int, prefetch: str, prefetch_experts: int,
                  stream: str, decay: float, score_source: str, low_precision_threshold: float,
                  low_precision_bits: int, expert_bits: int) -> None:
    """ArgumentError naming the first bad argument, its value and what is allowed."""
    top_k, num_experts = min(trace.top_k, trace.num_experts), trace.num_experts
    choices = {"policy": (policy, POLICIES), "prefetch": (prefetch, PREFETCH), "stream": (stream, STREAMS),
               "score_source": (score_source, policies.SCORE_SOURCES)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ArgumentError(name, value, f"allowed are {', '.join(allowed)}")
    if not (isinstance(cache_experts, int | np.integer) and top_k <= cache_experts <= num_experts):
        raise ArgumentError("cache_experts", cache_experts, f"experts cached per MoE layer: an integer in [top_k, E] "
                                                            f"= [{top_k}, {num_experts}]")
    if not (isinstance(prefetch_experts, int | np.integer) and 1 <= prefetch_experts <= cache_experts):
        raise ArgumentError("prefetch_experts", prefetch_experts, f"an integer in [1, cache_experts] = "
                                                                  f"[1, {cache_experts}]")
    if not 0 < decay <= 1:
        raise ArgumentError("decay", decay, "the aging factor per token: a number in (0, 1] (1: no aging)")
    if policy == "score" and score_source == "score" and trace.scores is None:
        raise ArgumentError("score_source", score_source, "the trace has no router scores (record it with "
                                                          "--with_scores), use 'weight'")
    if not low_precision_threshold >= 0:
        raise ArgumentError("low_precision_threshold", low_precision_threshold, "a gate weight >= 0 (0: off)")
    if not (isinstance(expert_bits, int | np.integer) and expert_bits >= 1):
        raise ArgumentError("expert_bits", expert_bits, "bits per expert weight: an integer >= 1")
    if not (isinstance(low_precision_bits, int | np.integer) and 1 <= low_precision_bits <= expert_bits):
        raise ArgumentError("low_precision_bits", low_precision_bits, f"an integer in [1, expert_bits] = "
                                                                      f"[1, {expert_bits}]")


def simulate(trace: Trace, policy: str = "lru", cache_experts: int | None = None, *, prefetch: str = "none",
             prefetch_experts: int | None = None, predictions: np.ndarray | None = None,
             affinity: np.ndarray | None = None, stream: str = "document", global_cache: bool = False,
             decay: float = 1.0, score_source: str = "weight", low_precision_threshold: float = 0.0,
             low_precision_bits: int = 4, expert_bits: int = 16, progress: Callable[[int], None] | None = None
             ) -> Result:
    """Simulates the expert caches over ``trace`` (module docstring, ``offload_policies``).

    policy: lru | lfu | score | belady; cache_experts: experts per MoE layer's cache (default 2 top_k, at most E),
    with ``global_cache`` a budget of cache_experts * L shared by all layers; prefetch: none | affinity | pregated
    | oracle, of ``prefetch_experts`` experts (default top_k); predictions: pregated's [L, N, q]; affinity:
    [L - 1, E, E] for 'affinity' (default: estimated on ``trace`` itself, in-sample: pass one from a calibration
    trace, ``split_calibration``); stream: document | corpus; decay: lfu/score aging per token; score_source:
    weight | score; low_precision_threshold: a miss of gate weight below it loads ``low_precision_bits`` /
    ``expert_bits`` of the expert (0: off). ``progress(tokens done)``."""
    top_k = min(trace.top_k, trace.num_experts)
    cache_experts = min(2 * top_k, trace.num_experts) if cache_experts is None else cache_experts
    prefetch_experts = top_k if prefetch_experts is None else prefetch_experts
    check_options(trace, policy, cache_experts, prefetch, prefetch_experts, stream, decay, score_source,
                  low_precision_threshold, low_precision_bits, expert_bits)
    num_experts = trace.num_experts
    pre = None
    if prefetch == "oracle":
        pre = oracle_predictions(trace, prefetch_experts)
    elif prefetch == "affinity":
        pre = affinity_predictions(trace, analysis.inter_layer_affinity(trace) if affinity is None else affinity,
                                   prefetch_experts)
    elif prefetch == "pregated":
        if predictions is None:
            raise ArgumentError("predictions", None, "prefetch='pregated' needs the predicted experts [L, N, q]")
        pre = check_predictions(predictions, trace, prefetch_experts)
    engine = policies.make_policy(
        policy, trace.num_layers, num_experts, decay=decay,
        scores=trace.scores if policy == "score" and score_source == "score" else None,
        occurrences=policies.occurrences(trace.experts, num_experts) if policy == "belady" else None)
    segments = [tuple(int(v) for v in d) for d in trace.documents] if stream == "document" else [
        (0, trace.num_tokens)]
    counts = policies.run(trace.experts, trace.weights, segments, num_experts, cache_experts, engine,
                          global_cache=global_cache, prefetch=pre, low_threshold=low_precision_threshold,
                          low_units=low_precision_bits / expert_bits, progress=progress)
    options = {"policy": policy, "cache_experts": int(cache_experts), "prefetch": prefetch,
               "prefetch_experts": int(prefetch_experts) if prefetch != "none" else 0, "stream": stream,
               "global_cache": bool(global_cache), "decay": float(decay),
               "score_source": score_source if policy == "score" else None,
               "low_precision_threshold": float(low_precision_threshold),
               "low_precision_bits": int(low_precision_bits), "expert_bits": int(expert_bits)}
    arrays = {key: np.asarray(counts[key], np.int64) for key in
              ("accesses", "hits", "compulsory", "low_slots", "prefetch_loads", "prefetch_useful")}
    steps = {key: np.asarray(counts[key], np.float32).reshape(trace.num_layers, -1)
             for key in ("demand", "prefetched", "active")}
    return Result(options=options, layers=trace.layers.tolist(), num_tokens=trace.num_tokens, **arrays, **steps)


def summary(result: Result, costs: Costs | None = None) -> dict[str, Any]:
    """The JSON-serialisable numbers of a simulation: hit_rate [L] and hit_rate_overall (hits / demand accesses);
    warm_hit_rate (the same without compulsory misses: 1 when the cache holds every expert); misses; bytes and
    experts moved per token (demand and prefetch); prefetch loads, useful and useless; low-precision slots; with
    ``costs``: the cache's bytes, whether it fits the device memory, and the latency per token (mean, p50, p90,
    p99 seconds, tokens/s) beside two references: every expert resident (compute only) and no cache (every demanded
    expert loaded, full precision)."""
    tokens = max(result.num_tokens, 1)
    accesses, hits = result.accesses, result.hits
    moved = result.demand + result.prefetched

    def ratio(a, b):
        return float(a / b) if b else None

    out = {**result.options, "layers": result.layers, "num_tokens": result.num_tokens,
           "hit_rate": [ratio(h, a) for h, a in zip(hits, accesses, strict=True)],
           "hit_rate_overall": ratio(hits.sum(), accesses.sum()),
           "warm_hit_rate": ratio(hits.sum(), accesses.sum() - result.compulsory.sum()),
           "accesses": accesses.tolist(), "misses": (accesses - hits).tolist(),
           "compulsory_misses": result.compulsory.tolist(),
           "experts_moved_per_token": float(moved.sum() / tokens),
           "demand_experts_per_token": float(result.demand.sum() / tokens),
           "prefetch_loads": result.prefetch_loads.tolist(), "prefetch_useful": result.prefetch_useful.tolist(),
           "prefetch_useless": (result.prefetch_loads - result.prefetch_useful).tolist(),
           "low_precision_slots": result.low_slots.tolist(), "low_precision_slots_total": int(result.low_slots.sum())}
    if costs is not None:
        slots = result.options["cache_experts"] * len(result.layers)
        latency = costs.latency(result.active, moved)
        resident = costs.latency(result.active, np.zeros_like(moved))
        no_cache = costs.latency(result.active, result.active)

        def stats(values: np.ndarray) -> dict[str, float | None]:
            if not len(values):
                return {"mean_s": None, "p50_s": None, "p90_s": None, "p99_s": None, "tokens_per_s": None}
            mean = float(values.mean())
            p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
            return {"mean_s": mean, "p50_s": p50, "p90_s": p90, "p99_s": p99,
                    "tokens_per_s": 1 / mean if mean > 0 else None}

        out.update({"bytes_moved_per_token": float(moved.sum() / tokens * costs.expert_bytes),
                    "demand_bytes_per_token": float(result.demand.sum() / tokens * costs.expert_bytes),
                    "prefetch_bytes_per_token": float(result.prefetched.sum() / tokens * costs.expert_bytes),
                    "cache_bytes": slots * costs.expert_bytes,
                    "fits_device_memory": slots * costs.expert_bytes <= costs.device.memory_gb * 1e9,
                    "latency": stats(latency), "latency_resident": stats(resident),
                    "latency_no_cache": stats(no_cache)})
    return out


def costs_json(costs: Costs) -> dict[str, Any]:
    return {"device": dataclasses.asdict(costs.device), "expert_bytes": costs.expert_bytes,
            "expert_flops": costs.flops, "expert_bits": costs.expert_bits, "overlap": costs.overlap,
            "expert_compute_s": costs.compute_s, "expert_transfer_s": costs.transfer_s,
            "formula": ("step[l,t] = " + ("max(compute, transfer)" if costs.overlap else "compute + transfer")
                        + "; compute = experts demanded * max(expert_flops / (tflops * 1e12), expert_bytes / "
                          "(hbm_bandwidth_gbs * 1e9)); transfer = (experts loaded + prefetched, low precision as "
                          "low_bits / expert_bits) * expert_bytes / (host_bandwidth_gbs * 1e9); latency[t] = "
                          "sum over MoE layers")}


# ------------------------------------------------------------------------------------------------------- plot

def plot_hit_rate(summaries: Sequence[Mapping[str, Any]], path: str | os.PathLike | None = None) -> Figure:
    """Hit rate (overall) against the cache size, one line per (policy, prefetch) of ``summaries`` (``summary``
    dicts); a ``matplotlib.figure.Figure`` built without pyplot, saved as a PNG when ``path`` is given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for s in summaries:
        if s["hit_rate_overall"] is not None:
            lines.setdefault((s["policy"], s["prefetch"]), []).append((s["cache_experts"], s["hit_rate_overall"]))
    for i, ((policy, prefetch), points) in enumerate(sorted(lines.items())):
        x, y = zip(*sorted(points), strict=True)
        style = "--" if policy == "belady" else "-"
        ax.plot(x, y, style, marker="o", color=f"C{i % 10}",
                label=policy + ("" if prefetch == "none" else f" + {prefetch} prefetch"))
    scope = "global budget / L" if summaries and summaries[0].get("global_cache") else "per MoE layer"
    ax.set(xlabel=f"cached experts ({scope})", ylabel="hit rate", ylim=(0, 1.02),
           title="expert cache hit rate (simulated from a routing trace)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if path is not None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


# ------------------------------------------------------------------------------------------------ command line

OUTPUTS = ("offload.json", "hit_rate.png")  # what the command writes into --out


def add_flags(parser) -> None:
    """The flags of ``python -m moejax.posthoc offload`` (docs/serving.md)."""
    parser.add_argument("--trace", required=True, help="a trace directory (python -m moejax.posthoc trace)")
    parser.add_argument("--out", required=True, help=f"the directory for {' and '.join(OUTPUTS)}")
    parser.add_argument("--policy", default="lru,lfu,score,belady",
                        help=f"comma-separated, of {', '.join(POLICIES)} (belady: offline MIN, the bound)")
    parser.add_argument("--cache_experts", default="", help="experts cached per MoE layer, comma-separated, each in "
                                                            "[top_k, E] (default top_k, 2 top_k, 4 top_k, ... and E)")
    parser.add_argument("--global_cache", action="store_true",
                        help="one cache of cache_experts * L experts shared by the MoE layers")
    parser.add_argument("--stream", default="document", help="document: empty caches at every document start; "
                                                             "corpus: one stream in corpus order")
    parser.add_argument("--prefetch", default="none", help=f"comma-separated, of {', '.join(PREFETCH)}")
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
    parser.add_argument("--first_tokens", type=int, default=0, help="simulate the first N tokens only (0: all)")
    parser.add_argument("--decay", type=float, default=1.0, help="lfu and score: aging factor per token in (0, 1]")
    parser.add_argument("--score_source", default="weight", help="score: accumulate the gate weight (weight) or "
                                                                 "the router score (score: traced --with_scores)")
    parser.add_argument("--low_precision_threshold", type=float, default=0.0,
                        help="a miss of gate weight below it loads a low-precision copy (HOBBIT; 0: off)")
    parser.add_argument("--low_precision_bits", type=int, default=4, help="bits of the low-precision copies")
    parser.add_argument("--expert_bits", type=int, default=16, help="bits per weight of the experts")
    parser.add_argument("--device", default="h100-sxm", help=_DEVICE_HELP + " (nominal datasheet numbers)")
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


def _costs(args, trace: Trace) -> tuple[Costs, str]:
    device, given = parse_device(args.device)
    expert_bytes, flops, source = args.expert_bytes or given.get("expert_bytes"), None, "--expert_bytes"
    if not args.expert_bytes and expert_bytes:
        source = "--device"
    checkpoint = args.checkpoint or trace.metadata.get("checkpoint") or ""
    if not expert_bytes and checkpoint and (args.checkpoint or pathlib.Path(checkpoint).is_dir()):
        expert_bytes, flops = expert_size(_model_config(checkpoint), args.expert_bits)
        source = f"the config of {checkpoint}"
    if not expert_bytes:
        raise ArgumentError("expert_bytes", args.expert_bytes, "the bytes of one expert are unknown: give "
                                                               "--expert_bytes, expert_bytes in --device, or "
                                                               "--checkpoint")
    flops = args.expert_flops or given.get("expert_flops") or flops
    return Costs(device, float(expert_bytes), flops, args.expert_bits, not args.no_overlap), source


def command(args, say: Callable[[str], None], progress_bar: Callable[[int, str], Callable[[int], None]]
            ) -> dict[str, Any]:
    """Runs the command of ``args`` (``add_flags``): every --policy x --prefetch x --cache_experts, then writes
    offload.json and hit_rate.png to --out. ArgumentError names a bad flag."""
    from moejax.posthoc.trace import read_trace

    def open_trace(flag: str, path: str) -> Trace:
        try:
            return read_trace(path)
        except (FileNotFoundError, ValueError) as e:
            raise ArgumentError(flag, path, str(e)) from e

    trace = open_trace("trace", args.trace)
    names = _list("policy", args.policy, POLICIES)
    prefetches = _list("prefetch", args.prefetch, PREFETCH)
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
    calibration, evaluation, cut = split_calibration(trace, fraction)
    if args.first_tokens > 0:
        evaluation = part(evaluation, 0, min(args.first_tokens, evaluation.num_tokens))
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
            check_predictions(predictions, trace, 1)  # raises, naming --predictions
        predictions = predictions[:, cut:cut + evaluation.num_tokens]
    options = dict(stream=args.stream, global_cache=args.global_cache, decay=args.decay,
                   score_source=args.score_source, low_precision_threshold=args.low_precision_threshold,
                   low_precision_bits=args.low_precision_bits, expert_bits=args.expert_bits)
    runs = [(name, size, pre) for pre in prefetches for name in names for size in sizes]
    p = args.prefetch_experts or top_k
    for name, size, pre in runs:  # every argument checked before the first run
        check_options(evaluation, name, size, pre, p, args.stream, args.decay, args.score_source,
                      args.low_precision_threshold, args.low_precision_bits, args.expert_bits)
    costs, source = _costs(args, trace)
    say(f"simulating {len(runs)} expert caches over {evaluation.num_tokens:,} tokens of {args.trace} "
        f"({trace.num_layers} MoE layers, {num_experts} experts, top-{trace.top_k}"
        + (f"; the first {cut:,} tokens estimate the affinity" if cut else "") + f"); expert bytes from {source}")
    show = progress_bar(len(runs) * evaluation.num_tokens, "tokens")
    summaries = []
    for i, (name, size, pre) in enumerate(runs):
        offset = i * evaluation.num_tokens
        result = simulate(evaluation, name, size, prefetch=pre, prefetch_experts=p, predictions=predictions,
                          affinity=affinity, progress=lambda done, offset=offset: show(offset + done), **options)
        summaries.append(summary(result, costs))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"trace": str(args.trace), "num_tokens": evaluation.num_tokens, "calibration_tokens": cut,
              "calibration_trace": args.calibration_trace or None, "expert_bytes_source": source,
              "costs": costs_json(costs), "runs": summaries}
    (out / OUTPUTS[0]).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    plot_hit_rate(summaries, path=out / OUTPUTS[1])
    for s in summaries:
        if not s["fits_device_memory"]:
            say(f"note: {s['cache_experts']} experts x {len(s['layers'])} layers ({s['cache_bytes'] / 1e9:.3g} GB) "
                f"exceed the device's {costs.device.memory_gb:g} GB")
            break
    best = max(summaries, key=lambda s: s["hit_rate_overall"] or 0.0)
    say(f"best hit rate {best['hit_rate_overall']:.4f} ({best['policy']}, {best['cache_experts']} experts, prefetch "
        f"{best['prefetch']}); wrote {', '.join(OUTPUTS)} to {out}")
    return report
