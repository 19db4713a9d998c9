"""Writes the Colab notebooks of this folder from the cell sources below: ``python colab/build_notebooks.py``.

The notebooks are generated, so that they are reviewed as Python here and stay stripped (no outputs, no execution
counts): edit a cell in this file, run the script, commit both. ``tests/test_notebooks.py`` executes every notebook
(``MOEJAX_NOTEBOOK_BUDGET=ci``) and checks that this script reproduces the committed files byte for byte.

``python colab/build_notebooks.py --check`` writes nothing and exits with status 1 when a notebook differs.

Every notebook starts the same way: a cell installing moejax when it is not importable (Colab), a cell detecting
the platform, and a cell tagged ``parameters`` choosing the budget: ``MOEJAX_NOTEBOOK_BUDGET`` when set (``ci``: a
few steps of a small model, for the test), else ``cpu`` on a CPU (minutes) or ``full`` on a TPU or GPU.
"""
from __future__ import annotations

import json
import pathlib
import sys
import textwrap

COLAB_DIR = pathlib.Path(__file__).resolve().parent
REPO_URL = "https://github.com/moejax/moejax"


def markdown(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": textwrap.dedent(text).strip("\n")}


def code(text: str, *, tags: tuple[str, ...] = ()) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {"tags": list(tags)} if tags else {},
            "outputs": [], "source": textwrap.dedent(text).strip("\n")}


INSTALL = f'''
# Install moejax from its repository when it is not importable (Colab); a checkout installed with
# `pip install -e .` (or CI) already has it. The configs come with the package as `moejax.configs`.
import importlib.util
import subprocess
import sys

REPO_URL = "{REPO_URL}"
if importlib.util.find_spec("moejax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{{REPO_URL}}"], check=True)
'''

BUDGET_CELL = '''
import os

# 'ci': a few steps of a small model (tests/test_notebooks.py); 'cpu': minutes on a laptop CPU;
# 'full': the preset's own budget, for a TPU or GPU runtime.
BUDGET = os.environ.get("MOEJAX_NOTEBOOK_BUDGET") or ("cpu" if platform == "cpu" else "full")
'''

PLATFORM = '''
import jax

platform = jax.default_backend()  # 'tpu', 'gpu' or 'cpu': the only platform-specific part is the budget below
print(f"platform: {platform}")
print(jax.devices())
'''


def parameters(extra: str) -> dict:
    """The cell tagged 'parameters' (papermill's convention; the test injects WORKDIR after it)."""
    return code(BUDGET_CELL + textwrap.dedent(extra), tags=("parameters",))


# ----------------------------------------------------------------------------------------------- quickstart

QUICKSTART = [
    markdown('''
        # moejax quickstart: train a small DeepSeekMoE

        Trains `configs/deepseekmoe.py` (the `tiny` preset: 1 shared + 63 routed experts, top-7) on the embedded
        corpus (the Python standard library's own source files, byte-level; nothing is downloaded), plots its loss
        and expert load, and shows which experts the trained router sends a piece of text to.

        On Colab pick a TPU or GPU runtime (*Runtime > Change runtime type*) for the preset's full budget; on a CPU
        runtime the notebook trains a shorter run.
        '''),
    code(INSTALL),
    code(PLATFORM),
    parameters('''
        WORKDIR = "runs/colab_quickstart"  # deleted and created fresh below
        TEXT = "def fibonacci(n):\\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\\n"
        '''),
    markdown('''
        ## The config

        `get_config("tiny")` returns an `ml_collections.ConfigDict`; every field and its default is documented in
        `configs/base.py`. The budget changes only how long it trains (and, for `ci`, the width).
        '''),
    code('''
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
        '''),
    markdown('''
        ## Train

        `train_and_evaluate` is what `python -m moejax.main` runs: it prints a line every `train.log_every` steps,
        evaluates, writes `metrics.jsonl`, TensorBoard events, an orbax checkpoint and `summary.json` into the
        workdir, and returns the summary. Running it again on the same workdir would resume the run; we start
        fresh.
        '''),
    code('''
        import shutil

        from moejax.training import loop

        shutil.rmtree(WORKDIR, ignore_errors=True)
        summary = loop.train_and_evaluate(config, WORKDIR)
        '''),
    markdown('''
        ## Loss curve

        `metrics.jsonl` holds one JSON object per log step (`"kind": "train"`) and per evaluation (`"eval"`).
        '''),
    code('''
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
        '''),
    markdown('''
        ## Expert load per layer

        Each train record's `expert_load` holds, per MoE layer, the fraction of the routed slots every expert got
        over that log interval (a column sums to 1; perfectly balanced is 1/E everywhere). The DeepSeekMoE balance
        loss pushes the columns towards uniform.
        '''),
    code('''
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
        '''),
    markdown('''
        ## Which experts does a piece of text go to?

        `load_checkpoint` reads the run's newest checkpoint as numpy arrays (`params`, `moe_state`, ...). We run the
        model on the bytes of `TEXT` and capture the first MoE layer's router logits with Flax's
        `capture_intermediates` (the router is the `RouterKernel` module of `moejax/moe/layer.py`), then route them
        with the same function the layer uses, `moejax.moe.routers.route`, including the layer's selection bias.
        '''),
    code('''
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
            return {ord(" "): "␣", ord("\\n"): "↵", ord("|"): "¦"}.get(byte, chr(byte))


        rows = [f"| `{show(b)}` | " + ", ".join(f"{e} ({w:.2f})" for e, w in zip(ids, ws, strict=True)) + " |"
                for b, ids, ws in zip(tokens[0][:20], experts[:20], weights[:20], strict=True)]
        display(Markdown(f"**{layer}**: the first 20 bytes of `TEXT` and their experts (combine weight)\\n\\n"
                         "| byte | experts |\\n|---|---|\\n" + "\\n".join(rows)))
        '''),
    code('''
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
        '''),
    markdown('''
        ## What does the model write?

        `moejax.load` opens the run (its config and newest checkpoint) and `moejax.generate.generate` continues a
        prompt: one prefill pass fills a KV cache, then a compiled loop decodes a token per step (the MoE layers
        dropless). Greedy first, then three samples at temperature 0.8 with nucleus 0.95. A model this small
        trained this briefly writes Python-shaped bytes, not programs; the same call works on any checkpoint
        `moejax.load` opens, a transformers directory included (`python -m moejax.generate` does it from a shell).
        '''),
    code('''
        import moejax
        import moejax.load
        from moejax import generate

        config, variables = moejax.load(WORKDIR)
        prompt = np.frombuffer(b"def ", np.uint8).astype(np.int32)[None]
        greedy = generate.generate(config, variables, prompt, max_new_tokens=120, eos_id=0)
        samples = generate.generate(config, variables, np.repeat(prompt, 3, axis=0), max_new_tokens=120,
                                    temperature=0.8, top_p=0.95, rng=jax.random.key(0), eos_id=0)
        for name, row in [("greedy", greedy[0])] + [(f"sample {i}", r) for i, r in enumerate(samples)]:
            text = bytes(int(t) for t in row if t).decode("utf-8", errors="replace")
            print(f"--- {name} ---\\n{text}\\n")
        '''),
]

# ----------------------------------------------------------------------------------------------- new router

NEW_ROUTER = [
    markdown('''
        # Try a new router in ten lines

        A router is one function from router logits to a `moejax.moe.routers.Routing` (which experts each token
        goes to, with what weights). Register it under a name with what it needs from the layer, set
        `config.model.moe.router.kind` to that name, and train it beside the default top-k router with everything
        else equal. The contract, from `moejax/moe/routers.py`:

        ```python
        @routers.register(kind, needs_rng=False, needs_token_ids=False, needs_progress=False, validate=None)
        router(logits [T, E] float32, cfg, ctx: RouterContext)
            -> Routing(weights [T, k], experts [T, k] int32, probs [T, E], logits [T, E])
        ```

        `cfg` is the `model.moe` config section; `ctx.bias` the selection-only bias of aux-loss-free balancing,
        `ctx.progress` the fraction of training done (a traced scalar, given to routers registered with
        `needs_progress=True`; `None` in evaluation). `probs` feed the balance loss and the metrics; an expert id
        `>= E` marks a slot that computes nothing.
        '''),
    code(INSTALL),
    code(PLATFORM),
    parameters('''
        WORKDIR = "runs/colab_new_router"  # one run per router below it; deleted and created fresh
        '''),
    markdown('''
        ## The idea: top-k with an annealed temperature

        Select and weight experts by `softmax(logits / τ)` with τ annealed from `router.temperature` at the start
        of training to 1 at the end: early on the scores are flatter, so the balance loss sees (and spreads) more of
        the experts before the router commits. Evaluation uses τ = 1. Registering it is all the plumbing there is;
        do it before training, since the config is checked against the registry.
        '''),
    code('''
        import jax
        import jax.numpy as jnp

        from moejax.moe import routers


        @routers.register("annealed_topk", needs_progress=True)
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
        '''),
    markdown('''
        A quick check on random logits before spending compute: shapes, weights summing to 1, and the temperature
        flattening the scores (higher entropy) at the start of training.
        '''),
    code('''
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
        '''),
    markdown('''
        ## Train both routers

        The same config and seed for both; only `router.kind` differs.
        '''),
    code('''
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
        '''),
    markdown('''
        ## Compare loss and balance

        Loss curves from each run's `metrics.jsonl`; balance as the max/mean expert load of each log interval
        (1 is perfectly balanced), averaged over the MoE layers, and per layer at the final evaluation
        (`summary.json`).
        '''),
    code('''
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
        '''),
    code('''
        from IPython.display import Markdown, display

        rows = []
        for kind, summary in summaries.items():
            loads = [stats["max_over_mean_load"] for stats in summary["moe_layers"].values()]
            rows.append(f"| `{kind}` | {summary['val_loss']:.4f} | {np.mean(loads):.3f} | {max(loads):.3f} |")
        display(Markdown("| router | validation loss (nats/byte) | max/mean load, layer mean | worst layer |\\n"
                         "|---|---|---|---|\\n" + "\\n".join(rows)))
        '''),
    markdown('''
        One seed at a small budget is a smoke test of an idea, not a result: for a claim, add seeds and steps, or
        put the router in an ablation table (`experiments/reproduce.py`; see `reproduce_ablation.ipynb`).
        '''),
]

# ----------------------------------------------------------------------------------------------- expert parallelism

EXPERT_PARALLELISM = [
    markdown('''
        # Expert parallelism

        A mesh over all devices with the routed experts sharded over its `expert` axis: each device holds E / n of
        the experts, and the MoE layer exchanges tokens between devices inside `jax.shard_map`
        (`moejax/parallel.py`). We check that the expert-parallel layer computes the single-device layer's output
        and gradients on several meshes and exchange modes, then look at the memory each device needs for
        parameters and Adam's moments as the expert axis grows.

        On a TPU runtime the mesh uses its 8 TPU cores. On a CPU (or a single GPU or TPU chip) it uses 8 host CPU
        devices forced by `XLA_FLAGS`, which must be set before jax is imported: the first cell does that.
        '''),
    code(textwrap.dedent('''
        import os

        # 8 host CPU devices; affects only the CPU platform, and only when set before jax is first imported
        # (restart the runtime if jax was imported already)
        if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
            os.environ["XLA_FLAGS"] = flags.strip()
        ''') + INSTALL),
    code('''
        import jax
        import numpy as np

        # exact float32 matmuls, so that the comparison below measures the layer and not TPU's bfloat16 passes
        jax.config.update("jax_default_matmul_precision", "highest")
        platform = jax.default_backend()
        devices = jax.devices()
        if len(devices) == 1:  # one GPU or one TPU chip: show the layout on the 8 host CPU devices instead
            devices = jax.devices("cpu")
            jax.config.update("jax_default_device", devices[0])
        print(f"platform: {platform}; the meshes below use {len(devices)} {devices[0].platform} devices")
        print(devices)
        '''),
    parameters('''
        # the MoE layer compared below: x [BATCH, SEQ, D_MODEL], NUM_EXPERTS experts of width EXPERT_FFN, top-TOP_K
        LAYER = {"ci": dict(BATCH=8, SEQ=4, D_MODEL=16, NUM_EXPERTS=8, EXPERT_FFN=8, TOP_K=2),
                 "cpu": dict(BATCH=16, SEQ=32, D_MODEL=64, NUM_EXPERTS=16, EXPERT_FFN=32, TOP_K=4),
                 "full": dict(BATCH=64, SEQ=256, D_MODEL=512, NUM_EXPERTS=64, EXPERT_FFN=256, TOP_K=6)}[BUDGET]
        '''),
    markdown('''
        ## The single-device layer

        `moejax.moe.layer.MoE` with no mesh: route, sort the slots by expert, grouped matmul, combine. Its output and
        the gradients of a scalar function of it (with respect to the parameters and the input) are the reference.
        '''),
    code('''
        import jax.numpy as jnp
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P
        from moejax.configs import base

        from moejax import parallel
        from moejax.moe import layer as moe


        def layer_config(ep_mode: str = "a2a"):
            cfg = base.moe_config()
            cfg.update(num_experts=LAYER["NUM_EXPERTS"], top_k=LAYER["TOP_K"], expert_ffn=LAYER["EXPERT_FFN"],
                       dispatch="dropless", ep_mode=ep_mode)
            return cfg


        x = jax.random.normal(jax.random.key(0), (LAYER["BATCH"], LAYER["SEQ"], LAYER["D_MODEL"]))
        variables = moe.MoE(layer_config()).init(jax.random.key(1), x)
        params, moe_state = variables["params"], variables["moe_state"]


        def output_and_grads(layer: moe.MoE, params, x):
            def loss(params, x):
                y, _ = layer.apply({"params": params, "moe_state": moe_state}, x, train=True, mutable=["moe_aux"])
                return jnp.sum(y * jnp.cos(y)), y

            (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
            return y, grads


        y_ref, grads_ref = output_and_grads(moe.MoE(layer_config()), params, x)
        print(jax.tree.map(lambda p: p.shape, params))
        '''),
    markdown('''
        ## The same layer on meshes

        Mesh axes are `(data, fsdp, expert, tensor)`. The batch is split over `data x fsdp x expert`; the experts'
        leading axis over `expert`; their hidden width over `tensor`. `parallel.param_shardings` gives every
        parameter its sharding from its logical axis names. `ep_mode` picks the token exchange: `a2a`
        (all-to-all of per-device buffers), `ring` (all-gather the tokens, reduce-scatter the outputs), and on TPU
        and GPU also `ragged_a2a`.
        '''),
    code('''
        def make_mesh(shape):
            return jax.make_mesh(shape, parallel.MESH_AXES, devices=devices,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(parallel.MESH_AXES))


        n = len(devices)
        shapes = [(n // e, 1, e, 1) for e in sorted({2, n}) if n % e == 0]  # the experts over 2 and over all devices
        if n % 8 == 0:
            shapes.append((n // 8, 2, 2, 2))  # fsdp and tensor too
        modes = ["a2a", "ring"] + (["ragged_a2a"] if devices[0].platform != "cpu" else [])

        def relative_diff(a, b):
            """max |a - b| / max |b|."""
            return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


        print("relative difference to the single-device layer, max |a - b| / max |b|")
        print(f"{'ep_mode':>10} {'mesh (data, fsdp, expert, tensor)':>34} {'output':>9} {'gradients':>10}")
        worst = 0.0
        for shape in shapes:
            mesh = make_mesh(shape)
            sharded_params = jax.device_put(params, parallel.param_shardings(params, mesh))
            sharded_x = jax.device_put(x, NamedSharding(mesh, P(parallel.TOKEN_AXES)))
            for mode in modes:
                y, grads = output_and_grads(moe.MoE(layer_config(mode), mesh=mesh), sharded_params, sharded_x)
                output_diff = relative_diff(y, y_ref)
                pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True)
                grad_diff = max(relative_diff(a, b) for a, b in pairs)
                worst = max(worst, output_diff, grad_diff)
                print(f"{mode:>10} {str(shape):>34} {output_diff:9.1e} {grad_diff:10.1e}")
        assert worst < 1e-5, f"the expert-parallel layer differs from the single-device layer by {worst:.1e}"
        '''),
    markdown('''
        Where the expert weights live on the last mesh: every device holds a slice of the experts (and, with
        `fsdp` and `tensor` > 1, of their model and hidden widths). The router's expert axis is never split: each
        device routes its own tokens over all experts.
        '''),
    code('''
        wi_0 = sharded_params["experts"]["wi_0"]
        print(f"experts/wi_0 {wi_0.shape} on mesh {dict(mesh.shape)}: {wi_0.sharding.spec}")
        for shard in wi_0.addressable_shards:
            experts = shard.index[0]
            print(f"  {shard.device}: experts {experts.start}..{experts.stop - 1}, block {shard.data.shape}")
        print(f"router/kernel {sharded_params['router']['kernel'].shape}: "
              f"{sharded_params['router']['kernel'].sharding.spec} (its expert axis is never split)")
        '''),
    markdown('''
        ## Memory per device

        Parameters plus Adam's two moments, per device, as the `expert` axis grows (the rest of the devices on
        `data`, so everything that is not a routed expert stays replicated). `parallel.state_shardings` gives the
        shardings of a whole train state; the bytes per device follow from the shard shapes, so this works for
        models far too large to allocate here (nothing below is allocated but the small model). For that one, the
        arrays are also materialised and measured with `parallel.bytes_per_device`.

        `num_experts` must be a multiple of `mesh.expert` for the experts to split: the `tiny` and `2b` DeepSeekMoE
        presets have 63 routed experts, so they are shown with 64 here (the layer itself pads 63 to a multiple
        and stays exact, but the stored weights stay whole on every device).
        '''),
    code('''
        import math

        import matplotlib.pyplot as plt
        from moejax.configs import deepseekmoe

        from moejax import model
        from moejax.training import optim, step


        def abstract_state(config):
            module = model.Transformer(config.model)
            tx = optim.make_optimizer(config)

            def init(key):
                variables = module.init(key, jnp.zeros((1, 8), jnp.int32))
                return step.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                        opt_state=tx.init(variables["params"]),
                                        moe_state=variables.get("moe_state", {}))

            return init, jax.eval_shape(init, jax.random.key(0))


        def bytes_per_device(state, expert):
            """(routed-expert bytes, other bytes) of a train state's shards on one device with mesh.expert = expert."""
            shape = (n // expert, 1, expert, 1)
            shardings = parallel.state_shardings(state, make_mesh(shape))
            totals = {True: 0, False: 0}
            leaves = jax.tree_util.tree_leaves_with_path(state)
            for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
                routed = "'experts'" in jax.tree_util.keystr(path)
                totals[routed] += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
            return totals[True], totals[False]


        small = deepseekmoe.get_config("tiny")
        small.model.moe.num_experts = 64
        if BUDGET == "ci":
            small.model.update(d_model=64, num_layers=2, ffn_dim=128)
            small.model.moe.update(num_experts=16, expert_ffn=32, top_k=4)
        models = {f"deepseekmoe:tiny, {small.model.moe.num_experts} experts": small,
                  "deepseekmoe:16b": deepseekmoe.get_config("16b")}
        expert_sizes = [e for e in (1, 2, 4, 8) if e <= n and n % e == 0]

        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4))
        for ax, (name, config) in zip(axes, models.items(), strict=True):
            _, state = abstract_state(config)
            routed, other = map(np.array, zip(*(bytes_per_device(state, e) for e in expert_sizes), strict=True))
            unit, scale = ("GiB", 2**30) if (routed + other).max() > 2**30 else ("MiB", 2**20)
            labels = [str(e) for e in expert_sizes]
            ax.bar(labels, other / scale, label="everything else (replicated)")
            ax.bar(labels, routed / scale, bottom=other / scale, label="routed experts (split over 'expert')")
            ax.set(xlabel="mesh.expert", ylabel=f"{unit} per device (params + Adam)", title=name)
            ax.legend()
            print(f"{name}: " + ", ".join(f"expert={e}: {(r + o) / scale:.2f} {unit}"
                                          for e, r, o in zip(expert_sizes, routed, other, strict=True)))
        fig.tight_layout()
        plt.show()

        # the small model for real: allocate its state sharded on the largest expert axis and measure one device
        expert = expert_sizes[-1]
        init, state = abstract_state(small)
        mesh = make_mesh((n // expert, 1, expert, 1))
        real = jax.jit(init, out_shardings=parallel.state_shardings(state, mesh))(jax.random.key(0))
        measured = parallel.bytes_per_device(real)
        print(f"measured on {devices[0]} with mesh.expert={expert}: {measured / 2**20:.2f} MiB")
        assert measured == sum(bytes_per_device(state, expert))
        '''),
]

# ----------------------------------------------------------------------------------------------- reproduce ablation

REPRODUCE_ABLATION = [
    markdown('''
        # Reproduce an ablation table

        `python -m experiments.reproduce <table>` trains every row of a table in `experiments/tables/` at several
        seeds (each run is `python -m moejax.main` in its own process, resumable), then writes a markdown table
        (mean ± std over seeds, the paper's numbers beside them, within-seed differences against a reference row)
        and plots. This notebook runs one table and renders what it wrote.

        The tables and `experiments/` live in the repository, not in the pip package, so this notebook works in a
        checkout: on Colab the first cell clones the repository and installs it in editable mode. The runs are
        subprocesses; the notebook itself never imports jax, so on a TPU or GPU runtime the runs get the
        accelerator.
        '''),
    code(f'''
        # Work in a checkout of the repository (clone it on Colab) with moejax installed from it.
        import os
        import pathlib
        import subprocess
        import sys

        REPO_URL = "{REPO_URL}"
        if not pathlib.Path("experiments/reproduce.py").exists():
            if not pathlib.Path("moejax").exists():
                subprocess.run(["git", "clone", "-q", "--depth=1", REPO_URL, "moejax"], check=True)
            os.chdir("moejax")
        if subprocess.run([sys.executable, "-c", "import moejax.configs.base"], capture_output=True).returncode:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "."], check=True)
        print(f"working in {{os.getcwd()}}")
        '''),
    code('''
        # The platform, asked in a subprocess: importing jax here would hold a TPU or GPU that the runs need.
        probe = [sys.executable, "-c", "import jax; print(jax.default_backend(), jax.device_count())"]
        platform, device_count = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-2:]
        print(f"platform: {platform}, {device_count} device(s)")
        '''),
    parameters('''
        TABLE = "top_p_vs_top2"  # a file of experiments/tables/
        WORKDIR = "runs/colab_reproduce_ablation"  # the runs and the results; deleted and created fresh
        # ci: SMOKE_BUDGET (4 steps: tests the pipeline, the numbers mean nothing), two runs at a time;
        # cpu: the table's own budget at one seed (two 600-step runs; a MoE run of the tables' width took
        # about 10 minutes on 2 cores); full: three seeds
        TABLE_BUDGET, SEEDS, JOBS = {"ci": ("smoke", 1, 2), "cpu": ("full", 1, 1), "full": ("full", 3, 1)}[BUDGET]
        '''),
    markdown('''
        ## The tables

        A table file defines its rows (a config file with overrides, and the paper's numbers), a shared budget,
        the metrics and what the paper found; see `experiments/tables/__init__.py`. `--dry-run` prints the runs and
        their `python -m moejax.main` commands without running anything.
        '''),
    code('''
        tables = sorted(p.stem for p in pathlib.Path("experiments/tables").glob("*.py") if not p.name.startswith("_"))
        print("tables:", ", ".join(tables))
        command = [sys.executable, "-m", "experiments.reproduce", TABLE, "--seeds", str(SEEDS), "--budget",
                   TABLE_BUDGET, "--workdir", WORKDIR, "--results-dir", f"{WORKDIR}/results", "--jobs", str(JOBS)]
        print(subprocess.run([*command, "--dry-run"], capture_output=True, text=True, check=True).stdout)
        '''),
    markdown('''
        ## Run it

        Progress streams below. Interrupted (or run again without deleting the workdir), the same command skips
        the finished runs and resumes the others from their checkpoints.
        '''),
    code('''
        import shutil

        shutil.rmtree(WORKDIR, ignore_errors=True)
        print("$ python -m experiments.reproduce " + " ".join(command[3:]), flush=True)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            for line in process.stdout:
                print(line, end="", flush=True)
        if process.returncode:
            raise RuntimeError(f"experiments.reproduce failed with status {process.returncode}; the runs' logs are "
                               f"in {WORKDIR}/<row>/seed<k>/log.txt")
        '''),
    markdown('''
        ## The results

        `<table>.md` as written (its plot links are shown as images below), then the plots. `<table>.json` beside
        it holds every run's values.
        '''),
    code('''
        import re

        from IPython.display import Image, Markdown, display

        results = pathlib.Path(WORKDIR) / "results"
        page = (results / f"{TABLE}.md").read_text()
        text, _, plots = page.partition("\\n## Plots")
        display(Markdown(text))
        for caption, file in re.findall(r"!\\[(.*?)\\]\\((.*?)\\)", plots):
            display(Markdown(f"**{caption}**"), Image(filename=str(results / file)))
        '''),
    markdown('''
        The same plots come from `moejax.analysis` for any run directory, e.g.
        `analysis.load_heatmap("runs/colab_reproduce_ablation/top2/seed0")`, `analysis.maxvio_curves(...)` and
        `analysis.loss_curves({"top2": [...], "top_p": [...]})`; each returns a matplotlib figure.
        '''),
]

# ----------------------------------------------------------------------------------------------- post-hoc routing

POSTHOC = [
    markdown('''
        # Post-hoc routing: trace, analyse and steer a trained MoE model

        Everything here reads a trained model as it is, without retraining or editing model code
        (`moejax.posthoc`, docs/posthoc.md): record which experts every token of a corpus is routed to (a routing
        trace), plot expert load, inter-layer affinity and local routing consistency, find the experts most
        associated with a Python keyword (normalised PMI, as RICE does for reasoning markers), silence or reinforce
        them with a routing intervention and measure the effect with `moejax.evaluate`, and decode with and without
        the intervention and with self-contrast decoding (SCMoE).

        The notebook trains a small DeepSeekMoE first (the `quickstart` recipe); set `CHECKPOINT` to analyse a run
        you already have or a transformers directory instead (`moejax.load` opens both). On a CPU runtime the
        training is short, so the routing it shows is young.
        '''),
    code(INSTALL),
    code(PLATFORM),
    parameters('''
        WORKDIR = "runs/colab_posthoc"  # the trained model and the trace; deleted and created fresh
        CHECKPOINT = ""  # a moejax workdir or a transformers directory to analyse instead of training one
        KEYWORD = "def"  # the marker whose experts are steered (the first of KEYWORDS that occurs if it does not)
        KEYWORDS = ("def", "return", "self", "import", "if", "in")
        '''),
    markdown('''
        ## The model

        The `ci` budget trains a tiny model for a few steps (the numbers mean nothing; it tests the path), `cpu`
        the DeepSeekMoE `tiny` preset for 100 steps (about 3 minutes on 2 CPU cores), `full` its own 400 steps.
        '''),
    code('''
        import pathlib
        import shutil

        import jax
        import numpy as np
        from moejax.configs import deepseekmoe

        import moejax
        import moejax.load
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
        '''),
    markdown('''
        ## Record a routing trace

        The validation split, read as `python -m moejax.evaluate` reads it (the model's tokenizer, the run's batch
        shape), cut in two: the first `TRACE_BATCHES` batches are traced (and choose the experts to steer), the
        next `EVAL_BATCHES` are evaluated, so steering is never measured on the bytes it was chosen on.
        `moejax.posthoc.record` runs the model under `jax.jit` batch by batch and streams, per token and MoE layer,
        the selected experts, their gate weights and (`with_scores`) the router probabilities to a directory;
        `read_trace` opens it memory-mapped. `python -m moejax.posthoc trace` does the same from a shell.
        '''),
    code('''
        import ml_collections

        from moejax import data
        from moejax.data import tokenizers
        from moejax.posthoc import analysis, capture, read_trace

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
        '''),
    markdown('''
        ## Expert load, inter-layer affinity, local routing consistency

        Every analysis of `moejax.posthoc.analysis` takes the trace and returns numpy arrays; the `plot_*`
        functions return matplotlib figures. `summary` gathers the headline numbers (JSON-ready).

        - **Frequency**: the fraction of each layer's routed slots every expert gets (uniform = 1/E).
        - **Inter-layer affinity** (ExFlow): P(expert j at the next MoE layer | expert i at this one).
        - **Local routing consistency** ("Not All Models Suit Expert Offloading"): how well one fixed set of
          experts serves a segment of m consecutive tokens. SRP(m): the share of the segment's routed slots that its
          best k experts cover; SCH(m, c): the same for a cache of c experts. High values at long segments make a
          model friendly to expert offloading.
        '''),
    code('''
        import matplotlib.pyplot as plt
        from IPython.display import Image, display

        LENGTHS = (1, 2, 4, 8, 16, 32)
        summary = analysis.summary(trace, lengths=LENGTHS)
        for key in ("max_expert_fraction", "max_over_mean_load", "router_entropy", "affinity_top1", "srp_mean"):
            print(f"{key:>20}: {[v if v is None else round(v, 3) for v in summary[key]]}")  # None: NaN
        # the plot_* functions return matplotlib figures (no pyplot) and, given a path, save them as PNG
        plots = pathlib.Path(WORKDIR) / "analysis"
        analysis.plot_frequency(trace, path=plots / "frequency.png")
        if trace.num_layers > 1:
            analysis.plot_affinity(trace, path=plots / "affinity.png")
        analysis.plot_local_consistency(trace, lengths=LENGTHS, path=plots / "local_consistency.png")
        for name in ("frequency.png", "affinity.png", "local_consistency.png"):
            if (plots / name).exists():
                display(Image(filename=str(plots / name)))
        '''),
    markdown('''
        ## The experts most associated with a keyword

        With byte tokens a keyword is several tokens, so the marker is an event: a position is marked when its input
        byte belongs to a whole-word occurrence of the keyword (neither preceded nor followed by a letter, digit or
        `_`). Those positions get a synthetic token id (one past the vocabulary) in a copy of the trace, and
        `steer.marker_experts` ranks every (layer, expert) pair by its normalised PMI with that id (1: the expert is
        selected exactly at the marked positions; 0: independent). With a subword tokenizer (a `CHECKPOINT` with
        its own tokenizer) the keyword's token ids are the marker directly.
        '''),
    code('''
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
        '''),
    markdown('''
        ## Silence or reinforce them

        A routing intervention (`moejax.moe.intervention`) is one record passed to the forward: `mask_experts`
        never selects the experts (the next-ranked ones take their slots), `scale_experts` multiplies their combine
        weight (RICE reinforces its experts by 2). `moejax.evaluate.evaluate(..., intervention=iv)` measures the
        validation bits per byte under it on the held-out batches, and the per-layer expert load shows that the
        silenced experts get nothing. Expect small effects: over all bytes, two experts matter little.
        '''),
    code('''
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
        '''),
    markdown('''
        ## Decode with and without

        `moejax.generate.generate` takes the same intervention record. `SelfContrast` is SCMoE: every step runs the
        model twice, with its own routing (strong) and with each token routed to its rank-2 expert alone (weak),
        and decodes from `(1 + beta) z_strong - beta z_weak` on the plausible tokens (`z_strong >= log(alpha) +
        max z_strong`); beta = 0 is plain decoding.
        '''),
    code('''
        from moejax import generate

        prompt = np.asarray([tokenizer.encode("def fibonacci(n):\\n")], np.int32)
        runs = {"greedy": {},
                "greedy, silenced": {"intervention": interventions["silenced"]},
                "SCMoE beta=0.5": {"contrast": generate.SelfContrast(rank=2, alpha=0.1, beta=0.5)}}
        for name, extra in runs.items():
            tokens = generate.generate(config, variables, prompt, max_new_tokens=NEW_TOKENS, eos_id=tokenizer.eos_id,
                                       **extra)
            new = [int(t) for t in tokens[0, prompt.shape[1]:]]
            new = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
            print(f"--- {name} ---\\n{tokenizer.decode([int(t) for t in prompt[0]] + new)}\\n")
        '''),
    markdown('''
        The same from a shell: `python -m moejax.posthoc trace|analyze|steer` (docs/posthoc.md); a whole study on
        a trained DeepSeekMoE (keyword experts against random ones, the SCMoE beta sweep) is
        `experiments/posthoc_routing.py`, with its page `experiments/results/posthoc_routing.md`.
        '''),
]


NOTEBOOKS: dict[str, list[dict]] = {
    "quickstart": QUICKSTART,
    "new_router": NEW_ROUTER,
    "expert_parallelism": EXPERT_PARALLELISM,
    "reproduce_ablation": REPRODUCE_ABLATION,
    "posthoc": POSTHOC,
}


def _lines(source: str) -> list[str]:
    """Jupyter's on-disk form of a cell's source: its lines, each but the last ending in a newline."""
    return source.splitlines(keepends=True)


def render(name: str) -> str:
    """The .ipynb text of notebook ``name``: nbformat 4.5, outputs stripped, cell ids fixed by position."""
    cells = []
    for index, cell in enumerate(NOTEBOOKS[name]):
        cells.append({**cell, "id": f"{name}-{index:02d}", "source": _lines(cell["source"])})
    notebook = {
        "cells": cells,
        "metadata": {
            "colab": {"name": f"{name}.ipynb", "provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in NOTEBOOKS:
        path = COLAB_DIR / f"{name}.ipynb"
        text = render(name)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if not check:
            path.write_text(text, encoding="utf-8")
    verb = "differ from the generator" if check else "written"
    print(f"{', '.join(stale)}: {verb}" if stale else "all notebooks up to date")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
