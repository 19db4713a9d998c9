"""MoE layer speed against the hardware, for every dispatch kernel and grouped-matmul backend; prints JSON.

Sections (--sections, all by default), each measured against a reference taken in the same run:
* dispatch: permute + unpermute-combine forward ('jnp' gathers and the 'pallas' kernels) as bytes moved per
  second, against a device copy (a + 1 over T*k*D elements) of the same run.
* gmm: the experts' GLU (three grouped matmuls of T*k routed rows) per backend ('tiled', 'ragged_dot',
  'megablox', 'tokamax' where installed) in useful FLOP/s, against a dense GLU of the same T*k rows.
* layer: the whole MoE layer forward+backward per mode against the dense GLU FFN of equal activated width; also
  as a fraction of the dense matmul rate.

Shapes: --shape tiny (default on CPU; DeepSeekMoE-tiny: T=8192, D=256, 63 routed experts of F=176, top-7, 1 shared)
or v2lite (default on accelerators; DeepSeek-V2-Lite: T=16384, D=2048, E=64, F=1408, k=6, 2 shared, bf16).
On CPU the Pallas kernels and megablox run in interpret mode, which checks correctness and says nothing about
speed; they run at --interpret_tokens tokens (default 256) and their rows say "interpreted". Backends a platform
cannot run (megablox off TPU and CPU, tokamax where not installed, ragged_dot on CPU) are listed under
"gmm_skipped" with the reason. --smoke: the 'smoke' shape (T=64, D=32, 8 experts), one repeat, 32 interpreted
tokens and one layer mode of each kind (SMOKE_MODES): every section in seconds, the same code and JSON keys (the
test suite runs it).

    python -m experiments.bench_moe_layer [--shape smoke|tiny|v2lite] [--smoke] [--tokens N]
        [--sections dispatch,gmm,layer] [--modes dropless:tiled,capacity:1.25,pallas:tiled,dropless:megablox]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from moejax.configs import base

from moejax.moe import dispatch, experts, pipeline, stats
from moejax.moe import layer as moe
from moejax.moe.routers import Routing

SHAPES = {
    "smoke": dict(tokens=64, d_model=32, num_experts=8, expert_ffn=16, top_k=2, num_shared=1, dtype="float32"),
    "tiny": dict(tokens=8192, d_model=256, num_experts=63, expert_ffn=176, top_k=7, num_shared=1, dtype="float32"),
    "v2lite": dict(tokens=16384, d_model=2048, num_experts=64, expert_ffn=1408, top_k=6, num_shared=2,
                   dtype="bfloat16"),
}
SMOKE_MODES = ("dropless:tiled", "capacity:1.25", "pallas:tiled")  # one mode of each kind
dropless_plan = jax.jit(dispatch.dropless_plan, static_argnums=(1, 2))  # one compile, not an op-by-op plan


def figure(x: float) -> float:
    """x to 4 significant digits (the tiny figures of a smoke run stay positive)."""
    return float(f"{float(x):.4g}")


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


def interpreted(kind: str) -> bool:
    """Pallas kernels and megablox are interpreted on CPU."""
    return jax.default_backend() == "cpu" and kind in ("pallas", "megablox")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def random_routing(tokens: int, num_experts: int, top_k: int, seed: int = 0) -> Routing:
    """Uniformly random distinct experts per token (about balanced), softmax-like positive weights."""
    keys = jax.random.split(jax.random.key(seed), 2)
    experts_ = jnp.argsort(jax.random.uniform(keys[0], (tokens, num_experts)), axis=1)[:, :top_k].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(keys[1], (tokens, top_k)), axis=-1)
    return Routing(weights=weights, experts=experts_, probs=None, logits=None)


def bench_dispatch(args, dtype, tokens: int, kernel: str) -> dict:
    d, k = args.d_model, args.top_k
    x = jax.random.normal(jax.random.key(0), (tokens, d), dtype)
    route = random_routing(tokens, args.num_experts, k)
    plan = dropless_plan(route, args.num_experts, 1)
    permute, combine = pipeline.kernel_ops(kernel)
    def step(x, w):  # returns the rows too, so that XLA cannot fuse the two gathers into one and skip the buffer
        rows = permute(x, plan.slot_row, plan.row_slot)
        return rows, combine(rows, w, plan.slot_row, plan.row_slot)

    step = jax.jit(step)
    seconds = time_fn(step, x, route.weights, repeats=args.repeats)
    copy_src = jax.random.normal(jax.random.key(1), (tokens * k, d), dtype)
    copy_s = time_fn(jax.jit(lambda a: a + 1), copy_src, repeats=args.repeats)
    item = jnp.dtype(dtype).itemsize
    moved = (3 * k + 1) * tokens * d * item  # permute: read + write T*k rows; combine: read T*k, write T rows
    # the reference: a + 1 over T*k rows reads and writes 2*T*k*D elements
    copy_bw, bw = 2 * tokens * k * d * item / copy_s, moved / seconds
    return {"tokens": tokens, "ms": figure(seconds * 1e3), "GB_per_s": figure(bw / 1e9),
            "copy_GB_per_s": figure(copy_bw / 1e9), "fraction_of_copy": figure(bw / copy_bw),
            "interpreted": interpreted(kernel)}


def bench_gmm(args, dtype, tokens: int, backend: str) -> dict:
    d, f, k, e = args.d_model, args.expert_ffn, args.top_k, args.num_experts
    route = random_routing(tokens, e, k)
    tile = 1 if backend in experts.RAGGED_BACKENDS else dispatch.default_tile(tokens * k, e)
    plan = dropless_plan(route, e, tile)
    x = jax.random.normal(jax.random.key(0), (tokens, d), dtype)
    rows = dispatch.permute(x, plan.slot_row, plan.row_slot)
    keys = jax.random.split(jax.random.key(1), 3)
    weights = tuple(jax.random.normal(key, shape, dtype) * 0.02
                    for key, shape in zip(keys, [(e, d, f), (e, d, f), (e, f, d)], strict=True))
    step = jax.jit(lambda rows, w: experts.grouped_apply(experts.GLUExperts("silu"), rows, w, plan, backend))
    seconds = time_fn(step, rows, weights, repeats=args.repeats)
    dense_rows = jax.random.normal(jax.random.key(2), (tokens * k, d), dtype)
    dense_w = tuple(w[0] for w in weights)
    dense_s = time_fn(jax.jit(lambda r, w: experts.glu(r, *w, "silu")), dense_rows, dense_w, repeats=args.repeats)
    flops = 3 * 2 * tokens * k * d * f
    return {"tokens": tokens, "ms": figure(seconds * 1e3), "TFLOP_per_s": figure(flops / seconds / 1e12),
            "dense_TFLOP_per_s": figure(flops / dense_s / 1e12), "fraction_of_dense": figure(dense_s / seconds),
            "interpreted": interpreted(backend)}


def unsupported_backends(platform: str) -> dict[str, str]:
    """{each grouped-matmul backend that cannot run on platform: why}."""
    unsupported = {}
    if platform not in ("cpu", "tpu"):
        unsupported["megablox"] = "a Pallas TPU (Mosaic) kernel: compiled on TPU only, interpreted on CPU"
    if not experts.tokamax_installed():
        unsupported["tokamax"] = "the tokamax package is not installed (pip install tokamax)"
    return unsupported


def gmm_backends(platform: str) -> tuple[list[str], dict[str, str]]:
    """(the grouped-matmul backends the gmm section runs on platform, {each backend left out: why})."""
    skipped = unsupported_backends(platform)
    if platform == "cpu":
        skipped["ragged_dot"] = "XLA:CPU's ragged_dot runs every expert on every row"
    return [b for b in ("tiled", "megablox", "ragged_dot", "tokamax") if b not in skipped], skipped


def default_modes(platform: str) -> list[str]:
    """The layer section's modes on platform: the tiled loop at three tiles, capacity and the interpreted Pallas
    dispatch on CPU; the platform's grouped matmuls dropless, the Pallas dispatch and capacity elsewhere."""
    if platform == "cpu":
        return ["dropless:tiled", "dropless:tiled:64", "dropless:tiled:512", "capacity:1.0", "capacity:1.25",
                "pallas:tiled"]
    backends = [b for b in gmm_backends(platform)[0] if b != "tiled"]
    return [f"dropless:{b}" for b in backends] + ["pallas:ragged_dot", "capacity:1.25"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the shape's fields, --repeats, --interpret_tokens and --modes filled in for this
    platform where not given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="the smoke shape, --repeats 1 and --interpret_tokens 32 unless given")
    for name in SHAPES["tiny"]:
        parser.add_argument(f"--{name}", type=str if name == "dtype" else int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 5)")
    parser.add_argument("--interpret_tokens", type=int, default=None, help="tokens of interpreted rows (256)")
    parser.add_argument("--sections", default="dispatch,gmm,layer")
    parser.add_argument("--modes", default=None,
                        help="comma list of dropless:<backend>[:<tile>], pallas:<backend> (dropless with the Pallas "
                             "dispatch kernels) and capacity:<factor>; the default leaves out dropless:ragged_dot "
                             "on CPU, where it runs every expert on every token")
    args = parser.parse_args(argv)
    platform = jax.default_backend()
    if args.smoke:
        args.shape = args.shape or "smoke"
    shape = SHAPES[args.shape or ("tiny" if platform == "cpu" else "v2lite")]
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    if args.interpret_tokens is None:
        args.interpret_tokens = 32 if args.smoke else 256
    if args.dtype not in ("float32", "bfloat16"):
        parser.error(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    if args.modes is None:
        args.modes = ",".join(SMOKE_MODES if args.smoke else default_modes(platform))
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the sections of the command line argv; prints each row as it comes and the result as JSON, and
    returns it: {'shape', 'backend', 'device', 'dispatch': {kernel: row}, 'gmm': {backend: row}, 'gmm_skipped':
    {backend: why}, 'layer': {..., 'modes': {mode: row}}} (the sections asked for)."""
    args = parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    sections = args.sections.split(",")
    dtype = jnp.dtype(args.dtype)
    result = {"shape": vars(args), "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}

    if "dispatch" in sections:
        result["dispatch"] = {}
        for name, kernel, tokens in dispatch_runs(args, on_cpu):
            row = result["dispatch"][name] = bench_dispatch(args, dtype, tokens, kernel)
            print(f"dispatch {name}: {row}", flush=True)
    if "gmm" in sections:
        backends, result["gmm_skipped"] = gmm_backends(jax.default_backend())
        result["gmm"] = {}
        for backend in backends:
            tokens = args.interpret_tokens if interpreted(backend) else args.tokens
            row = result["gmm"][backend] = bench_gmm(args, dtype, tokens, backend)
            print(f"gmm {backend}: {row}", flush=True)
    if "layer" in sections:
        result["layer"] = bench_layers(args, dtype)
    print(json.dumps(result, indent=1))
    return result


def dispatch_runs(args: argparse.Namespace, on_cpu: bool) -> list[tuple[str, str, int]]:
    """(row name, kernel, tokens) of the dispatch section: each kernel at --tokens (interpreted ones at
    --interpret_tokens), and on CPU the jnp gathers also at the interpreted size, for a like-for-like row."""
    runs = [(kernel, args.interpret_tokens if interpreted(kernel) else args.tokens) for kernel in pipeline.KERNELS]
    if on_cpu:
        runs.append(("jnp", args.interpret_tokens))
    return [(kernel if tokens == args.tokens or interpreted(kernel) else f"{kernel}@{tokens}", kernel, tokens)
            for kernel, tokens in runs]


def dense_layer(args: argparse.Namespace, dtype) -> tuple[jax.Array, float, dict]:
    """The layer section's reference: (x [1, T, D], seconds of the dense GLU FFN's forward+backward, its row).
    The dense FFN is (top_k + num_shared) * expert_ffn wide: the MoE layer's activated width."""
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, args.d_model), dtype)
    dense_ffn = (args.top_k + args.num_shared) * args.expert_ffn
    dense = moe.GLU(dense_ffn, dtype=dtype)
    step, params = fwd_bwd(dense, jax.jit(dense.init)(jax.random.key(1), x), x)
    dense_s = time_fn(step, params, x, repeats=args.repeats)
    flops = 3 * 2 * 3 * args.tokens * args.d_model * dense_ffn  # 3 matmuls, fwd + 2x bwd
    print(f"dense GLU F={dense_ffn}: {dense_s * 1e3:.1f} ms fwd+bwd", flush=True)
    return x, dense_s, {"dense_ffn": dense_ffn, "dense_fwd_bwd_ms": figure(dense_s * 1e3),
                        "dense_TFLOP_per_s": figure(flops / dense_s / 1e12)}


def bench_mode(args: argparse.Namespace, dtype, mode: str, x: jax.Array, dense_s: float) -> dict:
    """One mode of the layer section (dropless:<backend>[:<tile>], pallas:<backend> or capacity:<factor>): the
    MoE layer's forward+backward on x [1, T, D] against the dense FFN's dense_s seconds, and its routing figures."""
    kind, *opts = mode.split(":")
    cfg = base.get_config().model.moe
    cfg.update(num_experts=args.num_experts, top_k=args.top_k, expert_ffn=args.expert_ffn,
               num_shared=args.num_shared, dispatch="capacity" if kind == "capacity" else "dropless",
               balance_loss="none")
    if kind == "capacity":
        cfg.capacity_factor = float(opts[0])
    else:
        cfg.gmm_backend = opts[0]
        cfg.gmm_tile = int(opts[1]) if len(opts) > 1 else 0
        cfg.dispatch_kernel = "pallas" if kind == "pallas" else "jnp"
    layer = moe.MoE(cfg, dtype=dtype, kernel_init=nn.initializers.normal(0.02))
    initial = jax.jit(layer.init)(jax.random.key(2), x)  # its forward pass sows the routing statistics of x
    (record,) = stats.collect(initial["moe_aux"]).values()  # one layer, one routed pass
    variables = {"params": initial["params"], "moe_state": initial["moe_state"]}
    step, params = fwd_bwd(layer, variables, x)
    seconds = time_fn(step, params, x, repeats=args.repeats)
    print(f"layer {mode}: {seconds * 1e3:.1f} ms = {seconds / dense_s:.2f}x dense", flush=True)
    return {
        "fwd_bwd_ms": figure(seconds * 1e3),
        "ratio_to_dense": figure(seconds / dense_s),
        "fraction_of_dense_rate": figure(dense_s / seconds),
        "drop_fraction": figure(record.drop_fraction),
        "max_over_mean_load": figure(record.max_over_mean_load),
    }


def bench_layers(args: argparse.Namespace, dtype) -> dict:
    """The layer section: the dense reference's row, {'modes': {mode: bench_mode's row}} and the best mode."""
    x, dense_s, result = dense_layer(args, dtype)
    result["modes"] = {mode: bench_mode(args, dtype, mode, x, dense_s) for mode in args.modes.split(",")}
    best = min(result["modes"], key=lambda m: result["modes"][m]["ratio_to_dense"])
    result["best_mode"] = best
    result["best_ratio_to_dense"] = result["modes"][best]["ratio_to_dense"]
    return result


if __name__ == "__main__":
    main()
