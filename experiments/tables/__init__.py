"""Ablation tables that ``python -m experiments.reproduce <table>`` runs: one file per table.

A table file defines:

* ``TITLE``: one line.
* ``PAPER``: the citation, arXiv id and which table or figure is reproduced.
* ``ROWS``: a list of ``Row`` (name, config file[:preset], config overrides, the paper's numbers for the row).
* ``BUDGET``: config overrides shared by every row (steps, evaluation), with the measured wall time documented.
* ``METRICS``: the metrics of the results table, names of ``experiments.runner.METRICS``.
* ``EXPECTED``: the paper's ordering, in a few words.
* optionally ``REFERENCE``: the row that the other rows' within-seed differences are taken against.
* optionally ``CLAIMS``: a list of ``Claim``: the paper's claims as paired comparisons of two rows, each of which
  the results page answers with one verdict (reproduced / not resolved / contradicted, see
  experiments/reproduce.py).
* optionally ``BUDGET_STATUS``: a sentence the results page shows beside the budget when the budget is
  provisional (``BUDGET_PENDING`` until the pilot study of issue 20 has chosen the step budgets).

``TINY_MODEL`` and ``TINY_TRAIN`` are the width and optimiser of ``configs/deepseekmoe.py:tiny``, which every
table's rows share (the paper configs other than deepseekmoe.py default to the ``:small`` width). ``CORPUS`` is the
data every table's rows train and evaluate on: the embedded stdlib corpus tokenized with a byte-level BPE of 8,192
ids (``bpe:8192``, trained once on the training split and cached in the data dir; docs/data.md), the vocabulary
size of DeepSeekMoE's validation experiments. ``TINY`` includes it; rows that do not use ``TINY`` add it themselves.
"""
import dataclasses
from typing import Any

# The tables' corpus: the stdlib corpus (data.name's default) in BPE tokens. model.vocab_size is the tokenizer's
# vocabulary (8,192 ids measured: ids 0..8191, the end-of-document token <|endoftext|> is id 0). The hash router
# hashes these ids (moejax.moe.routers.hash_experts works on any id; 8,192 ids spread 507-516 per expert of 16).
CORPUS = {"data.tokenizer": "bpe:8192", "model.vocab_size": 8192}
# The width of configs/deepseekmoe.py:tiny: one "standard FFN" is a 352-wide SwiGLU; queries and keys RMS-normed.
TINY_MODEL = {"model.d_model": 128, "model.num_layers": 4, "model.num_heads": 4, "model.ffn_dim": 352,
              "model.qk_norm": True}
# The optimiser, batch and sequence of configs/deepseekmoe.py:tiny (cosine schedule and AdamW as in configs/base.py).
TINY_TRAIN = {"train.batch_size": 32, "train.seq_len": 128, "train.learning_rate": 6e-3, "train.warmup_steps": 30}
TINY = {**CORPUS, **TINY_MODEL, **TINY_TRAIN}
# Shown on every results page until the pilot study of issue 20 has chosen each table's step budget.
BUDGET_PENDING = ("provisional: the step budget predates the BPE corpus and is pending the pilot study of issue 20, "
                  "which chooses the smallest budget at which Table 1's MoE-beats-dense claim shows beyond seed noise")


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


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the paper, tested as a paired comparison of two rows of the table.

    text: the claim in a few words, e.g. 'DeepSeekMoE beats GShard'.
    row, reference: the rows compared; the statistic is (row - reference) in ``metric`` at each seed both finished.
    metric: a name of experiments.runner.METRICS (need not be one of the table's METRICS).
    better: 'lower' or 'higher': the paper's direction, i.e. the claim is that ``row`` has a lower (higher)
      ``metric`` than ``reference``. The verdict is 'reproduced' when the 95% t-interval of the paired differences
      excludes 0 on that side, 'contradicted' when it excludes 0 on the other side, 'not resolved' when it contains
      0 or fewer than 2 seeds are paired.
    """

    text: str
    row: str
    reference: str
    metric: str = "val_loss"
    better: str = "lower"
