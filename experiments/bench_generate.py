"""Decoding speed with the KV cache against recomputing the forward pass, measured in one run.

    python -m experiments.bench_generate [--checkpoint=<workdir>] [--new_tokens 256] [--prompt 32]
        [--batches 1 16] [--models tiny v2lite] [--nocache_steps 8] [--json PATH] [--smoke]

Models: ``tiny``, the default main job's model (configs/deepseekmoe.py, the trained one of --checkpoint when given,
else random weights of that config: speed does not depend on the values), and ``v2lite``, a synthetic ~100M
DeepSeek-V2-Lite-shaped model (MLA with kv-LoRA, 2 shared + 64 routed experts, top-6; random weights).

For each model and batch size: prefill tokens/s (the prompt pass that fills the cache), decode tokens/s of the
cached loop (moejax.generate, greedy, ``--new_tokens`` new tokens, compile excluded: a warm-up call first), and the
no-cache path: a jitted loop that runs the full forward over the whole [B, prompt + new] buffer for every new token
(the causal mask makes the not-yet-written tail irrelevant) and takes the argmax at the current position. Its
per-token cost is the same at every step, so it is timed over ``--nocache_steps`` steps and scaled to the same
number of new tokens (stated in the table). Also: the cache bytes per token and layer (MLA: kv_lora_rank +
qk_rope_head_dim values, against 2 x heads x head width for the expanded keys and values).

The figures end as one JSON object on stdout (and in --json PATH): {'machine', 'settings', 'cache': {model:
{'values_per_token_layer', 'expanded_values'}}, 'rows': [{'model', 'params', 'batch', 'prefill_tok_s',
'decode_tok_s', 'nocache_tok_s', 'speedup'}]}. --smoke: both models cut to one layer (a MoE layer), 8 prompt
tokens, 4 new, 2 no-cache steps, batch 1: every figure in seconds, the same JSON keys (the test suite runs it).
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
from moejax.configs import base

from moejax import generate, kv_cache, model

SMOKE = dict(new_tokens=4, prompt=8, batches=[1], nocache_steps=2)  # --smoke's settings


def v2lite_100m():
    """A ~100M DeepSeek-V2-Lite-shaped config (random weights): MLA with kv-LoRA, 2 shared + 64 routed experts."""
    from moejax.configs import deepseek_v2_lite

    config = deepseek_v2_lite.get_config("lite")
    config.model.update(d_model=512, num_layers=8, num_heads=8, ffn_dim=2048, vocab_size=16384,
                        dtype="float32", param_dtype="float32", rope_scaling=base.get_config().model.rope_scaling)
    config.model.mla.update(kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    config.model.moe.update(expert_ffn=128)
    return config


def tiny(checkpoint: str | None):
    """(config, variables) of --checkpoint, or (configs/deepseekmoe.py:tiny, None: random weights)."""
    if checkpoint:
        import moejax

        return moejax.load(checkpoint)
    from moejax.configs import deepseekmoe

    return deepseekmoe.get_config(), None


def shrunk(config):
    """config cut to one layer, a MoE layer (--smoke)."""
    config.model.update(num_layers=1, first_dense_layers=0)
    return config


def nocache_loop(cfg, rows: int, length: int, prompt: int, steps: int):
    module = model.Transformer(generate.decode_config(cfg))

    def run(variables, buf):
        def body(t, buf):
            logits = module.apply(variables, buf)
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, prompt + t - 1, axis=1, keepdims=False), -1)
            return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), prompt + t, axis=1)
        return jax.lax.fori_loop(0, steps, body, buf)

    return jax.jit(run)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench(name: str, config, variables, batches: list[int], prompt: int, new: int, nocache_steps: int) -> list[dict]:
    cfg = config.model
    if variables is None:
        variables = jax.jit(model.Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
    rows = []
    for batch in batches:
        prompts = np.asarray(jax.random.randint(jax.random.key(batch), (batch, prompt), 1, cfg.vocab_size))
        # prefill alone: a generate call with one new token (compile excluded by a warm-up call)
        generate.generate(config, variables, prompts, max_new_tokens=1)
        prefill_s = min(timed(lambda p=prompts: generate.generate(config, variables, p, max_new_tokens=1))
                        for _ in range(2))
        generate.generate(config, variables, prompts, max_new_tokens=new)
        total_s = timed(lambda p=prompts: generate.generate(config, variables, p, max_new_tokens=new))
        decode_s = max(total_s - prefill_s, 1e-9)
        loop = nocache_loop(cfg, batch, prompt + new, prompt, nocache_steps)
        buf = jnp.zeros((batch, prompt + new), jnp.int32).at[:, :prompt].set(prompts)
        timed(loop, variables, buf)
        nocache_s = timed(loop, variables, buf) * new / nocache_steps
        rows.append(dict(model=name, params=params, batch=batch, prefill_tok_s=batch * prompt / prefill_s,
                         decode_tok_s=batch * (new - 1) / decode_s, nocache_tok_s=batch * new / nocache_s,
                         speedup=nocache_s / total_s))
        print(f"  {name} batch {batch}: prefill {rows[-1]['prefill_tok_s']:,.0f} tok/s, decode "
              f"{rows[-1]['decode_tok_s']:,.1f} tok/s, no cache {rows[-1]['nocache_tok_s']:,.1f} tok/s "
              f"-> {rows[-1]['speedup']:.1f}x", flush=True)
    return rows


def cache_bytes(config) -> tuple[float, float]:
    """(values per token and layer in the cache, the same for expanded per-head keys and values)."""
    cfg = generate.decode_config(config)
    module = model.Transformer(cfg)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    cache = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 4), jnp.int32), cache=kv_cache.Cache(
        4, jnp.int32(0), jnp.zeros((1,), jnp.int32)), mutable=["cache"])[1], variables)
    per_token = kv_cache.bytes_per_token(cache["cache"]) / jnp.dtype(cfg.dtype).itemsize / cfg.num_layers
    if cfg.attention == "mla":
        expanded = cfg.num_heads * (cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim + cfg.mla.v_head_dim)
    else:
        expanded = per_token
    return per_token, expanded


def main(argv: list[str] | None = None) -> dict:
    """Runs the command line argv: prints each row as it comes, the table, and the figures as JSON (the module
    docstring names their keys), which it returns."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a trained workdir of the default main job")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--models", nargs="+", default=["tiny", "v2lite"], choices=["tiny", "v2lite"])
    parser.add_argument("--nocache_steps", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help=f"one MoE layer per model and {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
               f"({jax.default_backend()})")
    print(f"machine: {machine}; prompt {args.prompt}, {args.new_tokens} new tokens, greedy")
    rows, caches = [], {}
    for name in args.models:
        config, variables = tiny(args.checkpoint) if name == "tiny" else (v2lite_100m(), None)
        if args.smoke and variables is None:
            config = shrunk(config)
        per_token, expanded = cache_bytes(config)
        caches[name] = {"values_per_token_layer": float(per_token), "expanded_values": float(expanded)}
        print(f"{name}: cache {per_token:.0f} values per token and layer (expanded keys and values: "
              f"{expanded:.0f})", flush=True)
        rows += bench(name, config, variables, args.batches, args.prompt, args.new_tokens, args.nocache_steps)
    print("\n| model | params | batch | prefill tok/s | decode tok/s | no-cache tok/s | cached speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['prefill_tok_s']:,.0f} | "
              f"{r['decode_tok_s']:,.1f} | {r['nocache_tok_s']:,.1f} | {r['speedup']:.1f}x |")
    settings = {name: getattr(args, name) for name in ("checkpoint", "prompt", "new_tokens", "batches", "models",
                                                       "nocache_steps", "smoke")}
    result = {"machine": machine, "settings": settings, "cache": caches, "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
