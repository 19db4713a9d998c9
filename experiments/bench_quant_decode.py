"""Weight-only quantised decoding (moejax/quant/decode.py) against float weights, measured in one run: parameter
memory and decoding speed of int8 and int4 against the unquantised model.

    python -m experiments.bench_quant_decode [--model v2lite|tiny] [--schemes none int8 int4/g32]
        [--new_tokens 64] [--prompt 16] [--batches 1 8] [--repeats 2] [--json PATH] [--smoke]

Models: ``v2lite``, a synthetic ~100M DeepSeek-V2-Lite-shaped model (experiments/bench_generate.py: MLA, 2 shared +
64 routed experts, top-6; float32 random weights: the speed does not depend on the values), and ``tiny``
(configs/deepseekmoe.py's default). For each scheme: the bytes of the parameters as held (``decode.param_bytes``:
codes and scales for the quantised matrices; the routers, embeddings, norms and output head stay float32) and,
per batch size, prefill and decode tokens/s of ``moejax.generate`` (greedy, ``--new_tokens`` new tokens; compile
excluded by a warm-up call; prefill = until the first new tokens reach the host through ``stream``, decode = the
rest of the call; the best of ``--repeats``). The ratios
are against the unquantised row of the same run. The machine's load average is recorded before and after. Also
XLA's memory plan of a one-token forward pass with the weights as held (``step_plan``, dequantised as ``generate``
does: the routed experts only where the token's slots select them, moejax/moe/quantised.py); on CPU the dequantised
attention, shared-expert and dense weights of every layer are temporaries live at once.

The figures end as one JSON object on stdout (and in --json PATH): {'machine', 'load', 'settings', 'rows':
[{'scheme', 'param_bytes', 'memory_ratio', 'batch', 'prefill_tok_s', 'decode_tok_s', 'speed_ratio',
'step_argument_bytes', 'step_temp_bytes'}]}. --smoke:
the tiny model cut to one MoE layer, int4/g32 against none, 4 prompt tokens, 3 new, batch 1, one repeat (the test
suite runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_generate
from moejax import generate, model
from moejax.quant import decode

SMOKE = dict(model="tiny", schemes=["none", "int4/g32"], new_tokens=3, prompt=4, batches=[1], repeats=1)


def step_plan(config, held) -> dict:
    """XLA's memory plan of one jitted one-token forward pass (no cache) with these weights, dequantisation
    included as in ``generate`` (the routed experts' codes gathered for the selected experts): the arguments' bytes
    (the weights as held) and the temporaries' (None where the backend does not report them)."""
    module = model.Transformer(config.model)
    tokens = jnp.zeros((1, 1), jnp.int32)
    compiled = jax.jit(lambda v, t: module.apply(decode.materialise(v, routed=False), t)).lower(held, tokens).compile()
    plan = compiled.memory_analysis()
    if plan is None:
        return {"argument_bytes": None, "temp_bytes": None}
    return {"argument_bytes": int(plan.argument_size_in_bytes), "temp_bytes": int(plan.temp_size_in_bytes)}


def bench(config, variables, scheme: str, batches: list[int], prompt: int, new: int, repeats: int) -> list[dict]:
    held = variables if scheme == "none" else decode.quantise(config, variables, scheme)
    held = jax.block_until_ready(held)
    size = decode.param_bytes(held)
    plan = step_plan(config, held)
    print(f"  {scheme}: one-token forward's memory plan {plan}", flush=True)
    rows = []
    for batch in batches:
        prompts = np.asarray(jax.random.randint(jax.random.key(batch), (batch, prompt), 1, config.model.vocab_size))
        marks: list[float] = []
        record = lambda _, marks=marks: marks.append(time.perf_counter())  # noqa: E731  (one function: the
        #                                                   compiled loop is kept by settings, the stream among them)

        def run(p=prompts, marks=marks, record=record) -> tuple[float, float]:
            """(prefill seconds: until the first new tokens reach the host, decode seconds: the rest)."""
            marks.clear()
            start = time.perf_counter()
            generate.generate(config, held, p, max_new_tokens=new, stream=record)
            end = time.perf_counter()
            return marks[0] - start, end - marks[0]

        run()  # warm-up: prefill and decode loop compiled
        timings = [run() for _ in range(repeats)]
        prefill_s = min(t[0] for t in timings)
        decode_s = max(min(t[1] for t in timings), 1e-9)
        rows.append(dict(scheme=scheme, param_bytes=size, batch=batch, prefill_tok_s=batch * prompt / prefill_s,
                         decode_tok_s=batch * (new - 1) / decode_s, step_argument_bytes=plan["argument_bytes"],
                         step_temp_bytes=plan["temp_bytes"]))
        print(f"  {scheme} batch {batch}: {size / 2**20:,.1f} MiB of parameters, prefill "
              f"{rows[-1]['prefill_tok_s']:,.0f} tok/s, decode {rows[-1]['decode_tok_s']:,.1f} tok/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Runs the command line argv: prints each row, the table and the figures as JSON (returned)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="v2lite", choices=["v2lite", "tiny"])
    parser.add_argument("--schemes", nargs="+", default=["none", "int8", "int4/g32"])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE}, one MoE layer")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    if args.schemes[0] != "none":
        parser.error("--schemes: the first scheme is the baseline 'none' the ratios are against")
    for scheme in args.schemes[1:]:
        try:
            decode.parse(scheme, "schemes")
        except ValueError as e:
            parser.error(str(e))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
               f"({jax.default_backend()})")
    load_before = os.getloadavg()
    print(f"machine: {machine}; load average {load_before[0]:.2f}; model {args.model}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy", flush=True)
    if args.model == "v2lite":
        config = bench_generate.v2lite_100m()
    else:
        config, _ = bench_generate.tiny(None)
        if args.smoke:
            config = bench_generate.shrunk(config)
    variables = jax.jit(model.Transformer(config.model).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    rows = []
    for scheme in args.schemes:
        rows += bench(config, variables, scheme, args.batches, args.prompt, args.new_tokens, args.repeats)
    base = {(r["batch"]): r for r in rows if r["scheme"] == "none"}
    for r in rows:
        r["memory_ratio"] = r["param_bytes"] / base[r["batch"]]["param_bytes"]
        r["speed_ratio"] = r["decode_tok_s"] / base[r["batch"]]["decode_tok_s"]
    load_after = os.getloadavg()
    print("\n| scheme | parameters | vs float32 | step temporaries | batch | prefill tok/s | decode tok/s | vs f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        temp = "n/a" if r["step_temp_bytes"] is None else f"{r['step_temp_bytes'] / 2**20:,.1f} MiB"
        print(f"| {r['scheme']} | {r['param_bytes'] / 2**20:,.1f} MiB | {r['memory_ratio']:.3f} | {temp} | "
              f"{r['batch']} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} | {r['speed_ratio']:.2f} |")
    settings = {name: getattr(args, name) for name in ("model", "schemes", "prompt", "new_tokens", "batches",
                                                       "repeats", "smoke")}
    result = {"machine": machine, "load": {"before": list(load_before), "after": list(load_after)},
              "settings": settings, "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
