"""Ablation tables that ``python -m experiments.reproduce <table>`` runs: one file per table.

A table file defines:

* ``TITLE``: one line.
* ``PAPER``: the citation, arXiv id and which table or figure is reproduced.
* ``ROWS``: a list of ``Row`` (name, config file[:preset], config overrides, the paper's numbers for the row).
* ``BUDGET``: config overrides shared by every row (steps, evaluation), with the measured wall time documented.
* ``METRICS``: the metrics of the results table, names of ``experiments.runner.METRICS``.
* ``EXPECTED``: the paper's ordering, in a few words.
* optionally ``REFERENCE``: the row that the other rows' within-seed differences are taken against.

``TINY_MODEL`` and ``TINY_TRAIN`` are the width and optimiser of ``configs/deepseekmoe.py:tiny``, which every
table's rows share (the paper configs other than deepseekmoe.py default to the ``:small`` width).
"""
import dataclasses
from typing import Any

# The width of configs/deepseekmoe.py:tiny: one "standard FFN" is a 352-wide SwiGLU; queries and keys RMS-normed.
TINY_MODEL = {"model.d_model": 128, "model.num_layers": 4, "model.num_heads": 4, "model.ffn_dim": 352,
              "model.qk_norm": True}
# The optimiser, batch and sequence of configs/deepseekmoe.py:tiny (cosine schedule and AdamW as in configs/base.py).
TINY_TRAIN = {"train.batch_size": 32, "train.seq_len": 128, "train.learning_rate": 6e-3, "train.warmup_steps": 30}
TINY = {**TINY_MODEL, **TINY_TRAIN}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of an ablation table.

    name: the row's label and the directory of its runs (letters, digits, '_', '-', '.').
    config: a config file with an optional preset, e.g. 'configs/deepseekmoe.py:tiny'.
    overrides: {config field: value} applied on top of the config and the table's BUDGET.
    paper: {label: number}: the paper's numbers for this row (e.g. {'Pile loss': 1.808}); empty if it gives none.
    note: what the row is, in a few words (written into the results).
    """

    name: str
    config: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    paper: dict[str, float] = dataclasses.field(default_factory=dict)
    note: str = ""
