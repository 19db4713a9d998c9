"""moejax on whatever accelerator jax finds: correctness on the hardware, then the speed figures; one JSON and a log.

Parts (--parts, all by default; each has a time budget, after which its remaining items are skipped and say so;
one part's failure is recorded and the next part runs):

1. ``correctness``: the Pallas dispatch kernels (moejax/kernels/dispatch.py) compiled for the platform (Triton on
   GPU, Mosaic on TPU; interpreted on CPU only) against jnp references (the gathers written out; permute and
   unpermute-combine forward and VJP against moejax.moe.dispatch's jnp ops, dropless and with capacity drops), and
   every grouped-matmul backend (``model.moe.gmm_backend``: tiled, ragged_dot, megablox, tokamax) that runs here,
   dispatch -> experts -> combine against the dense every-expert-on-every-token reference, forward and gradients
   (tokens, routing weights, expert weights), with empty experts and groups that are not tile multiples. Each
   check (experiments/kernel_checks.py) records its largest error relative to the reference's largest magnitude,
   and its tolerance.
2. ``moe_layer``: experiments/bench_moe_layer.py's figures at --shape v2lite (T=16384, D=2048, E=64, F=1408, k=6,
   bf16; dry: its smoke shape, one layer mode), row by row: dispatch bandwidth as a fraction of a device copy,
   grouped-matmul rate as a fraction of a dense matmul of equal FLOPs, the MoE layer's forward+backward as a
   fraction of the dense FFN's rate, per kernel, backend and mode (the tiled loop too); beside the goals of GOALS.
3. ``train_step``: the main job's jitted train step (moejax/training/step.py) at configs/deepseekmoe.py:small with
   a batch of TRAIN_BATCH x 256 tokens in bf16, and beside it configs/dense.py (dense FFN of the same activated
   width): tokens/s and model FLOPs utilisation against a large bf16 matmul measured in the same run. Model FLOPs
   per token: 6 x the activated matmul parameters (embedding lookup excluded) + 12 x layers x heads x head width
   x sequence length (attention scores and values, not halved for causality, as PaLM counts them).
4. ``decode``: experiments/bench_generate.py's prefill, cached decode and no-cache tokens/s at batch 1 and 64
   (dry: its --smoke settings, the tiny model).

On a GPU machine, from the repository root (writes experiments/results/gpu_check.json and gpu_check.log beside it;
exit status 1 when a correctness check failed or could not run):

    JAX_PLATFORMS=cuda python -m experiments.gpu_check --out experiments/results/gpu_check.json

The run is sized to finish inside 10 minutes (PART_BUDGET_S); progress goes to stderr and the log. ``--dry`` runs
every part at tiny shapes on CPU in well under a minute (the test suite runs it); its JSON goes to --out or a
temporary directory. Imports happen inside the parts, so that a package missing on the machine fails only the
parts that need it (recorded under 'errors'; 'packages' lists what is installed): moejax's MoE code needs
ml-collections (moejax.moe.routers), the train step also clu (its metrics); a GPU image without them needs them
installed (pure Python: ``pip install --no-deps ml-collections clu``, or their wheels carried in).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import pathlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    import ml_collections

PARTS = ("correctness", "moe_layer", "train_step", "decode")
PART_BUDGET_S = {"correctness": 90, "moe_layer": 200, "train_step": 120, "decode": 90}  # on an accelerator
DRY_BUDGET_S = 60  # each part's, in --dry
OVER_BUDGET = "its part's time budget was spent"
GOALS = {"dispatch_fraction_of_copy": 0.6, "gmm_fraction_of_dense": 0.6, "layer_fraction_of_dense_rate": 0.4}
DTYPES, DRY_DTYPES = ("float32", "bfloat16"), ("float32",)  # correctness checks (bf16: tests/moe/test_kernels)
PACKAGES = ("flax", "optax", "ml-collections", "clu", "grain", "tokamax", "numpy", "ml_dtypes")
TRAIN_BATCH, TRAIN_STEPS, MATMUL_SIZE = 256, 10, 8192
DRY_TRAIN = dict(num_layers=1, batch_size=2, seq_len=32, steps=2, matmul_size=256)
DECODE = dict(models=("tiny", "v2lite"), prompt=32, new_tokens=128, nocache_steps=8)
DECODE_BATCHES = [1, 64]  # dry: bench_generate's smoke settings, the tiny model only
DRY_MODES = "dropless:tiled"  # the layer modes of --dry


class Run:
    """The run's JSON record, its log (stderr and a file) and the time budget of the part in progress."""

    def __init__(self, out: pathlib.Path, dry: bool):
        self.out, self.dry = out, dry
        self.log = open(out.with_suffix(".log"), "w")  # open for the whole run
        self.start = self.deadline = time.perf_counter()
        self.record: dict = {"skipped": {}, "errors": {}}

    def write(self, text: str) -> int:  # a stream: the benchmarks' prints go to stderr and the log
        sys.stderr.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def say(self, line: str) -> None:
        self.write(f"[{time.perf_counter() - self.start:6.1f}s] {line}\n")

    def skip(self, name: str, why: str) -> None:
        self.record["skipped"][name] = why
        self.say(f"skipped {name}: {why}")

    def over_budget(self, name: str) -> bool:
        """True (and name recorded as skipped) once the part's budget is spent."""
        if time.perf_counter() < self.deadline:
            return False
        self.skip(name, OVER_BUDGET)
        return True

    def item(self, name: str, fn: Callable[[], dict | None]) -> dict | None:
        """fn()'s result, or None with the error recorded (the run goes on)."""
        if self.over_budget(name):
            return None
        start, cpu = time.perf_counter(), time.process_time()
        try:
            with contextlib.redirect_stdout(self):
                result = fn()
            self.log.write(f"{name}: {time.perf_counter() - start:.1f} s ({time.process_time() - cpu:.1f} s CPU)\n")
            return result
        except Exception as err:  # one failing item must not stop the others
            self.record["errors"][name] = f"{type(err).__name__}: {err}"[:2000]  # the traceback: in the log
            self.say(f"error in {name}: {type(err).__name__}: {err}")
            self.log.write(traceback.format_exc())
            return None

    def save(self) -> None:
        self.record["seconds"] = round(time.perf_counter() - self.start, 1)
        self.out.write_text(json.dumps(self.record, indent=1, default=float) + "\n")


# ----------------------------------------------------------------------------------------------- 1. correctness


def correctness(run: Run) -> None:
    """Part 1: experiments/kernel_checks.py's checks (under 'correctness'/'checks', matmuls at full float32
    precision: no TF32)."""
    from experiments import bench_moe_layer as bml
    from experiments import kernel_checks as kc

    part = run.record["correctness"] = {"checks": {}, "skipped": {}}

    def check(name: str, fn: Callable[[], dict[str, dict]]) -> None:
        part["checks"].update(run.item(name, fn) or {})

    unsupported = bml.unsupported_backends(jax.default_backend())
    wide = (64, 6, 256) if run.dry else (512, 6, 2048)  # T, k, D
    gmm_shape = (32, 3, 6, 32, 24) if run.dry else (512, 6, 16, 256, 192)  # T, k, E, D, F
    with jax.default_matmul_precision("highest"):
        for dtype in DRY_DTYPES if run.dry else DTYPES:
            for case, shape in {"uneven": (21, 3, 48), "wide": wide}.items():
                check(f"correctness/kernel/gathers/{case}/{dtype}", lambda d=dtype, c=case, s=shape:
                      kc.gather_checks(d, c, s))
            for mode in ("dropless", "capacity"):
                check(f"correctness/kernel/permute_combine/{mode}/{dtype}", lambda d=dtype, m=mode:
                      kc.permute_checks(d, m, wide))
        for backend in ("tiled", "ragged_dot", "megablox", "tokamax"):
            if why := unsupported.get(backend):
                part["skipped"][backend] = why
                run.skip(f"correctness/gmm/{backend}", why)
                continue
            for dtype in DRY_DTYPES if run.dry else DTYPES:
                check(f"correctness/gmm/{backend}/{dtype}", lambda b=backend, d=dtype: kc.gmm_checks(b, d, gmm_shape))


# ----------------------------------------------------------------------------------------------- 2. MoE layer


def moe_layer(run: Run) -> None:
    """Part 2: experiments/bench_moe_layer.py's rows one by one (under 'moe_layer'), and their fractions."""
    from experiments import bench_moe_layer as bml

    platform = jax.default_backend()
    args = bml.parse_args(["--smoke", "--modes", DRY_MODES] if run.dry else ["--shape", "v2lite"])
    modes = args.modes.split(",")
    if platform != "cpu" and "dropless:tiled" not in modes:
        modes.insert(0, "dropless:tiled")
    dtype = jnp.dtype(args.dtype)
    backends, skipped = bml.gmm_backends(platform)
    part = run.record["moe_layer"] = {"shape": {n: getattr(args, n) for n in bml.SHAPES["tiny"]}, "goals": GOALS,
                                      "dispatch": {}, "gmm": {}, "gmm_skipped": skipped, "layer": {"modes": {}}}
    for backend, why in skipped.items():
        run.skip(f"moe_layer/gmm/{backend}", why)
    for name, kernel, tokens in bml.dispatch_runs(args, platform == "cpu"):
        row = run.item(f"moe_layer/dispatch/{name}", lambda k=kernel, n=tokens: bml.bench_dispatch(args, dtype, n, k))
        if row is not None:
            part["dispatch"][name] = row
            run.say(f"dispatch {name}: {row['fraction_of_copy']} of a device copy")
    for backend in backends:
        tokens = args.interpret_tokens if bml.interpreted(backend) else args.tokens
        row = run.item(f"moe_layer/gmm/{backend}", lambda b=backend, n=tokens: bml.bench_gmm(args, dtype, n, b))
        if row is not None:
            part["gmm"][backend] = row
            run.say(f"gmm {backend}: {row['fraction_of_dense']} of the dense matmul rate")
    dense = run.item("moe_layer/layer/dense", lambda: dict(zip(("x", "seconds", "row"), bml.dense_layer(args, dtype),
                                                               strict=True)))
    if dense is None:
        return
    part["layer"].update(dense["row"])
    for mode in modes:
        row = run.item(f"moe_layer/layer/{mode}", lambda m=mode: bml.bench_mode(args, dtype, m, dense["x"],
                                                                                  dense["seconds"]))
        if row is not None:
            part["layer"]["modes"][mode] = row
    part["fractions"] = {
        "dispatch_fraction_of_copy": {n: r["fraction_of_copy"] for n, r in part["dispatch"].items()},
        "gmm_fraction_of_dense": {n: r["fraction_of_dense"] for n, r in part["gmm"].items()},
        "layer_fraction_of_dense_rate": {m: r["fraction_of_dense_rate"] for m, r in part["layer"]["modes"].items()}}


# ----------------------------------------------------------------------------------------------- 3. train step


def matmul_rate(size: int, repeats: int) -> float:
    """FLOP/s of a [size, size] @ [size, size] bf16 matmul (median of repeats)."""
    from experiments.bench_moe_layer import time_fn

    a, b = (jax.random.normal(jax.random.key(i), (size, size), jnp.bfloat16) for i in range(2))
    return 2 * size**3 / time_fn(jax.jit(jnp.matmul), a, b, repeats=repeats)


def model_flops_per_token(config: ml_collections.ConfigDict, counts: dict[str, int]) -> float:
    """6 x activated matmul parameters + 12 x layers x heads x head width x sequence length (PaLM's count)."""
    m = config.model
    embed = 0 if m.tie_embeddings else m.vocab_size * m.d_model  # the lookup does no matmul
    head_dim = m.head_dim or m.d_model // m.num_heads
    return 6 * (counts["activated"] - embed) + 12 * m.num_layers * m.num_heads * head_dim * config.train.seq_len


def train_rate(config: ml_collections.ConfigDict, steps: int, peak: float) -> dict:
    """Tokens/s and MFU (against peak FLOP/s) of the main job's train step on random tokens [B, S + 1], timed over
    `steps` steps after one compiling step."""
    from moejax import model
    from moejax.moe import experts
    from moejax.training import hooks, initialise, metrics, objectives, optim, step

    module = model.Transformer(config.model)
    tx = optim.make_optimizer(config)
    batch, seq = config.train.batch_size, config.train.seq_len

    def init(key):
        variables = module.init(key, jnp.zeros((1, seq), jnp.int32))
        return initialise.new_state(variables["params"], variables.get("moe_state", {}), tx)

    state = jax.jit(init)(jax.random.key(0))
    counts = model.param_counts(state.params, config.model)
    empty = metrics.metrics_collection(True, len(model.moe_layers(config.model)), config.model.moe.num_experts).empty()
    objective = objectives.from_config(config, module, jax.random.key(1))
    step_fn = jax.jit(lambda s, m, b: step.train_step(s, m, b, objective=objective, tx=tx,
                                                      hooks=hooks.from_config(config)), donate_argnums=0)
    tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 0, config.model.vocab_size)
    start = time.perf_counter()
    state, _, out = step_fn(state, empty, tokens)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, _, out = step_fn(state, empty, tokens)
    loss = float(jax.block_until_ready(out)[0])
    seconds = (time.perf_counter() - start) / steps
    flops = model_flops_per_token(config, counts)
    tokens_per_s = batch * seq / seconds
    return {"params_total": counts["total"], "params_activated": counts["activated"], "batch": batch, "seq_len": seq,
            "dtype": config.model.dtype, "gmm_backend": experts.resolve_backend(config.model.moe.gmm_backend),
            "first_step_s": compile_s, "step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
            "model_flops_per_token": flops, "model_TFLOP_per_s": tokens_per_s * flops / 1e12,
            "mfu": tokens_per_s * flops / peak, "loss": loss}


def train_configs(dry: bool) -> dict[str, ml_collections.ConfigDict]:
    """{'moe': deepseekmoe small (dry: tiny, cut), 'dense': configs/dense.py with the MoE's activated FFN width}."""
    from moejax.configs import deepseekmoe
    from moejax.configs import dense as dense_config

    moe = deepseekmoe.get_config("tiny" if dry else "small")
    moe.train.batch_size = DRY_TRAIN["batch_size"] if dry else TRAIN_BATCH
    if dry:
        moe.model.num_layers = DRY_TRAIN["num_layers"]
        moe.train.seq_len = DRY_TRAIN["seq_len"]
    moe.model.dtype = "bfloat16"
    dense = dense_config.get_config()
    m = moe.model
    width = (m.moe.num_shared + m.moe.top_k) * m.moe.expert_ffn
    dense.model.update(d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads, qk_norm=m.qk_norm,
                       vocab_size=m.vocab_size, dtype=m.dtype, ffn_dim=width)
    dense.train.update(batch_size=moe.train.batch_size, seq_len=moe.train.seq_len)
    return {"moe": moe, "dense": dense}


def train_step(run: Run) -> None:
    """Part 3: the bf16 matmul rate, then the MoE and the dense train step (under 'train_step')."""
    size = DRY_TRAIN["matmul_size"] if run.dry else MATMUL_SIZE
    part = run.record["train_step"] = {"matmul_size": size}
    peak = run.item("train_step/matmul", lambda: {"flops": matmul_rate(size, repeats=3 if run.dry else 10)})
    if peak is None:
        return
    part["matmul_TFLOP_per_s"] = peak["flops"] / 1e12
    run.say(f"bf16 matmul {size}^3: {peak['flops'] / 1e12:.1f} TFLOP/s")
    steps = DRY_TRAIN["steps"] if run.dry else TRAIN_STEPS
    for name, config in train_configs(run.dry).items():
        row = run.item(f"train_step/{name}", lambda c=config: train_rate(c, steps, peak["flops"]))
        if row is not None:
            part[name] = row
            run.say(f"train step {name}: {row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.3f}")


# ----------------------------------------------------------------------------------------------- 4. decode


def decode(run: Run) -> None:
    """Part 4: experiments/bench_generate.py's rows per model (under 'decode')."""
    from experiments import bench_generate as bg

    settings = {**bg.SMOKE, "models": ("tiny",)} if run.dry else {**DECODE, "batches": DECODE_BATCHES}
    part = run.record["decode"] = {"settings": settings, "rows": []}
    for name in settings["models"]:
        def bench(name=name):
            config = bg.tiny(None)[0] if name == "tiny" else bg.v2lite_100m()
            if run.dry:
                config = bg.shrunk(config)
            return {"rows": bg.bench(name, config, None, settings["batches"], settings["prompt"],
                                     settings["new_tokens"], settings["nocache_steps"])}

        rows = run.item(f"decode/{name}", bench)
        if rows is not None:
            part["rows"] += rows["rows"]


# ----------------------------------------------------------------------------------------------- the run


def header() -> dict:
    """The platform, device, versions and installed packages of this run, and jax's environment report."""
    import jaxlib

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    device = jax.devices()[0]
    return {"platform": jax.default_backend(), "device": device.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": sys.version.split()[0],
            "packages": packages, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "environment": jax.print_environment_info(return_string=True)}  # on GPU: nvidia-smi's table too


def main(argv: list[str] | None = None) -> dict:
    """Runs the parts the command line asks for; returns the JSON record it wrote (with the correctness part:
    'correctness_passed', true when every check ran and passed, and 'correctness_failed', the checks that failed,
    raised or did not run for lack of time)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny shapes, a few steps: every part in seconds")
    parser.add_argument("--out", default=None, help="the JSON's path (its log: the same path ending in .log); "
                        "default experiments/results/gpu_check.json on a GPU, else a temporary directory")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    if args.out:
        out = pathlib.Path(args.out)
    elif jax.default_backend() == "gpu" and not args.dry:
        out = pathlib.Path(__file__).resolve().parent / "results" / "gpu_check.json"
    else:
        out = pathlib.Path(tempfile.mkdtemp(prefix="moejax_gpu_check_")) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.dry)
    run.record.update(header(), dry=args.dry, parts=parts)
    run.say(f"{run.record['platform']} ({run.record['device']}), jax {run.record['jax']}; writing {out}")
    for name, fn in {"correctness": correctness, "moe_layer": moe_layer, "train_step": train_step,
                     "decode": decode}.items():
        if name not in parts:
            run.skip(name, "not in --parts")
            continue
        budget = DRY_BUDGET_S if args.dry else PART_BUDGET_S[name]
        run.say(f"part {name} (budget {budget} s)")
        run.deadline = time.perf_counter() + budget
        run.item(name, lambda fn=fn: fn(run) or {})
        run.save()
    if "correctness" in parts:
        checks = run.record.get("correctness", {}).get("checks", {})
        failed = [name for name, c in checks.items() if not c["passed"]]
        failed += [f"{name} (error)" for name in run.record["errors"] if name.startswith("correctness")]
        failed += [f"{name} (not run: {why})" for name, why in run.record["skipped"].items()
                   if name.startswith("correctness/") and why == OVER_BUDGET]
        failed += [] if checks else ["correctness (no check ran)"]
        run.record["correctness_passed"] = not failed
        run.record["correctness_failed"] = failed
        run.say(f"correctness: {'passed' if not failed else 'FAILED ' + ', '.join(failed)}")
    run.save()
    run.say(f"{len(run.record['skipped'])} skipped, {len(run.record['errors'])} errors; wrote {out} and its log")
    run.log.close()
    return run.record


if __name__ == "__main__":
    sys.exit(1 if main().get("correctness_passed") is False else 0)
