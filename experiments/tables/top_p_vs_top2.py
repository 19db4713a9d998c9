"""Dynamic top-p routing vs top-2 at the tables' width: validation loss and mean activated experts per token.

Both rows are configs/top_p.py at the tables' width (4 layers, d_model 64, 16 experts of one 176-wide SwiGLU, Switch
balance loss 1e-2, raw softmax probabilities as weights, dropless; batch 32 x 128 tokens, LR 6e-3, 30 warm-up steps)
on experiments.tables.CORPUS (the stdlib corpus in `bpe:8192` tokens, model.vocab_size 8192; see
deepseekmoe_table1.py):
* top_p: the fewest experts whose cumulative probability reaches p = 0.4 (at most 4), dynamic (entropy) loss 1e-4.
* top2: the same model and losses with a fixed top-2 router and no dynamic loss.

Budget: experiments.tables.TABLE_BUDGET, chosen by Table 1's pilot (deepseekmoe_table1.py): 600 steps x 32 x 128 =
2,457,600 BPE tokens per run, one evaluation at the end on 64 validation batches spread over the split. Measured:
13.7-23.9 min per run, every run beside another table's run on the 2-core machine; the table's 6 runs took 1 h 53 min
of wall time that way (experiments/results/top_p_vs_top2.md).

Claims (CLAIMS): top-p activates fewer experts per token than top-2 (paper: 1.76 at inference; here the final
evaluation's mean and the mean over training), and a lower validation loss (paper: +0.7% over top-2 on benchmarks;
'not resolved' on loss is what "similar loss" looks like at this scale, 'contradicted' means top-p is worse beyond
seed noise).
"""
from experiments.tables import TABLE, TABLE_BUDGET, Claim, Row, experts

TOP_P = {**TABLE, **experts(0, 16, 1, 4)}

TITLE = "Dynamic top-p (p = 0.4) vs top-2 routing (d_model 64, 16 experts): loss and activated experts"
PAPER = ("Huang et al., Harder Tasks Need More Experts: Dynamic Routing in MoE Models, ACL 2024, arXiv 2403.07652 "
         "(top-p vs top-2; 1.76 activated experts per token on average at inference)")
EXPECTED = ("Top-p(0.4) matches or beats top-2 in loss with fewer than 2 experts per token on average (paper: "
            "+0.7% average over top-2 on benchmarks with 1.76 experts per token); more experts in lower layers.")
ROWS = [
    Row("top2", "configs/top_p.py",
        {**TOP_P, "model.moe.router.kind": "topk", "model.moe.top_k": 2, "model.moe.entropy_loss_coef": 0.0},
        {"experts/token": 2.0}, "fixed top-2, no dynamic loss"),
    Row("top_p", "configs/top_p.py", TOP_P, {"experts/token": 1.76}, "top-p 0.4, at most 4 experts"),
]
REFERENCE = "top2"
BUDGET = TABLE_BUDGET
METRICS = ["val_loss", "experts_per_token", "train_experts_per_token", "train_maxvio"]
CLAIMS = [
    Claim("top-p activates fewer experts per token (evaluation)", "top_p", "top2", "experts_per_token"),
    Claim("top-p activates fewer experts per token (training)", "top_p", "top2", "train_experts_per_token"),
    Claim("top-p has a lower validation loss (paper: +0.7% over top-2 on benchmarks)", "top_p", "top2"),
]
