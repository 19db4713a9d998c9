"""Staged data mixing: training batches drawn from several corpora with weights that change by stage (Innovator's
staged upcycling, arXiv 2507.18671: the routing warm-up on domain data, then general and domain data together;
docs/methods.md#innovators-staged-upcycling).

Fields (configs/base.py): ``data.mix``, the corpora beside ``data.name`` (sources: ``(data.name, *data.mix)``), and
``data.mix_stages``, a tuple of stages ``(until_step, w_0, w_1, ...)``: from the previous stage's until_step (0 for
the first) up to until_step, a batch of B rows holds ``rows(weights, B)`` rows of source i (the largest-remainder
rounding of w_i / sum(w) * B, ties to the lower source), in source order. The last stage lasts to the end of the
run. Every source is read by its own training iterator (the run's tokenizer, seed and window shape), and the
iterator state saves the step and every source's position, so a resumed run continues bit-identically. Evaluation
reads ``data.name``'s validation split as without mixing.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from moejax import checks
from moejax.data import iterators, tokenizers
from moejax.data.corpora import parse_name


def sources(config: Any) -> tuple[str, ...]:
    return (config.data.name, *config.data.mix)


def validate(config: Any) -> None:
    """Checks ``data.mix`` and ``data.mix_stages``; ConfigError naming the field, the value and what is allowed."""
    d = config.data
    mix, stages = tuple(d.mix), tuple(d.mix_stages)
    if not mix and not stages:
        return
    if not mix:
        checks.fail("data.mix_stages", d.mix_stages, "mixes data.name with the corpora of data.mix, which is empty: "
                                                     "name the corpora to mix in data.mix, or use ()")
    for name in mix:
        try:
            parse_name(name)
        except ValueError as e:
            checks.fail("data.mix", d.mix, f"{name!r} is not a corpus: {e}")
    kind, _ = tokenizers.parse_spec(tokenizers.spec_of(config))
    if kind == "bpe":
        checks.fail("data.mix", d.mix, f"mixing needs one tokenizer for every corpus, but data.tokenizer="
                                       f"{d.tokenizer!r} trains a BPE on data.name's corpus alone; use 'bytes' or "
                                       f"'hf:<dir>'")
    width = 1 + len(mix)
    if not stages:
        checks.fail("data.mix_stages", d.mix_stages, f"data.mix is set: give at least one stage (until_step, "
                                                     f"{width} weights for data.name and data.mix)")
    previous = 0
    for i, stage in enumerate(stages):
        where = f"stage {i} ({stage!r})"
        if not isinstance(stage, (tuple, list)) or len(stage) != 1 + width:
            names = ", ".join(f"w_{i}" for i in range(width))
            checks.fail("data.mix_stages", d.mix_stages, f"{where}: each stage is (until_step, {names}), the "
                                                         f"weights of data.name and data.mix: {1 + width} numbers")
        until, *weights = stage
        if isinstance(until, bool) or not isinstance(until, int) or until <= previous:
            checks.fail("data.mix_stages", d.mix_stages, f"{where}: until_step must be an integer above the "
                                                         f"previous stage's ({previous})")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights) or not sum(
                weights) > 0:
            checks.fail("data.mix_stages", d.mix_stages, f"{where}: weights must be numbers >= 0, not all 0")
        previous = until


def stage_weights(stages: tuple, step: int) -> tuple[float, ...]:
    """The weights of the stage step lies in (the last stage's past its until_step)."""
    for until, *weights in stages:
        if step < until:
            return tuple(weights)
    return tuple(stages[-1][1:])


def rows(weights: tuple[float, ...], batch: int) -> list[int]:
    """Rows per source of a batch of ``batch`` rows: floor(w_i / sum * batch), the remaining rows one each to the
    largest remainders (ties: the lower source)."""
    total = float(sum(weights))
    exact = [w / total * batch for w in weights]
    out = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:batch - sum(out)]:
        out[i] += 1
    return out


class MixedIterator(iterators.TrainIterator):
    def __init__(self, parts: list[iterators.TrainIterator], stages: tuple, batch: int, meta: dict):
        super().__init__(meta)
        self._parts, self._stages, self._batch, self._step = parts, stages, batch, 0

    def __next__(self) -> np.ndarray:
        counts = rows(stage_weights(self._stages, self._step), self._batch)
        self._step += 1
        return np.concatenate([next(part)[:n] for part, n in zip(self._parts, counts, strict=True) if n], axis=0)

    def _position(self) -> dict:
        return {"mix_step": self._step, "mix_parts": [part.get_state() for part in self._parts]}

    def _set_position(self, state: dict) -> None:
        parts = state["mix_parts"]
        if len(parts) != len(self._parts):
            raise ValueError(f"data iterator state mixes {len(parts)} corpora but this iterator mixes "
                             f"{len(self._parts)}")
        for part, part_state in zip(self._parts, parts, strict=True):
            part.set_state(part_state)
        self._step = int(state["mix_step"])


def train_iterator(config: Any, *, process_index: int = 0, process_count: int = 1) -> iterators.TrainIterator:
    """Endless training batches, int32 [config.train.batch_size // process_count, config.train.seq_len + 1]: those
    of ``iterators.train_iterator`` (``moejax.data.train_iterator`` is this function), or with ``data.mix`` the
    stages' rows of every corpus."""
    if not config.data.get("mix"):
        return iterators.train_iterator(config, process_index=process_index, process_count=process_count)
    validate(config)
    tokenizer = tokenizers.for_config(config)
    stages = tuple(tuple(stage) for stage in config.data.mix_stages)
    parts = []
    for name in sources(config):
        part = ml_collections.ConfigDict(config.to_dict())
        part.data.name, part.data.mix, part.data.mix_stages = name, (), ()
        tokenizers.pin(part, tokenizer)
        parts.append(iterators.train_iterator(part, process_index=process_index, process_count=process_count))
    meta = {"mix": list(sources(config)), "mix_stages": [list(stage) for stage in stages]}
    return MixedIterator(parts, stages, config.train.batch_size // process_count, meta)
