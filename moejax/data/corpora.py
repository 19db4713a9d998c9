"""Corpora: the embedded stdlib corpus (built once into TFDS array_record), prepared TFDS datasets and local
text files, as documents (see moejax/data/__init__.py); ``streams.py`` tokenizes them."""
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
from collections.abc import Iterator, Sequence
from typing import Any

VOCAB_SIZE = 256  # byte-level: token = byte value
SEPARATOR = 0  # token appended to every document (byte-level; other tokenizers append their eos_id)

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


def data_dir(config) -> pathlib.Path:
    """Cache of built corpora: config.data.dir, else $MOEJAX_DATA_DIR, else ~/.cache/moejax."""
    path = config.data.dir or os.environ.get("MOEJAX_DATA_DIR") or "~/.cache/moejax"
    return pathlib.Path(path).expanduser()


def check_config(config, process_index: int, process_count: int) -> tuple[int, int]:
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


def grain_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e; hashing keeps seeds s and s + 1 from sharing epochs.
    return int.from_bytes(hashlib.sha256(f"moejax.data:{seed}".encode()).digest()[:4], "little")


# ----------------------------------------------------------------------------------------------- corpora


Piece = tuple[bytes, bool]  # (UTF-8 text, followed by the separator): a document, or its part at a byte split


@dataclasses.dataclass(frozen=True)
class MemoryCorpus:
    fingerprint: dict  # of the text; corpus_fingerprint adds the tokenizer's
    train: tuple[Piece, ...]
    val: tuple[Piece, ...]
    train_paths: tuple[str, ...]
    val_paths: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TfdsCorpus:
    fingerprint: dict
    train: Any  # random-access data sources of records
    val: Any
    text_key: str


def _is_val(relpath: str, val_fraction: float) -> bool:
    """The split rule: sha256 of the posix relative path, first 8 bytes as a fraction of 2**64."""
    score = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2**64
    return score < val_fraction


def _split_bytes(docs: Sequence[bytes], val_fraction: float) -> tuple[list[Piece], list[Piece]]:
    """The documents (each followed by the separator) cut where the last val_fraction of their bytes starts; the
    document the cut falls in is split in two pieces."""
    whole = sum(len(d) + 1 for d in docs)
    cut = whole - max(1, round(whole * val_fraction))
    train, val, pos = [], [], 0
    for d in docs:
        end = pos + len(d) + 1
        if end <= cut:
            train.append((d, True))
        elif pos >= cut:
            val.append((d, True))
        else:  # pos < cut < end: cut - pos in [1, len(d)]
            train.append((d[:cut - pos], False))
            val.append((d[cut - pos:], True))
        pos = end
    return train, val


def _size(pieces: Sequence[Piece]) -> int:
    """Bytes of the byte-level stream of pieces (separators included)."""
    return sum(len(t) + ends for t, ends in pieces)


def _content_hash(docs: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for rel, text in sorted(docs):
        h.update(rel.encode() + b"\0" + text + b"\0")
    return h.hexdigest()


def _memory_corpus(name: str, docs: Sequence[tuple[str, bytes]], val: Sequence[tuple[str, bytes]] | None,
                   val_fraction: float, **extra: Any) -> MemoryCorpus:
    """docs: all (relpath, bytes); val: the validation docs if already split, else split here by file."""
    docs = sorted(docs)
    val_paths = {r for r, _ in val} if val is not None else {r for r, _ in docs if _is_val(r, val_fraction)}
    train_docs = [d for d in docs if d[0] not in val_paths]
    val_docs = [d for d in docs if d[0] in val_paths]
    split = "file"
    if train_docs and val_docs:
        train, valid = [(t, True) for _, t in train_docs], [(t, True) for _, t in val_docs]
    else:  # too few files to split by file: the last val_fraction of the bytes is validation
        split = "bytes"
        train, valid = _split_bytes([t for _, t in docs], val_fraction)
    fingerprint = {"name": name, **extra, "files": len(docs), "sha256": _content_hash(docs),
                   "val_fraction": val_fraction, "split": split,
                   "train_files": len(train_docs), "val_files": len(val_docs),
                   "train_bytes": _size(train), "val_bytes": _size(valid)}
    return MemoryCorpus(fingerprint, tuple(train), tuple(valid), tuple(r for r, _ in train_docs),
                         tuple(r for r, _ in val_docs))


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


def _load_stdlib(data_dir: pathlib.Path, val_fraction: float) -> MemoryCorpus:
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


def _load_text(name: str, val_fraction: float) -> MemoryCorpus:
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


def _load_tfds(source: _Source, tfds_dir: str, text_key: str) -> TfdsCorpus:
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
    return TfdsCorpus(fingerprint, train, val, text_key)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: pathlib.Path, val_fraction: float, tfds_dir: str,
                 text_key: str) -> MemoryCorpus | TfdsCorpus:
    source = parse_name(name)
    if source.kind == "stdlib":
        return _load_stdlib(data_dir, val_fraction)
    if source.kind == "text":
        return _load_text(name, val_fraction)
    return _load_tfds(source, tfds_dir, text_key)


def load(config) -> MemoryCorpus | TfdsCorpus:
    """The corpus of config.data, built on first use and cached in this process."""
    d = config.data
    parse_name(d.name)  # validate before anything touches the disk
    if not 0 < d.val_fraction < 1:
        raise ValueError(f"config.data.val_fraction={d.val_fraction!r} must be in (0, 1)")
    return _load_cached(d.name, data_dir(config), float(d.val_fraction), d.tfds_dir, d.text_key)


def fingerprint_id(fingerprint: dict) -> str:
    """A short hash of a fingerprint: names what is cached for a corpus, and what iterator states are valid for."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def train_texts(corpus: MemoryCorpus | TfdsCorpus) -> tuple[int, Iterator[str]]:
    """(count, the texts) of the corpus's training split, as a tokenizer trains on them."""
    if isinstance(corpus, MemoryCorpus):
        return len(corpus.train), (t.decode(errors="replace") for t, _ in corpus.train)
    source, key, block = corpus.train, corpus.text_key, 1024

    def texts() -> Iterator[str]:
        for start in range(0, len(source), block):
            for record in source.__getitems__(range(start, min(start + block, len(source)))):
                text = record[key]
                yield text if isinstance(text, str) else bytes(text).decode(errors="replace")

    return len(source), texts()
