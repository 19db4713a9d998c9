"""MoE layer forward+backward vs the dense GLU FFN of equal activated FLOPs; prints JSON.

Default shape: DeepSeekMoE-tiny (T=8192 tokens, D=256, 63 routed experts of F=176, top-7, 1 shared of F=176)
against a dense GLU of F=1408 = (7 + 1) * 176. Routing is balanced random (random router weights).

    python -m experiments.bench_moe_layer [--tokens 8192] [--repeats 5] [--modes dropless:tiled,capacity:1.25]
"""
import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from moejax.configs import base

from moejax import moe


def time_fn(fn, *args, repeats: int) -> float:
    """Median wall seconds of fn(*args) after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(layer, variables, x):
    def loss(params, x):
        out = layer.apply({**variables, "params": params}, x)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), variables["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--num_experts", type=int, default=63)
    parser.add_argument("--expert_ffn", type=int, default=176)
    parser.add_argument("--top_k", type=int, default=7)
    parser.add_argument("--num_shared", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default=None,
                        help="comma list of dropless:<backend>[:<tile>] and capacity:<factor>; the default "
                             "leaves out dropless:ragged_dot on CPU, where it runs every expert on every token")
    args = parser.parse_args()
    if args.modes is None:
        args.modes = "dropless:tiled,dropless:tiled:64,dropless:tiled:512,capacity:1.0,capacity:1.25"
        if jax.default_backend() != "cpu":
            args.modes += ",dropless:ragged_dot"
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, args.d_model), dtype)
    dense_ffn = (args.top_k + args.num_shared) * args.expert_ffn

    dense = moe.GLU(dense_ffn, dtype=dtype)
    step, params = fwd_bwd(dense, dense.init(jax.random.key(1), x), x)
    dense_s = time_fn(step, params, x, repeats=args.repeats)
    flops = 3 * 2 * 3 * args.tokens * args.d_model * dense_ffn  # 3 matmuls, fwd + 2x bwd
    result = {"shape": vars(args), "dense_ffn": dense_ffn, "backend": jax.default_backend(),
              "dense_fwd_bwd_ms": round(dense_s * 1e3, 2), "dense_gflops": round(flops / dense_s / 1e9, 1),
              "modes": {}}
    print(f"dense GLU F={dense_ffn}: {dense_s * 1e3:.1f} ms fwd+bwd", flush=True)

    for mode in args.modes.split(","):
        kind, *opts = mode.split(":")
        cfg = base.get_config().model.moe
        cfg.update(num_experts=args.num_experts, top_k=args.top_k, expert_ffn=args.expert_ffn,
                   num_shared=args.num_shared, dispatch=kind, balance_loss="none")
        if kind == "capacity":
            cfg.capacity_factor = float(opts[0])
        else:
            cfg.gmm_backend = opts[0]
            cfg.gmm_tile = int(opts[1]) if len(opts) > 1 else 0
        layer = moe.MoE(cfg, dtype=dtype, kernel_init=nn.initializers.normal(0.02))
        variables = layer.init(jax.random.key(2), x)
        variables = {"params": variables["params"], "moe_state": variables["moe_state"]}
        step, params = fwd_bwd(layer, variables, x)
        seconds = time_fn(step, params, x, repeats=args.repeats)
        _, aux = layer.apply(variables, x, mutable=["moe_aux"])
        load = aux["moe_aux"]["tokens_per_expert"][0]
        result["modes"][mode] = {
            "fwd_bwd_ms": round(seconds * 1e3, 2),
            "ratio_to_dense": round(seconds / dense_s, 3),
            "drop_fraction": round(float(aux["moe_aux"]["drop_fraction"][0]), 4),
            "max_over_mean_load": round(float(load.max() / load.mean()), 3),
        }
        print(f"{mode}: {seconds * 1e3:.1f} ms = {seconds / dense_s:.2f}x dense", flush=True)
    best = min(result["modes"], key=lambda m: result["modes"][m]["ratio_to_dense"])
    result["best_mode"] = best
    result["best_ratio_to_dense"] = result["modes"][best]["ratio_to_dense"]
    result["goal_met"] = result["best_ratio_to_dense"] <= 1.5
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
