"""DeepSeekMoE Figure 3 at the tiny width: GShard -> + shared expert -> + fine-grained m=2 -> m=4, at constant total
expert parameters (16 standard FFNs per MoE layer) and constant activated expert parameters (2 standard FFNs).

Every row is configs/deepseekmoe.py:tiny (4 layers, d_model 128, one standard FFN = a 352-wide SwiGLU; softmax gate
without renormalisation, DeepSeekMoE expert-level balance loss alpha1 = 0.01, dropless; batch 32 x 128 tokens, LR
6e-3) on experiments.tables.CORPUS (the stdlib corpus in `bpe:8192` tokens, model.vocab_size 8192; see
deepseekmoe_table1.py) with only the expert layout changed, so each step of the figure changes one thing:
* gshard: 0 shared + 16 x 352, top-2.
* shared: 1 shared + 15 x 352, top-1.
* fine_m2: 1 shared + 31 x 176, top-3.
* fine_m4: 1 shared + 63 x 88, top-7 (= configs/deepseekmoe.py:tiny).
Choice: the gshard arm keeps DeepSeekMoE's router (no renormalisation of the top-2 weights, DeepSeekMoE's loss), so
it differs from Table 1's gshard row (configs/gshard.py: renormalised, Switch loss). Renormalising would also break
the +shared arm: a renormalised top-1 weight is always 1, and its router would get no gradient from the LM loss.

The paper gives Figure 3 as bars normalised to the best arm per benchmark (no absolute Pile loss), so the rows
carry no paper number. Read off Figure 3 of arXiv 2401.06066, TriviaQA goes from about 0.61 for GShard to 0.85
with the shared expert and 1.0 at m=4 (see docs/methods.md#deepseekmoe).

Budget: PENDING the pilot study of issue 20 (BUDGET_STATUS); it follows Table 1's. Until then: 150 steps x 32 x 128
= 614,400 BPE tokens per run, one evaluation at the end on 16 validation batches: Table 1's budget, so the fine_m4
row is the same command as Table 1's deepseekmoe row (same config, overrides and seeds) and
experiments/results/deepseekmoe_fig3.md can reuse those three runs instead of repeating them (copy the run
directories; the runner skips them as finished). Measured before the BPE default, on bytes, on the 2-core CPU: a
fine_m4 run took about 5-6 minutes with other work on the machine, the other rows 3-4 minutes; about 40 minutes for
the 9 new runs with --jobs 1. The 8,192-id output layer makes BPE steps slower; the pilot measures them again.

Claims (CLAIMS): each step of the figure lowers the loss (+shared beats GShard, m=2 beats +shared, m=4 beats m=2),
and m=4 beats GShard overall.
"""
from experiments.tables import BUDGET_PENDING, CORPUS, Claim, Row

TITLE = "DeepSeekMoE Figure 3 (tiny): GShard -> +shared expert -> +fine-grained m=2 -> m=4"
PAPER = ("Dai et al., DeepSeekMoE, ACL 2024, arXiv 2401.06066, Figure 3 (ablation of shared-expert isolation and "
         "fine-grained segmentation, 2B validation models; bars normalised to the best arm, no absolute numbers)")
EXPECTED = ("Validation loss falls at each step: GShard > +shared > m=2 > m=4. Expect small gaps at this scale "
            "(an independent 2B/10B-token reproduction found DeepSeekMoE only 0.012 BPB better than GShard).")
ROWS = [
    Row("gshard", "configs/deepseekmoe.py:tiny",
        {**CORPUS, "model.moe.num_shared": 0, "model.moe.num_experts": 16, "model.moe.expert_ffn": 352,
         "model.moe.top_k": 2},
        note="0 shared + 16 x 352, top-2"),
    Row("shared", "configs/deepseekmoe.py:tiny",
        {**CORPUS, "model.moe.num_shared": 1, "model.moe.num_experts": 15, "model.moe.expert_ffn": 352,
         "model.moe.top_k": 1},
        note="1 shared + 15 x 352, top-1"),
    Row("fine_m2", "configs/deepseekmoe.py:tiny",
        {**CORPUS, "model.moe.num_shared": 1, "model.moe.num_experts": 31, "model.moe.expert_ffn": 176,
         "model.moe.top_k": 3},
        note="1 shared + 31 x 176, top-3"),
    Row("fine_m4", "configs/deepseekmoe.py:tiny", CORPUS, note="1 shared + 63 x 88, top-7 (the tiny preset)"),
]
REFERENCE = "gshard"
BUDGET_STATUS = BUDGET_PENDING
BUDGET = {"train.steps": 150, "train.eval_every": 0, "train.log_every": 10, "data.eval_batches": 16,
          "checkpoint.every_steps": 50}
METRICS = ["val_loss", "train_maxvio", "train_tokens_per_s"]
CLAIMS = [
    Claim("+shared expert beats GShard", "shared", "gshard"),
    Claim("fine-grained m=2 beats +shared", "fine_m2", "shared"),
    Claim("fine-grained m=4 beats m=2", "fine_m4", "fine_m2"),
    Claim("DeepSeekMoE (m=4) beats GShard", "fine_m4", "gshard"),
]
