"""Quantisation as a model transform: ``(config, variables) -> (config, variables')`` with every matched weight
replaced by its quantised-dequantised value in the parameter's own dtype (fake quantisation), and the compact form
(``Tensor``: codes and scales per format, ``moejax.quant.formats.pack``) that dequantises to exactly those values.

    from moejax import quant
    rules = quant.parse_rules("experts=int4/g128;attention=int8;router=none")
    new_variables, tensors = quant.quantize(config, variables, rules)          # round to nearest
    quant.save_tensors(tensors, "out/quantised.safetensors")
    params = quant.materialise(variables["params"], quant.load_tensors("out/quantised.safetensors"))  # == new

The model code is untouched: the fake-quantised variables run on every path the original runs on (scanned or
unrolled layers, every grouped-matmul backend, expert parallelism, ``generate``, ``evaluate``, the post-hoc tools).
The stacked parameters of a matrix (scanned layers, routed experts) may mix formats per stacked index (a rule's
``layers``, per-expert bits from ``moejax.quant.mixed``): a ``Tensor`` holds one ``Part`` per format, with the stacked
indices it covers; indices no rule quantised keep their values and are not part of the compact form.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from moejax.quant import formats
from moejax.quant import rules as rules_lib
from moejax.quant.rules import Matrix, Rule

METADATA_KEY = "moejax.quant"
TENSORS_FILE = "quantised.safetensors"  # the compact form beside a quantised workdir (posthoc quantise)


@dataclasses.dataclass
class Part:
    """The stacked indices ``index`` of one matrix stored in one ``format``: ``arrays`` from ``formats.pack`` of
    the [len(index), K, N] slices."""

    index: np.ndarray
    format: formats.Format
    arrays: dict[str, np.ndarray]


@dataclasses.dataclass
class Tensor:
    """The compact form of one quantised matrix: its ``Matrix``, its parameter ``dtype`` and its parts."""

    matrix: Matrix
    dtype: str
    parts: list[Part]

    @property
    def nbytes(self) -> int:
        return sum(formats.packed_bytes(part.arrays) for part in self.parts)


# A solver rounds slices [n, K, N] (float32) of a matrix at stacked indices ``index`` to a format:
# solver(matrix, index, slices, fmt) -> (grid values [n, K, N], scales [n, Gk, Gn]).
Solver = Callable[[Matrix, np.ndarray, np.ndarray, formats.Format], tuple[np.ndarray, np.ndarray]]


def rtn(matrix: Matrix, index: np.ndarray, slices: np.ndarray, fmt: formats.Format) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest (``formats.quantize``)."""
    del matrix, index
    return formats.quantize(slices, fmt)


def _dtype(value: Any) -> np.dtype:
    return np.dtype(value.dtype)


def quantize_matrix(matrix: Matrix, value: Any, chosen: Sequence[formats.Format | None], solver: Solver = rtn
                    ) -> tuple[np.ndarray, Tensor]:
    """One parameter (its full array, e.g. [U, E, K, N]) with the stacked indices quantised to ``chosen[b]`` by the
    solver: (the new array, fake-quantised in the parameter's dtype; its ``Tensor``)."""
    dtype = _dtype(value)
    stack = np.array(matrix.view(np.asarray(value)), copy=True)
    parts = []
    for fmt in dict.fromkeys(f for f in chosen if f is not None):
        index = np.asarray([b for b, f in enumerate(chosen) if f == fmt], np.int64)
        grid, scales = solver(matrix, index, stack[index].astype(np.float32), fmt)
        arrays = formats.pack(np.asarray(grid, np.float32), np.asarray(scales, np.float32), fmt)
        parts.append(Part(index, fmt, arrays))
        stack[index] = dequantize_part(parts[-1], matrix, dtype)
    return stack.reshape(matrix.shape), Tensor(matrix, dtype.name, parts)


def dequantize_part(part: Part, matrix: Matrix, dtype: Any) -> np.ndarray:
    """A part's slices [len(index), K, N] in dtype: its grid values times their scales (float32), cast."""
    grid, scales = formats.unpack(part.arrays, part.format, (len(part.index), matrix.k, matrix.n))
    return formats.dequantize(grid, scales, part.format, dtype)


# ------------------------------------------------------------------------------------------------ the tree


def get_path(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_paths(tree: Mapping[str, Any], values: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """A copy of a nested dict with the leaves at ``values``' paths replaced (the other leaves shared)."""
    out = dict(tree)
    heads: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in values.items():
        if len(path) == 1:
            out[path[0]] = value
        else:
            heads.setdefault(path[0], {})[path[1:]] = value
    for head, rest in heads.items():
        out[head] = set_paths(tree[head], rest)
    return out


def apply(config: Any, variables: Mapping[str, Any],
          assignment: Mapping[str, tuple[Matrix, Sequence[formats.Format | None]]], solver: Solver = rtn,
          progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Every assigned matrix through ``quantize_matrix``: (the new variables, ``{matrix name: Tensor}``)."""
    del config
    params = variables["params"]
    new, tensors = {}, {}
    for name, (matrix, chosen) in assignment.items():
        if progress is not None:
            progress(name)
        new[matrix.path], tensors[name] = quantize_matrix(matrix, get_path(params, matrix.path), chosen, solver)
    return {**variables, "params": set_paths(params, new)}, tensors


def quantize(config: Any, variables: Mapping[str, Any], rules: Sequence[Rule], *,
             expert_bits: Mapping[int, Sequence[int]] | None = None, solver: Solver = rtn,
             progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The model's variables with the weights ``rules`` match fake-quantised (round to nearest by default), and the
    compact form. ``expert_bits``: ``{MoE layer: bits per stored routed expert}`` (``moejax.quant.mixed``) overriding
    the routed experts' int format per expert (16: kept). ValueError naming the rule field for a bad rule."""
    assignment = rules_lib.assign(config, variables["params"], rules)
    if expert_bits is not None:
        from moejax.quant import mixed

        assignment = mixed.with_expert_bits(assignment, expert_bits)
    return apply(config, variables, assignment, solver, progress)


def materialise(params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """params with every tensor's quantised slices dequantised into place (the other slices and parameters as
    given): on the original params, the fake-quantised params ``quantize`` returned, exactly."""
    new = {}
    for tensor in tensors.values():
        matrix = tensor.matrix
        stack = np.array(matrix.view(np.asarray(get_path(params, matrix.path))), copy=True)
        for part in tensor.parts:
            stack[part.index] = dequantize_part(part, matrix, _dtype_from_name(tensor.dtype))
        new[matrix.path] = stack.reshape(matrix.shape)
    return set_paths(params, new)


def on_device(variables: Mapping[str, Any]) -> dict[str, Any]:
    """{'params', 'moe_state'} as committed arrays on the default device: trees mixing numpy arrays (the quantised
    weights) and device arrays (the others) in different places would each compile a jitted forward anew."""
    import jax

    device = jax.devices()[0]
    return {key: jax.device_put(variables[key], device) for key in ("params", "moe_state")
            if variables.get(key) is not None}


# ------------------------------------------------------------------------------------------------ on disk


def _dtype_from_name(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name == "bfloat16" else np.dtype(name)


def save_tensors(tensors: Mapping[str, Tensor], path: str | pathlib.Path, metadata: Mapping[str, Any] | None = None
                 ) -> pathlib.Path:
    """Writes the compact form as one safetensors file: the arrays under ``<matrix>#<part>/<array>`` and, in the
    header's metadata under ``moejax.quant``, each matrix's layout, dtype and parts (format, stacked indices)."""
    from safetensors.numpy import save_file

    arrays, layout = {}, {}
    for name, tensor in tensors.items():
        m = tensor.matrix
        layout[name] = {"path": list(m.path), "target": m.target, "shape": list(m.shape), "batch_ndim": m.batch_ndim,
                        "k": m.k, "n": m.n, "layers": list(m.layers), "experts": list(m.experts),
                        "dtype": tensor.dtype, "parts": []}
        for i, part in enumerate(tensor.parts):
            layout[name]["parts"].append({"format": part.format.name, "index": part.index.tolist(),
                                          "arrays": sorted(part.arrays)})
            for key, value in part.arrays.items():
                arrays[f"{name}#{i}/{key}"] = np.ascontiguousarray(value)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {METADATA_KEY: json.dumps({"tensors": layout, **dict(metadata or {})})}
    save_file(arrays, str(path), metadata=header)
    return path


def load_tensors(path: str | pathlib.Path) -> dict[str, Tensor]:
    """``save_tensors``' file back as ``{matrix name: Tensor}``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        layout = json.loads(f.metadata()[METADATA_KEY])["tensors"]
        out = {}
        for name, entry in layout.items():
            matrix = Matrix(tuple(entry["path"]), entry["target"], tuple(entry["shape"]), entry["batch_ndim"],
                            entry["k"], entry["n"], tuple(entry["layers"]), tuple(entry["experts"]))
            parts = [Part(np.asarray(p["index"], np.int64), formats.parse(p["format"]),
                          {key: f.get_tensor(f"{name}#{i}/{key}") for key in p["arrays"]})
                     for i, p in enumerate(entry["parts"])]
            out[name] = Tensor(matrix, _dtype_from_name(entry["dtype"]).name, parts)
    return out


def tensors_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """What ``save_tensors`` recorded beside the tensors' layout (its ``metadata``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        stored = json.loads(f.metadata()[METADATA_KEY])
    stored.pop("tensors")
    return stored
