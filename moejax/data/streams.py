"""A corpus under a tokenizer: the token streams of an in-memory corpus (encoded once and cached in the data dir)
and the corpus's fingerprint with its tokenizer's. Sits above ``corpora`` (documents) and ``tokenizers`` (which
trains a 'bpe:' tokenizer on a corpus), so neither of those imports the other's users."""
from __future__ import annotations

import functools
import io
import pathlib
import time

import numpy as np

from moejax.data import corpora, tokenizers


def token_streams(config) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token streams of an in-memory corpus under config.data.tokenizer: each split's documents, each
    followed by the eos id. Byte-level streams are the bytes (uint8); the others are encoded once, cached in the data
    dir as tokens-<corpus id>-<tokenizer file sha256[:16]>-eos<id>.npz (uint16 or int32) and in this process."""
    corpus, tokenizer = corpora.load(config), tokenizers.for_config(config)
    if tokenizer.fingerprint is None:
        return tokenizer.stream(corpus.train), tokenizer.stream(corpus.val)
    sha, eos = tokenizer.fingerprint["sha256"][:16], tokenizer.eos_id
    path = corpora.data_dir(config) / f"tokens-{corpora.fingerprint_id(corpus.fingerprint)}-{sha}-eos{eos}.npz"
    if not path.is_file():
        _encode(corpus, tokenizer, path)
    return read_streams(path)


def _encode(corpus: corpora.MemoryCorpus, tokenizer: tokenizers.Tokenizer, path: pathlib.Path) -> None:
    start = time.time()
    streams = {"train": tokenizer.stream(corpus.train), "val": tokenizer.stream(corpus.val)}
    buffer = io.BytesIO()
    np.savez(buffer, **streams)
    tokenizers.write_atomic(path, buffer.getvalue())
    print(f"encoded {corpus.fingerprint['name']} with data.tokenizer={tokenizer.spec!r}: {streams['train'].size:,} "
          f"+ {streams['val'].size:,} tokens in {time.time() - start:.1f}s -> {path}", flush=True)


@functools.lru_cache(maxsize=4)
def read_streams(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        return saved["train"], saved["val"]


def corpus_fingerprint(config) -> dict:
    """JSON-serialisable identity of the corpus: name, python version (stdlib), file count, sha256, split sizes; with
    a tokenizer other than bytes also its fingerprint (spec, sha256 of its file, vocab size, eos id) and, for
    in-memory corpora, the tokens per split."""
    corpus, tokenizer = corpora.load(config), tokenizers.for_config(config)
    fingerprint = dict(corpus.fingerprint)
    if tokenizer.fingerprint is None:
        return fingerprint
    fingerprint["tokenizer"] = dict(tokenizer.fingerprint)
    if isinstance(corpus, corpora.MemoryCorpus):
        train, val = token_streams(config)
        fingerprint.update(train_tokens=int(train.size), val_tokens=int(val.size))
    return fingerprint
