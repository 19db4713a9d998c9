"""Expert-parallelism figures; prints JSON lines.

1. Per-device bytes of parameters + Adam state at mesh.expert = 1, 2, 4, 8 (data fills the rest) for the
   DeepSeekMoE-tiny shapes with 64 routed experts (so that every expert axis size divides them).
2. MoE layer forward+backward time per ep_mode at mesh.expert = 4 and 8, against the same layer without a mesh.
3. The all_to_all bytes one device sends per MoE layer and step by moejax's own accounting
   (moejax.moe.expert_parallel.a2a_bytes_per_step) for a DeepSeek-V2-Lite layer (D=2048, 64 experts, top-6) on
   64 devices.

On CPU it forces 8 host devices (set XLA_FLAGS yourself to change that). --smoke shrinks the model (one layer,
D=32, experts of width 8; still 64 of them), the tokens to 64, the repeats to 1 and the expert axis sizes to 1 and
8 (state bytes) and 8 (layer time): every kind of figure in seconds, the same JSON keys (the test suite runs it).

    python -m experiments.bench_expert_parallel [--tokens 4096] [--repeats 3] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from moejax.configs import deepseekmoe  # noqa: E402

from experiments.bench_moe_layer import time_fn  # noqa: E402
from moejax import model, parallel  # noqa: E402
from moejax.moe import expert_parallel  # noqa: E402
from moejax.moe import layer as moe_layer  # noqa: E402
from moejax.training import optim, step  # noqa: E402

LAYER_WIDTH = 256  # d_model of the layer-time figure (the smoke run's: SMOKE_MODEL's)
SMOKE_MODEL = dict(d_model=32, num_layers=1, num_heads=2, ffn_dim=64)
# expert axis sizes of the state-bytes and layer-time figures (--smoke: the smallest and largest only)
STATE_EXPERTS, LAYER_EXPERTS = (1, 2, 4, 8), (4, 8)
SMOKE_STATE_EXPERTS, SMOKE_LAYER_EXPERTS = (1, 8), (8,)


def tiny_config(smoke: bool):
    """configs/deepseekmoe.py:tiny with 64 routed experts (shrunk to SMOKE_MODEL and experts of width 8 for
    --smoke)."""
    config = deepseekmoe.get_config("tiny")
    config.model.moe.num_experts = 64
    if smoke:
        config.model.update(SMOKE_MODEL)
        config.model.moe.expert_ffn = 8
    return config


def state_bytes(expert: int, smoke: bool = False) -> dict:
    """Per-device bytes of parameters + Adam state with `expert` devices on the expert axis (data fills the
    rest)."""
    config = tiny_config(smoke)
    config.mesh.update(data=-1, fsdp=1, expert=expert, tensor=1)
    mesh = parallel.make_mesh(config)
    module = model.Transformer(config.model, mesh=mesh)
    tx = optim.make_optimizer(config)

    def init():
        params = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        return step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                moe_state={})

    abstract = jax.eval_shape(init)
    state = jax.jit(init, out_shardings=parallel.state_shardings(abstract, mesh))()
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
    per_device = parallel.bytes_per_device(state)
    return {"figure": "state_bytes_per_device", "mesh": dict(mesh.shape), "bytes_per_device": per_device,
            "bytes_total": total, "ratio_to_replicated": per_device / total}


def layer_time(mode: str | None, expert: int, tokens: int, repeats: int, smoke: bool = False) -> dict:
    """Seconds of the MoE layer's forward+backward on x [8, tokens / 8, D] with ep_mode `mode` at `expert`
    devices on the expert axis (None: no mesh)."""
    cfg = tiny_config(smoke).model.moe
    width = SMOKE_MODEL["d_model"] if smoke else LAYER_WIDTH
    x = jax.random.normal(jax.random.key(0), (8, tokens // 8, width))
    mesh = None
    if mode is not None:
        cfg.ep_mode = mode
        mesh = jax.make_mesh((8 // expert, 1, expert, 1), parallel.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 4)
        x = jax.device_put(x, NamedSharding(mesh, P(parallel.TOKEN_AXES)))
    layer = moe_layer.MoE(cfg, mesh=mesh)
    variables = jax.jit(layer.init)(jax.random.key(1), x)

    def loss(params, x):
        out, _ = layer.apply({**variables, "params": params}, x, train=True, mutable=["moe_aux"])
        return jnp.mean(out ** 2)

    seconds = time_fn(jax.jit(jax.grad(loss, argnums=(0, 1))), variables["params"], x, repeats=repeats)
    return {"figure": "moe_layer_fwd_bwd", "ep_mode": mode or "single_device (no mesh)", "expert": expert,
            "tokens": tokens, "seconds": seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints each figure as one JSON line as it comes and returns them in order: the devices line, then rows
    whose 'figure' is state_bytes_per_device, moe_layer_fwd_bwd or a2a_bytes_per_layer_step."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None, help="tokens of the layer-time figure (4096)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per layer time (3)")
    parser.add_argument("--smoke", action="store_true", help="a shrunk model, 64 tokens and 1 repeat unless given")
    args = parser.parse_args(argv)
    tokens = args.tokens or (64 if args.smoke else 4096)
    repeats = args.repeats or (1 if args.smoke else 3)
    rows = []

    def emit(row: dict) -> dict:
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    emit({"devices": jax.device_count(), "platform": jax.default_backend()})
    for expert in SMOKE_STATE_EXPERTS if args.smoke else STATE_EXPERTS:
        emit(state_bytes(expert, args.smoke))
    base = emit(layer_time(None, 1, tokens, repeats, args.smoke))
    modes = ["a2a", "ring"] + (["ragged_a2a"] if jax.default_backend() != "cpu" else [])
    for expert in SMOKE_LAYER_EXPERTS if args.smoke else LAYER_EXPERTS:
        for mode in modes:
            row = layer_time(mode, expert, tokens, repeats, args.smoke)
            row["ratio_to_single_device"] = row["seconds"] / base["seconds"]
            emit(row)
    for tokens_local in (4096, 8192):
        for factor in (0.0, 1.25):
            sent = expert_parallel.a2a_bytes_per_step(tokens_local, top_k=6, num_experts=64, expert_size=64,
                                                      d_model=2048, dtype_bytes=2, buffer_factor=factor)
            emit({"figure": "a2a_bytes_per_layer_step", "layer": "DeepSeek-V2-Lite (D=2048, E=64, k=6)",
                  "devices": 64, "expert_axis": 64, "tokens_per_device": tokens_local, "dtype": "bf16",
                  "ep_buffer_factor": factor, "bytes_sent_per_device": sent, "gib_sent_per_device": sent / 2**30})
    return rows


if __name__ == "__main__":
    main()
