"""DeepSeekMoE Figure 3 at the tables' width: GShard -> + shared expert -> + fine-grained m=2 -> m=4, at constant total
expert parameters (16 standard FFNs per MoE layer) and constant activated expert parameters (2 standard FFNs).

Every row is configs/deepseekmoe.py:tiny (softmax gate without renormalisation, DeepSeekMoE expert-level balance
loss alpha1 = 0.01, dropless; batch 32 x 128 tokens, LR 6e-3) at the tables' width (experiments.tables.TABLE: 4
layers, d_model 64, one standard FFN = a 176-wide SwiGLU) on experiments.tables.CORPUS (the stdlib corpus in
`bpe:8192` tokens, model.vocab_size 8192; see deepseekmoe_table1.py) with only the expert layout changed, so each step
of the figure changes one thing:
* gshard: 0 shared + 16 x 176, top-2.
* shared: 1 shared + 15 x 176, top-1.
* fine_m2: 1 shared + 31 x 88, top-3.
* fine_m4: 1 shared + 63 x 44, top-7 (Table 1's deepseekmoe row).
Choice: the gshard arm keeps DeepSeekMoE's router (no renormalisation of the top-2 weights, DeepSeekMoE's loss), so
it differs from Table 1's gshard row (configs/gshard.py: renormalised, Switch loss). Renormalising would also break
the +shared arm: a renormalised top-1 weight is always 1, and its router would get no gradient from the LM loss.

The paper gives Figure 3 as bars normalised to the best arm per benchmark (no absolute Pile loss), so the rows
carry no paper number. Read off Figure 3 of arXiv 2401.06066, TriviaQA goes from about 0.61 for GShard to 0.85
with the shared expert and 1.0 at m=4 (see docs/methods.md#deepseekmoe).

Budget: experiments.tables.TABLE_BUDGET, chosen by Table 1's pilot (deepseekmoe_table1.py): 600 steps x 32 x 128 =
2,457,600 BPE tokens per run, one evaluation at the end on 64 validation batches spread over the split. The fine_m4
row is the same command as Table 1's deepseekmoe row (same config, overrides and seeds), so its runs can be reused
instead of repeated: copy Table 1's deepseekmoe/seed<k> directories to fine_m4/seed<k> (the runner skips them as
finished). The gshard row computes exactly what top_p_vs_top2's top2 row computes: the same model, and its
DeepSeekMoE expert-level loss is the same function as the Switch loss there (moejax.moe.losses.expert_balance_loss;
the names differ only in the device-level term, off here). Runs of one reproduce the other bit for bit: seeds 0 and
1, trained under both names, gave the same validation loss to the last digit (4.502387523651123, 4.4966020584106445).
So gshard seed 2 was copied from top_p_vs_top2's top2/seed2 instead of repeated; its config.json says
`balance_loss=switch`.

Measured: about 13-14 min per run with another run beside it on the 2-core machine (fine_m4 alone, as Table 1's
deepseekmoe row: 9.4-11.4 min).

Claims (CLAIMS): each step of the figure lowers the loss (+shared beats GShard, m=2 beats +shared, m=4 beats m=2),
and m=4 beats GShard overall.
"""
from experiments.tables import FFN, TABLE, TABLE_BUDGET, Claim, Row, experts

TITLE = "DeepSeekMoE Figure 3 (d_model 64): GShard -> +shared expert -> +fine-grained m=2 -> m=4"
PAPER = ("Dai et al., DeepSeekMoE, ACL 2024, arXiv 2401.06066, Figure 3 (ablation of shared-expert isolation and "
         "fine-grained segmentation, 2B validation models; bars normalised to the best arm, no absolute numbers)")
EXPECTED = ("Validation loss falls at each step: GShard > +shared > m=2 > m=4. Expect small gaps at this scale "
            "(an independent 2B/10B-token reproduction found DeepSeekMoE only 0.012 BPB better than GShard).")
ROWS = [
    Row("gshard", "configs/deepseekmoe.py:tiny", {**TABLE, **experts(0, 16, 1, 2)},
        note=f"0 shared + 16 x {FFN}, top-2"),
    Row("shared", "configs/deepseekmoe.py:tiny", {**TABLE, **experts(1, 15, 1, 1)},
        note=f"1 shared + 15 x {FFN}, top-1"),
    Row("fine_m2", "configs/deepseekmoe.py:tiny", {**TABLE, **experts(1, 31, 2, 3)},
        note=f"1 shared + 31 x {FFN // 2}, top-3"),
    Row("fine_m4", "configs/deepseekmoe.py:tiny", {**TABLE, **experts(1, 63, 4, 7)},
        note=f"1 shared + 63 x {FFN // 4}, top-7 (Table 1's deepseekmoe row)"),
]
REFERENCE = "gshard"
BUDGET = TABLE_BUDGET
METRICS = ["val_loss", "train_maxvio", "train_tokens_per_s"]
CLAIMS = [
    Claim("+shared expert beats GShard", "shared", "gshard"),
    Claim("fine-grained m=2 beats +shared", "fine_m2", "shared"),
    Claim("fine-grained m=4 beats m=2", "fine_m4", "fine_m2"),
    Claim("DeepSeekMoE (m=4) beats GShard", "fine_m4", "gshard"),
]
