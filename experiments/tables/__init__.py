"""Ablation tables that ``python -m experiments.reproduce <table>`` runs: one file per table.

A table file defines:

* ``TITLE``: one line.
* ``PAPER``: the citation, arXiv id and which table or figure is reproduced.
* ``ROWS``: a list of ``Row`` (name, config file[:preset], config overrides, the paper's numbers for the row).
* ``BUDGET``: config overrides shared by every row (steps, evaluation), with the measured wall time documented.
* ``METRICS``: the metrics of the results table, names of ``experiments.runner.METRICS``.
* ``EXPECTED``: the paper's ordering, in a few words.
* optionally ``SEEDS``: the seeds per row that ``experiments.reproduce`` runs without ``--seeds`` (default 3).
* optionally ``SEEDS_PREREGISTERED``: how many of those seeds were fixed before the table ran (default ``SEEDS``).
  A table whose seeds were extended after a result was seen keeps the original count here, and its results page
  gives, beside each claim's verdicts at all seeds, the verdicts at the first ``SEEDS_PREREGISTERED`` seeds.
* optionally ``REFERENCE``: the row that the other rows' within-seed differences are taken against.
* optionally ``CLAIMS``: a list of ``Claim``: the paper's claims as paired comparisons of two rows, each of which
  the results page answers with one verdict (reproduced / not resolved / contradicted, see
  experiments/stats.py).
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
import importlib.util
import pathlib
import re
from types import ModuleType
from typing import Any

from experiments import runner
from experiments.stats import DIRECTIONS

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


# ----------------------------------------------------------------------------------------------- loading

TABLES_DIR = pathlib.Path(__file__).resolve().parent
REQUIRED = ("TITLE", "PAPER", "ROWS", "BUDGET", "METRICS", "EXPECTED")
# Seeds per row when neither the command line (--seeds) nor the table (SEEDS) says.
DEFAULT_SEEDS = 3
# A few steps of a small batch, evaluated once on one batch: the pipeline in seconds per run, not a result.
SMOKE_BUDGET = {"train.steps": 4, "train.batch_size": 8, "train.seq_len": 32, "train.warmup_steps": 1,
                "train.log_every": 2, "train.eval_every": 0, "data.eval_batches": 1, "checkpoint.every_steps": 0}
_ROW_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def available_tables(tables_dir: pathlib.Path) -> list[str]:
    return sorted(p.stem for p in tables_dir.glob("*.py") if not p.name.startswith("_"))


def load_table(name: str, tables_dir: pathlib.Path = TABLES_DIR) -> ModuleType:
    """The table module ``<tables_dir>/<name>.py``, checked: its attributes, rows, metrics and every override
    against its config. Raises runner.UsageError naming what is wrong and what is allowed."""
    path = tables_dir / f"{name}.py"
    if not path.is_file():
        raise runner.UsageError(f"table {name!r} does not exist in {tables_dir}; allowed tables: "
                                f"{', '.join(available_tables(tables_dir)) or '(none)'}")
    spec = importlib.util.spec_from_file_location(f"_moejax_table_{name}", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    missing = [attr for attr in REQUIRED if not hasattr(table, attr)]
    if missing:
        raise runner.UsageError(f"table file {path} lacks {', '.join(missing)} (a table defines {', '.join(REQUIRED)}"
                                ", see experiments/tables/__init__.py)")
    table.SEEDS = getattr(table, "SEEDS", DEFAULT_SEEDS)
    if not isinstance(table.SEEDS, int) or isinstance(table.SEEDS, bool) or table.SEEDS < 1:
        raise runner.UsageError(f"table file {path}: SEEDS={table.SEEDS!r} is invalid: must be an integer >= 1")
    table.SEEDS_PREREGISTERED = getattr(table, "SEEDS_PREREGISTERED", table.SEEDS)
    declared = table.SEEDS_PREREGISTERED
    if not isinstance(declared, int) or isinstance(declared, bool) or not 1 <= declared <= table.SEEDS:
        raise runner.UsageError(f"table file {path}: SEEDS_PREREGISTERED={declared!r} is invalid: must be an integer "
                                f"from 1 to SEEDS={table.SEEDS}")
    table.ROWS = [row if isinstance(row, Row) else Row(**row) for row in table.ROWS]
    names = [row.name for row in table.ROWS]
    for row in table.ROWS:
        if not _ROW_NAME.match(row.name) or names.count(row.name) > 1:
            raise runner.UsageError(f"table {name}: row name {row.name!r} must be unique and made of letters, digits, "
                                    "'_', '-' and '.' (it names the row's run directory)")
        config = runner.load_config(row.config)
        for field, value in {**table.BUDGET, **row.overrides}.items():
            runner.typed_value(config, field, value, f"table {name}, row {row.name!r} ({row.config})")
    for metric in table.METRICS:
        runner.check_metric(metric, f"table {name}, METRICS")
    reference = getattr(table, "REFERENCE", None)
    if reference is not None and reference not in names:
        raise runner.UsageError(f"table {name}: REFERENCE={reference!r} is not a row; rows: {', '.join(names)}")
    table.CLAIMS = [claim if isinstance(claim, Claim) else Claim(**claim) for claim in getattr(table, "CLAIMS", [])]
    for claim in table.CLAIMS:
        where = f"table {name}, claim {claim.text!r}"
        for row in (claim.row, claim.reference):
            if row not in names:
                raise runner.UsageError(f"{where}: {row!r} is not a row; rows: {', '.join(names)}")
        if claim.row == claim.reference:
            raise runner.UsageError(f"{where}: row and reference are both {claim.row!r}; a claim compares two rows")
        runner.check_metric(claim.metric, where)
        if claim.better not in DIRECTIONS:
            raise runner.UsageError(f"{where}: better={claim.better!r} is invalid: allowed {', '.join(DIRECTIONS)}")
    return table
