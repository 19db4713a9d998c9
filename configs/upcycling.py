"""Sparse upcycling (Komatsuzaki et al., ICLR 2023, arXiv 2212.05055) at DeepSeekMoE-small width, with the
fine-grained splitting of Innovator (Liao et al., 2025, arXiv 2507.18671) as preset ``fine``
(docs/methods.md#sparse-upcycling). Runs on its own: with no dense checkpoint given (upcycle.dense_checkpoint='') it
first trains the dense model (4 layers, d_model 256, SwiGLU FFN 704) for upcycle.dense_steps = 100 steps in
<workdir>/dense, then builds the MoE from it and trains that for train.steps. The log and metrics.jsonl hold an
evaluation at step 0, before any MoE step, beside the dense model's final loss. Reproduces the comparison upcycled
MoE vs dense continued training at equal extra steps (configs/dense.py --config.model.ffn_dim=704 from the same
checkpoint) and vs an MoE trained from scratch.

Presets:
* ``coarse`` (default): every FFN becomes 8 copies of itself, top-2 with the two weights renormalised, router at
  random, Switch balance loss 0.01, no token dropping. Renormalised weights over identical experts reproduce the
  dense FFN, so the step-0 loss equals the dense model's (the paper uses raw softmax weights and expert capacity;
  here the function is preserved exactly, and only training makes the copies diverge).
* ``fine``: Innovator's recipe without its domain stages: the FFN cut into m = 4 slices of 176, 8 copies of each
  (32 routed experts), top-4, and a shared expert that takes the whole dense FFN (num_shared 4 x 176 = 704).
* ``innovator``: ``fine`` with Innovator's staged training (docs/methods.md#innovators-staged-upcycling): the
  dense stage trains on the general corpus (``stdlib``, whose build leaves test files out); the MoE run's first
  ``train.router_warmup_steps`` = 20 steps train the routers alone on the domain corpus (this Python's standard-library
  test files, ``data.mix``), then every parameter trains on general and domain data 1:1 (``data.mix_stages``).
  Evaluation reads the general corpus; evaluate the domain with ``python -m moejax.evaluate --data=<the mix corpus>``.

Point upcycle.dense_checkpoint at the workdir of any finished dense run of the same shapes to skip the dense stage.
"""
import sysconfig

import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("coarse", "fine", "innovator")
ROUTER_WARMUP_STEPS = 20  # innovator: the routing warm-up, then general and domain data 1:1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="coarse")
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=704)
    config.upcycle.update(enabled=True, dense_checkpoint="", dense_steps=100, router_init="normal")
    moe = config.model.moe
    moe.update(dispatch="dropless", balance_loss="switch", balance_coef=0.01)
    if preset == "coarse":
        config.upcycle.granularity = 1
        moe.update(num_experts=8, top_k=2, expert_ffn=704)
        moe.router.update(score="softmax", norm_topk_prob=True)
    else:  # "fine", "innovator"
        config.upcycle.granularity = 4
        moe.update(num_experts=32, top_k=4, expert_ffn=176, num_shared=4)
        moe.router.update(score="softmax", norm_topk_prob=False)
    if preset == "innovator":
        domain = f"text:{sysconfig.get_paths()['stdlib']}/test/test_*.py"
        config.data.update(name="stdlib", mix=(domain,),
                           mix_stages=((ROUTER_WARMUP_STEPS, 0.0, 1.0), (config.train.steps, 1.0, 1.0)))
        config.train.router_warmup_steps = ROUTER_WARMUP_STEPS
    return config
