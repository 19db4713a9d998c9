"""Routing traces: which experts each token of a corpus was routed to, at every MoE layer of a trained model.

A trace holds, for L MoE layers and N tokens in corpus order, the selected experts ``[L, N, k]`` (an id outside
``[0, E)`` marks a null slot: the routers' null id is ``>= E``), their gate weights ``[L, N, k]``, optionally the
router scores ``[L, N, E]``, the token ids ``[N]``, the model's layer index of each MoE layer ``[L]`` and the
positions where documents start. ``Trace`` is the in-memory form; ``TraceWriter`` streams a trace to disk chunk by
chunk (a corpus too large for memory) and ``read_trace`` opens it memory-mapped.

On disk a trace is a directory::

    manifest.json    {"format": "moejax.routing_trace", "version": 1, "layers": [...], "num_experts": E,
                      "top_k": k, "with_scores": bool, "num_tokens": N, "num_documents": D, "metadata": {...}}
    experts.npy      [L, N, k] int32
    weights.npy      [L, N, k] float32
    scores.npy       [L, N, E] float32 (only when with_scores)
    token_ids.npy    [N] int32
    doc_starts.npy   [D] int64

The manifest is written last: a directory without one is a trace whose writer did not close. While writing, each
chunk is appended to one raw file per (array, layer) under ``.chunks/``; ``close`` copies those into the layer-major
``.npy`` files (one sequential pass, memory bounded by one layer's block) and removes them.

    with TraceWriter("traces/run1", layers=[1, 3, 5], num_experts=64, top_k=6, with_scores=True) as writer:
        for batch in batches:
            writer.append(experts, weights, token_ids, scores=scores, doc_starts=[0])
    trace = read_trace("traces/run1")
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PathLike = str | os.PathLike
FORMAT = "moejax.routing_trace"
VERSION = 1
MANIFEST = "manifest.json"
CHUNKS = ".chunks"
# The files a trace directory may hold; TraceWriter(overwrite=True) removes these and nothing else.
_ARRAYS = ("experts", "weights", "scores", "token_ids", "doc_starts")
_DTYPES = {"experts": np.int32, "weights": np.float32, "scores": np.float32, "token_ids": np.int32}
_COPY_ROWS = 1 << 20  # tokens copied per block when a writer assembles its files


@dataclasses.dataclass(kw_only=True, eq=False)
class Trace:
    """A routing trace of L MoE layers over N tokens (E experts, k slots per token).

    experts:     [L, N, k] integer; ids outside [0, E) are null slots (ignored by every analysis).
    weights:     [L, N, k] float; the gate weight of each slot.
    scores:      [L, N, E] float or None; the router's non-negative scores (probabilities) of every expert.
    token_ids:   [N] integer; the input token at each position, in corpus order.
    layers:      [L] integer; the model's layer index of each MoE layer (``trace.layers[l]`` is the layer at
                 position ``l``; the analyses index layers by position).
    num_experts: E.
    doc_starts:  [D] integer; the positions where documents start. Normalised on construction: sorted, unique, and
                 starting with 0 when N > 0. None: one document.
    metadata:    free JSON-serialisable information (checkpoint, step, corpus).

    The arrays may be memory-mapped (``read_trace``); nothing here copies them. Traces compare by identity (``==``
    does not compare the arrays)."""

    experts: np.ndarray
    weights: np.ndarray
    scores: np.ndarray | None = None
    token_ids: np.ndarray
    layers: np.ndarray
    num_experts: int
    doc_starts: np.ndarray | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.experts = np.asarray(self.experts)
        self.weights = np.asarray(self.weights)
        self.token_ids = np.asarray(self.token_ids)
        self.layers = np.asarray(self.layers, dtype=np.int64).reshape(-1)
        self.num_experts = int(self.num_experts)
        if self.experts.ndim != 3:
            raise ValueError(f"experts must be [L, N, k], got shape {self.experts.shape}")
        layers, tokens, _ = self.experts.shape
        if self.weights.shape != self.experts.shape:
            raise ValueError(f"weights {self.weights.shape} must have the shape of experts {self.experts.shape}")
        if self.token_ids.shape != (tokens,):
            raise ValueError(f"token_ids must be [N] = [{tokens}], got shape {self.token_ids.shape}")
        if self.layers.shape != (layers,):
            raise ValueError(f"layers must be [L] = [{layers}], got {self.layers.tolist()}")
        if not (np.issubdtype(self.experts.dtype, np.integer) and np.issubdtype(self.token_ids.dtype, np.integer)):
            raise ValueError(f"experts and token_ids must be integer arrays, got {self.experts.dtype} and "
                             f"{self.token_ids.dtype}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.scores is not None:
            self.scores = np.asarray(self.scores)
            if self.scores.shape != (layers, tokens, self.num_experts):
                raise ValueError(f"scores must be [L, N, E] = {[layers, tokens, self.num_experts]}, got shape "
                                 f"{self.scores.shape}")
        starts = np.zeros(0, np.int64) if self.doc_starts is None else np.asarray(self.doc_starts, np.int64).ravel()
        if len(starts) and (starts.min() < 0 or starts.max() >= max(tokens, 1)):
            raise ValueError(f"doc_starts must lie in [0, N) = [0, {tokens}), got min {starts.min()} and max "
                             f"{starts.max()}")
        self.doc_starts = np.unique(np.concatenate([[0], starts]) if tokens else starts)
        self.metadata = dict(self.metadata or {})

    @property
    def num_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def documents(self) -> np.ndarray:
        """[D, 2] int64: the [start, end) positions of each document, in corpus order."""
        ends = np.append(self.doc_starts[1:], self.num_tokens)[:len(self.doc_starts)]
        return np.stack([self.doc_starts, ends], axis=1)


class TraceWriter:
    """Streams a routing trace to the directory ``path``, a chunk of tokens at a time (see the module docstring).

    path:        the trace directory; created. An existing trace there (or the files of a writer that did not close)
                 is refused unless ``overwrite`` (which removes only the trace's own files).
    layers:      [L] the model's layer index of each MoE layer, in the order of the chunks' first axis.
    num_experts: E; top_k: k, the slots per token (layers routing fewer experts pad with null ids >= E).
    with_scores: whether every chunk carries the router scores [L, n, E].
    metadata:    JSON-serialisable information stored in the manifest (``Trace.metadata`` on reading).

    Use as a context manager: leaving the block normally closes the writer (assembles the files, writes the
    manifest); leaving it on an exception leaves the trace unclosed (``read_trace`` refuses it)."""

    def __init__(self, path: PathLike, layers: Sequence[int], num_experts: int, top_k: int,
                 with_scores: bool = False, metadata: Mapping[str, Any] | None = None, overwrite: bool = False):
        self.path = pathlib.Path(path)
        self.layers = [int(layer) for layer in layers]
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.with_scores = bool(with_scores)
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # refuse metadata the manifest cannot hold now, not at close
        if not self.layers or self.num_experts < 1 or self.top_k < 1:
            raise ValueError(f"a trace needs at least one layer, one expert and one slot: layers={self.layers}, "
                             f"num_experts={self.num_experts}, top_k={self.top_k}")
        existing = trace_files(self.path)
        if existing and not overwrite:
            raise FileExistsError(f"{self.path} already holds a routing trace ({', '.join(existing)}); pass "
                                  "overwrite=True to replace it")
        remove_trace_files(self.path)
        (self.path / CHUNKS).mkdir(parents=True)
        self.num_tokens = 0
        self._doc_starts: list[np.ndarray] = [np.zeros(1, np.int64)]
        self.closed = False

    def _chunk_file(self, name: str, layer: int | None = None) -> pathlib.Path:
        return self.path / CHUNKS / (f"{name}.bin" if layer is None else f"{name}.{layer}.bin")

    def append(self, experts: np.ndarray, weights: np.ndarray, token_ids: np.ndarray,
               scores: np.ndarray | None = None, doc_starts: Sequence[int] = ()) -> None:
        """Appends n tokens. experts: [L, n, k] integer (null slots: ids >= E); weights: [L, n, k]; token_ids: [n];
        scores: [L, n, E] (given exactly when the writer is ``with_scores``); doc_starts: positions within this
        chunk (0 <= i < n) where a document starts (a chunk boundary is not a document boundary by itself)."""
        if self.closed:
            raise ValueError(f"the trace writer of {self.path} is closed")
        experts, weights, token_ids = np.asarray(experts), np.asarray(weights), np.asarray(token_ids)
        layers, k = len(self.layers), self.top_k
        if experts.ndim != 3 or experts.shape[0] != layers or experts.shape[2] != k:
            raise ValueError(f"experts must be [L, n, k] = [{layers}, n, {k}], got shape {experts.shape}")
        n = experts.shape[1]
        if weights.shape != experts.shape or token_ids.shape != (n,):
            raise ValueError(f"weights must be {experts.shape} and token_ids ({n},), got {weights.shape} and "
                             f"{token_ids.shape}")
        if (scores is not None) != self.with_scores:
            raise ValueError(f"the writer was opened with with_scores={self.with_scores} but scores were "
                             f"{'given' if scores is not None else 'not given'}")
        if scores is not None:
            scores = np.asarray(scores)
            if scores.shape != (layers, n, self.num_experts):
                raise ValueError(f"scores must be [L, n, E] = {[layers, n, self.num_experts]}, got {scores.shape}")
        starts = np.asarray(doc_starts, np.int64).ravel()
        if len(starts) and (starts.min() < 0 or starts.max() >= n):
            raise ValueError(f"doc_starts are positions within the chunk, in [0, {n}); got {starts.tolist()}")
        for layer in range(layers):
            _append_raw(self._chunk_file("experts", layer), experts[layer], np.int32)
            _append_raw(self._chunk_file("weights", layer), weights[layer], np.float32)
            if scores is not None:
                _append_raw(self._chunk_file("scores", layer), scores[layer], np.float32)
        _append_raw(self._chunk_file("token_ids"), token_ids, np.int32)
        self._doc_starts.append(starts + self.num_tokens)
        self.num_tokens += n

    def close(self) -> pathlib.Path:
        """Assembles the layer-major .npy files, writes the manifest and removes the chunk files; returns the trace
        directory. Closing twice is a no-op."""
        if self.closed:
            return self.path
        layers, n = len(self.layers), self.num_tokens
        shapes = {"experts": (self.top_k,), "weights": (self.top_k,)}
        if self.with_scores:
            shapes["scores"] = (self.num_experts,)
        for name, trailing in shapes.items():
            out = _open_npy(self.path / f"{name}.npy", (layers, n, *trailing), _DTYPES[name])
            for layer in range(layers):
                _copy_raw(self._chunk_file(name, layer), out, layer, trailing, _DTYPES[name])
            _flush(out)
        out = _open_npy(self.path / "token_ids.npy", (n,), np.int32)
        _copy_raw(self._chunk_file("token_ids"), out, None, (), np.int32)
        _flush(out)
        starts = np.unique(np.concatenate(self._doc_starts)) if n else np.zeros(0, np.int64)
        np.save(self.path / "doc_starts.npy", starts)
        manifest = {"format": FORMAT, "version": VERSION, "layers": self.layers, "num_experts": self.num_experts,
                    "top_k": self.top_k, "with_scores": self.with_scores, "num_tokens": n,
                    "num_documents": len(starts), "metadata": self.metadata}
        temporary = self.path / f"{MANIFEST}.tmp"
        temporary.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(temporary, self.path / MANIFEST)
        _remove(self.path / CHUNKS)
        self.closed = True
        return self.path

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()


def read_trace(path: PathLike, mmap: bool = True) -> Trace:
    """The trace in directory ``path`` (written by ``TraceWriter`` or ``write_trace``). Its arrays are memory-mapped
    read-only (``mmap=False``: loaded into memory). Raises FileNotFoundError for a directory without a manifest
    (saying so when a writer left it unclosed) and ValueError for another format or version."""
    path = pathlib.Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        if (path / CHUNKS).exists():
            raise FileNotFoundError(f"{path} holds an unclosed routing trace: its TraceWriter was never closed "
                                    "(the program stopped while writing)")
        raise FileNotFoundError(f"{manifest_path} does not exist: is {path} a routing trace directory?")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{manifest_path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                         f"this moejax reads {FORMAT!r} version {VERSION}")
    mode = "r" if mmap else None

    def load(name: str) -> np.ndarray:
        array = np.load(path / f"{name}.npy", mmap_mode=mode)
        return np.load(path / f"{name}.npy") if array.size == 0 else array  # an empty file cannot be mapped

    return Trace(experts=load("experts"), weights=load("weights"),
                 scores=load("scores") if manifest["with_scores"] else None, token_ids=load("token_ids"),
                 layers=np.asarray(manifest["layers"], np.int64), num_experts=manifest["num_experts"],
                 doc_starts=np.load(path / "doc_starts.npy"), metadata=manifest.get("metadata", {}))


def write_trace(trace: Trace, path: PathLike, chunk_tokens: int = 1 << 16, overwrite: bool = False) -> pathlib.Path:
    """Writes an in-memory (or memory-mapped) trace to the directory ``path`` through ``TraceWriter``, in chunks of
    ``chunk_tokens`` tokens; returns the directory."""
    writer = TraceWriter(path, trace.layers.tolist(), trace.num_experts, trace.top_k,
                         with_scores=trace.scores is not None, metadata=trace.metadata, overwrite=overwrite)
    for start in range(0, trace.num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, trace.num_tokens)
        starts = trace.doc_starts[(trace.doc_starts >= start) & (trace.doc_starts < end)] - start
        writer.append(trace.experts[:, start:end], trace.weights[:, start:end], trace.token_ids[start:end],
                      scores=None if trace.scores is None else trace.scores[:, start:end], doc_starts=starts)
    return writer.close()


def trace_files(path: PathLike) -> list[str]:
    """The names of the trace files (a closed trace's, or the chunks of a writer that did not close) in the directory
    path."""
    return [name for name in (MANIFEST, CHUNKS, f"{MANIFEST}.tmp", *(f"{a}.npy" for a in _ARRAYS))
            if (pathlib.Path(path) / name).exists()]


def remove_trace_files(path: PathLike) -> None:
    """Removes the trace files (``trace_files``) of the directory path, and nothing else."""
    for name in trace_files(path):
        _remove(pathlib.Path(path) / name)


def _append_raw(path: pathlib.Path, array: np.ndarray, dtype: type) -> None:
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())


def _open_npy(path: pathlib.Path, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A writable .npy of ``shape``: memory-mapped, or an in-memory zero array when empty (saved by _flush)."""
    if int(np.prod(shape)) == 0:
        array = np.zeros(shape, dtype)
        np.save(path, array)
        return array
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _copy_raw(source: pathlib.Path, out: np.ndarray, layer: int | None, trailing: tuple[int, ...],
              dtype: type) -> None:
    """Copies the raw rows of ``source`` (each of shape ``trailing``) into ``out[layer]`` (or ``out``), a block of
    rows at a time."""
    target = out if layer is None else out[layer]
    rows = target.shape[0]
    if rows == 0:
        return
    raw = np.memmap(source, dtype=dtype, mode="r", shape=(rows, *trailing))
    for start in range(0, rows, _COPY_ROWS):
        target[start:start + _COPY_ROWS] = raw[start:start + _COPY_ROWS]
    del raw


def _flush(array: np.ndarray) -> None:
    if isinstance(array, np.memmap):
        array.flush()


def _remove(path: pathlib.Path) -> None:
    """Removes one trace file, or the chunk directory and the raw files in it."""
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()
