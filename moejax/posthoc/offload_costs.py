"""The offloading simulator's cost model (``moejax.posthoc.offload``): devices (nominal datasheet presets, JSON or
key=value specs), an expert's bytes and FLOPs from a model config, and the latency per token of a simulated run
(docs/serving.md has the formula)."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np


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


def costs_json(costs: Costs) -> dict[str, Any]:
    return {"device": dataclasses.asdict(costs.device), "expert_bytes": costs.expert_bytes,
            "expert_flops": costs.flops, "expert_bits": costs.expert_bits, "overlap": costs.overlap,
            "expert_compute_s": costs.compute_s, "expert_transfer_s": costs.transfer_s,
            "formula": ("step[l,t] = " + ("max(compute, transfer)" if costs.overlap else "compute + transfer")
                        + "; compute = experts demanded * max(expert_flops / (tflops * 1e12), expert_bytes / "
                          "(hbm_bandwidth_gbs * 1e9)); transfer = (experts loaded + prefetched, low precision as "
                          "low_bits / expert_bits) * expert_bytes / (host_bandwidth_gbs * 1e9); latency[t] = "
                          "sum over MoE layers")}
