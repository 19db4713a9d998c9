# %% [markdown]
# # moejax quickstart: train a small DeepSeekMoE
#
# Trains `configs/deepseekmoe.py` (the `tiny` preset: 1 shared + 63 routed experts, top-7) on the embedded
# corpus (the Python standard library's own source files, byte-level; nothing is downloaded), plots its loss
# and expert load, and shows which experts the trained router sends a piece of text to.
#
# On Colab pick a TPU or GPU runtime (*Runtime > Change runtime type*) for the preset's full budget; on a CPU
# runtime the notebook trains a shorter run.

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

WORKDIR = "runs/colab_quickstart"  # deleted and created fresh below
TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"

# %% [markdown]
# ## The config
#
# `get_config("tiny")` returns an `ml_collections.ConfigDict`; every field and its default is documented in
# `configs/base.py`. The budget changes only how long it trains (and, for `ci`, the width).

# %%
from moejax.configs import deepseekmoe

config = deepseekmoe.get_config("tiny")
if BUDGET == "cpu":  # a quarter of the preset's 400 steps: about 3 minutes on 2 CPU cores
    config.train.update(steps=100, eval_every=50, log_every=10)
elif BUDGET == "ci":
    config.model.update(d_model=64, num_layers=2, ffn_dim=128)
    config.model.moe.update(num_experts=16, top_k=4, expert_ffn=32)
    config.train.update(steps=10, batch_size=8, seq_len=64, warmup_steps=2, log_every=2, eval_every=0)
    config.data.eval_batches = 1
config.checkpoint.every_steps = 0  # one checkpoint, at the end
t = config.train
m = config.model
print(f"budget {BUDGET}: {t.steps} steps of {t.batch_size} x {t.seq_len} bytes; {m.num_layers} layers of "
      f"width {m.d_model}, {m.moe.num_shared} shared + {m.moe.num_experts} routed experts, top-{m.moe.top_k}")

# %% [markdown]
# ## Train
#
# `train_and_evaluate` is what `python -m moejax.main` runs: it prints a line every `train.log_every` steps,
# evaluates, writes `metrics.jsonl`, TensorBoard events, an orbax checkpoint and `summary.json` into the
# workdir, and returns the summary. Running it again on the same workdir would resume the run; we start
# fresh.

# %%
import shutil

from moejax.training import loop

shutil.rmtree(WORKDIR, ignore_errors=True)
summary = loop.train_and_evaluate(config, WORKDIR)

# %% [markdown]
# ## Loss curve
#
# `metrics.jsonl` holds one JSON object per log step (`"kind": "train"`) and per evaluation (`"eval"`).

# %%
import json
import math
import pathlib

import matplotlib.pyplot as plt

records = [json.loads(line) for line in (pathlib.Path(WORKDIR) / "metrics.jsonl").read_text().splitlines()]
train_records = [r for r in records if r["kind"] == "train"]
eval_records = [r for r in records if r["kind"] == "eval"]

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], label="train")
ax.plot([r["step"] for r in eval_records], [r["loss"] for r in eval_records], "o", label="validation")
ax.axhline(math.log(256), color="gray", linestyle=":", label="uniform over bytes")
ax.set(xlabel="step", ylabel="loss (nats per byte)", title="deepseekmoe:tiny")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
print(f"validation loss {summary['val_loss']:.3f} nats/byte, {summary['val_bits_per_byte']:.3f} bits/byte")

# %% [markdown]
# ## Expert load per layer
#
# Each train record's `expert_load` holds, per MoE layer, the fraction of the routed slots every expert got
# over that log interval (a column sums to 1; perfectly balanced is 1/E everywhere). The DeepSeekMoE balance
# loss pushes the columns towards uniform.

# %%
import numpy as np

layers = list(train_records[-1]["expert_load"])
fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.8), squeeze=False)
for ax, layer in zip(axes[0], layers, strict=True):
    loads = np.array([r["expert_load"][layer] for r in train_records]).T  # [experts, log steps]
    image = ax.imshow(loads, aspect="auto", origin="lower", interpolation="nearest", vmin=0,
                      extent=(0.5, len(train_records) + 0.5, -0.5, loads.shape[0] - 0.5))
    ax.set_xticks(range(1, len(train_records) + 1), [r["step"] for r in train_records])
    ax.xaxis.set_major_locator(plt.MaxNLocator(6, integer=True))
    ax.set(title=f"{layer} (uniform = {1 / loads.shape[0]:.3f})", xlabel="log step", ylabel="expert")
    fig.colorbar(image, ax=ax)
fig.tight_layout()
plt.show()
for layer, stats in summary["moe_layers"].items():
    print(f"{layer}: max/mean expert load {stats['max_over_mean_load']:.2f} at the final evaluation")

# %% [markdown]
# ## Which experts does a piece of text go to?
#
# `load_checkpoint` reads the run's newest checkpoint as numpy arrays (`params`, `moe_state`, ...). We run the
# model on the bytes of `TEXT` and capture the first MoE layer's router logits with Flax's
# `capture_intermediates` (the router is the `RouterKernel` module of `moejax/moe/layer.py`), then route them
# with the same function the layer uses, `moejax.moe.routers.route`, including the layer's selection bias.

# %%
import jax
import jax.numpy as jnp
from IPython.display import Markdown, display

from moejax import model
from moejax.moe import layer as moe_layer
from moejax.moe import routers, stats
from moejax.training import checkpoint

state, meta = checkpoint.load_checkpoint(WORKDIR)
print(f"checkpoint of step {meta['step']}")
tokens = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)[None]  # [1, S]: the bytes are the tokens
# as jax arrays: the numpy arrays of load_checkpoint cannot be indexed by the experts' traced loop
variables = jax.tree.map(jnp.asarray, {"params": state["params"], "moe_state": state["moe_state"]})


@jax.jit
def forward(variables, tokens):
    """The sown 'moe_aux' statistics and the router logits ('intermediates') of a forward pass."""
    _, collections = model.Transformer(config.model).apply(
        variables, tokens, mutable=["moe_aux", "intermediates"],
        capture_intermediates=lambda module, method: isinstance(module, moe_layer.RouterKernel))
    return collections


collections = forward(variables, tokens)

layer = f"layers_{model.moe_layers(config.model)[0]}"
router_logits = collections["intermediates"][layer]["ffn"]["router"]["__call__"][0]  # [S, E]
bias = variables["moe_state"][layer]["ffn"]["router_bias"]
route = routers.route(router_logits, config.model.moe, bias=bias)
experts, weights = np.asarray(route.experts), np.asarray(route.weights)  # [S, k] each

# the same forward pass counted the tokens per expert itself: our routing must agree with it
sown = stats.collect(collections["moe_aux"])[(layer, "ffn")].tokens_per_expert
np.testing.assert_array_equal(np.bincount(experts.ravel(), minlength=config.model.moe.num_experts), sown)


def show(byte: int) -> str:
    return {ord(" "): "␣", ord("\n"): "↵", ord("|"): "¦"}.get(byte, chr(byte))


rows = [f"| `{show(b)}` | " + ", ".join(f"{e} ({w:.2f})" for e, w in zip(ids, ws, strict=True)) + " |"
        for b, ids, ws in zip(tokens[0][:20], experts[:20], weights[:20], strict=True)]
display(Markdown(f"**{layer}**: the first 20 bytes of `TEXT` and their experts (combine weight)\n\n"
                 "| byte | experts |\n|---|---|\n" + "\n".join(rows)))

# %%
probs = np.asarray(route.probs)[:48]  # [tokens, E] router probabilities of the first 48 bytes
fig, ax = plt.subplots(figsize=(12, 4.5))
image = ax.imshow(probs.T, aspect="auto", origin="lower", interpolation="nearest", cmap="Blues")
positions = np.repeat(np.arange(len(probs)), experts.shape[1])
ax.scatter(positions, experts[:48].ravel(), s=6, c="tab:red")
ax.set_xticks(range(len(probs)), [show(b) for b in tokens[0][:48]])
ax.set(xlabel="byte of TEXT", ylabel="expert",
       title=f"{layer}: router probabilities (blue) and the top-{experts.shape[1]} experts (red dots)")
fig.colorbar(image, ax=ax)
plt.show()

# %% [markdown]
# ## What does the model write?
#
# `moejax.load` opens the run (its config and newest checkpoint) and `moejax.generate.generate` continues a
# prompt: one prefill pass fills a KV cache, then a compiled loop decodes a token per step (the MoE layers
# dropless). Greedy first, then three samples at temperature 0.8 with nucleus 0.95. A model this small
# trained this briefly writes Python-shaped bytes, not programs; the same call works on any checkpoint
# `moejax.load` opens, a transformers directory included (`python -m moejax.generate` does it from a shell).

# %%
import moejax
from moejax import generate

config, variables = moejax.load(WORKDIR)
prompt = np.frombuffer(b"def ", np.uint8).astype(np.int32)[None]
greedy = generate.generate(config, variables, prompt, max_new_tokens=120, eos_id=0)
samples = generate.generate(config, variables, np.repeat(prompt, 3, axis=0), max_new_tokens=120,
                            temperature=0.8, top_p=0.95, rng=jax.random.key(0), eos_id=0)
for name, row in [("greedy", greedy[0])] + [(f"sample {i}", r) for i, r in enumerate(samples)]:
    text = bytes(int(t) for t in row if t).decode("utf-8", errors="replace")
    print(f"--- {name} ---\n{text}\n")
