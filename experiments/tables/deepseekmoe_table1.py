"""DeepSeekMoE Table 1 at the tables' width: Dense, Hash Layer, Switch, GShard and DeepSeekMoE, matched total expert
parameters (16 standard FFNs per MoE layer) on the embedded stdlib corpus in the paper's 8K BPE vocabulary.

Corpus (experiments.tables.CORPUS, every row): the stdlib corpus tokenized with `bpe:8192` (a byte-level BPE trained
once on the training split: 2,867,425 training and 313,878 validation tokens, 3.79 bytes per token on Python 3.11.7's
stdlib), `model.vocab_size = 8192`. The hash row hashes these BPE ids (about 512 ids per expert), not the 256 byte
values of the results measured before this default, where each expert owned a fixed set of 16 bytes.

Shapes (experiments.tables.TABLE, every row: 4 layers, d_model 64, 4 heads with qk-norm, one standard FFN = a
176-wide SwiGLU; optimiser, batch and sequence of configs/deepseekmoe.py:tiny: batch 32 x 128 tokens, LR 6e-3, 30
warm-up steps, cosine):
* dense: one 176-wide FFN, i.e. the activated FFN of Switch and Hash. This follows the paper's Table 1, whose Dense
  column has the activated parameters of Hash/Switch (0.2B) and their FLOPs (2.9T per 2K tokens). configs/dense.py
  defaults instead to DeepSeekMoE's activated width (1408 at :small), which is another comparison.
* hash: 16 x 176, top-1, by a fixed hash of the token id (configs/hash.py).
* switch: 16 x 176, top-1, Switch loss 0.01, jitter 0.01 (configs/switch.py), but dropless like every arm of the
  paper's table (the paper drops no token); experiments/tables/switch_capacity.py is about capacity.
* gshard: 16 x 176, top-2, renormalised, Switch loss 0.01, dropless (configs/gshard.py).
* deepseekmoe: 1 shared + 63 routed x 44, top-7, alpha1 0.01 (configs/deepseekmoe.py:tiny's layout at this width).
The 8,192-id embedding and (untied) output layer add 1.05M parameters to every row: the dense row has 1.25M
parameters, and the output layer's 64 x 8192 matmul costs more per token than the four blocks together.

Budget (experiments.tables.TABLE_BUDGET, shared by every table): 600 steps x 32 x 128 = 2,457,600 BPE tokens per run
(0.86 epochs of the training split), one evaluation at the end on 64 validation batches spread over the split
(262,144 tokens, 2,048 of its 2,452 windows); 5 seeds. Chosen by a pilot study of dense against deepseekmoe
(issue 20; experiments/results/pilot_deepseekmoe_table1.md), differences deepseekmoe - dense in validation
nats/token at the same seed, 95% t-intervals:
* d_model 128 (the tiny preset's width), 150 steps, 3 seeds: +0.023, [-0.099, +0.145], not resolved;
* d_model 128, 300 steps, 3 seeds: -0.046, [-0.300, +0.209], not resolved. deepseekmoe lags dense by 0.19-0.34
  around steps 50-70 and passes it near step 165; the seeds' differences stay about 0.1 apart;
* d_model 128, 600 steps, 2 seeds: -0.058, -0.056, [-0.069, -0.044]: the claim shows, but Table 1 would take about
  5 hours with 3 seeds (a dense run 16.9 and a deepseekmoe run 17.9 minutes);
* d_model 64, 600 steps, 3 seeds: -0.010, -0.031, -0.066, mean -0.036, [-0.106, +0.035], not resolved;
* d_model 64, 600 steps, 5 seeds: the two further seeds -0.062, -0.022; mean -0.038, [-0.069, -0.008]: reproduced.
Why: at d_model 64 a run is about 2.3 (dense) and 1.8 (deepseekmoe) times faster and the early lag stays (+0.14 to
+0.43 around steps 40-60 on four of five seeds), but the gain at 600 steps is two thirds of d_model 128's, and three
seeds do not separate it from seed noise; five do (SEEDS = 5). No point of the grid fits 2 CPU-hours per table with
the claim resolved: the full table at this budget took about 40 minutes per seed on 2 cores with the cores
unshared (minutes per run: dense 6.9-7.4 at 5,900-6,300 training tokens/s, hash 6.9-7.8, switch 7.1-8.0, gshard
7.6-7.9, deepseekmoe 9.4-10.6 at 4,100-4,700), about 3.3 hours for 5 seeds. Its results and findings:
experiments/results/deepseekmoe_table1.md.

Claims (CLAIMS): the paper's ordering Dense > Hash > Switch >~ GShard > DeepSeekMoE in loss, as paired comparisons:
each MoE row beats dense, Switch and GShard beat Hash, GShard beats Switch, DeepSeekMoE beats GShard.
"""
from experiments.tables import FFN, TABLE, TABLE_BUDGET, Claim, Row, experts

TITLE = "DeepSeekMoE Table 1 (d_model 64): Dense vs Hash vs Switch vs GShard vs DeepSeekMoE"
PAPER = ("Dai et al., DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models, "
         "ACL 2024, arXiv 2401.06066, Table 1 (2B validation models, 100B tokens; Pile loss, BPE 8K vocabulary)")
EXPECTED = ("Dense > Hash > Switch >~ GShard > DeepSeekMoE in validation loss (paper: 2.060, 1.932, 1.881, 1.867, "
            "1.808 on the Pile). Gaps at this scale are small: compare within seeds.")
ROWS = [
    Row("dense", "configs/dense.py", TABLE, {"Pile loss": 2.060},
        f"one {FFN}-wide FFN: the activated FFN of Hash and Switch (the paper's Dense column)"),
    Row("hash", "configs/hash.py", {**TABLE, **experts(0, 16, 1, 1)}, {"Pile loss": 1.932},
        f"16 x {FFN}, top-1 by token-id hash"),
    Row("switch", "configs/switch.py", {**TABLE, **experts(0, 16, 1, 1), "model.moe.dispatch": "dropless"},
        {"Pile loss": 1.881}, f"16 x {FFN}, top-1, dropless"),
    Row("gshard", "configs/gshard.py", {**TABLE, **experts(0, 16, 1, 2)}, {"Pile loss": 1.867},
        f"16 x {FFN}, top-2, dropless"),
    Row("deepseekmoe", "configs/deepseekmoe.py:tiny", {**TABLE, **experts(1, 63, 4, 7)}, {"Pile loss": 1.808},
        f"1 shared + 63 routed x {FFN // 4}, top-7"),
]
REFERENCE = "gshard"
SEEDS = 5  # the pilot: 3 seeds do not resolve DeepSeekMoE beats Dense at this budget, 5 do
SEEDS_PREREGISTERED = 3  # the pilot (these rows' dense, deepseekmoe runs) went to 5 after 3 left it unresolved
BUDGET = TABLE_BUDGET
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
