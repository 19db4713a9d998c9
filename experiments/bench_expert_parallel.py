"""Expert-parallelism figures; prints JSON lines.

1. Per-device bytes of parameters + Adam state at mesh.expert = 1, 2, 4, 8 (data fills the rest) for the
   DeepSeekMoE-tiny shapes with 64 routed experts (so that every expert axis size divides them).
2. MoE layer forward+backward time per ep_mode at mesh.expert = 4 and 8, against the same layer without a mesh.
3. The all_to_all bytes one device sends per MoE layer and step by moejax's own accounting
   (moejax.moe.expert_parallel.a2a_bytes_per_step) for a DeepSeek-V2-Lite layer (D=2048, 64 experts, top-6) on
   64 devices.

On CPU it forces 8 host devices (set XLA_FLAGS yourself to change that):

    python -m experiments.bench_expert_parallel [--tokens 4096] [--repeats 3]
"""
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


def state_bytes(expert: int) -> dict:
    config = deepseekmoe.get_config("tiny")
    config.model.moe.num_experts = 64
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


def layer_time(mode: str | None, expert: int, tokens: int, repeats: int) -> dict:
    cfg = deepseekmoe.get_config("tiny").model.moe
    cfg.num_experts = 64
    x = jax.random.normal(jax.random.key(0), (8, tokens // 8, 256))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"devices": jax.device_count(), "platform": jax.default_backend()}), flush=True)
    for expert in (1, 2, 4, 8):
        print(json.dumps(state_bytes(expert)), flush=True)
    base = layer_time(None, 1, args.tokens, args.repeats)
    print(json.dumps(base), flush=True)
    modes = ["a2a", "ring"] + (["ragged_a2a"] if jax.default_backend() != "cpu" else [])
    for expert in (4, 8):
        for mode in modes:
            row = layer_time(mode, expert, args.tokens, args.repeats)
            row["ratio_to_single_device"] = row["seconds"] / base["seconds"]
            print(json.dumps(row), flush=True)
    for tokens_local in (4096, 8192):
        for factor in (0.0, 1.25):
            sent = expert_parallel.a2a_bytes_per_step(tokens_local, top_k=6, num_experts=64, expert_size=64,
                                                      d_model=2048, dtype_bytes=2, buffer_factor=factor)
            print(json.dumps({"figure": "a2a_bytes_per_layer_step", "layer": "DeepSeek-V2-Lite (D=2048, E=64, k=6)",
                              "devices": 64, "expert_axis": 64, "tokens_per_device": tokens_local, "dtype": "bf16",
                              "ep_buffer_factor": factor, "bytes_sent_per_device": sent,
                              "gib_sent_per_device": sent / 2**30}), flush=True)


if __name__ == "__main__":
    main()
