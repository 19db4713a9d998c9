"""Input pipelines: the embedded stdlib corpus, prepared TFDS datasets and local text files, byte-level tokens.

``config.data.name`` picks the corpus:

- ``'stdlib'`` (default): the ``.py`` files of this Python's standard library, without its test folders
  (``test``, ``tests``, ``idle_test``), ``site-packages`` and the machine-specific ``_sysconfigdata*``. The first
  call builds it into a TFDS dataset (array_record, no TensorFlow) under ``<data dir>/stdlib-py<ver>-<hash>-val<f>``;
  later calls reuse it. A file is in the validation split iff ``sha256(relative path)`` read as a fraction in
  [0, 1) is below ``config.data.val_fraction``, so the split never changes between machines with the same files.
- ``'tfds:<name>[:<version>][:<train_split>[:<eval_split>]]'``: a TFDS text dataset already prepared in
  array_record format (``tfds build lm1b --file_format=array_record``), read with ``tfds`` data sources, e.g.
  ``tfds:lm1b``, ``tfds:c4/en:3.1.0:train:validation``, ``tfds:lm1b:train[:90%]:train[90%:]``. The eval split
  defaults to ``validation``, else ``test``. Documents are ``record[config.data.text_key]``. Nothing is downloaded.
- ``'text:<glob>'``: local files (``**`` allowed), split by file like the stdlib; when that leaves a split
  empty (few files) the last ``val_fraction`` of the concatenated bytes is the validation split instead. Files that
  are not valid UTF-8 (binary files the glob caught) are skipped with a warning naming them.

Tokens are bytes (``VOCAB_SIZE = 256``); each document is followed by ``SEPARATOR`` (0, absent from the stdlib's
source files). A batch is ``int32 [config.train.batch_size // process_count, config.train.seq_len + 1]``;
inputs are ``[:, :-1]`` and targets ``[:, 1:]``.

In-memory corpora (stdlib, text) are one token stream per split, cut into windows ``stream[i*L : i*L + L + 1]``
(``L = seq_len``). Training shuffles the window order with grain (a new order each epoch, derived from
``config.seed``); process ``p`` of ``P`` takes global positions ``p, p + P, ...``, so the ``P`` processes'
batch ``i`` together hold exactly the single-process global batch ``i``. The iterator state is the step.
TFDS datasets are streamed: documents are shuffled by grain and packed into ``batch // P`` independent lanes
per process (row ``r`` continues lane ``r``'s stream); the state is each lane's (document, offset).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import io
import json
import os
import pathlib
import platform
import re
import shutil
import sysconfig
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

VOCAB_SIZE = 256  # byte-level: token = byte value
SEPARATOR = 0  # token appended to every document

NAMES_ALLOWED = "'stdlib', 'tfds:<name>[:<version>][:<train_split>[:<eval_split>]]' or 'text:<glob>'"
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_STDLIB_BUILDER = "moejax_stdlib"
_STDLIB_VERSION = "1.0.0"  # bump when the corpus recipe changes
_SKIPPED_SHOWN = 5  # 'text:' files that are not UTF-8 named one per warning line; the rest are counted


# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _Source:
    kind: str  # 'stdlib' | 'tfds' | 'text'
    arg: str = ""  # TFDS dataset name or glob
    train_split: str = "train"
    eval_split: str | None = None  # None: 'validation', else 'test'


def parse_name(name: Any) -> _Source:
    """Parses ``config.data.name``; raises ValueError naming the field, the value and what is allowed."""
    def bad(why: str = "") -> ValueError:
        return ValueError(f"config.data.name={name!r} is not supported{why}; allowed: {NAMES_ALLOWED}")

    if not isinstance(name, str):
        raise bad()
    if name == "stdlib":
        return _Source("stdlib")
    if name.startswith("text:"):
        if not name[5:]:
            raise bad(" (empty glob)")
        return _Source("text", name[5:])
    if name.startswith("tfds:"):
        parts = re.split(r":(?![^\[]*\])", name[5:])  # ':' inside a split slice '[..:..]' does not split
        if len(parts) > 1 and re.fullmatch(r"\d+\.\d+\.\d+", parts[1]):
            parts[0:2] = [f"{parts[0]}:{parts[1]}"]
        if len(parts) > 3 or not all(parts):
            raise bad()
        return _Source("tfds", parts[0], *parts[1:])
    raise bad()


def _data_dir(config) -> pathlib.Path:
    """Cache of built corpora: config.data.dir, else $MOEJAX_DATA_DIR, else ~/.cache/moejax."""
    path = config.data.dir or os.environ.get("MOEJAX_DATA_DIR") or "~/.cache/moejax"
    return pathlib.Path(path).expanduser()


def _check_config(config, process_index: int, process_count: int) -> tuple[int, int]:
    """Validates the fields this module reads; returns (rows per process, seq_len)."""
    batch, seq_len = config.train.batch_size, config.train.seq_len
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise ValueError(f"config.train.seq_len={seq_len!r} must be an int >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if not (isinstance(batch, int) and batch >= process_count and batch % process_count == 0):
        raise ValueError(f"config.train.batch_size={batch!r} must be a positive multiple of "
                         f"process_count={process_count}")
    if config.data.eval_batches < 0:
        raise ValueError(f"config.data.eval_batches={config.data.eval_batches!r} must be >= 0")
    return batch // process_count, seq_len


def _grain_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e; hashing keeps seeds s and s + 1 from sharing epochs.
    return int.from_bytes(hashlib.sha256(f"moejax.data:{seed}".encode()).digest()[:4], "little")


# ----------------------------------------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True)
class _MemoryCorpus:
    fingerprint: dict
    train: np.ndarray  # [n_train] uint8 token stream
    val: np.ndarray  # [n_val] uint8
    train_paths: tuple[str, ...]
    val_paths: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _TfdsCorpus:
    fingerprint: dict
    train: Any  # random-access data sources of records
    val: Any
    text_key: str


def _is_val(relpath: str, val_fraction: float) -> bool:
    """The split rule: sha256 of the posix relative path, first 8 bytes as a fraction of 2**64."""
    score = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2**64
    return score < val_fraction


def _stream(docs: Sequence[bytes]) -> np.ndarray:
    """[sum(len(d) + 1)] uint8: the documents, each followed by SEPARATOR."""
    sep = bytes([SEPARATOR])
    return np.frombuffer(b"".join(d + sep for d in docs), np.uint8)


def _content_hash(docs: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for rel, text in sorted(docs):
        h.update(rel.encode() + b"\0" + text + b"\0")
    return h.hexdigest()


def _memory_corpus(name: str, docs: Sequence[tuple[str, bytes]], val: Sequence[tuple[str, bytes]] | None,
                   val_fraction: float, **extra: Any) -> _MemoryCorpus:
    """docs: all (relpath, bytes); val: the validation docs if already split, else split here by file."""
    docs = sorted(docs)
    val_paths = {r for r, _ in val} if val is not None else {r for r, _ in docs if _is_val(r, val_fraction)}
    train_docs = [d for d in docs if d[0] not in val_paths]
    val_docs = [d for d in docs if d[0] in val_paths]
    split = "file"
    if train_docs and val_docs:
        train, valid = _stream([t for _, t in train_docs]), _stream([t for _, t in val_docs])
    else:  # too few files to split by file: the last val_fraction of the bytes is validation
        split, whole = "bytes", _stream([t for _, t in docs])
        cut = len(whole) - max(1, round(len(whole) * val_fraction))
        train, valid = whole[:cut], whole[cut:]
    fingerprint = {"name": name, **extra, "files": len(docs), "sha256": _content_hash(docs),
                   "val_fraction": val_fraction, "split": split,
                   "train_files": len(train_docs), "val_files": len(val_docs),
                   "train_bytes": int(train.size), "val_bytes": int(valid.size)}
    return _MemoryCorpus(fingerprint, train, valid, tuple(r for r, _ in train_docs), tuple(r for r, _ in val_docs))


def _stdlib_files() -> list[tuple[str, pathlib.Path]]:
    """Sorted (posix relative path, absolute path) of the stdlib's .py files, test folders excluded."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                path = pathlib.Path(dirpath, f)
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def _tfds():
    """tensorflow_datasets, imported on first use (it does not import TensorFlow for array_record data)."""
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise ImportError("moejax.data needs tensorflow-datasets for the stdlib corpus and tfds: datasets: "
                          "pip install tensorflow-datasets (TensorFlow itself is not needed)") from e
    return tensorflow_datasets


@functools.cache
def _stdlib_builder_class() -> type:
    tfds = _tfds()

    class MoejaxStdlib(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """The Python standard library's own source files; features path and text (bytes)."""

        VERSION = tfds.core.Version(_STDLIB_VERSION)
        code_path = None  # no checksums/metadata files to look up (and no importlib_resources needed)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=self.__doc__,
                features=tfds.features.FeaturesDict({"path": tfds.features.Text(), "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(docs) for split, docs in self.splits.items()}

        def _generate_examples(self, docs):
            for rel, text in docs:
                yield rel, {"path": rel, "text": text}

    return MoejaxStdlib


def _build_stdlib(target: pathlib.Path, docs: Sequence[tuple[str, bytes]], val_fraction: float) -> None:
    """Writes the TFDS dataset into a temp dir beside target, then renames it; a lost race keeps the winner."""
    tfds = _tfds()
    from tensorflow_datasets.core.utils import tqdm_utils

    start, size = time.time(), sum(len(t) for _, t in docs)
    print(f"building stdlib corpus: {len(docs)} files, {size / 1e6:.1f} MB -> {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    progress = getattr(tqdm_utils, "_active", True)
    try:
        tfds.display_progress_bar(False)
        builder = _stdlib_builder_class()(data_dir=tmp, file_format="array_record")
        builder.splits = {"train": [d for d in docs if not _is_val(d[0], val_fraction)],
                          "validation": [d for d in docs if _is_val(d[0], val_fraction)]}
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_dir=tmp / "downloads")
        shutil.rmtree(tmp / "downloads", ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _STDLIB_BUILDER).is_dir():
                raise
    finally:
        tfds.display_progress_bar(progress)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built stdlib corpus in {time.time() - start:.1f}s", flush=True)


def _load_stdlib(data_dir: pathlib.Path, val_fraction: float) -> _MemoryCorpus:
    tfds = _tfds()

    docs = [(rel, path.read_bytes()) for rel, path in _stdlib_files()]
    expected = _memory_corpus("stdlib", docs, None, val_fraction, python=platform.python_version())
    fp = expected.fingerprint
    target = data_dir / f"stdlib-py{fp['python']}-{fp['sha256'][:16]}-val{val_fraction:g}"
    if not (target / _STDLIB_BUILDER).is_dir():
        _build_stdlib(target, docs, val_fraction)
    builder = tfds.builder_from_directory(target / _STDLIB_BUILDER / _STDLIB_VERSION)
    read = {}
    for split, source in builder.as_data_source().items():
        records = source.__getitems__(range(len(source)))
        read[split] = [(r["path"].decode(), r["text"]) for r in records]
    corpus = _memory_corpus("stdlib", read["train"] + read["validation"], read["validation"], val_fraction,
                            python=platform.python_version())
    if corpus.fingerprint != fp:
        raise RuntimeError(f"the cached stdlib corpus in {target} does not match the files it was built from; "
                           f"delete that folder to rebuild it")
    return corpus


def _glob_root(pattern: str) -> pathlib.Path:
    parts = pathlib.Path(pattern).parts
    fixed = parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]
    root = pathlib.Path(*fixed) if fixed else pathlib.Path(".")
    return root if root.is_dir() else root.parent


def _load_text(name: str, val_fraction: float) -> _MemoryCorpus:
    """The files of a 'text:<glob>' name; files that are not valid UTF-8 are skipped with a warning naming them."""
    pattern = os.path.expanduser(name[len("text:"):])
    if os.path.isdir(pattern):
        raise ValueError(f"config.data.name={name!r} names a directory, not files; give a glob of its files, e.g. "
                         f"'text:{os.path.join(pattern, '**', '*.txt')}' (** matches any depth)")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"config.data.name={name!r} matches no files; allowed: {NAMES_ALLOWED} "
                         f"with a glob that matches files")
    root = _glob_root(pattern)
    docs, skipped = [], []
    for p in paths:
        text = pathlib.Path(p).read_bytes()
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.append(f"{p} (byte {text[e.start]:#04x} at offset {e.start})")
            continue
        docs.append((pathlib.Path(p).relative_to(root).as_posix(), text))
    for line in skipped[:_SKIPPED_SHOWN]:
        print(f"warning: skipped {line}: not valid UTF-8 text", flush=True)
    if len(skipped) > _SKIPPED_SHOWN:
        print(f"warning: skipped {len(skipped) - _SKIPPED_SHOWN} more files of config.data.name={name!r} that are "
              f"not valid UTF-8 text", flush=True)
    if not docs:
        raise ValueError(f"config.data.name={name!r}: none of the {len(paths)} files it matches is valid UTF-8 "
                         f"text; give a glob of text files")
    return _memory_corpus(name, docs, None, val_fraction)


def _load_tfds(source: _Source, tfds_dir: str, text_key: str) -> _TfdsCorpus:
    tfds = _tfds()
    from tensorflow_datasets.core import read_only_builder

    field = f"config.data.name='tfds:{source.arg}'"
    try:
        builder = read_only_builder.builder_from_files(source.arg, data_dir=tfds_dir or None)
    except Exception as e:  # DatasetNotFoundError and friends
        raise ValueError(f"{field}: no prepared TFDS dataset found (config.data.tfds_dir={tfds_dir!r}); prepare it "
                         f"with `tfds build {source.arg.split(':')[0]} --file_format=array_record` ({e})") from e
    info = builder.info
    if info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"{field}: {info.full_name} is stored as {info.file_format.value}; allowed: array_record "
                         f"(rebuild with --file_format=array_record; reading other formats needs TensorFlow)")
    eval_split = source.eval_split or next((s for s in ("validation", "test") if s in info.splits), None)
    if eval_split is None:
        raise ValueError(f"{field}: no 'validation' or 'test' split in {list(info.splits)}; name the eval split "
                         f"as tfds:<name>:<train_split>:<eval_split>")
    try:
        train, val = builder.as_data_source(split=[source.train_split, eval_split])
    except Exception as e:  # unknown split names, bad slices
        raise ValueError(f"{field}: cannot read splits {source.train_split!r} and {eval_split!r}; allowed: "
                         f"{list(info.splits)} with optional slices like train[:90%] ({e})") from e
    if text_key not in info.features:
        raise ValueError(f"config.data.text_key={text_key!r} is not a feature of {info.full_name}; "
                         f"allowed: {list(info.features)}")
    if not len(train) or not len(val):
        raise ValueError(f"{field}: split {source.train_split!r} or {eval_split!r} is empty")
    splits = {s: (info.splits[s].shard_lengths, info.splits[s].num_bytes) for s in sorted(info.splits)}
    fingerprint = {"name": f"tfds:{source.arg}", "dataset": info.full_name, "train_split": source.train_split,
                   "eval_split": eval_split, "train_examples": len(train), "val_examples": len(val),
                   "text_key": text_key,
                   "sha256": hashlib.sha256(json.dumps([info.full_name, splits]).encode()).hexdigest()}
    return _TfdsCorpus(fingerprint, train, val, text_key)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: pathlib.Path, val_fraction: float, tfds_dir: str,
                 text_key: str) -> _MemoryCorpus | _TfdsCorpus:
    source = parse_name(name)
    if source.kind == "stdlib":
        return _load_stdlib(data_dir, val_fraction)
    if source.kind == "text":
        return _load_text(name, val_fraction)
    return _load_tfds(source, tfds_dir, text_key)


def _load(config) -> _MemoryCorpus | _TfdsCorpus:
    """The corpus of config.data, built on first use and cached in this process."""
    d = config.data
    parse_name(d.name)  # validate before anything touches the disk
    if not 0 < d.val_fraction < 1:
        raise ValueError(f"config.data.val_fraction={d.val_fraction!r} must be in (0, 1)")
    return _load_cached(d.name, _data_dir(config), float(d.val_fraction), d.tfds_dir, d.text_key)


def corpus_fingerprint(config) -> dict:
    """JSON-serialisable identity of the corpus: name, python version (stdlib), file count, sha256, split sizes."""
    return dict(_load(config).fingerprint)


# ----------------------------------------------------------------------------------------------- iterators


class TrainIterator:
    """Endless iterator of int32 batches [batch_size // process_count, seq_len + 1] with checkpointable state.

    ``get_state()`` is a JSON-serialisable dict; after ``set_state(state)`` the following batches are
    bit-identical to those the original iterator produced after the same point.
    """

    def __init__(self, meta: dict):
        self._meta = meta  # what the state is only valid for: corpus, seed, shapes

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> np.ndarray:
        raise NotImplementedError

    def _position(self) -> dict:
        raise NotImplementedError

    def _set_position(self, state: dict) -> None:
        raise NotImplementedError

    def get_state(self) -> dict:
        return {**self._meta, **self._position()}

    def set_state(self, state: dict) -> None:
        for key, value in self._meta.items():
            if state.get(key) != value:
                raise ValueError(f"data iterator state has {key}={state.get(key)!r} but this iterator has "
                                 f"{key}={value!r}; it was saved for a different corpus or config")
        self._set_position(state)


def _windows(stream: np.ndarray, seq_len: int, rows: int, process_index: int, process_count: int,
             seed: int | None, split: str) -> grain.MapDataset:
    """Endless MapDataset of int32 [rows, seq_len + 1] batches of windows stream[i*L : i*L + L + 1]."""
    count = (stream.size - 1) // seq_len
    if count < 1:
        raise ValueError(f"the {split} has {stream.size} tokens, fewer than config.train.seq_len + 1 = "
                         f"{seq_len + 1}; use a larger corpus or a smaller seq_len")
    ds = grain.MapDataset.range(count)
    if seed is not None:
        ds = ds.shuffle(seed=_grain_seed(seed))
    ds = ds.repeat(None)[process_index::process_count].batch(rows, drop_remainder=True)
    offsets = np.arange(seq_len + 1)
    return ds.map(lambda ids: stream[ids[:, None] * seq_len + offsets].astype(np.int32))


class _WindowIterator(TrainIterator):
    """Batch ``step`` of a shuffled window MapDataset; the state is the step (the same in every process)."""

    def __init__(self, batches: grain.MapDataset, meta: dict):
        super().__init__(meta)
        self._batches, self._step = batches, 0

    def __next__(self) -> np.ndarray:
        batch = self._batches[self._step]
        self._step += 1
        return batch

    def _position(self) -> dict:
        return {"step": self._step}

    def _set_position(self, state: dict) -> None:
        self._step = int(state["step"])


class _PackedIterator(TrainIterator):
    """Packs streamed documents into one lane per row; lane g reads documents g, g + stride, g + 2 * stride, ...

    ``order`` maps a document number to a record of ``source``; a lane reads ``_BLOCK`` documents at a time
    (one batched array_record read). The state is each row's [document number k within its lane, offset] of
    its next window's first token.
    """

    _BLOCK = 16

    def __init__(self, source: Any, order: grain.MapDataset, text_key: str, seq_len: int, lanes: Sequence[int],
                 stride: int, meta: dict):
        super().__init__(meta)
        self._source, self._key, self._seq_len = source, text_key, seq_len
        self._blocks = [order[g::stride].batch(self._BLOCK, batch_fn=list) for g in lanes]
        self._pos = [[0, 0] for _ in lanes]
        self._cache: list[tuple[int, list[np.ndarray]]] = [(-1, [])] * len(lanes)

    def _doc(self, row: int, k: int) -> np.ndarray:
        """[len + 1] uint8: document k of the row's lane, then SEPARATOR."""
        block, i = divmod(k, self._BLOCK)
        if self._cache[row][0] != block:
            texts = [r[self._key] for r in self._source.__getitems__(self._blocks[row][block])]
            texts = [t.encode() if isinstance(t, str) else bytes(t) for t in texts]
            sep = bytes([SEPARATOR])
            self._cache[row] = (block, [np.frombuffer(t + sep, np.uint8) for t in texts])
        return self._cache[row][1][i]

    def _window(self, row: int) -> np.ndarray:
        (k, o), need, pieces = self._pos[row], self._seq_len + 1, []
        while True:
            piece = self._doc(row, k)[o:o + need]
            pieces.append(piece)
            need, o = need - piece.size, o + piece.size
            if not need:
                break
            k, o = k + 1, 0
        self._pos[row] = [k, o - 1]  # the next window starts on this window's last token
        return np.concatenate(pieces)

    def __next__(self) -> np.ndarray:
        return np.stack([self._window(r) for r in range(len(self._pos))]).astype(np.int32)

    def _position(self) -> dict:
        return {"lanes": [list(p) for p in self._pos]}

    def _set_position(self, state: dict) -> None:
        lanes = state["lanes"]
        if len(lanes) != len(self._pos):
            raise ValueError(f"data iterator state has {len(lanes)} lanes but this iterator has {len(self._pos)}")
        self._pos = [[int(k), int(o)] for k, o in lanes]


def _corpus_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _iterator(config, process_index: int, process_count: int, train: bool) -> TrainIterator:
    rows, seq_len = _check_config(config, process_index, process_count)
    corpus = _load(config)
    seed = int(config.seed) if train else None
    meta = {"corpus": _corpus_id(corpus.fingerprint), "seed": seed, "batch_size": config.train.batch_size,
            "seq_len": seq_len}
    if isinstance(corpus, _MemoryCorpus):
        stream = corpus.train if train else corpus.val
        split = f"{'train' if train else 'validation'} split of config.data.name={config.data.name!r}"
        return _WindowIterator(_windows(stream, seq_len, rows, process_index, process_count, seed, split), meta)
    source = corpus.train if train else corpus.val
    order = grain.MapDataset.range(len(source))
    if train:
        order = order.shuffle(seed=_grain_seed(seed))
    lanes = range(process_index * rows, (process_index + 1) * rows)
    meta.update(process_index=process_index, process_count=process_count)
    return _PackedIterator(source, order.repeat(None), corpus.text_key, seq_len, lanes, rows * process_count, meta)


def train_iterator(config, *, process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """Endless training batches, int32 [config.train.batch_size // process_count, config.train.seq_len + 1].

    Epochs repeat, each shuffled differently by ``config.seed``; processes see disjoint data.
    """
    return _iterator(config, process_index, process_count, train=True)


def eval_batches(config, *, process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """The first ``config.data.eval_batches`` validation batches, int32 [batch // process_count, seq_len + 1].

    Deterministic and independent of ``config.seed``; a validation split smaller than that repeats.
    """
    it = _iterator(config, process_index, process_count, train=False)
    return [next(it) for _ in range(config.data.eval_batches)]


__all__ = ["SEPARATOR", "VOCAB_SIZE", "TrainIterator", "corpus_fingerprint", "eval_batches", "train_iterator"]
