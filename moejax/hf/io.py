"""Safetensors files read through memory maps and written as a stream, without torch.

``safetensors.safe_open(framework='numpy')`` cannot return BF16 or FP8 tensors (numpy has no such dtypes), and
released MoE checkpoints are BF16 (DeepSeek-V3: FP8). So the reader parses the safetensors header itself (8 bytes
of header length, a JSON header, then the raw little-endian data) and views each tensor of a memory-mapped file as a
numpy array of the matching ``ml_dtypes`` type: nothing is read until a tensor (or a slice of its first axis) is
used. Each tensor gets a memory map of its own byte range, unmapped when the last view of it is dropped: the pages
read through a map count in the process's RSS for as long as the map lives, so one map of the whole file would keep
every tensor read so far resident (a whole extra copy of the checkpoint by the end of a load). The writer streams:
it writes the header from the shapes, then each tensor as it is produced, so saving holds one tensor group in host
memory at a time.
"""
from __future__ import annotations

import json
import math
import pathlib
import struct
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype names <-> numpy dtypes (ml_dtypes for the ones numpy lacks)
DTYPES: dict[str, Any] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as safetensors, or whose tensors do not fit the model."""


class SafetensorsFile:
    """One .safetensors file: its header, and each tensor as a read-only memory map of its bytes."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        try:
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {e}") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict[str, Any]] = header
        self.data_start = 8 + length
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {info.get('dtype')!r}, which moejax "
                                      f"cannot read (known: {', '.join(DTYPES)})")
            begin, end = info["data_offsets"]
            if end - begin != math.prod(info["shape"]) * DTYPES[info["dtype"]].itemsize:
                raise CheckpointError(f"{self.path}: tensor {name} holds {end - begin} bytes, not the "
                                      f"{math.prod(info['shape'])} x {info['dtype']} its header announces")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.header[name]["dtype"]]

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map of its own bytes (read from disk only where used; unmapped, its
        pages leaving this process's RSS, when the last view of it goes)."""
        begin, end = self.header[name]["data_offsets"]
        shape, dtype = self.shape(name), self.dtype(name)
        if end == begin:  # mmap cannot map 0 bytes
            return np.empty(shape, dtype)
        try:
            return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot map tensor {name} (bytes {self.data_start + begin} to "
                                  f"{self.data_start + end} of the file): {e}") from e


class Checkpoint:
    """The safetensors tensors of a directory: shards listed by model.safetensors.index.json, else one
    model.safetensors, else every *.safetensors file in it."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"cannot read the weight map of {index}: {e}") from e
            names = sorted(set(weight_map.values()))
        else:  # model.safetensors alone where it exists (other safetensors files beside it are not weights)
            weight_map = None
            names = [SINGLE_FILE] if (self.directory / SINGLE_FILE).is_file() else sorted(
                p.name for p in self.directory.glob("*.safetensors"))
        if not names:
            raise CheckpointError(f"{self.directory} holds no *.safetensors file")
        self.files: dict[str, SafetensorsFile] = {}
        for name in names:
            if not (self.directory / name).is_file():
                raise CheckpointError(f"{index} lists {name}, which is not in {self.directory}")
            self.files[name] = SafetensorsFile(self.directory / name)
        self.where: dict[str, SafetensorsFile] = {}
        for file in self.files.values():
            for key in file.keys():
                if key in self.where:
                    raise CheckpointError(f"tensor {key} is in both {self.where[key].path.name} and {file.path.name}")
                self.where[key] = file
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self.where:
                    raise CheckpointError(f"{index} maps {key} to {name}, which does not hold it")

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.where[key].dtype(key)

    def array(self, key: str) -> np.ndarray:
        return self.where[key].array(key)


# ----------------------------------------------------------------------------------------------- writing

Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]  # name, shape, dtype, produce the data


def _header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype, _ in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def write_file(path: pathlib.Path, entries: list[Entry], metadata: dict[str, str]) -> None:
    """Writes the entries to one safetensors file, producing (and dropping) each tensor in turn."""
    header = _header(entries, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, shape, dtype, produce in entries:
            data = np.ascontiguousarray(produce(), dtype=dtype)
            if data.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {data.shape}, announced {tuple(shape)}")
            f.write(data.tobytes())


def write_checkpoint(directory: pathlib.Path, entries: Iterable[Entry], max_shard_bytes: int,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Writes model.safetensors, or shards model-0000i-of-0000n.safetensors with model.safetensors.index.json when
    the tensors exceed max_shard_bytes (a tensor larger than that gets a shard of its own). Returns the file names."""
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        write_file(directory / SINGLE_FILE, shards[0], metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = 0
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_file(directory / name, shard, metadata)
        for key, shape, dtype, _ in shard:
            weight_map[key] = name
            total += math.prod(shape) * np.dtype(dtype).itemsize
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
    return names
