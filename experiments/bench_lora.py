"""Fine-tuning memory and step time, full fine-tuning against LoRA, on a scaled-down released shape; prints JSON.

The model: ``configs/qwen3_moe.py:small`` (Qwen3-30B-A3B's layout: 128 routed experts, top-8, renormalised softmax
router, grouped-query attention with per-head qk-norm; at width 256, 4 layers, experts of width 96, bytes). Both ways
of fine-tuning it run the train step moejax.training.loop runs (jitted with the state donated), on the same batch:

* ``full``: every parameter trained, AdamW moments for all of them;
* ``lora``: adapters of rank --rank (alpha 2r) on the attention projections and on every routed expert's three
  matrices, one per expert (``model.lora``, moejax/adapters/lora.py); the base frozen, the optimizer holding the
  adapters' moments only and the step computing no gradient for the base.

For each: parameters trained, the train state's bytes (parameters + optimizer state), XLA's memory plan of the
compiled step (its reported peak, temporaries, arguments, and the total of its buffers: arguments + outputs not
aliased to them + temporaries), the device's peak bytes in use where the platform reports one
(accelerators; each way then runs in its own subprocess so that the peaks do not mix), and the median seconds per
step. --smoke: one layer of 8 experts, a batch of 2 x 32 tokens, one timed step (the test suite runs it).

    python -m experiments.bench_lora [--batch 8] [--seq 256] [--rank 8] [--repeats 3] [--smoke]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from moejax.configs import qwen3_moe

from moejax import model
from moejax.adapters import lora
from moejax.training import hooks, initialise, metrics, objectives, optim, step

VARIANTS = ("full", "lora")
TARGETS = ("attn/(q|k|v|o)/kernel", "experts/(wi_0|wi_1|wo)")


def bench_config(variant: str, rank: int, batch: int, seq: int, smoke: bool):
    """The preset's config for one way of fine-tuning."""
    config = qwen3_moe.get_config("small")
    if smoke:
        config.model.num_layers = 1
        config.model.moe.update(num_experts=8, top_k=min(config.model.moe.top_k, 2))
    config.train.update(batch_size=batch, seq_len=seq, warmup_steps=0, weight_decay=0.0)
    if variant == "lora":
        config.model.lora.update(targets=TARGETS, rank=rank, alpha=2.0 * rank)
    model.validate(config.model)
    return config


def _bytes(tree: Any) -> int:
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def measure(variant: str, rank: int, batch: int, seq: int, repeats: int, smoke: bool) -> dict[str, Any]:
    """One way of fine-tuning: its state, the compiled step's memory plan, the device peak (where reported) and the
    median step time."""
    config = bench_config(variant, rank, batch, seq, smoke)
    module = model.Transformer(config.model)
    tx = optim.make_optimizer(config)
    variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))
    state = jax.jit(lambda p, ms: initialise.new_state(p, ms, tx))(variables["params"], variables["moe_state"])
    trainable = lora.trainable(state.params) if variant == "lora" else jax.tree.map(lambda _: True, state.params)
    trained = int(sum(leaf.size for leaf, keep in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainable),
                                                      strict=True) if keep))
    collection = metrics.metrics_collection(True, len(model.moe_layers(config.model)),
                                            config.model.moe.num_experts).empty()
    objective = objectives.from_config(config, module, jax.random.key(1))
    train_step = jax.jit(functools.partial(step.train_step, objective=objective, tx=tx,
                                           hooks=hooks.from_config(config)), donate_argnums=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.model.vocab_size, (batch, seq + 1)), jnp.int32)
    compiled = train_step.lower(state, collection, tokens).compile()
    plan = compiled.memory_analysis()
    row: dict[str, Any] = {
        "parameters": int(sum(leaf.size for leaf in jax.tree.leaves(state.params))), "trained_parameters": trained,
        "parameter_bytes": _bytes(state.params), "optimizer_state_bytes": _bytes(state.opt_state),
        "state_bytes": _bytes(state.params) + _bytes(state.opt_state),
        "step_peak_bytes": int(plan.peak_memory_in_bytes), "step_temp_bytes": int(plan.temp_size_in_bytes),
        "step_argument_bytes": int(plan.argument_size_in_bytes),
        # every buffer of the step's plan: the arguments, the outputs not aliased to them (the state is donated),
        # the temporaries
        "step_total_bytes": int(plan.argument_size_in_bytes + plan.output_size_in_bytes - plan.alias_size_in_bytes
                                + plan.temp_size_in_bytes),
    }
    times = []
    losses = []
    for i in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        state, collection, out = compiled(state, collection, tokens)
        jax.block_until_ready(out)
        if i:
            times.append(time.perf_counter() - start)
        losses.append(float(out[0]))
    row["step_seconds"] = statistics.median(times)
    row["loss_first_last"] = [losses[0], losses[-1]]
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        row["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return row


def _in_subprocess(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, "-m", "experiments.bench_lora", f"--variant={variant}", f"--batch={args.batch}",
            f"--seq={args.seq}", f"--rank={args.rank}", f"--repeats={args.repeats}"] + (["--smoke"] if args.smoke
                                                                                        else [])
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="the adapters' rank (alpha = 2 rank)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # one way, as JSON
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.repeats = 2, 32, 1
    if args.variant is not None:
        row = measure(args.variant, args.rank, args.batch, args.seq, args.repeats, args.smoke)
        print(json.dumps(row))
        return row
    separate = bool(jax.devices()[0].memory_stats())  # peaks reported: one process per way
    rows = {variant: (_in_subprocess(variant, args) if separate else
                      measure(variant, args.rank, args.batch, args.seq, args.repeats, args.smoke))
            for variant in VARIANTS}
    full, adapted = rows["full"], rows["lora"]
    result = {
        "model": "configs/qwen3_moe.py:small" + (" (1 layer, 8 experts)" if args.smoke else ""),
        "device": jax.devices()[0].device_kind, "tokens_per_step": args.batch * args.seq, "rank": args.rank,
        "targets": list(TARGETS), **rows,
        "lora_over_full": {key: adapted[key] / full[key] for key in ("trained_parameters", "state_bytes",
                                                                      "optimizer_state_bytes", "step_peak_bytes",
                                                                      "step_temp_bytes", "step_total_bytes",
                                                                      "step_seconds",
                                                                      *(["device_peak_bytes"] if "device_peak_bytes"
                                                                        in full else []))},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
