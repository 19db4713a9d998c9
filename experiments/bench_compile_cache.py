"""First and second call of ``python -m moejax.generate`` and ``python -m moejax.evaluate`` with JAX's persistent
compilation cache (``--compile_cache``, on by default) against the same calls without it; prints JSON.

Each call is a fresh process (as a user runs the commands): wall seconds from start to exit, on the untrained model of
``tests/helpers_train.py`` (the test suite's tiny config) saved in a temporary directory. --smoke: generate only,
two calls with the cache (the suite runs it).

    python -m experiments.bench_compile_cache [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def _untrained(workdir: pathlib.Path) -> pathlib.Path:
    import importlib.util

    import jax
    import jax.numpy as jnp

    from moejax import model
    from moejax.training import checkpoint

    spec = importlib.util.spec_from_file_location("helpers_train", REPO / "tests" / "helpers_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    variables = model.Transformer(config.model).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return checkpoint.save_variables(workdir, config, {k: v for k, v in variables.items() if k != "moe_aux"})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "MOEJAX_COMPILE_CACHE"}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        workdir = _untrained(tmp / "run")
        commands = {"generate": ["moejax.generate", f"--checkpoint={workdir}", "--prompt=def ",
                                 f"--max_new_tokens={2 if args.smoke else 32}"]}
        if not args.smoke:
            commands["evaluate"] = ["moejax.evaluate", f"--checkpoint={workdir}", f"--out={tmp / 'e.json'}",
                                    f"--data_dir={tmp / 'data'}", "--max_tokens=4096"]
        result = {}
        for name, command in commands.items():
            cache = tmp / f"cache_{name}"
            on = [_timed([*command, f"--compile_cache={cache}"], env) for _ in range(2)]
            result[name] = {"on_first_s": on[0], "on_second_s": on[1], "cache_files": len(list(cache.iterdir()))}
            if not args.smoke:
                off = [_timed([*command, "--compile_cache=off"], env) for _ in range(2)]
                result[name].update(off_first_s=off[0], off_second_s=off[1], second_call_speedup=off[1] / on[1])
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
