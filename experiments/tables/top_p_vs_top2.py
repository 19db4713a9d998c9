"""Dynamic top-p routing vs top-2 at the tiny width: validation loss and mean activated experts per token.

Both rows are configs/top_p.py at the tiny width (4 layers, d_model 128, 16 experts of one 352-wide SwiGLU, Switch
balance loss 1e-2, raw softmax probabilities as weights, dropless; batch 32 x 128 tokens, LR 6e-3, 30 warm-up steps)
on experiments.tables.CORPUS (the stdlib corpus in `bpe:8192` tokens, model.vocab_size 8192; see
deepseekmoe_table1.py):
* top_p: the fewest experts whose cumulative probability reaches p = 0.4 (at most 4), dynamic (entropy) loss 1e-4.
* top2: the same model and losses with a fixed top-2 router and no dynamic loss.

Budget: PENDING the pilot study of issue 20 (BUDGET_STATUS). Until then: 300 steps x 32 x 128 = 1,228,800 BPE tokens
per run, one evaluation at the end on 16 validation batches. Measured before the BPE default, on bytes, on the 2-core
CPU: the slowest row of the other tables (deepseekmoe m=4) took 1.70 s/step plus 45 s per run with another job
sharing the cores; at that speed the table (2 rows x 3 seeds, --jobs 1) would take about 55 minutes. These rows were
never timed: top-p uses at most 4 experts of 352 per token (up to twice m=4's activated width), and the 8,192-id
output layer makes BPE steps slower; the pilot measures them.

Claims (CLAIMS): top-p activates fewer experts per token than top-2 (paper: 1.76 at inference; here the final
evaluation's mean and the mean over training), and a lower validation loss (paper: +0.7% over top-2 on benchmarks;
'not resolved' on loss is what "similar loss" looks like at this scale, 'contradicted' means top-p is worse beyond
seed noise).
"""
from experiments.tables import BUDGET_PENDING, TINY, Claim, Row

TOP_P = {**TINY, "model.moe.expert_ffn": 352}

TITLE = "Dynamic top-p (p = 0.4) vs top-2 routing (tiny, 16 experts): loss and activated experts"
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
BUDGET_STATUS = BUDGET_PENDING
BUDGET = {"train.steps": 300, "train.eval_every": 0, "train.log_every": 10, "data.eval_batches": 16,
          "checkpoint.every_steps": 100}
METRICS = ["val_loss", "experts_per_token", "train_experts_per_token", "train_maxvio"]
CLAIMS = [
    Claim("top-p activates fewer experts per token (evaluation)", "top_p", "top2", "experts_per_token"),
    Claim("top-p activates fewer experts per token (training)", "top_p", "top2", "train_experts_per_token"),
    Claim("top-p has a lower validation loss (paper: +0.7% over top-2 on benchmarks)", "top_p", "top2"),
]
