"""Batch iterators over a corpus: windows of in-memory token streams, packed lanes over streamed TFDS documents,
with checkpointable state (see moejax/data/__init__.py)."""
from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from moejax.data import tokenizers
from moejax.data.corpora import NAMES_ALLOWED, MemoryCorpus, check_config, fingerprint_id, grain_seed, load, parse_name
from moejax.data.streams import corpus_fingerprint, token_streams


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
             seed: int | None, split: str, spread: int = 0) -> grain.MapDataset:
    """Endless MapDataset of int32 [rows, seq_len + 1] batches of windows stream[i*L : i*L + L + 1].

    seed: shuffle the windows (training); None keeps their order. spread > 0 (evaluation): the first ``spread``
    windows of the dataset are evenly spaced over the whole stream instead of its first ``spread`` windows, so a
    validation set smaller than the split samples all of it rather than its first documents."""
    count = (stream.size - 1) // seq_len
    if count < 1:
        raise ValueError(f"the {split} has {stream.size} tokens, fewer than config.train.seq_len + 1 = "
                         f"{seq_len + 1}; use a larger corpus or a smaller seq_len")
    ds = grain.MapDataset.range(count)
    if seed is not None:
        ds = ds.shuffle(seed=grain_seed(seed))
    elif 0 < spread < count:
        picked = np.linspace(0, count - 1, spread).round().astype(np.int64)
        ds = grain.MapDataset.range(spread).map(lambda i: picked[i])
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
    (one batched array_record read, encoded by ``tokenizer``). The state is each row's [document number k within its
    lane, offset in tokens] of its next window's first token.
    """

    _BLOCK = 16

    def __init__(self, source: Any, order: grain.MapDataset, text_key: str, tokenizer: tokenizers.Tokenizer,
                 seq_len: int, lanes: Sequence[int], stride: int, meta: dict):
        super().__init__(meta)
        self._source, self._key, self._tokenizer, self._seq_len = source, text_key, tokenizer, seq_len
        self._blocks = [order[g::stride].batch(self._BLOCK, batch_fn=list) for g in lanes]
        self._pos = [[0, 0] for _ in lanes]
        self._cache: list[tuple[int, list[np.ndarray]]] = [(-1, [])] * len(lanes)

    def _doc(self, row: int, k: int) -> np.ndarray:
        """[len + 1]: the tokens of document k of the row's lane, then the eos id."""
        block, i = divmod(k, self._BLOCK)
        if self._cache[row][0] != block:
            texts = [r[self._key] for r in self._source.__getitems__(self._blocks[row][block])]
            texts = [t.encode() if isinstance(t, str) else bytes(t) for t in texts]
            self._cache[row] = (block, self._tokenizer.documents(texts))
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


def _iterator(config, process_index: int, process_count: int, train: bool) -> TrainIterator:
    rows, seq_len = check_config(config, process_index, process_count)
    corpus = load(config)
    seed = int(config.seed) if train else None
    meta = {"corpus": fingerprint_id(corpus_fingerprint(config)), "seed": seed, "batch_size": config.train.batch_size,
            "seq_len": seq_len}
    if isinstance(corpus, MemoryCorpus):
        stream = token_streams(config)[0 if train else 1]
        split = f"{'train' if train else 'validation'} split of config.data.name={config.data.name!r}"
        spread = 0 if train else config.data.eval_batches * config.train.batch_size
        return _WindowIterator(_windows(stream, seq_len, rows, process_index, process_count, seed, split, spread),
                               meta)
    source = corpus.train if train else corpus.val
    order = grain.MapDataset.range(len(source))
    if train:
        order = order.shuffle(seed=grain_seed(seed))
    lanes = range(process_index * rows, (process_index + 1) * rows)
    meta.update(process_index=process_index, process_count=process_count)
    return _PackedIterator(source, order.repeat(None), corpus.text_key, tokenizers.for_config(config), seq_len, lanes,
                           rows * process_count, meta)


def train_iterator(config, *, process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """Endless training batches, int32 [config.train.batch_size // process_count, config.train.seq_len + 1].

    Epochs repeat, each shuffled differently by ``config.seed``; processes see disjoint data.
    """
    return _iterator(config, process_index, process_count, train=True)


def eval_batches(config, *, process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """``config.data.eval_batches`` validation batches, int32 [batch // process_count, seq_len + 1].

    Deterministic and independent of ``config.seed``. In-memory corpora (stdlib, text:): windows evenly spaced over
    the whole validation split, in order (not its first windows: the stdlib split's files come in path order, and
    its first windows are mostly codec tables, far easier than the rest); a split with fewer windows than that
    repeats. tfds corpora: the first windows of the split's documents, packed per row.
    """
    it = _iterator(config, process_index, process_count, train=False)
    return [next(it) for _ in range(config.data.eval_batches)]


def checkpoint_windows(config, checkpoint: str | pathlib.Path | None = None, *, data: str | None = None,
                       max_tokens: int = 0, batch_size: int = 0, seq_len: int = 0,
                       data_dir: str | None = None) -> tuple[Any, list[np.ndarray], tokenizers.Tokenizer]:
    """(a copy of config with the data fields set, evaluation windows int32 [B, S + 1], tokenizer): the one source
    of evaluation and calibration batches for a checkpoint (``python -m moejax.evaluate``, the post-hoc tools and
    studies). The validation split of ``data`` (default: the config's own ``data.name``) read by ``eval_batches``
    with the checkpoint's tokenizer (``tokenizers.for_checkpoint``; the config's without a checkpoint), pinned in
    the returned config. ``batch_size`` and ``seq_len`` (0: the config's ``train`` fields) shape the windows;
    ``max_tokens`` (0: the config's ``data.eval_batches`` batches) sets their number, ceil(max_tokens /
    (batch_size * seq_len)). Errors (ValueError) name the command-line flags (--data, --max_tokens, --batch_size,
    --seq_len) the tools pass through unchanged."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    if data:
        try:
            parse_name(data)
        except ValueError as e:
            raise ValueError(f"--data={data!r} is not a corpus: allowed are {NAMES_ALLOWED}") from e
        config.data.name = data
    if data_dir is not None:
        config.data.dir = data_dir
    for flag, value in (("batch_size", batch_size), ("seq_len", seq_len), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"--{flag}={value!r} must be an integer >= 0 (0: the checkpoint config's own)")
        if value and flag != "max_tokens":
            config.train[flag] = value
    per_batch = config.train.batch_size * config.train.seq_len
    if max_tokens:
        config.data.eval_batches = max(1, math.ceil(max_tokens / per_batch))
    if config.data.eval_batches < 1:
        raise ValueError(f"data.eval_batches={config.data.eval_batches} leaves no evaluation batches: pass "
                         f"--max_tokens")
    tokenizer = tokenizers.for_checkpoint(checkpoint, config) if checkpoint is not None else \
        tokenizers.for_config(config)
    tokenizers.pin(config, tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"the tokenizer of {config.data.name!r} ({tokenizer.spec}) has {tokenizer.vocab_size} ids, "
                         f"the model's vocabulary {config.model.vocab_size}")
    return config, [np.asarray(window) for window in eval_batches(config)], tokenizer
