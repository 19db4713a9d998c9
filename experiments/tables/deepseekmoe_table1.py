"""DeepSeekMoE Table 1 at the tiny width: Dense, Hash Layer, Switch, GShard and DeepSeekMoE, matched total expert
parameters (16 standard FFNs per MoE layer) on the embedded stdlib corpus in the paper's 8K BPE vocabulary.

Corpus (experiments.tables.CORPUS, every row): the stdlib corpus tokenized with `bpe:8192` (a byte-level BPE trained
once on the training split: 2,867,425 training and 313,878 validation tokens, 3.79 bytes per token on Python 3.11.7's
stdlib), `model.vocab_size = 8192`. The hash row hashes these BPE ids (about 512 ids per expert), not the 256 byte
values of the results measured before this default, where each expert owned a fixed set of 16 bytes.

Shapes (every row: 4 layers, d_model 128, 4 heads, one standard FFN = a 352-wide SwiGLU; optimiser, batch and
sequence of configs/deepseekmoe.py:tiny: batch 32 x 128 tokens, LR 6e-3, 30 warm-up steps, cosine):
* dense: one 352-wide FFN, i.e. the activated FFN of Switch and Hash. This follows the paper's Table 1, whose Dense
  column has the activated parameters of Hash/Switch (0.2B) and their FLOPs (2.9T per 2K tokens). configs/dense.py
  defaults instead to DeepSeekMoE's activated width (1408 at :small), which is another comparison.
* hash: 16 x 352, top-1, by a fixed hash of the token id (configs/hash.py).
* switch: 16 x 352, top-1, Switch loss 0.01, jitter 0.01 (configs/switch.py), but dropless like every arm of the
  paper's table (the paper drops no token); experiments/tables/switch_capacity.py is about capacity.
* gshard: 16 x 352, top-2, renormalised, Switch loss 0.01, dropless (configs/gshard.py).
* deepseekmoe: 1 shared + 63 routed x 88, top-7, alpha1 0.01 (configs/deepseekmoe.py:tiny).
The 8,192-id embedding and (untied) output layer add 2.03M parameters to every row (0.07M at 256 ids): the dense
row has about 2.9M parameters instead of 0.87M, and the output layer's 128 x 8192 matmul costs about as much per
token as the four blocks together.

Budget: PENDING the pilot study of issue 20 (BUDGET_STATUS), which chooses the smallest model and step budget at which
the MoE-beats-dense claims show beyond seed noise. Pilot grid so far (experiments/results/pilot_deepseekmoe_table1.md;
dense vs deepseekmoe, validation on 64 batches spread over the split, `python -m experiments.reproduce
deepseekmoe_table1 --rows dense,deepseekmoe --set train.steps=<N> ...`):
* 150 steps, 3 seeds: deepseekmoe - dense = +0.023 nats/token, 95% interval [-0.099, +0.145], not resolved;
* 300 steps, 3 seeds: -0.046, [-0.300, +0.209], not resolved. deepseekmoe lags dense by 0.19-0.34 around steps
  50-70 and passes it near step 165; the seeds' differences stay about 0.1 apart;
* 600 steps, 2 seeds: -0.058, -0.056, interval [-0.069, -0.044]: the claim shows, but two seeds are fragile (seed 1
  was +0.070 at 300 steps); a third seed has to confirm it. Table 1 at 600 steps would take about 5 hours.
At 300 steps Table 1 takes about 2.4 hours with --jobs 1 (dense about 7.5 and each MoE row about 10 minutes a run).
Until the choice: 150 steps x 32 x 128 = 614,400 BPE tokens per run (about 2.3M bytes of text, 0.21 epochs of the
training split), one evaluation at the end on 16 validation batches spread over the split (65,536 tokens).

Claims (CLAIMS): the paper's ordering Dense > Hash > Switch >~ GShard > DeepSeekMoE in loss, as paired comparisons:
each MoE row beats dense, Switch and GShard beat Hash, GShard beats Switch, DeepSeekMoE beats GShard.
"""
from experiments.tables import BUDGET_PENDING, CORPUS, TINY, Claim, Row

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
    Row("deepseekmoe", "configs/deepseekmoe.py:tiny", CORPUS, {"Pile loss": 1.808}, "1 shared + 63 routed x 88, top-7"),
]
REFERENCE = "gshard"
BUDGET_STATUS = BUDGET_PENDING
BUDGET = {"train.steps": 150, "train.eval_every": 0, "train.log_every": 10, "data.eval_batches": 16,
          "checkpoint.every_steps": 50}
METRICS = ["val_loss", "train_maxvio", "maxvio", "drop_fraction", "train_tokens_per_s"]
CLAIMS = [
    Claim("Hash Layer beats Dense", "hash", "dense"),
    Claim("Switch beats Dense", "switch", "dense"),
    Claim("GShard beats Dense", "gshard", "dense"),
    Claim("DeepSeekMoE beats Dense", "deepseekmoe", "dense"),
    Claim("Switch beats Hash Layer", "switch", "hash"),
    Claim("GShard beats Hash Layer", "gshard", "hash"),
    Claim("GShard beats Switch (paper: by 0.014 only)", "gshard", "switch"),
    Claim("DeepSeekMoE beats GShard", "deepseekmoe", "gshard"),
]
