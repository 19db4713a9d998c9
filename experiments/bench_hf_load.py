"""Load time and peak host memory of ``moejax.hf.load`` on a synthetic transformers-format checkpoint.

Builds a checkpoint of at least --gib GiB (random weights, several safetensors shards with an index) of a released
family's shape, scaled down in width, vocabulary and depth, in a temporary directory; then loads it with
``moejax.hf.load(dir)`` in a fresh Python process (so that its RSS holds nothing else) and reports the load time,
the checkpoint's bytes, the RSS before loading (jax and moejax imported, the CPU backend started), the peak RSS
(VmHWM of /proc/self/status; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is printed too, but on Linux it starts
from the RSS of the parent process at the fork, which exec carries over, so here it reports the writer's memory when
that is larger), the RSS after loading, the bytes of the loaded variables (jax
arrays on the CPU device: one copy of the model), the largest single parameter, and the ratios. A sampler thread
reads /proc/self/status every 5 ms during the load to split the RSS into anonymous memory (numpy and jax buffers)
and file-backed pages (the memory-mapped checkpoint files).

    python -m experiments.bench_hf_load [--gib 1.0] [--family deepseek_v2 ...] [--dtype bfloat16] [--keep]
        [--json PATH] [--smoke]

Families (--family, several allowed; default deepseek_v2): mixtral, qwen3_moe, olmoe, deepseek_v2 (DeepSeek-V2-Lite
at half width: d_model 1024, 8 MLA heads, 2 shared + 64 routed experts of 704, top-6, its 102400 vocabulary),
deepseek_v3 (written as FP8 e4m3 with 128 x 128 block scales, as released, dequantised to --dtype on load), gpt_oss.
Each starts from the released preset (configs/<family>.py) with the overrides in SHAPES; the number of MoE layers
is the smallest that reaches --gib on disk; a vocabulary whose two embedding tables would fill half of it is cut to
32768. The figures end as one JSON object on stdout (and in --json PATH): {'machine', 'results': [one per family]}.
--smoke: the families shrunk further (SMOKE_MODEL, SMOKE_MLA, SMOKE_MOE), a 2 MiB checkpoint in 2 shards: the same
steps and JSON keys in seconds (the test suite runs it). Nothing here needs torch or transformers.
"""
import argparse
import importlib
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

GIB = 2**30
SMALL_VOCAB = 32768

# family: (config file, released preset, model_type, model overrides, mla overrides, moe overrides)
SHAPES = {
    "mixtral": ("mixtral", "8x7b", "mixtral", dict(d_model=1024, num_heads=8, num_kv_heads=2, ffn_dim=3584), {},
                dict(expert_ffn=3584)),
    "qwen3_moe": ("qwen3_moe", "30b_a3b", "qwen3_moe", dict(d_model=1024, num_heads=16, num_kv_heads=2, ffn_dim=3072),
                  {}, dict(expert_ffn=384)),
    "olmoe": ("olmoe", "1b_7b", "olmoe", dict(d_model=1024, num_heads=8, num_kv_heads=8, ffn_dim=512), {},
              dict(expert_ffn=512)),
    "deepseek_v2": ("deepseek_v2_lite", "lite", "deepseek_v2", dict(d_model=1024, num_heads=8, ffn_dim=5472),
                    dict(kv_lora_rank=256), dict(expert_ffn=704)),
    "deepseek_v3": ("deepseek_v3", "671b", "deepseek_v3",
                    dict(d_model=1024, num_heads=8, ffn_dim=2560, first_dense_layers=1),
                    dict(q_lora_rank=384, kv_lora_rank=128), dict(num_experts=64, expert_ffn=512)),
    "gpt_oss": ("gpt_oss", "20b", "gpt_oss", dict(d_model=1440, num_heads=32, num_kv_heads=4, ffn_dim=1440), {},
                dict(expert_ffn=1440)),
}
FP8_FAMILIES = ("deepseek_v3",)
# --smoke: model, MLA and MoE fields set after SHAPES' (a q_lora_rank stays 0 where the family has none)
SMOKE_MODEL = dict(d_model=128, ffn_dim=256, vocab_size=1024)
SMOKE_MLA = dict(kv_lora_rank=32, q_lora_rank=64)
SMOKE_MOE = dict(num_experts=16, expert_ffn=64)  # 16: two per group of deepseek_v3's 8
SMOKE_GIB, SMOKE_SHARDS = 2 / 1024, 2
FP8_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}


# ----------------------------------------------------------------------------------------------- the checkpoint


def _param_bytes(model_cfg, itemsize: int) -> int:
    import jax

    from moejax import hf

    abstract = hf.abstract_variables(model_cfg)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract["params"])) * itemsize


def bench_model(family: str, target_bytes: int, dtype: str, smoke: bool = False):
    """The moejax model config of the benchmark checkpoint: the released preset with SHAPES' overrides (and the
    SMOKE_* ones for smoke) and as many MoE layers as reach target_bytes on disk (FP8 families: one byte per
    quantised weight, counted as such)."""
    file, preset, _, model_fields, mla_fields, moe_fields = SHAPES[family]
    m = importlib.import_module(f"moejax.configs.{file}").get_config(preset).model
    m.update(model_fields)
    m.mla.update(mla_fields)
    m.moe.update(moe_fields)
    if smoke:
        m.update(SMOKE_MODEL)
        m.mla.update({k: v for k, v in SMOKE_MLA.items() if k != "q_lora_rank" or m.mla.q_lora_rank})
        m.moe.update(SMOKE_MOE)
    m.update(dtype=dtype, param_dtype=dtype, layer_types=())
    itemsize = 1 if family in FP8_FAMILIES else np.dtype(_np_dtype(dtype)).itemsize
    if 2 * m.vocab_size * m.d_model * max(itemsize, 2) > target_bytes / 2:
        m.vocab_size = SMALL_VOCAB
    first = m.first_dense_layers
    sizes = []
    for layers in (first + 1, first + 2):
        m.num_layers = layers
        sizes.append(_param_bytes(m, itemsize))
    per_layer = sizes[1] - sizes[0]
    fixed = sizes[0] - per_layer
    m.num_layers = first + max(2, math.ceil((target_bytes - fixed) / per_layer))
    if family == "gpt_oss":
        m.layer_types = ("sliding", "full") * (m.num_layers // 2) + ("sliding",) * (m.num_layers % 2)
    return m


def _np_dtype(dtype: str):
    import ml_dtypes

    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]


def write_checkpoint(family: str, m, directory: pathlib.Path, shards: int, seed: int = 0) -> None:
    """Random weights of model m saved with moejax.hf.save as `family` in about `shards` files (FP8 families:
    saved in m's dtype to a scratch directory, then every layer Linear weight but the router's quantised to FP8
    with 128 x 128 block scales, as DeepSeek-V3 is released)."""
    import jax

    from moejax import hf

    abstract = hf.abstract_variables(m)
    rng = np.random.default_rng(seed)
    dtype = _np_dtype(m.param_dtype)

    def random(leaf):
        return (rng.standard_normal(leaf.shape, dtype=np.float32) * 0.02).astype(dtype)

    variables = {"params": jax.tree.map(random, abstract["params"]),
                 "moe_state": jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract["moe_state"])}
    total = sum(x.nbytes for x in jax.tree.leaves(variables))
    model_type = SHAPES[family][2]
    if family not in FP8_FAMILIES:
        hf.save(m, variables, directory, model_type=model_type, max_shard_bytes=math.ceil(total / shards))
        return
    scratch = directory.with_name(directory.name + "_unquantised")
    hf.save(m, variables, scratch, model_type=model_type, max_shard_bytes=math.ceil(total / shards))
    del variables
    _quantise_fp8(scratch, directory, shards)
    shutil.rmtree(scratch)


def _fp8_weight(key: str, shape: tuple[int, ...]) -> bool:
    return (key.startswith("model.layers.") and key.endswith(".weight") and len(shape) == 2
            and "norm" not in key and not key.endswith("mlp.gate.weight"))


def _quantise_fp8(source: pathlib.Path, out: pathlib.Path, shards: int) -> None:
    from moejax.hf import io, quant

    ckpt = io.Checkpoint(source)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def quantised(key: str) -> tuple[np.ndarray, np.ndarray]:
        if key not in cache:
            cache.clear()
            cache[key] = quant.quantize_fp8(np.asarray(ckpt.array(key), np.float32), (128, 128))
        return cache[key]

    entries = []
    for key in ckpt.keys():
        shape, dtype = ckpt.shape(key), ckpt.dtype(key)
        if _fp8_weight(key, shape):
            scale_shape = quant.fp8_scale_shape(shape, (128, 128))
            entries.append((key, shape, np.dtype(quant.FP8_DTYPES[0]), lambda key=key: quantised(key)[0]))
            entries.append((key + "_scale_inv", scale_shape, np.dtype(np.float32),
                            lambda key=key: quantised(key)[1]))
        else:
            entries.append((key, shape, dtype, lambda key=key: np.asarray(ckpt.array(key))))
    total = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype, _ in entries)
    out.mkdir(parents=True, exist_ok=True)
    io.write_checkpoint(out, entries, math.ceil(total / shards))
    raw = json.loads((source / "config.json").read_text())
    raw["quantization_config"] = FP8_QUANTIZATION
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def checkpoint_bytes(directory: pathlib.Path) -> tuple[int, int]:
    """(bytes of the *.safetensors files, their number)."""
    files = sorted(directory.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files), len(files)


# ----------------------------------------------------------------------------------------------- the measurement


def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(directory: str, dtype: str | None) -> dict:
    """Loads the checkpoint in this (fresh) process; the figures as a dict."""
    import jax

    import moejax.hf

    jax.devices()  # start the CPU backend before the baseline
    before = _status()
    maxrss_before = _max_rss()
    seen = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.005):
            status = _status()
            for name in seen:
                seen[name] = max(seen[name], status.get(name, 0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    config, variables = moejax.hf.load(directory, dtype=dtype)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = _status()
    leaves = jax.tree.leaves(variables)
    largest = max(leaves, key=lambda x: x.nbytes)
    return {
        "load_seconds": seconds, "rss_before": before["VmRSS"], "peak_rss_before_load": before["VmHWM"],
        "peak_rss": after["VmHWM"], "ru_maxrss_before_load": maxrss_before, "ru_maxrss": _max_rss(),
        "rss_after": after["VmRSS"], "rss_anon_after": after.get("RssAnon", 0),
        "rss_file_after": after.get("RssFile", 0), "sampled_peak_anon": seen["RssAnon"],
        "sampled_peak_file": seen["RssFile"], "sampled_peak_rss": seen["VmRSS"],
        "variables_bytes": sum(x.nbytes for x in leaves), "largest_parameter_bytes": largest.nbytes,
        "largest_parameter_shape": list(largest.shape), "param_dtype": config.model.param_dtype,
        "num_parameters": sum(x.size for x in leaves),
    }


def measure_in_fresh_process(directory: pathlib.Path, dtype: str | None) -> dict:
    command = [sys.executable, "-m", "experiments.bench_hf_load", "--measure", str(directory)]
    if dtype:
        command += ["--load_dtype", dtype]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise RuntimeError(f"the load process failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    import jax

    return (f"{os.cpu_count()} CPUs ({usable} usable{', ' + model if model else ''}), {memory:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, jax {jax.__version__}, "
            f"numpy {np.__version__}")


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB ({n / GIB:.3f} GiB)"


def report(family: str, m, ckpt: int, files: int, write_seconds: float, r: dict) -> str:
    rows = [
        ("checkpoint", f"{_gb(ckpt)} in {files} safetensors shards + index"
                       f"{' (FP8 e4m3, 128x128 block scales)' if family in FP8_FAMILIES else ''}; written in "
                       f"{write_seconds:.1f} s"),
        ("loaded model", f"{r['num_parameters'] / 1e9:.3f}B parameters in {r['param_dtype']}: "
                         f"{_gb(r['variables_bytes'])} of jax arrays"),
        ("largest parameter", f"{r['largest_parameter_shape']}: {_gb(r['largest_parameter_bytes'])}"),
        ("load time", f"{r['load_seconds']:.2f} s ({ckpt / r['load_seconds'] / 1e9:.2f} GB/s of checkpoint)"),
        ("RSS before load (baseline)", _gb(r["rss_before"])),
        ("peak RSS (VmHWM)", f"{_gb(r['peak_rss'])}; before load {_gb(r['peak_rss_before_load'])}"),
        ("ru_maxrss", f"{_gb(r['ru_maxrss'])}; before load {_gb(r['ru_maxrss_before_load'])} (carries the parent's "
                      f"RSS at the fork)"),
        ("RSS after load", f"{_gb(r['rss_after'])}: anon {_gb(r['rss_anon_after'])}, "
                           f"file-backed {_gb(r['rss_file_after'])}"),
        ("sampled peaks during load", f"anon {_gb(r['sampled_peak_anon'])}, file-backed "
                                      f"{_gb(r['sampled_peak_file'])} (every 5 ms)"),
        ("peak RSS / checkpoint bytes", f"{r['peak_rss'] / ckpt:.2f}"),
        ("(peak - baseline) / checkpoint bytes", f"{(r['peak_rss'] - r['rss_before']) / ckpt:.2f}"),
        ("(peak - baseline) / loaded model bytes", f"{(r['peak_rss'] - r['rss_before']) / r['variables_bytes']:.2f}"),
        ("peak - final RSS (transient)", _gb(r["peak_rss"] - r["rss_after"])),
        ("peak - baseline - model - largest parameter",
         _gb(r["peak_rss"] - r["rss_before"] - r["variables_bytes"] - r["largest_parameter_bytes"])),
    ]
    width = max(len(name) for name, _ in rows)
    shape = (f"d_model {m.d_model}, {m.num_layers} layers ({m.first_dense_layers} dense), {m.moe.num_experts} "
             f"experts of {m.moe.expert_ffn}, top-{m.moe.top_k}, vocabulary {m.vocab_size}")
    lines = [f"moejax.hf.load: {family} ({shape})", "-" * (width + 60)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    """Runs the command line argv: writes each family's checkpoint, loads it in a fresh process, prints the report
    and the figures as JSON ({'machine', 'results'}), which it returns (None in the --measure child process)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=None, help="checkpoint size to reach on disk, GiB (1.0)")
    parser.add_argument("--family", nargs="+", default=["deepseek_v2"], choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the weights on disk (FP8 families: of the dequantised weights)")
    parser.add_argument("--shards", type=int, default=None, help="about this many safetensors files (5)")
    parser.add_argument("--dir", default=None, help="where to write (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="shrunk families, a 2 MiB checkpoint in 2 shards")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process: load and print
    parser.add_argument("--load_dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.load_dtype)))
        return None
    gib = args.gib or (SMOKE_GIB if args.smoke else 1.0)
    shards = args.shards or (SMOKE_SHARDS if args.smoke else 5)

    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="moejax_bench_hf_load_"))
    print(f"machine: {machine()}", flush=True)
    results = []
    try:
        for family in args.family:
            m = bench_model(family, int(gib * GIB), args.dtype, args.smoke)
            directory = root / family
            if directory.exists():
                shutil.rmtree(directory)
            start = time.perf_counter()
            write_checkpoint(family, m, directory, shards)
            written = time.perf_counter() - start
            ckpt, files = checkpoint_bytes(directory)
            figures = measure_in_fresh_process(directory, args.dtype if family in FP8_FAMILIES else None)
            print(report(family, m, ckpt, files, written, figures), flush=True)
            results.append({"family": family, "checkpoint_bytes": ckpt, "files": files,
                            "write_seconds": written, **figures})
    finally:
        if args.keep:
            print(f"checkpoints kept in {root}")
        elif args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    result = {"machine": machine(), "results": results}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text)
    return result


if __name__ == "__main__":
    main()
