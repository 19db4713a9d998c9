"""Switch Transformer capacity factor at the tables' width: top-1 of 16 experts with capacity factor 1.0, 1.25 and 2.0
in training, and dropless, recording validation loss and the fraction of routed slots dropped.

Every row is configs/switch.py (Switch loss 0.01, router jitter 0.01, drop by position, dropped tokens pass through
the residual) at the tables' width (experiments.tables.TABLE): 4 layers, d_model 64, 16 experts of one 176-wide
SwiGLU, batch 32 x 128 tokens, LR 6e-3, 30 warm-up steps, on experiments.tables.CORPUS (the stdlib corpus in
`bpe:8192` tokens, model.vocab_size 8192; see deepseekmoe_table1.py). The final evaluation runs every capacity row
at Switch's eval capacity factor 2.0, as the paper evaluates: `drop_fraction` is that evaluation's,
`train_drop_fraction` the training one (mean over the run).

Budget: experiments.tables.TABLE_BUDGET, chosen by Table 1's pilot (deepseekmoe_table1.py): 600 steps x 32 x 128 =
2,457,600 BPE tokens per run, one evaluation at the end on 64 validation batches spread over the split. The dropless
row is the same command as Table 1's switch row (the same config, overrides and seeds: their config.json files do
not differ), so its runs can be reused instead of repeated: copy Table 1's switch/seed<k> directories to
dropless/seed<k> (the runner skips them as finished). The committed results did so for seeds 0-4.

Seeds: SEEDS = 5. With 3 seeds, CF 2.0 vs CF 1.0 was not resolved at the evaluation's capacity factor, and the
dropless evaluation below ordered the rows as the paper does at every seed without resolving it.

Measured: the capacity rows took 12.5-15.3 min per run with a second run beside them on the 2-core machine, and 8.2
min for the one that ran mostly alone (cf2.0 seed 2; Table 1's switch runs took 7.1-8.0 min alone). The 15 capacity
runs, two at a time (`--jobs 2`), took 62 min for seeds 0-2 and about 45 min for seeds 3-4.

To separate what training under a capacity did to the weights from what the evaluation's own drops cost, evaluate a
finished run dropless: ``python -m moejax.evaluate --checkpoint=<workdir>/cf1.0/seed0 --set
model.moe.dispatch=dropless`` (the findings on the results page do this for every run).

Claims (CLAIMS): from the paper's Table 1, CF 1.25 and CF 2.0 beat CF 1.0 in loss (CF 1.25 and 2.0 roughly tie, so
no claim between them), and a larger capacity factor drops fewer tokens in training; this table's own expectation,
not the paper's (which has no dropless row), is that dropless beats CF 1.0.
"""
from experiments.tables import TABLE, TABLE_BUDGET, Claim, Row, experts

SWITCH = {**TABLE, **experts(0, 16, 1, 1)}

TITLE = "Switch Transformer capacity factor (d_model 64): CF 1.0 / 1.25 / 2.0 vs dropless, top-1 of 16"
PAPER = ("Fedus, Zoph, Shazeer, Switch Transformers, JMLR 2022, arXiv 2101.03961, Table 1 (Switch-Base, 128 "
         "experts, C4; negative log perplexity at 100k steps, higher is better)")
EXPECTED = ("A larger capacity factor drops fewer tokens and gives a lower loss (paper, neg. log perplexity: "
            "CF 1.0 -1.561, CF 1.25 -1.553, CF 2.0 -1.554, i.e. CF >= 1.25 roughly ties); dropless should match or "
            "beat CF 2.0.")
ROWS = [
    Row("cf1.0", "configs/switch.py", {**SWITCH, "model.moe.capacity_factor": 1.0},
        {"neg. log perplexity": -1.561}, "capacity factor 1.0 in training"),
    Row("cf1.25", "configs/switch.py", {**SWITCH, "model.moe.capacity_factor": 1.25},
        {"neg. log perplexity": -1.553}, "capacity factor 1.25 in training (Switch's default)"),
    Row("cf2.0", "configs/switch.py", {**SWITCH, "model.moe.capacity_factor": 2.0},
        {"neg. log perplexity": -1.554}, "capacity factor 2.0 in training"),
    Row("dropless", "configs/switch.py", {**SWITCH, "model.moe.dispatch": "dropless"},
        note="no capacity: every routed slot computed"),
]
REFERENCE = "dropless"
BUDGET = TABLE_BUDGET
SEEDS = 5  # 3 seeds left CF 2.0 vs CF 1.0 unresolved
SEEDS_PREREGISTERED = 3  # ran at 3 seeds first; extended after CF 2.0 vs CF 1.0 was unresolved
METRICS = ["val_loss", "train_drop_fraction", "drop_fraction", "train_maxvio", "train_tokens_per_s"]
CLAIMS = [
    Claim("CF 1.25 beats CF 1.0 in loss", "cf1.25", "cf1.0"),
    Claim("CF 2.0 beats CF 1.0 in loss", "cf2.0", "cf1.0"),
    Claim("CF 1.25 drops fewer tokens than CF 1.0 in training", "cf1.25", "cf1.0", "train_drop_fraction"),
    Claim("CF 2.0 drops fewer tokens than CF 1.25 in training", "cf2.0", "cf1.25", "train_drop_fraction"),
    Claim("dropless beats CF 1.0 in loss (this table's expectation; no dropless row in the paper)", "dropless",
          "cf1.0"),
]
