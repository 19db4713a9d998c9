"""DeepSeekMoE Table 1 at the tiny width: Dense, Hash Layer, Switch, GShard and DeepSeekMoE, matched total expert
parameters (16 standard FFNs per MoE layer) on the embedded stdlib corpus.

Shapes (every row: 4 layers, d_model 128, 4 heads, one standard FFN = a 352-wide SwiGLU; optimiser, batch and
sequence of configs/deepseekmoe.py:tiny: batch 32 x 128 bytes, LR 6e-3, 30 warm-up steps, cosine):
* dense: one 352-wide FFN, i.e. the activated FFN of Switch and Hash. This follows the paper's Table 1, whose Dense
  column has the activated parameters of Hash/Switch (0.2B) and their FLOPs (2.9T per 2K tokens). configs/dense.py
  defaults instead to DeepSeekMoE's activated width (1408 at :small), which is another comparison.
* hash: 16 x 352, top-1, by a fixed hash of the token id (configs/hash.py).
* switch: 16 x 352, top-1, Switch loss 0.01, jitter 0.01 (configs/switch.py), but dropless like every arm of the
  paper's table (the paper drops no token); experiments/tables/switch_capacity.py is about capacity.
* gshard: 16 x 352, top-2, renormalised, Switch loss 0.01, dropless (configs/gshard.py).
* deepseekmoe: 1 shared + 63 routed x 88, top-7, alpha1 0.01 (configs/deepseekmoe.py:tiny).

Budget: 150 steps (614K tokens), one evaluation at the end on 16 validation batches (65K bytes). Measured on the
2-core CPU (one 30-step run of the slowest row, deepseekmoe m=4, while another training job shared the cores):
1.70 s/step and 45 s per run of start-up, compilation, final evaluation and checkpoint, so a deepseekmoe run takes
about 45 + 150 x 1.70 = 300 s. With every row as slow, 15 runs would take 75 minutes; the dense and 16-expert rows
are faster, and the README's uncontended 400-step tiny run (about 1.3 s/step) puts the table at 45-60 minutes with
--jobs 1.
"""
from experiments.tables import TINY, Row

TITLE = "DeepSeekMoE Table 1 (tiny): Dense vs Hash vs Switch vs GShard vs DeepSeekMoE"
PAPER = ("Dai et al., DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models, "
         "ACL 2024, arXiv 2401.06066, Table 1 (2B validation models, 100B tokens; Pile loss, BPE 8K vocabulary)")
EXPECTED = ("Dense > Hash > Switch >~ GShard > DeepSeekMoE in validation loss (paper: 2.060, 1.932, 1.881, 1.867, "
            "1.808 on the Pile). Gaps at this scale are small: compare within seeds.")
ROWS = [
    Row("dense", "configs/dense.py", TINY, {"Pile loss": 2.060},
        "one 352-wide FFN: the activated FFN of Hash and Switch (the paper's Dense column)"),
    Row("hash", "configs/hash.py", {**TINY, "model.moe.expert_ffn": 352}, {"Pile loss": 1.932},
        "16 x 352, top-1 by token-id hash"),
    Row("switch", "configs/switch.py", {**TINY, "model.moe.expert_ffn": 352, "model.moe.dispatch": "dropless"},
        {"Pile loss": 1.881}, "16 x 352, top-1, dropless"),
    Row("gshard", "configs/gshard.py", {**TINY, "model.moe.expert_ffn": 352}, {"Pile loss": 1.867},
        "16 x 352, top-2, dropless"),
    Row("deepseekmoe", "configs/deepseekmoe.py:tiny", {}, {"Pile loss": 1.808}, "1 shared + 63 routed x 88, top-7"),
]
REFERENCE = "gshard"
BUDGET = {"train.steps": 150, "train.eval_every": 0, "train.log_every": 10, "data.eval_batches": 16,
          "checkpoint.every_steps": 50}
METRICS = ["val_loss", "train_maxvio", "maxvio", "drop_fraction", "train_tokens_per_s"]
