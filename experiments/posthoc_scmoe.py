"""Self-contrast decoding (SCMoE) on a trained MoE model, step 4 of experiments/posthoc_routing.py (its docstring
says what it computes): the beta sweep over the evaluation windows (``step_scmoe``) and greedy samples
(``step_samples``), each stored in the study's result cache.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from experiments.posthoc_common import ResultCache


def step_scmoe(cache: ResultCache, config: ml_collections.ConfigDict, variables: dict[str, Any],
               windows: list[np.ndarray], betas: Sequence[float], alpha: float, weak_rank: int,
               say: Callable[[str], None], bytes_table: np.ndarray | None = None) -> dict[str, Any]:
    """The cached 'scmoe' record of these settings, else the sweep over the evaluation windows: per beta the bits
    per byte on the plausible head (where the true byte is in it), of the unmasked contrast, and the greedy
    accuracy; the head's mean size and the weak routing's bits per byte. The weak expert's weight is the authors'
    choice for the model's router (``rank_weight_for``), stored in the settings. ``bytes_table``: text bytes per
    token id (``moejax.evaluate.text_bytes_table``) that turn bits per token into bits per byte; None: one byte per
    token (the byte tokenizer)."""
    from moejax.moe import intervention as iv_lib

    record = cache.get("scmoe")
    want = {"betas": [float(b) for b in betas], "alpha": alpha, "weak_rank": weak_rank,
            "weak_weight": iv_lib.rank_weight_for(config)}
    if record is not None and record.get("settings") == want:
        return record
    import jax
    import jax.numpy as jnp

    from moejax import model
    from moejax.generate import SelfContrast

    started = time.perf_counter()
    module = model.Transformer(config.model)
    weak_iv = iv_lib.rank_only(config, weak_rank)
    contrasts = [SelfContrast(rank=weak_rank, alpha=alpha, beta=float(b)) for b in betas]
    table = jnp.ones((config.model.vocab_size,), jnp.float32) if bytes_table is None else jnp.asarray(
        bytes_table, jnp.float32)

    def stats(v, batch, iv):
        inputs, targets = batch[:, :-1], batch[:, 1:, None]
        strong = module.apply(v, inputs).astype(jnp.float32)
        weak = module.apply(v, inputs, intervention=iv).astype(jnp.float32)
        plausible = strong >= jnp.log(jnp.float32(alpha)) + strong.max(-1, keepdims=True)
        inside = jnp.take_along_axis(plausible, targets, -1)[..., 0]
        nbytes = table[targets[..., 0]]
        out = {"inside": inside.sum(), "head_size": plausible.sum(), "bytes": nbytes.sum(),
               "inside_bytes": jnp.where(inside, nbytes, 0.0).sum(),
               "weak_nll": -jnp.take_along_axis(jax.nn.log_softmax(weak), targets, -1).sum()}
        for c in contrasts:
            masked = jax.nn.log_softmax(c.combine(strong, weak), axis=-1)
            nll_masked = -jnp.take_along_axis(masked, targets, -1)[..., 0]
            raw = (1 + c.beta) * strong - c.beta * weak
            nll_raw = -jnp.take_along_axis(jax.nn.log_softmax(raw), targets, -1)[..., 0]
            correct = jnp.argmax(c.combine(strong, weak), -1) == targets[..., 0]
            out[str(c.beta)] = {"masked_nll": jnp.where(inside, nll_masked, 0.0).sum(), "raw_nll": nll_raw.sum(),
                                "correct": correct.sum()}
        return out

    step = jax.jit(stats)
    v = {k: variables[k] for k in ("params", "moe_state") if variables.get(k) is not None}
    totals = None
    for window in windows:
        result = jax.device_get(step(v, jnp.asarray(window, jnp.int32), weak_iv))
        totals = result if totals is None else jax.tree.map(lambda a, b: a + b, totals, result)
    tokens = sum(int(w[:, 1:].size) for w in windows)
    inside = int(totals["inside"])
    text_bytes, inside_bytes = float(totals["bytes"]), float(totals["inside_bytes"])
    ln2 = math.log(2)
    rows = []
    for c in contrasts:
        t = totals[str(c.beta)]
        rows.append({"beta": c.beta, "outside_fraction": 1 - inside / tokens,
                     "masked_bits_per_byte_inside": float(t["masked_nll"]) / (inside_bytes * ln2),
                     "raw_bits_per_byte": float(t["raw_nll"]) / (text_bytes * ln2),
                     "greedy_accuracy": float(t["correct"]) / tokens})
    record = cache.put("scmoe", {"settings": want, "rows": rows, "tokens": tokens, "bytes": text_bytes,
                                 "mean_head_size": float(totals["head_size"]) / tokens,
                                 "weak_bits_per_byte": float(totals["weak_nll"]) / (text_bytes * ln2),
                                 "seconds": time.perf_counter() - started})
    say(f"SCMoE sweep: {tokens:,} positions, true byte outside the head at {1 - inside / tokens:.2%}; " + "; ".join(
        f"beta {r['beta']}: {r['masked_bits_per_byte_inside']:.4f} (head) {r['raw_bits_per_byte']:.4f} (unmasked)"
        for r in rows) + f" [{record['seconds']:.1f}s]")
    return record


def step_samples(cache: ResultCache, config: ml_collections.ConfigDict, variables: dict[str, Any], tokenizer: Any,
                 prompts: Sequence[str], alpha: float, weak_rank: int, max_new: int, say: Callable[[str], None],
                 betas: Sequence[float] = (0.0, 0.5)) -> dict[str, Any]:
    """The cached 'samples' record, completed: per beta the greedy continuations (up to max_new tokens, cut at the
    eos) of the prompts under ``SelfContrast(rank=weak_rank, alpha=alpha, beta=beta)`` (each entry records the weak
    expert's weight; one made with another is redone)."""
    from moejax import generate
    from moejax.moe import intervention as iv_lib

    record = cache.get("samples") or {}
    weak_weight = iv_lib.rank_weight_for(config)
    for beta in betas:
        key = str(float(beta))
        if key in record and record[key].get("weak_weight") == weak_weight:
            continue
        started = time.perf_counter()
        encoded = [tokenizer.encode(p) for p in prompts]
        padded = np.zeros((len(encoded), max(len(e) for e in encoded)), np.int32)
        for i, e in enumerate(encoded):
            padded[i, :len(e)] = e
        tokens = generate.generate(config, variables, padded, max_new_tokens=max_new, eos_id=tokenizer.eos_id,
                                   prompt_lengths=np.asarray([len(e) for e in encoded]),
                                   contrast=generate.SelfContrast(rank=weak_rank, alpha=alpha, beta=float(beta)))
        texts = []
        for i, e in enumerate(encoded):
            new = [int(t) for t in tokens[i, len(e):len(e) + max_new]]
            if tokenizer.eos_id in new:
                new = new[:new.index(tokenizer.eos_id)]
            texts.append(tokenizer.decode(new))
        record[key] = {"prompts": list(prompts), "continuations": texts, "weak_weight": weak_weight,
                       "seconds": time.perf_counter() - started}
        cache.put("samples", record)
        say(f"greedy samples at beta {beta} [{record[key]['seconds']:.1f}s]")
    return record
