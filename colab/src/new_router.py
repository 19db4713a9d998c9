# %% [markdown]
# # Try a new router in ten lines
#
# A router is one function from router logits to a `moejax.moe.routers.Routing` (which experts each token
# goes to, with what weights). Register it under a name with what it needs from the layer, set
# `config.model.moe.router.kind` to that name, and train it beside the default top-k router with everything
# else equal. The contract, from `moejax/moe/routers.py`:
#
# ```python
# @routers.register(kind, needs_rng=False, needs_token_ids=False, needs_progress=False, ranks_by_score=False,
#                   renormalises=False, ids_depend_on_num_experts=False, null_experts=False, validate=None)
# router(logits [T, E] float32, cfg, ctx: RouterContext)
#     -> Routing(weights [T, k], experts [T, k] int32, probs [T, E], logits [T, E])
# ```
#
# The keywords are the router's facts (`RouterSpec`): what the layer must give it (`needs_*`), whether it ranks
# scores with `top_k` (so every routing intervention applies to it) and renormalises its weights, whether its ids
# depend on the number of experts (pruning and merging then refuse it), whether it handles null experts, and its
# own field checks. A name already registered is refused.
#
# `cfg` is the `model.moe` config section; `ctx.bias` the selection-only bias of aux-loss-free balancing,
# `ctx.progress` the fraction of training done (a traced scalar, given to routers registered with
# `needs_progress=True`; `None` in evaluation). `probs` feed the balance loss and the metrics; an expert id
# `>= E` marks a slot that computes nothing.

# %%
# Install moejax from its repository when it is not importable (Colab); a checkout installed with
# `pip install -e .` (or CI) already has it. The configs come with the package as `moejax.configs`.
import importlib.util
import subprocess
import sys

REPO_URL = "https://github.com/moejax/moejax"
if importlib.util.find_spec("moejax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"], check=True)

# %%
import jax

platform = jax.default_backend()  # 'tpu', 'gpu' or 'cpu': the only platform-specific part is the budget below
print(f"platform: {platform}")
print(jax.devices())

# %% tags=["parameters"]
import os

# 'ci': a few steps of a small model (tests/experiments/test_notebooks.py); 'cpu': minutes on a laptop CPU;
# 'full': the preset's own budget, for a TPU or GPU runtime.
BUDGET = os.environ.get("MOEJAX_NOTEBOOK_BUDGET") or ("cpu" if platform == "cpu" else "full")

WORKDIR = "runs/colab_new_router"  # one run per router below it; deleted and created fresh

# %% [markdown]
# ## The idea: top-k with an annealed temperature
#
# Select and weight experts by `softmax(logits / τ)` with τ annealed from `router.temperature` at the start
# of training to 1 at the end: early on the scores are flatter, so the balance loss sees (and spreads) more of
# the experts before the router commits. Evaluation uses τ = 1. Registering it is all the plumbing there is;
# do it before training, since the config is checked against the registry.

# %%
import jax
import jax.numpy as jnp

from moejax.moe import routers


@routers.register("annealed_topk", needs_progress=True, ranks_by_score=True, renormalises=True)
def annealed_topk(logits, cfg, ctx):
    """Top-k of softmax(logits / tau), tau from router.temperature down to 1 over training; renormalised."""
    start = cfg.router.get("temperature", 2.0)
    tau = 1.0 if ctx.progress is None else start + (1.0 - start) * ctx.progress
    probs = jax.nn.softmax(logits / tau, axis=-1)
    choice = routers.with_bias(probs, ctx.bias)
    _, experts = jax.lax.top_k(choice, cfg.top_k)
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    weights = weights / weights.sum(-1, keepdims=True)
    return routers.Routing(weights=weights, experts=experts.astype(jnp.int32), probs=probs, logits=logits)


# %% [markdown]
# A quick check on random logits before spending compute: shapes, weights summing to 1, and the temperature
# flattening the scores (higher entropy) at the start of training.

# %%
from moejax.configs import base

cfg = base.moe_config()
cfg.router.kind = "annealed_topk"
cfg.router.temperature = 2.0  # a new field for the new router: ConfigDicts accept it, config.json records it
logits = jax.random.normal(jax.random.key(0), (6, cfg.num_experts))
for progress in (0.0, 1.0):
    r = routers.route(logits, cfg, train=True, progress=jnp.float32(progress))
    entropy = float(-(r.probs * jnp.log(r.probs)).sum(-1).mean())
    print(f"progress {progress}: experts {r.experts.shape}, weights sum {r.weights.sum(-1)}, "
          f"router entropy {entropy:.3f}")
assert r.experts.shape == (6, cfg.top_k) and jnp.allclose(r.weights.sum(-1), 1.0)

# %% [markdown]
# ## Train both routers
#
# The same config and seed for both; only `router.kind` differs.

# %%
import pathlib
import shutil

from moejax.configs import deepseekmoe

from moejax.training import loop


def make_config(kind: str):
    config = deepseekmoe.get_config("tiny")
    if BUDGET == "cpu":  # about 2 minutes per router on 2 CPU cores
        config.model.moe.update(num_experts=16, top_k=4, expert_ffn=88)
        config.train.update(steps=80, batch_size=16, warmup_steps=10, eval_every=40, log_every=5)
    elif BUDGET == "ci":
        config.model.update(d_model=64, num_layers=2, ffn_dim=128)
        config.model.moe.update(num_experts=16, top_k=4, expert_ffn=32)
        config.train.update(steps=8, batch_size=8, seq_len=64, warmup_steps=2, log_every=2, eval_every=0)
        config.data.eval_batches = 1
    config.checkpoint.every_steps = 0
    config.model.moe.router.kind = kind
    if kind == "annealed_topk":
        config.model.moe.router.temperature = 2.0
    return config


shutil.rmtree(WORKDIR, ignore_errors=True)
summaries = {}
for kind in ("topk", "annealed_topk"):
    print(f"--- router {kind}")
    summaries[kind] = loop.train_and_evaluate(make_config(kind), pathlib.Path(WORKDIR) / kind)

# %% [markdown]
# ## Compare loss and balance
#
# Loss curves from each run's `metrics.jsonl`; balance as the max/mean expert load of each log interval
# (1 is perfectly balanced), averaged over the MoE layers, and per layer at the final evaluation
# (`summary.json`).

# %%
import json

import matplotlib.pyplot as plt
import numpy as np


def records(kind: str) -> list[dict]:
    lines = (pathlib.Path(WORKDIR) / kind / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


fig, (loss_ax, balance_ax, final_ax) = plt.subplots(1, 3, figsize=(16, 4))
for kind, summary in summaries.items():
    history = records(kind)
    trained = [r for r in history if r["kind"] == "train"]
    steps = [r["step"] for r in trained]
    line, = loss_ax.plot(steps, [r["loss"] for r in trained], label=f"{kind} (train)")
    evals = [r for r in history if r["kind"] == "eval"]
    loss_ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o", color=line.get_color(),
                 label=f"{kind} (validation)")
    layers = list(summary["moe_layers"])
    balance = [np.mean([r[f"{layer}_max_over_mean_load"] for layer in layers]) for r in trained]
    balance_ax.plot(steps, balance, label=kind)
    offset = 0.2 if kind == "annealed_topk" else -0.2
    final_ax.bar(np.arange(len(layers)) + offset, [summary["moe_layers"][layer]["max_over_mean_load"]
                                                   for layer in layers], width=0.4, label=kind)
final_ax.set_xticks(range(len(layers)), layers)
for ax in (balance_ax, final_ax):
    ax.axhline(1.0, color="gray", linestyle=":")  # perfectly balanced
loss_ax.set(xlabel="step", ylabel="loss (nats per byte)", title="loss")
balance_ax.set(xlabel="step", ylabel="max / mean expert load", title="balance in training (layer mean)")
final_ax.set(ylabel="max / mean expert load", title="balance at the final evaluation")
for ax in (loss_ax, balance_ax, final_ax):
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
plt.show()

# %%
from IPython.display import Markdown, display

rows = []
for kind, summary in summaries.items():
    loads = [stats["max_over_mean_load"] for stats in summary["moe_layers"].values()]
    rows.append(f"| `{kind}` | {summary['val_loss']:.4f} | {np.mean(loads):.3f} | {max(loads):.3f} |")
display(Markdown("| router | validation loss (nats/byte) | max/mean load, layer mean | worst layer |\n"
                 "|---|---|---|---|\n" + "\n".join(rows)))

# %% [markdown]
# One seed at a small budget is a smoke test of an idea, not a result: for a claim, add seeds and steps, or
# put the router in an ablation table (`experiments/reproduce.py`; see `reproduce_ablation.ipynb`).
