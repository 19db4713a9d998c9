"""Quantised transformers checkpoints: what ``moejax.hf.save(..., quantisation='fp8' | 'mxfp4')`` writes.

* ``fp8`` (``fp8/<b0>x<b1>`` for other blocks): DeepSeek-V3's FP8 release format. Every weight of the attention
  projections, the dense MLPs, the shared experts and the routed experts is stored as float8_e4m3fn beside
  ``<name>_scale_inv`` (float32, one per b0 x b1 block of the stored [out, in] tensor, default 128 x 128: the tensor
  is ``fp8 * scale_inv`` block by block, scale_inv = block amax / 448). The embeddings, the norms, the biases, the
  routers and the output head stay in the parameters' dtype, as in the release. A weight whose last two axes are not
  multiples of the block stays unquantised too: transformers derives the block from the scale grid when it
  dequantises (``rows // scale_rows``), which is wrong for a partial last block, and its own quantiser leaves such
  weights alone. config.json gets ``quantization_config = {quant_method: 'fp8', fmt: 'e4m3', activation_scheme:
  'dynamic', weight_block_size: [b0, b1]}`` and, when some Linear stays unquantised, ``modules_to_not_convert``
  naming those modules (transformers' FP8 Linear replacement would otherwise expect scales for them).
* ``mxfp4``: GPT-OSS's release format, for the ``gpt_oss`` family. The routed experts' ``gate_up_proj`` and
  ``down_proj`` (stacked [E, in, out]) are stored as ``<name>_blocks`` [E, out, in / 32, 16] uint8 (two E2M1 codes
  per byte, the low nibble first) and ``<name>_scales`` [E, out, in / 32] uint8 (E8M0: a power-of-two exponent + 127
  per 32 inputs, the smallest that keeps the group within +-6); the rest stays in the parameters' dtype. config.json
  gets ``quantization_config = {quant_method: 'mxfp4', modules_to_not_convert: [...]}`` with the release's list
  (attention, router, embeddings, output head).

The codes and scales are ``moejax.quant.formats``' (fp8 with a b0 x b1 tile over [out, in]; mxfp4), and
``moejax.hf.load`` dequantises them back (moejax/hf/quant.py) to exactly the fake-quantised values.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from moejax.hf import io
from moejax.hf.config import HFConfigError
from moejax.quant import formats
from moejax.quant import rules as quant_rules

QUANTISED_TARGETS = ("attention", "dense", "shared", "experts")  # moejax.quant.rules targets written quantised
SCHEME_HELP = "fp8 (E4M3, 128x128 block scales), fp8/<b0>x<b1> (other blocks), mxfp4 (GPT-OSS's routed experts)"
MXFP4_KEEP = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
MXFP4_TENSORS = ("gate_up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A checkpoint quantisation: ``kind`` 'fp8' (``block`` the (out, in) block of a scale) or 'mxfp4'."""

    kind: str
    block: tuple[int, int] = (formats.FP8_BLOCK, formats.FP8_BLOCK)


def parse(value: Any, field: str = "quantisation") -> Scheme | None:
    """The scheme named by value (None or 'none': unquantised); ValueError naming field, the value and what is
    allowed."""
    if value is None:
        return None
    text = str(value).strip().lower() if isinstance(value, str) else ""
    if text == "none":
        return None
    if text == "mxfp4":
        return Scheme("mxfp4")
    match = re.fullmatch(r"fp8(?:/(\d+)x(\d+))?", text)
    if match and (match.group(1) is None or (int(match.group(1)) >= 1 and int(match.group(2)) >= 1)):
        return Scheme("fp8", (int(match.group(1) or formats.FP8_BLOCK), int(match.group(2) or formats.FP8_BLOCK)))
    raise ValueError(f"{field}={value!r} is not a checkpoint quantisation: allowed are {SCHEME_HELP}, or none")


def check(scheme: Scheme | None, model_type: str) -> None:
    """HFConfigError for a scheme the family cannot carry (MXFP4 is read by transformers for GPT-OSS only)."""
    if scheme is not None and scheme.kind == "mxfp4" and model_type != "gpt_oss":
        raise HFConfigError(f"quantisation='mxfp4' is written for the gpt_oss family only (transformers reads MXFP4 "
                            f"for GPT-OSS's experts), not {model_type}: use 'fp8'")


class Writer:
    """Turns the checkpoint entries of a save into quantised ones (``entry``), and gives the quantization_config of
    what it wrote (``config``)."""

    def __init__(self, scheme: Scheme):
        self.scheme = scheme
        self.kept_linear: list[str] = []
        self.quantised = 0
        self._scales: dict[str, np.ndarray] = {}

    def _fp8(self, name: str, shape: tuple[int, ...], produce: Callable[[], np.ndarray]) -> list[io.Entry]:
        b0, b1 = self.scheme.block
        fmt = formats.Format("fp8", 8, (b0, b1))  # the tile runs over the stored [out, in]: K = out, N = in
        *lead, rows, cols = shape
        scale_name = name[:-len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"

        def weight() -> np.ndarray:
            w = np.asarray(produce(), np.float32).reshape(-1, rows, cols)
            grid, scales = formats.quantize(w, fmt)
            self._scales[scale_name] = scales.reshape(*lead, rows // b0, cols // b1)
            return grid.astype(ml_dtypes.float8_e4m3fn).reshape(shape)

        self.quantised += 1
        return [(name, shape, np.dtype(ml_dtypes.float8_e4m3fn), weight),
                (scale_name, (*lead, rows // b0, cols // b1), np.dtype(np.float32),
                 lambda: self._scales.pop(scale_name))]

    def _mxfp4(self, name: str, shape: tuple[int, ...], produce: Callable[[], np.ndarray]) -> list[io.Entry]:
        experts, k, n = shape
        if k % formats.MXFP4_GROUP:
            raise HFConfigError(f"quantisation='mxfp4': {name} has {k} inputs, not a multiple of "
                                f"{formats.MXFP4_GROUP} (GPT-OSS's MXFP4 groups)")
        fmt = formats.parse("mxfp4")
        groups = k // formats.MXFP4_GROUP
        packed: dict[str, np.ndarray] = {}

        def blocks() -> np.ndarray:
            arrays = formats.pack(*formats.quantize(np.asarray(produce(), np.float32), fmt), fmt)
            packed["scales"] = arrays["scales"]
            return arrays["blocks"]

        self.quantised += 1
        return [(name + "_blocks", (experts, n, groups, formats.MXFP4_GROUP // 2), np.dtype(np.uint8), blocks),
                (name + "_scales", (experts, n, groups), np.dtype(np.uint8), lambda: packed.pop("scales"))]

    def entry(self, keys: tuple[str, ...], entry: io.Entry, kind: str) -> list[io.Entry]:
        """The entries that store ``entry`` (the tensor of parameter keys, by a rule of ``kind``)."""
        name, shape, _, produce = entry
        target = quant_rules.target(keys[1:]) if keys[0] == "params" and keys[-1] != "bias" else None
        if self.scheme.kind == "mxfp4":
            if target == "experts" and name.rsplit(".", 1)[-1] in MXFP4_TENSORS and len(shape) == 3:
                return self._mxfp4(name, shape, produce)
            return [entry]
        b0, b1 = self.scheme.block
        if target in QUANTISED_TARGETS and len(shape) >= 2 and shape[-2] % b0 == 0 and shape[-1] % b1 == 0:
            return self._fp8(name, shape, produce)
        if kind in ("linear", "linear2") and name.endswith(".weight"):  # transformers fuses per-expert Linears
            self.kept_linear.append(re.sub(r"(\.experts)\.\d+\..*", r"\1", name[:-len(".weight")]))
        return [entry]

    def config(self) -> dict[str, Any]:
        """The quantization_config of config.json."""
        if self.scheme.kind == "mxfp4":
            return {"quant_method": "mxfp4", "modules_to_not_convert": list(MXFP4_KEEP)}
        out: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": list(self.scheme.block)}
        if self.kept_linear:
            out["modules_to_not_convert"] = list(dict.fromkeys(self.kept_linear))
        return out
