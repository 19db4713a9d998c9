"""Tokenizers: how ``config.data.tokenizer`` turns text into token ids (see moejax/data/__init__.py).

- ``'bytes'`` (default): token = byte value, ``vocab_size`` 256, ``eos_id`` 0 (``corpora.SEPARATOR``).
- ``'hf:<dir or path of tokenizer.json>'``: a released model's own tokenizer.json, read with the ``tokenizers``
  package. Its ``eos_id`` (the end-of-document separator) is the first found of
  ``tokenizer_config.json``'s ``eos_token_id`` or ``eos_token``, then ``generation_config.json``'s and
  ``config.json``'s ``eos_token_id`` (the first of a list), in the tokenizer's directory.
- ``'bpe:<vocab_size>'``: a byte-level BPE (``tokenizers`` BpeTrainer, ByteLevel pre-tokenizer and decoder, special
  token ``<|endoftext|>`` as ``eos_id``) trained once on the corpus's training split and cached in the data dir as
  ``bpe<vocab_size>-<corpus id>.json`` (``corpus id``: a hash of the corpus fingerprint, so another corpus, split
  or val_fraction never reuses it). ``for_config(config)`` builds or loads it.

The contract (generation code relies on it): ``Tokenizer.encode(text) -> list[int]`` (no special tokens added: no
BOS; special-token strings in the text are matched as the HF tokenizer does), ``decode(ids) -> str`` (special tokens
kept; bytes decode with errors='replace'), ``vocab_size`` (one more than the largest id: the embedding rows needed),
``eos_id`` and ``spec``; ``from_spec(spec, data_dir=None)``, ``for_config(config)``, ``for_workdir(workdir)``.
Also ``token_bytes(id)`` (the text bytes a token stands for, for bits per byte) and ``for_checkpoint(path, config)``
(a workdir's or a transformers directory's tokenizer). A training run with a tokenizer other than bytes writes it
into its workdir (``Tokenizer.save``: ``tokenizer.json`` and a ``tokenizer_config.json`` naming the eos token),
where ``for_workdir`` finds it.

The data pipeline encodes documents with ``documents`` (each followed by ``eos_id``) and ``stream``; token arrays
use the smallest of uint8 / uint16 / int32 that holds ``vocab_size`` (``dtype``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from moejax.data import corpora

SPECS_ALLOWED = "'bytes', 'hf:<dir or path of tokenizer.json>' or 'bpe:<vocab_size>' (an integer >= 257)"
EOT = "<|endoftext|>"  # the special token of 'bpe:' tokenizers, their eos_id
EOS_FILES = ("tokenizer_config.json", "generation_config.json", "config.json")  # where an 'hf:' eos is looked up
_BYTES = 256
_ENCODE_CHUNK = 256  # documents per encode_batch_fast call


class Tokenizer:
    """text <-> token ids. ``spec``: the data.tokenizer it was made from; ``fingerprint``: its identity in the corpus
    fingerprint (None for bytes, so byte-level corpora keep the fingerprint they had before tokenizers existed)."""

    spec: str
    vocab_size: int
    eos_id: int
    fingerprint: dict | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | pathlib.Path) -> None:
        """Writes this tokenizer where ``for_workdir(directory)`` reads it."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> int:
        """The UTF-8 bytes of text token_id stands for. The eos id counts 1, as the byte tokenizer's separator does,
        so bits per byte compare across tokenizers; other special tokens count 0."""
        raise NotImplementedError

    def _encode_texts(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        """[len_i] token ids of each UTF-8 text, in ``dtype``."""
        raise NotImplementedError

    @property
    def dtype(self) -> np.dtype:
        """The smallest of uint8 / uint16 / int32 that holds every id."""
        return np.dtype(np.uint8 if self.vocab_size <= 2**8 else np.uint16 if self.vocab_size <= 2**16 else np.int32)

    def documents(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        """[len_i + 1] the ids of each document, then eos_id."""
        eos = np.array([self.eos_id], self.dtype)
        return [np.concatenate([ids, eos]) for ids in self._encode_texts(texts)]

    def stream(self, pieces: Sequence[tuple[bytes, bool]]) -> np.ndarray:
        """One token stream of (text, followed by eos) pieces: the documents of a split (a split cut inside a document
        leaves its head without eos)."""
        eos = np.array([self.eos_id], self.dtype)
        parts = []
        for ids, (_, ends) in zip(self._encode_texts([text for text, _ in pieces]), pieces, strict=True):
            parts += [ids, eos] if ends else [ids]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


class ByteTokenizer(Tokenizer):
    """token = byte value; eos 0."""

    spec, vocab_size, eos_id = "bytes", _BYTES, 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        """Invalid UTF-8 and ids past 255 (a padded embedding's) decode as U+FFFD."""
        return bytes(i if 0 <= i < _BYTES else 0xFF for i in map(int, ids)).decode(errors="replace")

    def save(self, directory: str | pathlib.Path) -> None:
        """Bytes need no file: a workdir without tokenizer.json is byte-level."""

    def token_bytes(self, token_id: int) -> int:
        return 1

    def _encode_texts(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(t, np.uint8) for t in texts]


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (``tok``, parsed from the tokenizer.json bytes ``raw``) with its eos id."""

    def __init__(self, spec: str, raw: bytes, tok: Any, eos_id: int):
        self.spec, self._raw, self._tok = spec, raw, tok
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        if not 0 <= eos_id < self.vocab_size:
            raise ValueError(f"config.data.tokenizer={spec!r}: eos id {eos_id} is outside the tokenizer's vocabulary "
                             f"of {self.vocab_size}")
        self.eos_id = eos_id
        self.fingerprint = {"spec": spec, "sha256": hashlib.sha256(raw).hexdigest(),
                            "vocab_size": self.vocab_size, "eos_id": eos_id}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | pathlib.Path) -> None:
        """tokenizer.json (the file's bytes, so the fingerprint stays) and tokenizer_config.json with the eos."""
        directory = pathlib.Path(directory)
        write_atomic(directory / "tokenizer.json", self._raw)
        eos = {"eos_token": self._tok.id_to_token(self.eos_id), "eos_token_id": self.eos_id}
        write_atomic(directory / "tokenizer_config.json", (json.dumps(eos, indent=2) + "\n").encode())

    def token_bytes(self, token_id: int) -> int:
        return int(self._bytes_per_token[token_id])

    @functools.cached_property
    def _bytes_per_token(self) -> np.ndarray:
        """[vocab_size]: a ByteLevel token's characters are one byte each; a byte-fallback token '<0xHH>' is one
        byte; other tokens are their text with SentencePiece's U+2581 as a space; added tokens their content."""
        from tokenizers import decoders

        byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        table = np.zeros(self.vocab_size, np.int64)
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            fallback = re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token)
            table[i] = len(token) if byte_level else 1 if fallback else len(token.replace("\u2581", " ").encode())
        for i, added in self._tok.get_added_tokens_decoder().items():
            table[i] = 0 if added.special else len(added.content.encode())
        table[self.eos_id] = 1
        return table

    def _encode_texts(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        out = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = [t.decode(errors="replace") for t in texts[start:start + _ENCODE_CHUNK]]
            out += [np.asarray(e.ids, self.dtype) for e in self._tok.encode_batch_fast(chunk, add_special_tokens=False)]
        return out


# ----------------------------------------------------------------------------------------------- specs


def spec_of(config) -> str:
    """config.data.tokenizer; configs without the field (older ones) are byte-level."""
    return config.data.get("tokenizer", "bytes")


def parse_spec(spec: Any) -> tuple[str, str]:
    """(kind, argument) of a data.tokenizer spec; ValueError naming the field, the value and what is allowed."""
    if spec == "bytes":
        return "bytes", ""
    if isinstance(spec, str) and spec.startswith("hf:") and spec[3:]:
        return "hf", spec[3:]
    if isinstance(spec, str) and spec.startswith("bpe:") and spec[4:].isdigit() and int(spec[4:]) > _BYTES:
        return "bpe", spec[4:]
    raise ValueError(f"config.data.tokenizer={spec!r} is not supported; allowed: {SPECS_ALLOWED}")


def vocab_size_of(spec: str) -> int:
    """The ids a spec's tokenizer can produce: 256 (bytes), the BPE's vocab_size (at most; a small corpus may stop
    the merges earlier) or the 'hf:' tokenizer's (read from its file)."""
    kind, arg = parse_spec(spec)
    if kind == "bpe":
        return int(arg)
    return from_spec(spec).vocab_size


def from_spec(spec: str, data_dir: str | pathlib.Path | None = None) -> Tokenizer:
    """The tokenizer of a spec. 'bpe:<n>' needs its corpus (``for_config``); with data_dir, the one 'bpe:<n>'
    tokenizer built there is loaded (ValueError when there is none or several: then pass the config)."""
    kind, arg = parse_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        file, directory = _hf_file(spec, arg)
        stat = file.stat()
        return _load_hf(spec, str(file), str(directory), stat.st_mtime_ns, stat.st_size)
    built = sorted(pathlib.Path(data_dir).expanduser().glob(f"bpe{arg}-*.json")) if data_dir is not None else []
    if len(built) != 1:
        raise ValueError(f"config.data.tokenizer={spec!r} is trained for a corpus: load it with "
                         f"moejax.data.tokenizers.for_config(config) (or for_workdir(workdir) for a run's); "
                         f"data dir {data_dir} holds {len(built)} such tokenizers")
    return _load_bpe(spec, built[0])


def for_config(config) -> Tokenizer:
    """The tokenizer of config.data.tokenizer; a 'bpe:' one is loaded from the data dir, trained there on the
    training split of config's corpus first when it is not built yet (one progress line)."""
    spec = spec_of(config)
    kind, arg = parse_spec(spec)
    if kind != "bpe":
        return from_spec(spec)
    corpus = corpora.load(config)
    path = corpora.data_dir(config) / f"bpe{arg}-{corpora.fingerprint_id(corpus.fingerprint)}.json"
    if not path.is_file():
        count, texts = corpora.train_texts(corpus)
        train_bpe(texts, count, int(arg), path, f"the training split of config.data.name={config.data.name!r}")
    return _load_bpe(spec, path)


def for_checkpoint(path: str | pathlib.Path, config=None) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: the tokenizer.json in path (a moejax workdir's, written when its
    run started, or a transformers directory's), else config's (``for_config``), else ``for_workdir(path)``."""
    path = pathlib.Path(path)
    if (path / "tokenizer.json").is_file():
        return from_spec(f"hf:{path}")
    return for_config(config) if config is not None else for_workdir(path)


def pin(config, tokenizer: Tokenizer) -> None:
    """Makes config's data pipeline tokenize with ``tokenizer`` when it was read from a file (a checkpoint's
    tokenizer.json, ``for_checkpoint``): sets config.data.tokenizer to its 'hf:' spec. Without this, a checkpoint
    trained with 'bpe:N' and read on another corpus would get a BPE trained afresh on that corpus, whose ids name
    other tokens than the ones the model learned."""
    if tokenizer.spec.startswith("hf:"):
        config.data.tokenizer = tokenizer.spec


def for_workdir(workdir: str | pathlib.Path) -> Tokenizer:
    """The tokenizer a run trained with: its workdir's tokenizer.json, else bytes. Raises ValueError when the
    run's config.json names another tokenizer but the file is missing."""
    workdir = pathlib.Path(workdir)
    if (workdir / "tokenizer.json").is_file():
        return from_spec(f"hf:{workdir}")
    try:
        spec = json.loads((workdir / "config.json").read_text()).get("data", {}).get("tokenizer", "bytes")
    except (OSError, ValueError):
        spec = "bytes"
    if spec != "bytes":
        raise ValueError(f"{workdir} holds a run of data.tokenizer={spec!r} but no tokenizer.json (a run writes it "
                         f"when it starts)")
    return ByteTokenizer()


# ----------------------------------------------------------------------------------------------- hf: and bpe:


def _hf_file(spec: str, arg: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(tokenizer.json, the directory whose json files name the eos) of an 'hf:' argument."""
    path = pathlib.Path(arg).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"config.data.tokenizer={spec!r}: {file} does not exist; allowed: {SPECS_ALLOWED} (a "
                         f"directory with the model's tokenizer.json, or that file)")
    return file, file.parent


@functools.lru_cache(maxsize=8)
def _load_hf(spec: str, file: str, directory: str, mtime_ns: int, size: int) -> HFTokenizer:
    del mtime_ns, size  # in the cache key: a rewritten file is read again
    raw, tok = _read(spec, pathlib.Path(file))
    return HFTokenizer(spec, raw, tok, _eos_id(spec, tok, pathlib.Path(directory)))


def _read(spec: str, file: pathlib.Path) -> tuple[bytes, Any]:
    """(the bytes, the tokenizers.Tokenizer) of a tokenizer.json file."""
    import tokenizers

    raw = file.read_bytes()
    try:
        return raw, tokenizers.Tokenizer.from_str(raw.decode())
    except Exception as e:  # the Rust reader raises plain Exceptions for malformed files
        raise ValueError(f"config.data.tokenizer={spec!r}: {file} is not a tokenizers tokenizer.json ({e})") from e


def _eos_id(spec: str, tok: Any, directory: pathlib.Path) -> int:
    for name in EOS_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"config.data.tokenizer={spec!r}: cannot read {path}: {e}") from e
        eos_id = raw.get("eos_token_id") if isinstance(raw, dict) else None
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int) and not isinstance(eos_id, bool):
            return eos_id
        token = raw.get("eos_token") if isinstance(raw, dict) else None
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
    raise ValueError(f"config.data.tokenizer={spec!r}: no end-of-document token: none of {', '.join(EOS_FILES)} in "
                     f"{directory} has an eos_token_id or an eos_token of the tokenizer's vocabulary; add one, e.g. "
                     f"tokenizer_config.json {{\"eos_token\": \"</s>\"}}")


def _load_bpe(spec: str, path: pathlib.Path) -> HFTokenizer:
    raw, tok = _read(spec, path)
    return HFTokenizer(spec, raw, tok, tok.token_to_id(EOT))


def train_bpe(texts: Iterable[str], count: int, vocab_size: int, path: pathlib.Path, what: str) -> None:
    """Trains a byte-level BPE of vocab_size (EOT first, id 0) on texts (count of them) and writes it to path."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    print(f"training a byte-level BPE tokenizer (bpe:{vocab_size}) on {what} ({count} documents) -> {path}",
          flush=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=count)
    write_atomic(path, tok.to_str().encode())


def write_atomic(path: pathlib.Path, content: bytes) -> None:
    """Writes a temp file beside path, then renames it over path (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
