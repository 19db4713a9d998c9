"""Compact moejax workdirs: a quantised model whose checkpoint stores its quantised matrices as codes and scales.

``python -m moejax.posthoc quantise --compact`` writes the workdir this way: in the orbax checkpoint, each quantised
parameter is a small tree instead of its float array,

    {'part0': {<formats.pack arrays of the stacked slices in part 0's format>}, 'part1': ..., 'kept': <float slices
     no rule quantised, [n, K, N], only when some are kept>}

(int<b> codes as int8, or two 4-bit codes per uint8 byte; FP8 codes as bytes with float32 scale_inv; MXFP4 blocks
and E8M0 scales; float32 scales), and ``quantised.json`` beside config.json records, per parameter, its path, shape,
dtype, ``Matrix`` view and each part's format and stacked indices. ``moejax.load`` sees ``quantised.json`` and
dequantises every such parameter back (``expand``): exactly the fake-quantised values the uncompact workdir holds.
``moejax.quant.decode.load`` instead keeps the int codes for quantised decoding.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from moejax.quant import formats, transform
from moejax.quant.rules import Matrix

LAYOUT_FILE = "quantised.json"


def _layout(tensor: transform.Tensor, kept: np.ndarray) -> dict[str, Any]:
    m = tensor.matrix
    return {"path": list(m.path), "target": m.target, "shape": list(m.shape), "batch_ndim": m.batch_ndim, "k": m.k,
            "n": m.n, "layers": list(m.layers), "experts": list(m.experts), "dtype": tensor.dtype,
            "parts": [{"format": p.format.name, "index": p.index.tolist()} for p in tensor.parts],
            "kept": kept.tolist()}


def to_tree(params: Mapping[str, Any], tensors: Mapping[str, transform.Tensor]) -> tuple[dict[str, Any], dict]:
    """(params with every quantised parameter replaced by its compact tree, the layout for ``quantised.json``)."""
    replaced, layout = {}, {}
    for name, tensor in tensors.items():
        m = tensor.matrix
        covered = np.concatenate([p.index for p in tensor.parts]) if tensor.parts else np.zeros(0, np.int64)
        kept = np.setdiff1d(np.arange(m.batch), covered)
        tree: dict[str, Any] = {f"part{i}": {key: np.asarray(value) for key, value in p.arrays.items()}
                                for i, p in enumerate(tensor.parts)}
        if kept.size:
            tree["kept"] = np.asarray(m.view(np.asarray(transform.get_path(params, m.path))))[kept]
        replaced[m.path] = tree
        layout[name] = _layout(tensor, kept)
    return transform.set_paths(params, replaced), {"tensors": layout}


def from_tree(params: Mapping[str, Any], layout: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """``to_tree``'s params and layout back to (params with every quantised parameter dequantised into its float
    array, ``{name: transform.Tensor}``)."""
    restored, tensors = {}, {}
    for name, entry in layout["tensors"].items():
        path = tuple(entry["path"])
        m = Matrix(path, entry["target"], tuple(entry["shape"]), entry["batch_ndim"], entry["k"], entry["n"],
                   tuple(entry["layers"]), tuple(entry["experts"]))
        tree = transform.get_path(params, path)
        parts = [transform.Part(np.asarray(p["index"], np.int64), formats.parse(p["format"]),
                                {key: np.asarray(value) for key, value in tree[f"part{i}"].items()})
                 for i, p in enumerate(entry["parts"])]
        tensor = transform.Tensor(m, entry["dtype"], parts)
        dtype = transform._dtype_from_name(entry["dtype"])
        stack = np.empty((m.batch, m.k, m.n), dtype)
        if entry["kept"]:
            stack[np.asarray(entry["kept"], np.int64)] = np.asarray(tree["kept"])
        for part in parts:
            stack[part.index] = transform.dequantize_part(part, m, dtype)
        restored[path] = stack.reshape(m.shape)
        tensors[name] = tensor
    return transform.set_paths(params, restored), tensors


def write_layout(workdir: str | pathlib.Path, layout: Mapping[str, Any]) -> pathlib.Path:
    path = pathlib.Path(workdir) / LAYOUT_FILE
    path.write_text(json.dumps(layout) + "\n")
    return path


def read_layout(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """The workdir's ``quantised.json``, or None when it is not a compact workdir."""
    path = pathlib.Path(workdir) / LAYOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def expand(workdir: str | pathlib.Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """The float params of a workdir's restored params: dequantised where it is a compact workdir."""
    layout = read_layout(workdir)
    return dict(params) if layout is None else from_tree(params, layout)[0]
