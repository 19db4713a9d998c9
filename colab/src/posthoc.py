# %% [markdown]
# # Post-hoc routing: trace, analyse and steer a trained MoE model
#
# Everything here reads a trained model as it is, without retraining or editing model code
# (`moejax.posthoc`, docs/posthoc.md): record which experts every token of a corpus is routed to (a routing
# trace), plot expert load, inter-layer affinity and local routing consistency, find the experts most
# associated with a Python keyword (normalised PMI, as RICE does for reasoning markers), silence or reinforce
# them with a routing intervention and measure the effect with `moejax.evaluate`, and decode with and without
# the intervention and with self-contrast decoding (SCMoE).
#
# The notebook trains a small DeepSeekMoE first (the `quickstart` recipe); set `CHECKPOINT` to analyse a run
# you already have or a transformers directory instead (`moejax.load` opens both). On a CPU runtime the
# training is short, so the routing it shows is young.

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

WORKDIR = "runs/colab_posthoc"  # the trained model and the trace; deleted and created fresh
CHECKPOINT = ""  # a moejax workdir or a transformers directory to analyse instead of training one
KEYWORD = "def"  # the marker whose experts are steered (the first of KEYWORDS that occurs if it does not)
KEYWORDS = ("def", "return", "self", "import", "if", "in")

# %% [markdown]
# ## The model
#
# The `ci` budget trains a tiny model for a few steps (the numbers mean nothing; it tests the path), `cpu`
# the DeepSeekMoE `tiny` preset for 100 steps (about 3 minutes on 2 CPU cores), `full` its own 400 steps.

# %%
import pathlib
import shutil

import jax
import numpy as np
from moejax.configs import deepseekmoe

import moejax
from moejax.training import loop

# per budget: (trace batches, evaluation batches, new tokens per sample)
TRACE_BATCHES, EVAL_BATCHES, NEW_TOKENS = {"ci": (4, 2, 24), "cpu": (8, 4, 120), "full": (32, 8, 200)}[BUDGET]
shutil.rmtree(WORKDIR, ignore_errors=True)
if CHECKPOINT:
    path = pathlib.Path(CHECKPOINT)
else:
    config = deepseekmoe.get_config("tiny")
    if BUDGET == "cpu":
        config.train.update(steps=100, eval_every=50, log_every=10)
    elif BUDGET == "ci":
        config.model.update(d_model=64, num_layers=2, ffn_dim=128)
        config.model.moe.update(num_experts=8, top_k=2, expert_ffn=32)
        config.train.update(steps=4, batch_size=8, seq_len=64, warmup_steps=1, log_every=2, eval_every=0)
        config.data.eval_batches = 1
    config.checkpoint.every_steps = 0
    path = pathlib.Path(WORKDIR) / "model"
    loop.train_and_evaluate(config, path)
config, variables = moejax.load(path)
m = config.model
print(f"{path}: {m.num_layers} layers, {m.moe.num_shared} shared + {m.moe.num_experts} routed experts, "
      f"top-{m.moe.top_k}, router {m.moe.router.kind}")

# %% [markdown]
# ## Record a routing trace
#
# The validation split, read as `python -m moejax.evaluate` reads it (the model's tokenizer, the run's batch
# shape), cut in two: the first `TRACE_BATCHES` batches are traced (and choose the experts to steer), the
# next `EVAL_BATCHES` are evaluated, so steering is never measured on the bytes it was chosen on.
# `moejax.posthoc.record` runs the model under `jax.jit` batch by batch and streams, per token and MoE layer,
# the selected experts, their gate weights and (`with_scores`) the router probabilities to a directory;
# `read_trace` opens it memory-mapped. `python -m moejax.posthoc trace` does the same from a shell.

# %%
import ml_collections

from moejax import data
from moejax.data import tokenizers
from moejax.posthoc import capture, read_trace, trace_report

data_config = ml_collections.ConfigDict(config.to_dict())
data_config.data.eval_batches = TRACE_BATCHES + EVAL_BATCHES
windows = data.eval_batches(data_config)  # [B, S + 1] each: inputs and next-token targets
trace_inputs = [np.asarray(w)[:, :-1] for w in windows[:TRACE_BATCHES]]
eval_windows = windows[TRACE_BATCHES:]
tokenizer = tokenizers.for_checkpoint(path, config)

trace_dir = capture.record(config, variables, trace_inputs, pathlib.Path(WORKDIR) / "trace",
                           with_scores=True, eos_id=tokenizer.eos_id, overwrite=True)
trace = read_trace(trace_dir)
print(f"{trace.num_tokens:,} tokens, {len(trace.doc_starts)} documents (rows and eos-separated files), "
      f"{trace.num_layers} MoE layers (model layers {trace.layers.tolist()}), {trace.num_experts} experts, "
      f"{trace.top_k} slots per token")

# %% [markdown]
# ## Expert load, inter-layer affinity, local routing consistency
#
# Every analysis of `moejax.posthoc.analysis` takes the trace and returns numpy arrays; `moejax.posthoc.trace_report`
# gathers the headline numbers (`summary`, JSON-ready) and its `plot_*` functions return matplotlib figures.
#
# - **Frequency**: the fraction of each layer's routed slots every expert gets (uniform = 1/E).
# - **Inter-layer affinity** (ExFlow): P(expert j at the next MoE layer | expert i at this one).
# - **Local routing consistency** ("Not All Models Suit Expert Offloading", arXiv 2505.16056), as the authors'
#   code computes it (`moejax.posthoc.locality`): SRP(m), the best F1 of a per-window expert set against the
#   experts each token uses within windows of m tokens; SCH(m, rho), the hit rate of a cache of rho * k experts
#   that evicts by the uses in the next m tokens. Both per layer and pooled over the model, with bootstrap
#   intervals over documents. High values at long windows make a model friendly to expert offloading.

# %%
import matplotlib.pyplot as plt
from IPython.display import Image, display

LENGTHS = (4, 16, 64)  # the authors' 4, 16, 64, 256 without the longest, for a short trace
summary = trace_report.summary(trace, lengths=LENGTHS, n_boot=200)
print("SRP (model) per length:", [round(v, 3) for v in summary["srp_model"]])
print("SCH (model) per length, rho = 1 and 2:", [[round(v, 3) for v in row] for row in summary["sch_model"]])
for key in ("max_expert_fraction", "max_over_mean_load", "router_entropy", "affinity_top1"):
    print(f"{key:>20}: {[v if v is None else round(v, 3) for v in summary[key]]}")  # None: NaN
# the plot_* functions return matplotlib figures (no pyplot) and, given a path, save them as PNG
plots = pathlib.Path(WORKDIR) / "analysis"
trace_report.plot_frequency(trace, path=plots / "frequency.png")
if trace.num_layers > 1:
    trace_report.plot_affinity(trace, path=plots / "affinity.png")
trace_report.plot_local_consistency(trace, lengths=LENGTHS, path=plots / "local_consistency.png", summary=summary)
for name in ("frequency.png", "affinity.png", "local_consistency.png"):
    if (plots / name).exists():
        display(Image(filename=str(plots / name)))

# %% [markdown]
# ## The experts most associated with a keyword
#
# With byte tokens a keyword is several tokens, so the marker is an event: a position is marked when its input
# byte belongs to a whole-word occurrence of the keyword (neither preceded nor followed by a letter, digit or
# `_`). Those positions get a synthetic token id (one past the vocabulary) in a copy of the trace, and
# `steer.marker_experts` ranks every (layer, expert) pair by its normalised PMI with that id (1: the expert is
# selected exactly at the marked positions; 0: independent). With a subword tokenizer (a `CHECKPOINT` with
# its own tokenizer) the keyword's token ids are the marker directly.

# %%
import dataclasses
import re

from moejax.posthoc import steer


def keyword_mask(token_ids, seq_len, keyword):
    """[N] bool: the bytes of every whole-word occurrence of keyword, searched row by row (rows of seq_len
    tokens, the order record wrote the batches in)."""
    pattern = re.compile(rb"(?<![A-Za-z0-9_])" + re.escape(keyword.encode()) + rb"(?![A-Za-z0-9_])")
    mask = np.zeros(len(token_ids), bool)
    for start in range(0, len(token_ids), seq_len):
        row = bytes(np.asarray(token_ids[start:start + seq_len]).astype(np.uint8))
        for match in pattern.finditer(row):
            mask[start + match.start():start + match.end()] = True
    return mask


def marker(keyword):
    """(trace, marker ids, marked positions) for the keyword."""
    if tokenizer.spec != "bytes":
        ids = tokenizer.encode(keyword)
        return trace, ids, int(np.isin(trace.token_ids, ids).sum())
    mask = keyword_mask(trace.token_ids, trace_inputs[0].shape[1], keyword)
    marked = dataclasses.replace(trace, token_ids=np.where(mask, config.model.vocab_size, trace.token_ids))
    return marked, [config.model.vocab_size], int(mask.sum())


keyword = next(k for k in (KEYWORD, *KEYWORDS) if marker(k)[2])
if keyword != KEYWORD:
    print(f"{KEYWORD!r} does not occur in the trace: using {keyword!r}")
marked, marker_ids, count = marker(keyword)
chosen = steer.marker_experts(marked, marker_ids, n=2)  # the 2 pairs of highest nPMI over the model
scores = {layer: [round(v, 3) for v in values] for layer, values in chosen.scores.items()}
print(f"{keyword!r}: {count} marked positions; top-2 experts {chosen.experts} (nPMI {scores})")

fig, ax = plt.subplots(figsize=(min(3 + 0.2 * trace.num_experts, 14), 1.5 + 0.5 * trace.num_layers))
image = ax.imshow(chosen.npmi, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1,
                  interpolation="nearest")
ax.set_yticks(range(trace.num_layers), trace.layers.tolist())
ax.set(xlabel="expert", ylabel="layer", title=f"nPMI of every expert with {keyword!r}")
fig.colorbar(image, ax=ax)
plt.show()

# %% [markdown]
# ## Silence or reinforce them
#
# A routing intervention (`moejax.moe.intervention`) is one record passed to the forward: `mask_experts`
# never selects the experts (the next-ranked ones take their slots), `scale_experts` multiplies their combine
# weight (RICE reinforces its experts by 2). `moejax.evaluate.evaluate(..., intervention=iv)` measures the
# validation bits per byte under it on the held-out batches, and the per-layer expert load shows that the
# silenced experts get nothing. Expect small effects: over all bytes, two experts matter little.

# %%
from moejax import evaluate
from moejax.moe import intervention

interventions = {"model": None,
                 "silenced": intervention.mask_experts(config, chosen.experts),
                 "reinforced x2": intervention.scale_experts(
                     config, {layer: {e: 2.0 for e in ids} for layer, ids in chosen.experts.items()})}
results = {name: evaluate.evaluate(config, variables, eval_windows, intervention=iv)
           for name, iv in interventions.items()}
for name, result in results.items():
    loads = ", ".join(f"layer {layer} expert {e}: {result['expert_load'][f'layers_{layer}'][e]:.3f}"
                      for layer, ids in chosen.experts.items() for e in ids)
    print(f"{name:>14}: {result['bits_per_byte']:.4f} bits/byte; load of the chosen experts: {loads}")
for layer, ids in chosen.experts.items():
    assert all(results["silenced"]["expert_load"][f"layers_{layer}"][e] == 0 for e in ids)

fig, ax = plt.subplots(figsize=(6, 3.5))
base = results["model"]["bits_per_byte"]
ax.bar(list(results), [r["bits_per_byte"] - base for r in results.values()], color=["gray", "C3", "C0"])
ax.axhline(0, color="black", linewidth=0.8)
ax.set(ylabel="Δ bits per byte", title=f"steering the top-2 {keyword!r} experts (model: {base:.3f} bits/byte)")
plt.show()

# %% [markdown]
# ## Decode with and without
#
# `moejax.generate.generate` takes the same intervention record. `SelfContrast` is SCMoE: every step runs the
# model twice, with its own routing (strong) and with each token routed to its rank-2 expert alone (weak),
# and decodes from `(1 + beta) z_strong - beta z_weak` on the plausible tokens (`z_strong >= log(alpha) +
# max z_strong`); beta = 0 is plain decoding.

# %%
from moejax import generate

prompt = np.asarray([tokenizer.encode("def fibonacci(n):\n")], np.int32)
runs = {"greedy": {},
        "greedy, silenced": {"intervention": interventions["silenced"]},
        "SCMoE beta=0.5": {"contrast": generate.SelfContrast(rank=2, alpha=0.1, beta=0.5)}}
for name, extra in runs.items():
    tokens = generate.generate(config, variables, prompt, max_new_tokens=NEW_TOKENS, eos_id=tokenizer.eos_id,
                               **extra)
    new = [int(t) for t in tokens[0, prompt.shape[1]:]]
    new = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    print(f"--- {name} ---\n{tokenizer.decode([int(t) for t in prompt[0]] + new)}\n")

# %% [markdown]
# The same from a shell: `python -m moejax.posthoc trace|analyze|steer` (docs/posthoc.md); a whole study on
# a trained DeepSeekMoE (keyword experts against random ones, the SCMoE beta sweep) is
# `experiments/posthoc_routing.py`, with its page `experiments/results/posthoc_routing.md`.
