"""Speculative decoding against plain decoding of the same model, measured in one run: a draft model and the model's
own multi-token-prediction (MTP) module as drafters, greedy and sampled.

    python -m experiments.bench_speculative [--steps 300] [--new_tokens 128] [--gammas 1 2 4]
        [--temperatures 0 1] [--json PATH] [--smoke]

The models are trained here first (acceptance rates of random weights say nothing): a target (4 layers, d_model 128,
8 experts top-2 with a shared expert, one MTP module, DeepSeek-V3's section 2.2 loss at weight 0.3) and a draft
(1 layer, d_model 64, dense), both on the same synthetic language of 128 tokens: runs of an arithmetic progression
modulo 128 (random start and step per sequence) where each token is replaced by a uniformly random one with
probability 0.1, so that a continuation is predictable except at the noise. Each trains ``--steps`` steps of Adam
(batch 16, 64 tokens) on its own loss; the final losses are reported.

Then, for batch 1, a 16-token prompt of the language and ``--new_tokens`` new tokens: plain decoding
(moejax.generate: one compiled loop), and speculative decoding (moejax.speculative: ``generate`` with the draft,
``generate_mtp`` with the MTP module) for each gamma and temperature. Every call is made once to compile, then
timed ``--repeats`` times (the fastest counts; the sampled calls repeat with the same key, so the same tokens).
Reported per row: tokens/s, the acceptance rate (proposals kept / proposals made), tokens per target pass, and the
speed-up over plain decoding at the same temperature. The figures end as one JSON object on stdout (and in --json
PATH): {'machine', 'settings', 'training': {'target_loss', 'target_mtp_loss', 'draft_loss'}, 'rows': [{'method',
'gamma', 'temperature', 'tok_s', 'acceptance_rate', 'tokens_per_pass', 'speedup'}]} (plain rows have gamma 0 and no
acceptance rate). --smoke: dense models of width 32, 2 training steps, 8 new tokens, gamma 2, greedy: every figure in
seconds.
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
import optax
from moejax.configs import base

from moejax import generate, model, speculative
from moejax.training import objectives

VOCAB, SEQ, BATCH, NOISE = 128, 64, 16, 0.1
SMOKE = dict(steps=2, new_tokens=8, gammas=[2], temperatures=[0.0], repeats=1)


def language(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """Arithmetic progressions modulo VOCAB, each token replaced by a random one with probability NOISE."""
    start, step = rng.integers(0, VOCAB, (rows, 1)), rng.integers(1, 8, (rows, 1))
    tokens = (start + step * np.arange(length)[None]) % VOCAB
    noise = rng.random((rows, length)) < NOISE
    return np.where(noise, rng.integers(0, VOCAB, (rows, length)), tokens).astype(np.int32)


def configs(smoke: bool = False):
    """(target, draft) configs; smoke: both at width 32, the target one dense layer with its MTP module."""
    target = base.get_config()
    target.model.update(vocab_size=VOCAB, d_model=128, num_layers=4, num_heads=4, ffn_dim=256, mtp_depth=1,
                        mtp_loss_weight=0.3)
    target.model.moe.update(num_experts=8, top_k=2, expert_ffn=64, num_shared=1)
    draft = base.get_config()
    draft.model.update(vocab_size=VOCAB, d_model=64, num_layers=1, num_heads=2, ffn_dim=128, moe_every=0)
    if smoke:
        target.model.update(d_model=32, num_layers=1, num_heads=2, ffn_dim=64, moe_every=0)
        draft.model.update(d_model=32, ffn_dim=64)
    return target, draft


def train(config, steps: int, seed: int) -> tuple[dict, float, float | None]:
    """(variables, the last step's next-token loss, its MTP loss or None) after ``steps`` Adam steps."""
    cfg = config.model
    module = model.Transformer(cfg)
    variables = module.init(jax.random.key(seed), jnp.zeros((1, SEQ), jnp.int32))
    params, state = variables["params"], variables.get("moe_state", {})
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params, tokens):
        logits, aux = module.apply({"params": params, "moe_state": state}, tokens[:, :-1], train=True,
                                   mutable=["moe_aux", model.MTP_COLLECTION], rngs={"routing": jax.random.key(0)})
        targets = tokens[:, 1:]
        main = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        mtp = [objectives.mtp_cross_entropy(x, targets, k)
               for k, x in enumerate(aux.get(model.MTP_COLLECTION, {}).get("logits", ()), 1)]
        extra = cfg.mtp_loss_weight * jnp.mean(jnp.stack(mtp)) if mtp else 0.0
        return main + extra, (main, mtp[0] if mtp else main)

    @jax.jit
    def step(params, opt_state, tokens):
        (_, (main, mtp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, main, mtp

    rng = np.random.default_rng(seed)
    main = mtp = jnp.nan
    for _ in range(steps):
        params, opt_state, main, mtp = step(params, opt_state, jnp.asarray(language(rng, BATCH, SEQ + 1)))
    out = {"params": params, "moe_state": state} if state else {"params": params}
    return out, float(main), (float(mtp) if cfg.mtp_depth else None)


def timed(fn, repeats: int):
    """(the fastest of ``repeats`` timed calls after a compiling one, its result): the minimum is the figure least
    disturbed by other work on the machine."""
    fn()  # compile
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    return best, result


def bench(target, target_vars, draft, draft_vars, new: int, gammas: list[int], temperatures: list[float],
          repeats: int):
    prompt = language(np.random.default_rng(123), 1, 16)
    rows = []
    for temperature in temperatures:
        rng = jax.random.key(7) if temperature > 0 else None
        plain_s, _ = timed(lambda t=temperature: generate.generate(
            target, target_vars, prompt, max_new_tokens=new, temperature=t, rng=jax.random.key(7)), repeats)
        rows.append(dict(method="plain", gamma=0, temperature=temperature, tok_s=new / plain_s,
                         acceptance_rate=None, tokens_per_pass=1.0, speedup=1.0))
        for gamma in gammas:
            for method in ("draft", "mtp"):
                if method == "draft":
                    call = lambda g=gamma, t=temperature, r=rng: speculative.generate(  # noqa: E731
                        target, target_vars, draft, draft_vars, prompt, max_new_tokens=new, gamma=g, temperature=t,
                        rng=r)
                else:
                    call = lambda g=gamma, t=temperature, r=rng: speculative.generate_mtp(  # noqa: E731
                        target, target_vars, prompt, max_new_tokens=new, gamma=g, temperature=t, rng=r)
                seconds, (_, stats) = timed(call, repeats)
                rows.append(dict(method=method, gamma=gamma, temperature=temperature, tok_s=new / seconds,
                                 acceptance_rate=stats["acceptance_rate"], tokens_per_pass=stats["tokens_per_pass"],
                                 speedup=plain_s / seconds))
                r = rows[-1]
                print(f"  {method} gamma {gamma} T {temperature}: {r['tok_s']:,.1f} tok/s, acceptance "
                      f"{r['acceptance_rate']:.2f}, {r['tokens_per_pass']:.2f} tokens per target pass, "
                      f"{r['speedup']:.2f}x plain", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Runs the command line argv: trains, measures, prints the table and the figures as JSON (the module docstring
    names their keys), which it returns."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of each model")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each setting (the fastest counts)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
               f"({jax.default_backend()}), load average {os.getloadavg()[0]:.1f} at start")
    print(f"machine: {machine}; {args.steps} training steps, batch 1, {args.new_tokens} new tokens", flush=True)
    target, draft = configs(args.smoke)
    began = time.perf_counter()
    target_vars, target_loss, mtp_loss = train(target, args.steps, 0)
    draft_vars, draft_loss, _ = train(draft, args.steps, 1)
    training = {"target_loss": target_loss, "target_mtp_loss": mtp_loss, "draft_loss": draft_loss}
    print(f"trained in {time.perf_counter() - began:.0f}s: target loss {target_loss:.3f} (MTP {mtp_loss:.3f}), "
          f"draft {draft_loss:.3f}", flush=True)
    rows = bench(target, target_vars, draft, draft_vars, args.new_tokens, args.gammas, args.temperatures,
                 args.repeats)
    print("\n| method | gamma | temperature | tok/s | acceptance | tokens / target pass | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        print(f"| {r['method']} | {r['gamma'] or '-'} | {r['temperature']:g} | {r['tok_s']:,.1f} | {rate} | "
              f"{r['tokens_per_pass']:.2f} | {r['speedup']:.2f}x |")
    settings = {name: getattr(args, name) for name in ("steps", "new_tokens", "gammas", "temperatures", "repeats",
                                                       "smoke")}
    machine += f", {os.getloadavg()[0]:.1f} at the end"
    result = {"machine": machine, "settings": settings, "training": training, "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
