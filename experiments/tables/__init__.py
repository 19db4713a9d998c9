"""Ablation tables that ``python -m experiments.reproduce <table>`` runs: one file per table.

A table file defines:

* ``TITLE``: one line.
* ``PAPER``: the citation, arXiv id and which table or figure is reproduced.
* ``ROWS``: a list of ``Row`` (name, config file[:preset], config overrides, the paper's numbers for the row).
* ``BUDGET``: config overrides shared by every row (steps, evaluation), with the measured wall time documented.
* ``METRICS``: the metrics of the results table, names of ``experiments.runner.METRICS``.
* ``EXPECTED``: the paper's ordering, in a few words.
* optionally ``SEEDS``: the seeds per row that ``experiments.reproduce`` runs without ``--seeds`` (default 3).
* optionally ``REFERENCE``: the row that the other rows' within-seed differences are taken against.
* optionally ``CLAIMS``: a list of ``Claim``: the paper's claims as paired comparisons of two rows, each of which
  the results page answers with one verdict (reproduced / not resolved / contradicted, see
  experiments/reproduce.py).
* optionally ``BUDGET_STATUS``: a sentence the results page shows beside the budget when the budget is
  provisional (``experiments.reproduce --set`` sets one for a pilot budget).

``TABLE_MODEL`` is the width every table's rows share: the shape of ``configs/deepseekmoe.py:tiny`` (4 layers, 4
heads, queries and keys RMS-normed) at half its width, d_model 64 and one "standard FFN" a ``FFN`` = 176-wide SwiGLU
(issue 20's pilot chose it: deepseekmoe_table1.py's docstring). ``TINY_TRAIN`` is the tiny preset's optimiser, batch
and sequence. ``CORPUS`` is the data every table's rows train and evaluate on: the embedded stdlib corpus tokenized
with a byte-level BPE of 8,192 ids (``bpe:8192``, trained once on the training split and cached in the data dir;
docs/data.md), the vocabulary size of DeepSeekMoE's validation experiments. ``TABLE`` is the three together;
``experts(...)`` gives a row's expert layout in standard FFNs. ``TABLE_BUDGET`` is the step budget and evaluation
every table runs at (the pilot's choice too).
"""
import dataclasses
from typing import Any

# The tables' corpus: the stdlib corpus (data.name's default) in BPE tokens. model.vocab_size is the tokenizer's
# vocabulary (8,192 ids measured: ids 0..8191, the end-of-document token <|endoftext|> is id 0). The hash router
# hashes these ids (moejax.moe.routers.hash_experts works on any id; 8,192 ids spread 507-516 per expert of 16).
CORPUS = {"data.tokenizer": "bpe:8192", "model.vocab_size": 8192}
# One "standard FFN" of the tables: a 176-wide SwiGLU, 2.75 x d_model as at every width of docs/methods.md.
FFN = 176
# The tables' width: configs/deepseekmoe.py:tiny's shape at half its width (d_model 128 -> 64, FFN 352 -> 176).
TABLE_MODEL = {"model.d_model": 64, "model.num_layers": 4, "model.num_heads": 4, "model.ffn_dim": FFN,
               "model.qk_norm": True}
# The optimiser, batch and sequence of configs/deepseekmoe.py:tiny (cosine schedule and AdamW as in configs/base.py).
TINY_TRAIN = {"train.batch_size": 32, "train.seq_len": 128, "train.learning_rate": 6e-3, "train.warmup_steps": 30}
TABLE = {**CORPUS, **TABLE_MODEL, **TINY_TRAIN}
# Every table's budget: 600 steps x 32 x 128 = 2,457,600 BPE tokens per run (0.86 epochs of the training split), one
# evaluation at the end on 64 validation batches spread over the split (262,144 tokens, 2,048 of its 2,452 windows).
TABLE_BUDGET = {"train.steps": 600, "train.eval_every": 0, "train.log_every": 10, "data.eval_batches": 64,
                "checkpoint.every_steps": 200}


def experts(num_shared: int, num_routed: int, granularity: int, top_k: int) -> dict[str, Any]:
    """Config overrides for an expert layout in standard FFNs: ``num_shared`` shared and ``num_routed`` routed
    experts, each ``FFN // granularity`` wide, ``top_k`` routed per token (DeepSeekMoE's m = granularity)."""
    if FFN % granularity:
        raise ValueError(f"granularity={granularity} must divide the standard FFN width {FFN}")
    return {"model.moe.num_shared": num_shared, "model.moe.num_experts": num_routed,
            "model.moe.expert_ffn": FFN // granularity, "model.moe.top_k": top_k}


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
