"""Calibration data for the post-hoc commands: input batches of a corpus split read with a checkpoint's tokenizer
and shaped like its evaluation windows (``calibration_batches``). ``moejax.posthoc.capture`` re-exports it."""
from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

SPLITS = ("train", "validation")  # the splits calibration batches come from; 'train' is the default
CALIBRATION_SEED = 1000  # the train split's window order: fixed, independent of the checkpoint config's seed


def calibration_batches(config: ml_collections.ConfigDict, checkpoint: str | pathlib.Path | None = None, *,
                        split: str = "train", seed: int = CALIBRATION_SEED, data: str | None = None,
                        max_tokens: int = 0, batch_size: int = 0, seq_len: int = 0,
                        data_dir: str | None = None) -> tuple[ml_collections.ConfigDict, list[np.ndarray], Any]:
    """(config with the data fields set, input batches [B, S], tokenizer): windows of ``data`` (default the
    config's corpus) read with the checkpoint's tokenizer and shaped as ``moejax.data.checkpoint_windows`` shapes
    the evaluation windows (same flags, same number of batches), without their last column (the targets' extra
    token): the batches are the model's inputs.

    ``split='train'`` (default): the first batches of the training split's iterator (``moejax.data.train_iterator``)
    with ``config.seed = seed`` (``CALIBRATION_SEED`` unless given): the same windows on every call whatever seed
    the checkpoint trained with, and none of them among the validation windows ``python -m moejax.evaluate``
    scores, so a model compressed on them is evaluated on data its calibration never saw. ``split='validation'``:
    the evaluation windows themselves (``checkpoint_windows``). ValueError for another split."""
    from moejax import data as data_lib

    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a calibration split: allowed are {', '.join(SPLITS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an integer (the train split's window order)")
    config, windows, tokenizer = data_lib.checkpoint_windows(config, checkpoint, data=data, max_tokens=max_tokens,
                                                             batch_size=batch_size, seq_len=seq_len,
                                                             data_dir=data_dir)
    if split == "train":
        shuffled = ml_collections.ConfigDict(config.to_dict())
        shuffled.seed = int(seed)
        iterator = data_lib.train_iterator(shuffled)
        windows = [np.asarray(next(iterator)) for _ in range(len(windows))]
    return config, [window[:, :-1] for window in windows], tokenizer
