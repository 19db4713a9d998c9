"""DeepSeekMoE (Dai et al., 2024, arXiv 2401.06066): fine-grained experts plus shared-expert isolation.

Presets (``--config=configs/deepseekmoe.py:<preset>``):
* ``tiny`` (default): the m=4 arm at the width a 2-core CPU trains in under 10 minutes to a validation loss below
  1.5 nats per byte on the embedded corpus: 4 layers, d_model 128, 4 heads with RMSNorm on queries and keys
  (qk_norm: 0.11-0.14 nats lower than without it at LR 6e-3, and far less seed-dependent), 1 shared + 63 routed
  experts of width 88 (a quarter of a 352-wide SwiGLU FFN), top-7, byte-level vocabulary, alpha1 = 0.01, no token
  dropping, softmax gate without renormalisation (the released 16B's norm_topk_prob=false); 400 steps of
  32 x 128 tokens (1.6M tokens), LR 6e-3 with 30 warm-up steps and cosine decay. Seed 0 reaches 1.471 on
  validation windows spread over the split (seeds 0/1/2/3: 1.455/1.472/1.466/1.481 on its first 8 batches).
* ``small``: the same arm at the small shapes (docs/methods.md#tiny-and-small-shapes), which dense.py, switch.py,
  gshard.py and the other paper configs share (matched total and activated parameters, DeepSeekMoE Table 1 / Figure 3):
  d_model 256, 1 shared + 63 routed experts of width 176 (a quarter of a 704-wide FFN), 150 steps of 16 x 256.
* ``2b``: the paper's validation model (section 4, Table 1 column DeepSeekMoE): 9 layers, d_model 1280, 10 heads,
  1 shared + 63 routed experts of width 853 (a quarter of the back-computed 3413-wide FFN), top-7, alpha1 0.01,
  LR 1.08e-3 with 2K warm-up steps and x0.316 at 80% and 90% of 25,000 steps, batch 2048 x 2048, init std 0.006.
  The paper uses an 8K BPE vocabulary; the presets keep the byte tokenizer (vocab_size 256, the default corpus);
  `--config.data.tokenizer=bpe:8192 --config.model.vocab_size=8192` gives the paper's (the ablation tables use it).
* ``16b``: the released DeepSeekMoE 16B: 28 layers, d_model 2048, 16 heads, 2 shared + 64 routed experts of
  width 1408, top-6, first layer dense (FFN 10944), alpha1 0.001, LR 4.2e-4, 106,449 steps of 4608 x 4096.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("tiny", "small", "2b", "16b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="tiny")
    config = base.get_config()
    model, moe, train = config.model, config.model.moe, config.train
    moe.update(num_shared=1, balance_loss="deepseek", balance_coef=0.01, dispatch="dropless")
    moe.router.update(score="softmax", softmax_before_topk=True, norm_topk_prob=False)
    if preset == "tiny":
        model.update(d_model=128, num_layers=4, num_heads=4, ffn_dim=352, qk_norm=True)
        moe.update(num_experts=63, top_k=7, expert_ffn=88)
        train.update(steps=400, batch_size=32, seq_len=128, learning_rate=6e-3, warmup_steps=30, eval_every=100)
        config.checkpoint.every_steps = 100
    elif preset == "small":
        model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
        moe.update(num_experts=63, top_k=7, expert_ffn=176)
    elif preset == "2b":
        model.update(d_model=1280, num_layers=9, num_heads=10, ffn_dim=3413, init_std=0.006, scan_layers=True,
                     remat=True, dtype="bfloat16")
        moe.update(num_experts=63, top_k=7, expert_ffn=853)
        train.update(steps=25_000, batch_size=2048, seq_len=2048, learning_rate=1.08e-3, warmup_steps=2000,
                     schedule="step", eval_every=1000)
        config.checkpoint.every_steps = 1000
    else:  # "16b"
        model.update(d_model=2048, num_layers=28, num_heads=16, ffn_dim=10944, first_dense_layers=1,
                     init_std=0.006, scan_layers=True, remat=True, dtype="bfloat16")
        moe.update(num_experts=64, top_k=6, expert_ffn=1408, num_shared=2, balance_coef=0.001)
        train.update(steps=106_449, batch_size=4608, seq_len=4096, learning_rate=4.2e-4, warmup_steps=2000,
                     schedule="step", eval_every=1000)
        config.checkpoint.every_steps = 1000
    return config
