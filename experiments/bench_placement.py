"""Expert placement with replicas (DeepSeek's EPLB, moejax/posthoc/placement.py) on forced host devices; prints JSON.

1. A tiny DeepSeekMoE (configs/deepseekmoe.py:tiny, 32 routed experts) whose routing is skewed by a selection-only
   bias (a few hot experts, as trained models have), on a mesh of 8 devices (mesh.expert=8): the routed slots each
   device serves per MoE layer (max / mean) and the forward+backward step time, before and after an EPLB plan with
   one redundant expert per device (40 physical experts), the plan made from the loads of a calibration batch and
   measured on another batch.
2. What a plan predicts for a cluster (``placement.device_loads``): DeepSeek-V3's shape (256 routed experts, 8
   groups, 58 MoE layers) on 8 nodes of 8 GPUs with 64 redundant experts, for loads drawn from a gamma(0.5)
   distribution (a synthetic skew, stated as such): max / mean slots per GPU, hierarchical and global policies.

The forced host devices share this machine's cores, so the step times say little about a real cluster: the slot
counts are what a plan changes. --smoke: two layers, shorter batches, no step times (the test suite runs it).

    python -m experiments.bench_placement [--tokens 4096] [--repeats 3] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from moejax.configs import deepseekmoe  # noqa: E402

from experiments.bench_moe_layer import time_fn  # noqa: E402
from moejax import model, parallel  # noqa: E402
from moejax.moe import placement as placement_lib  # noqa: E402
from moejax.posthoc import capture, importance, placement  # noqa: E402
from moejax.training import objectives  # noqa: E402

DEVICES = 8
EXPERTS = 32
REDUNDANT = 8
BIAS_SCALE = 0.02  # the selection bias's scale: hot experts without one expert taking every token


def skewed_model(seed: int = 0, smoke: bool = False):
    """(config, variables): the tiny DeepSeekMoE with 32 routed experts on mesh.expert=8, its selection bias
    drawn so that a few experts are hot (--smoke: two layers)."""
    config = deepseekmoe.get_config("tiny")
    config.model.moe.num_experts = EXPERTS
    if smoke:
        config.model.num_layers = 2
    config.mesh.update(data=1, fsdp=1, expert=DEVICES, tensor=1)
    variables = model.Transformer(config.model).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    variables = jax.tree.map(np.asarray, {k: v for k, v in variables.items() if k in ("params", "moe_state")})
    rng = np.random.default_rng(seed)

    def skew(path, x):
        return (rng.gamma(0.5, size=x.shape) * BIAS_SCALE).astype(x.dtype) if "router_bias" in str(path) else x

    variables["moe_state"] = jax.tree_util.tree_map_with_path(skew, variables["moe_state"])
    return config, variables


def device_slots(config, variables, batch: np.ndarray) -> np.ndarray:
    """[L, D] routed slots each device serves on ``batch`` (the layer's own replica choice, token index mod count)."""
    rows = []
    for captured in capture.stream(config, variables, [batch], lambda c: [layer.routing.experts for layer in c.layers]):
        for layer_index, experts in zip(model.moe_layers(config.model), captured, strict=True):
            ids = jnp.asarray(experts)
            num_stored = config.model.moe.num_experts
            width = num_stored
            if placement_lib.has_placement(config.model.moe):
                width = placement_lib.physical_count(config.model.moe)
                replicas, counts = placement_lib.layer_tables(config.model.moe, layer_index, num_stored)
                ids = placement_lib.to_physical(ids, replicas, counts, num_stored, width)
            ids = np.asarray(ids).reshape(-1)
            per_slot = np.bincount(ids[ids < width], minlength=width)
            rows.append(per_slot.reshape(DEVICES, -1).sum(-1))
    return np.stack(rows)


def step_seconds(config, variables, batch: np.ndarray, repeats: int) -> float:
    mesh = parallel.make_mesh(config)
    module = model.Transformer(config.model, mesh=mesh)
    tokens = jnp.asarray(batch)

    def loss(params):
        logits = module.apply({"params": params, "moe_state": variables["moe_state"]}, tokens[:, :-1])
        return objectives.cross_entropy(logits, tokens[:, 1:])

    grad = jax.jit(jax.value_and_grad(loss))
    params = jax.device_put(variables["params"], parallel.param_shardings(variables["params"], mesh))
    return time_fn(grad, params, repeats=repeats)


def cluster_prediction(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    load = rng.gamma(0.5, size=(58, 256)) * 1000
    identity = np.tile(np.arange(256), (58, 1))
    out = {"shape": "256 experts, 8 groups, 58 MoE layers; 8 nodes x 8 GPUs; 320 physical experts (5 per GPU)",
           "loads": "gamma(0.5) per expert (synthetic)",
           "no_plan": float(placement.imbalance(placement.device_loads(load, identity, 64)).mean())}
    for name, groups, nodes in (("hierarchical", 8, 8), ("global", 1, 1)):
        phy2log, _, _ = placement.rebalance_experts(load, 320, num_groups=groups, num_nodes=nodes, num_gpus=64)
        out[name] = float(placement.imbalance(placement.device_loads(load, phy2log, 64)).mean())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    tokens, repeats = (256, 1) if args.smoke else (args.tokens, args.repeats)
    config, variables = skewed_model(smoke=args.smoke)
    seq = config.train.seq_len + 1
    rng = np.random.default_rng(1)
    calibration, measured = (rng.integers(0, config.model.vocab_size, (max(tokens // seq, DEVICES), seq))
                             for _ in range(2))
    load = importance.from_forward(config, variables, [calibration[:, :-1]], "frequency")
    phy2log, _, count = placement.rebalance_experts(load, EXPERTS + REDUNDANT, num_gpus=DEVICES)
    placed_config, placed = placement.place(config, variables, phy2log)
    before = device_slots(config, variables, measured[:, :-1])
    after = device_slots(placed_config, placed, measured[:, :-1])
    identity = np.tile(np.arange(EXPERTS), (len(load), 1))
    result = {
        "device": jax.devices()[0].device_kind, "devices": DEVICES, "experts": EXPERTS,
        "physical_experts": EXPERTS + REDUNDANT, "tokens": int(measured[:, :-1].size),
        "max_over_mean_before": placement.imbalance(before).tolist(),
        "max_over_mean_after": placement.imbalance(after).tolist(),
        "predicted_after": placement.imbalance(placement.device_loads(load, phy2log, DEVICES)).tolist(),
        "predicted_before": placement.imbalance(placement.device_loads(load, identity, DEVICES)).tolist(),
        "replicas_of_hottest": int(count.max()),
        "step_seconds_before": None if args.smoke else step_seconds(config, variables, measured, repeats),
        "step_seconds_after": None if args.smoke else step_seconds(placed_config, placed, measured, repeats),
        "cluster": cluster_prediction(),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
