"""Post-hoc routing analysis, steering and self-contrast decoding of a trained MoE model (issue 16, item 6):
the results page ``experiments/results/posthoc_routing.md``.

    python -m experiments.posthoc_routing --checkpoint=runs/deepseekmoe [--max_tokens 65536]
        [--eval_tokens 32768] [--keywords def,return,self,import] [--random_draws 5] [--betas 0,0.25,0.5,1.0]
        [--alpha 0.1] [--weak_rank 2] [--data_dir DIR] [--out experiments/results] [--render_only] [--no_release]

Data: the validation split of the run's corpus (``data.eval_batches`` windows of the run's batch shape, read with the
checkpoint's tokenizer), cut in two disjoint consecutive parts: the first ``--max_tokens`` tokens (rounded up to
whole batches) are the *trace* (routing analyses, and where the keyword experts are chosen), the next
``--eval_tokens`` the *evaluation* set (every bits-per-byte figure), so the experts are never chosen on the bytes
they are evaluated on.

1. Routing trace (``moejax.posthoc.record``, with router scores, eos = the tokenizer's) and its analyses
   (``moejax.posthoc.analysis``): expert frequency per layer, inter-layer affinity, SRP/SCH against the segment
   length, the summary numbers; SRP/SCH again on the trace with its positions shuffled (the same permutation at
   every layer), the reference without any local consistency.
2. Keyword experts. With the byte tokenizer a keyword is several tokens, so the marker is an *event*, not a token id:
   a position is marked when its input byte belongs to a whole-word occurrence of the keyword (the regex
   ``(?<![A-Za-z0-9_])kw(?![A-Za-z0-9_])`` inside a batch row; every byte of the occurrence is marked). The trace's
   token ids are replaced by one synthetic id (the vocabulary size) at the marked positions and
   ``moejax.posthoc.steer.marker_experts(trace, [that id], n)`` gives the n (layer, expert) pairs of highest nPMI
   with the marker over the model (RICE). For comparison, the byte-level alternative: ``marker_experts`` with the
   keyword's byte ids (nPMI averaged over its distinct bytes, wherever they occur).
3. Silencing: ``moejax.moe.intervention.mask_experts`` on the top-1 and top-2 keyword experts, against two
   controls of ``--random_draws`` random sets of as many experts each: (layer, expert) pairs drawn uniformly from
   the model's routed experts (any MoE layer; every keyword's chosen experts excluded; shared by all keywords), and
   as many experts in each of the chosen experts' layers (the keyword's top-2 excluded). Also the top-2 reinforced
   (``scale_experts`` x ``--reinforce``, RICE's direction). Validation bits per byte from
   ``moejax.evaluate.evaluate(..., intervention=)`` over the evaluation set, and, from a second pass computing
   the per-position cross-entropy under the same intervention, the bits per byte on the keyword's bytes (the
   positions whose *target* byte lies in a whole-word occurrence of the keyword in the evaluation windows).
4. SCMoE beta sweep (``moejax.generate.SelfContrast``): per evaluation position the strong logits (the model) and
   the weak ones (``moejax.moe.intervention.rank_only(cfg, weak_rank)``: each MoE token routed to its rank-r expert
   alone, weight 1; the shared expert unchanged); the contrast ``(1 + beta) z_s - beta z_w`` on the plausible head
   ``z_s >= log(alpha) + max z_s`` (others -inf) is ``SelfContrast.combine``. The true byte falls outside the head
   at some positions (infinite cross-entropy there), so reported are: that fraction, the bits per byte over the
   other positions (the masked contrast renormalised on the head), the bits per byte of the unmasked contrast
   softmax((1 + beta) z_s - beta z_w) over every position, and the greedy (argmax) next-byte accuracy. Then
   greedy samples from ``moejax.generate.generate(..., contrast=SelfContrast(beta=...))`` for two prompts.
5. Mechanics on an imported release: a tiny random Mixtral-layout model written by ``moejax.hf.save`` (as
   tests/test_posthoc_cli.py), traced and analysed through ``python -m moejax.posthoc trace|analyze``
   (``moejax.posthoc.__main__.main``) on the same corpus.

Resumable: every finished step is stored in ``<checkpoint>/posthoc_routing/results.json`` (the trace and the
release beside it) as soon as it is done, and a rerun skips it; a progress line is printed per step. Outputs in
``--out``: ``posthoc_routing.md`` (the text between ``<!-- findings:begin -->`` and ``<!-- findings:end -->`` of an
existing page is kept), ``posthoc_routing.json`` and the plots ``posthoc_routing_*.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import re
import sys
import time
from typing import Any

import numpy as np

NAME = "posthoc_routing"
KEYWORDS = ("def", "return", "self", "import")
BETAS = (0.0, 0.25, 0.5, 1.0)
PROMPTS = ("def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n")
RANDOM_SEED = 2024
from experiments.runner import FINDINGS_BEGIN, FINDINGS_END, kept_findings  # noqa: E402

STARTED = time.perf_counter()


def _say(message: str) -> None:
    print(f"[{NAME} {time.perf_counter() - STARTED:7.1f}s] {message}", flush=True)


class Cache:
    """``<checkpoint>/posthoc_routing/results.json``: {step key: record}, rewritten atomically after each step."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "results.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
        return value


def _jsonable(value: Any) -> Any:
    from moejax.posthoc import analysis

    return analysis._json(value)


# ------------------------------------------------------------------------------------------------------ data

def keyword_mask(rows: np.ndarray, keyword: str) -> np.ndarray:
    """bool like rows [n, S]: the bytes of every whole-word occurrence of ``keyword`` inside each row (the
    previous and next bytes are not [A-Za-z0-9_]; an occurrence cut by the row's edge counts when the edge falls
    where a boundary is allowed, i.e. it is found in the row's bytes as they are)."""
    pattern = re.compile(rb"(?<![A-Za-z0-9_])" + re.escape(keyword.encode()) + rb"(?![A-Za-z0-9_])")
    mask = np.zeros(rows.shape, bool)
    for i, row in enumerate(np.asarray(rows)):
        text = bytes(np.clip(row, 0, 255).astype(np.uint8))
        for match in pattern.finditer(text):
            mask[i, match.start():match.end()] = True
    return mask


def load_data(config, checkpoint: pathlib.Path, max_tokens: int, eval_tokens: int, data_dir: str | None):
    """(data config, trace inputs [B, S] list, evaluation windows [B, S + 1] list, tokenizer)."""
    import ml_collections

    from moejax import data
    from moejax.data import tokenizers

    config = ml_collections.ConfigDict(config.to_dict())
    if data_dir:
        config.data.dir = data_dir
    per_batch = config.train.batch_size * config.train.seq_len
    n_trace, n_eval = max(1, math.ceil(max_tokens / per_batch)), max(1, math.ceil(eval_tokens / per_batch))
    config.data.eval_batches = n_trace + n_eval
    tokenizer = tokenizers.for_checkpoint(checkpoint, config)
    windows = [np.asarray(b) for b in data.eval_batches(config)]
    return config, [w[:, :-1] for w in windows[:n_trace]], windows[n_trace:], tokenizer


# ------------------------------------------------------------------------------------------------ the steps

def step_trace(cache: Cache, config, variables, inputs, tokenizer, out: pathlib.Path) -> Any:
    """The routing trace (recorded once) and its analyses + the three plots."""
    from moejax.posthoc import analysis, capture, read_trace

    trace_dir = cache.root / "trace"
    record = cache.get("trace")
    if record is None or not (trace_dir / "manifest.json").exists():
        started = time.perf_counter()
        total = sum(int(b.size) for b in inputs)
        _say(f"recording the routing trace of {total:,} validation tokens ({len(inputs)} batches of "
             f"{inputs[0].shape[0]} x {inputs[0].shape[1]})")
        capture.record(config, variables, inputs, trace_dir, with_scores=True, eos_id=tokenizer.eos_id,
                       overwrite=True, metadata={"split": "validation", "batches": len(inputs)},
                       progress=capture.progress_bar(total))
        record = cache.put("trace", {"seconds": time.perf_counter() - started, "tokens": total})
        _say(f"trace recorded in {record['seconds']:.1f}s")
    trace = read_trace(trace_dir)
    if cache.get("analysis") is None:
        started = time.perf_counter()
        summary = analysis.summary(trace)
        cache.put("analysis", {"summary": summary, "seconds": time.perf_counter() - started,
                               "gate_mass_max": _jsonable(analysis.gate_mass(trace).max(-1))})
        _say(f"analyses in {time.perf_counter() - started:.1f}s")
    if cache.get("shuffled") is None:  # the no-locality reference: the same routing in a random token order
        import dataclasses

        started = time.perf_counter()
        order = np.random.default_rng(RANDOM_SEED).permutation(trace.num_tokens)
        shuffled = dataclasses.replace(trace, experts=np.asarray(trace.experts)[:, order],
                                       weights=np.asarray(trace.weights)[:, order], scores=None,
                                       token_ids=np.asarray(trace.token_ids)[order])
        lengths = list(analysis.DEFAULT_LENGTHS)
        cache.put("shuffled", {
            "segment_lengths": lengths,
            "srp_mean": _jsonable(analysis._nanmean(analysis.segment_routing_best_performance(shuffled, lengths))),
            "sch_2k_mean": _jsonable(analysis._nanmean(analysis.segment_cache_best_hit_rate(
                shuffled, lengths, [2 * trace.top_k])[..., 0])),
            "seconds": time.perf_counter() - started})
        _say(f"shuffled-order reference in {time.perf_counter() - started:.1f}s")
    if not all((out / f"{NAME}_{p}.png").exists() for p in ("frequency", "affinity", "local_consistency")):
        analysis.plot_frequency(trace, path=out / f"{NAME}_frequency.png")
        analysis.plot_affinity(trace, path=out / f"{NAME}_affinity.png")
        analysis.plot_local_consistency(trace, path=out / f"{NAME}_local_consistency.png")
        _say("plots written")
    return trace


def marked_trace(trace, keyword: str, seq_len: int, marker_id: int):
    """The trace with the token id of every byte of the keyword's whole-word occurrences replaced by marker_id
    (rows of seq_len tokens, the layout ``record`` wrote the batches in)."""
    import dataclasses

    ids = np.asarray(trace.token_ids)
    mask = keyword_mask(ids.reshape(-1, seq_len), keyword).reshape(-1)
    return dataclasses.replace(trace, token_ids=np.where(mask, marker_id, ids)), int(mask.sum())


def step_keywords(cache: Cache, trace, keywords, seq_len: int, vocab: int) -> dict[str, Any]:
    """Per keyword: occurrences, the top-1/top-2 experts by the event marker, per-layer best nPMI, the byte-level
    alternative's top 2, and the top bytes of the top-1 expert."""
    from moejax.posthoc import analysis, steer

    record = cache.get("keywords") or {}
    for keyword in keywords:
        if keyword in record:
            continue
        started = time.perf_counter()
        marked, marked_bytes = marked_trace(trace, keyword, seq_len, vocab)
        if not marked_bytes:
            record[keyword] = {"occurrences": 0}
            cache.put("keywords", record)
            _say(f"keyword {keyword!r}: no whole-word occurrence in the trace, skipped")
            continue
        tops = {n: steer.marker_experts(marked, [vocab], n=n) for n in (1, 2)}
        scores = tops[1].npmi  # [L, E]
        best = [[int(layer), int(np.argmax(scores[li])), float(scores[li].max())]
                for li, layer in enumerate(trace.layers)]
        ranked = np.argsort(-scores.ravel(), kind="stable")[:5]
        top5 = [[int(trace.layers[i // scores.shape[1]]), int(i % scores.shape[1]), float(scores.ravel()[i])]
                for i in ranked]
        by_bytes = steer.marker_experts(trace, list(keyword.encode()), n=2)
        layer, expert = top5[0][0], top5[0][1]
        ids, values = analysis.top_tokens_per_expert(trace, int(np.flatnonzero(trace.layers == layer)[0]), n=6,
                                                     min_count=20)
        record[keyword] = {
            "occurrences": marked_bytes // len(keyword), "marked_bytes": marked_bytes,
            "top1": tops[1].to_json()["experts"], "top2": tops[2].to_json()["experts"], "top5": top5,
            "best_per_layer": best,
            "bytes_top2": [[int(layer), int(e), float(v)] for layer, es in by_bytes.experts.items()
                           for e, v in zip(es, by_bytes.scores[layer], strict=True)],
            "top1_top_bytes": [[int(i), float(v)] for i, v in zip(ids[expert], values[expert], strict=True)
                               if i >= 0],
            "seconds": time.perf_counter() - started}
        cache.put("keywords", record)
        _say(f"keyword {keyword!r}: {record[keyword]['occurrences']} occurrences; top-2 experts "
             f"{record[keyword]['top2']} (nPMI {[round(t[2], 3) for t in top5[:2]]})")
    return record


class Evaluator:
    """Bits per byte of the model under an intervention on the evaluation windows: overall from
    ``moejax.evaluate.evaluate`` and per keyword from a per-position cross-entropy pass."""

    def __init__(self, config, variables, windows: list[np.ndarray], keywords):
        import jax
        import jax.numpy as jnp

        from moejax import model

        self.config, self.variables, self.windows = config, variables, windows
        self.masks = {kw: [keyword_mask(w, kw)[:, 1:] for w in windows] for kw in keywords}
        module = model.Transformer(config.model)

        def nll(v, batch, iv):
            logits = module.apply(v, batch[:, :-1], intervention=iv).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0]

        self._nll = jax.jit(nll)
        self._v = {k: variables[k] for k in ("params", "moe_state") if variables.get(k) is not None}

    def __call__(self, intervention) -> dict[str, Any]:
        import jax.numpy as jnp

        from moejax import evaluate

        started = time.perf_counter()
        result = evaluate.evaluate(self.config, self.variables, self.windows, intervention=intervention)
        sums = {kw: 0.0 for kw in self.masks}
        total = 0.0
        for i, window in enumerate(self.windows):
            nll = np.asarray(self._nll(self._v, jnp.asarray(window, jnp.int32), intervention), np.float64)
            total += float(nll.sum())
            for kw, masks in self.masks.items():
                sums[kw] += float(nll[masks[i]].sum())
        ln2 = math.log(2)
        tokens = sum(int(w[:, 1:].size) for w in self.windows)
        return {"bits_per_byte": float(result["bits_per_byte"]), "loss": float(result["loss"]),
                "bits_per_byte_pass2": total / (tokens * ln2),
                "keyword_bits_per_byte": {kw: sums[kw] / (max(int(sum(m.sum() for m in self.masks[kw])), 1) * ln2)
                                          for kw in self.masks},
                "seconds": time.perf_counter() - started}


def random_sets(layers: list[int], num_experts: int, n: int, draws: int, exclude: set[tuple[int, int]]):
    """``draws`` sets of n distinct (layer, expert) pairs, uniform over the routed experts of the MoE layers minus
    ``exclude`` (seeded: RANDOM_SEED + 100 n + draw)."""
    pool = [(layer, e) for layer in layers for e in range(num_experts) if (layer, e) not in exclude]
    out = []
    for draw in range(draws):
        rng = np.random.default_rng(RANDOM_SEED + 100 * n + draw)
        picks = [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
        chosen: dict[int, list[int]] = {}
        for layer, e in sorted(picks):
            chosen.setdefault(int(layer), []).append(int(e))
        out.append(chosen)
    return out


def same_layer_sets(chosen: dict[int, list[int]], num_experts: int, draws: int, exclude: set[tuple[int, int]],
                    seed: int):
    """``draws`` sets with as many experts in each layer as ``chosen``, drawn uniformly from that layer's routed
    experts minus ``exclude`` (seeded by ``seed`` + draw)."""
    out = []
    for draw in range(draws):
        rng = np.random.default_rng(seed + draw)
        sets = {}
        for layer, ids in sorted(chosen.items()):
            pool = [e for e in range(num_experts) if (layer, e) not in exclude]
            sets[int(layer)] = sorted(int(e) for e in rng.choice(pool, size=len(ids), replace=False))
        out.append(sets)
    return out


def step_silencing(cache: Cache, config, variables, windows, keywords_record, random_draws: int,
                   reinforce: float = 2.0) -> dict[str, Any]:
    import zlib

    from moejax import model
    from moejax.moe import intervention as iv_lib

    keywords = [kw for kw, r in keywords_record.items() if r.get("occurrences")]
    record = cache.get("silencing") or {}
    evaluator = None

    def run(key: str, chosen: dict[int, list[int]] | None, scale: float | None = None) -> None:
        nonlocal evaluator
        if key in record:
            return
        if evaluator is None:
            evaluator = Evaluator(config, variables, windows, keywords)
        if chosen is None:
            iv = None
        elif scale is None:
            iv = iv_lib.mask_experts(config, chosen)
        else:
            iv = iv_lib.scale_experts(config, {layer: {e: scale for e in ids} for layer, ids in chosen.items()})
        result = evaluator(iv)
        record[key] = {"experts": None if chosen is None else {str(k): v for k, v in chosen.items()},
                       "scale": scale, **result}
        cache.put("silencing", record)
        kw_text = ", ".join(f"{kw} {v:.3f}" for kw, v in result["keyword_bits_per_byte"].items())
        _say(f"silencing {key}: {result['bits_per_byte']:.4f} bits/byte (keyword bytes: {kw_text}) "
             f"[{result['seconds']:.1f}s]")

    run("baseline", None)
    exclude = set()
    for kw in keywords:
        for n in (1, 2):
            chosen = {int(layer): ids for layer, ids in keywords_record[kw][f"top{n}"].items()}
            exclude |= {(layer, e) for layer, ids in chosen.items() for e in ids}
            run(f"keyword/{kw}/top{n}", chosen)
    layers = model.moe_layers(config.model)
    for n in (1, 2):
        for draw, chosen in enumerate(random_sets(layers, config.model.moe.num_experts, n, random_draws, exclude)):
            run(f"random/{n}/{draw}", chosen)
    for kw in keywords:  # the tighter control: random experts of the same layers as the keyword's
        own = {(int(layer), e) for layer, ids in keywords_record[kw]["top2"].items() for e in ids}
        for n in (1, 2):
            chosen = {int(layer): ids for layer, ids in keywords_record[kw][f"top{n}"].items()}
            seed = RANDOM_SEED + zlib.crc32(kw.encode()) % 10_000 + 100 * n
            for draw, sets in enumerate(same_layer_sets(chosen, config.model.moe.num_experts, random_draws, own,
                                                        seed)):
                run(f"same_layer/{kw}/{n}/{draw}", sets)
    if reinforce:
        for kw in keywords:
            chosen = {int(layer): ids for layer, ids in keywords_record[kw]["top2"].items()}
            run(f"reinforce/{kw}/top2", chosen, scale=reinforce)
    return record


def step_scmoe(cache: Cache, config, variables, windows, betas, alpha: float, weak_rank: int) -> dict[str, Any]:
    record = cache.get("scmoe")
    want = {"betas": [float(b) for b in betas], "alpha": alpha, "weak_rank": weak_rank}
    if record is not None and record.get("settings") == want:
        return record
    import jax
    import jax.numpy as jnp

    from moejax import model
    from moejax.generate import SelfContrast
    from moejax.moe import intervention as iv_lib

    started = time.perf_counter()
    module = model.Transformer(config.model)
    weak_iv = iv_lib.rank_only(config, weak_rank)
    contrasts = [SelfContrast(rank=weak_rank, alpha=alpha, beta=float(b)) for b in betas]

    def stats(v, batch, iv):
        inputs, targets = batch[:, :-1], batch[:, 1:, None]
        strong = module.apply(v, inputs).astype(jnp.float32)
        weak = module.apply(v, inputs, intervention=iv).astype(jnp.float32)
        plausible = strong >= jnp.log(jnp.float32(alpha)) + strong.max(-1, keepdims=True)
        inside = jnp.take_along_axis(plausible, targets, -1)[..., 0]
        out = {"inside": inside.sum(), "head_size": plausible.sum(),
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
    ln2 = math.log(2)
    rows = []
    for c in contrasts:
        t = totals[str(c.beta)]
        rows.append({"beta": c.beta, "outside_fraction": 1 - inside / tokens,
                     "masked_bits_per_byte_inside": float(t["masked_nll"]) / (inside * ln2),
                     "raw_bits_per_byte": float(t["raw_nll"]) / (tokens * ln2),
                     "greedy_accuracy": float(t["correct"]) / tokens})
    record = cache.put("scmoe", {"settings": want, "rows": rows, "tokens": tokens,
                                 "mean_head_size": float(totals["head_size"]) / tokens,
                                 "weak_bits_per_byte": float(totals["weak_nll"]) / (tokens * ln2),
                                 "seconds": time.perf_counter() - started})
    _say(f"SCMoE sweep: {tokens:,} positions, true byte outside the head at {1 - inside / tokens:.2%}; " + "; ".join(
        f"beta {r['beta']}: {r['masked_bits_per_byte_inside']:.4f} (head) {r['raw_bits_per_byte']:.4f} (unmasked)"
        for r in rows) + f" [{record['seconds']:.1f}s]")
    return record


def step_samples(cache: Cache, config, variables, tokenizer, alpha: float, weak_rank: int, max_new: int,
                 betas=(0.0, 0.5)) -> dict[str, Any]:
    record = cache.get("samples") or {}
    from moejax import generate

    for beta in betas:
        key = str(float(beta))
        if key in record:
            continue
        started = time.perf_counter()
        encoded = [tokenizer.encode(p) for p in PROMPTS]
        width = max(len(e) for e in encoded)
        prompts = np.zeros((len(encoded), width), np.int32)
        for i, e in enumerate(encoded):
            prompts[i, :len(e)] = e
        tokens = generate.generate(config, variables, prompts, max_new_tokens=max_new, eos_id=tokenizer.eos_id,
                                   prompt_lengths=np.asarray([len(e) for e in encoded]),
                                   contrast=generate.SelfContrast(rank=weak_rank, alpha=alpha, beta=float(beta)))
        texts = []
        for i, e in enumerate(encoded):
            new = [int(t) for t in tokens[i, len(e):len(e) + max_new]]
            if tokenizer.eos_id in new:
                new = new[:new.index(tokenizer.eos_id)]
            texts.append(tokenizer.decode(new))
        record[key] = {"prompts": list(PROMPTS), "continuations": texts, "seconds": time.perf_counter() - started}
        cache.put("samples", record)
        _say(f"greedy samples at beta {beta} [{record[key]['seconds']:.1f}s]")
    return record


def step_release(cache: Cache, data_dir: str | None) -> dict[str, Any] | None:
    """A tiny random Mixtral-layout release (moejax.hf.save), traced and analysed by the CLI."""
    record = cache.get("release")
    if record is not None:
        return record
    import jax
    from moejax.configs import base

    from moejax import hf
    from moejax.posthoc import __main__ as cli

    started = time.perf_counter()
    root = cache.root / "release"
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    config = base.get_config()
    config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, vocab_size=256)
    config.model.moe.update(num_experts=4, top_k=2, expert_ffn=16)
    config.model.moe.router.softmax_before_topk = False
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: rng.normal(0, 0.3, leaf.shape).astype(np.float32),
                          hf.abstract_variables(config.model)["params"])
    directory = hf.save(config, {"params": params}, root / "model")
    files = sorted(p.name for p in directory.iterdir())
    flags = ["--checkpoint", str(directory), "--data", "stdlib", "--batch_size", "8", "--seq_len", "64",
             "--max_tokens", "4096"] + (["--data_dir", data_dir] if data_dir else [])
    trace_dir = cli.main(["trace", *flags, "--out", str(root / "trace"), "--with_scores"])
    result = cli.main(["analyze", "--trace", str(trace_dir), "--out", str(root / "analysis")])
    s = result["summary"]
    record = cache.put("release", {
        "files": files, "model_type": json.loads((directory / "config.json").read_text()).get("model_type"),
        "tokens": s["num_tokens"], "layers": s["layers"], "num_experts": s["num_experts"], "top_k": s["top_k"],
        "max_expert_fraction": s["max_expert_fraction"], "srp_mean": s["srp_mean"], "segment_lengths":
        s["segment_lengths"], "router_entropy": s["router_entropy"],
        "outputs": sorted(p.name for p in (root / "analysis").iterdir()),
        "seconds": time.perf_counter() - started})
    _say(f"imported release: {files} traced and analysed in {record['seconds']:.1f}s")
    return record


# ------------------------------------------------------------------------------------------------------ plots

def plot_silencing(summary: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    rows = summary["silencing_table"]
    keywords = [r["keyword"] for r in rows]
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    bars = [("top{n}", "top-{n} keyword experts", 1.0), ("random{n}", "{n} random, any layer", 0.45),
            ("same{n}", "{n} random, same layers", 0.2)]
    width = 0.13
    for panel, (what, title) in enumerate((("overall", "all evaluation bytes"),
                                           ("keyword", "the keyword's own bytes"))):
        ax = fig.add_subplot(1, 2, panel + 1)
        x = np.arange(len(keywords))
        slot = 0
        for n in (1, 2):
            for key, label, alpha in bars:
                key = key.format(n=n)
                if key.startswith("top"):
                    values, errors = [r[key][f"{what}_delta"] for r in rows], None
                else:
                    values = [r[key][f"{what}_delta_mean"] for r in rows]
                    errors = [r[key][f"{what}_delta_std"] or 0.0 for r in rows]
                ax.bar(x + (slot - 2.5) * width, values, yerr=errors, width=width, color=f"C{n - 1}", alpha=alpha,
                       capsize=2, label=label.format(n=n), edgecolor=f"C{n - 1}")
                slot += 1
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xticks(x, keywords)
        ax.set(ylabel="Δ bits per byte vs. the model", title=f"silencing: {title}")
        ax.grid(alpha=0.3, axis="y")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=6, fontsize="small")
    fig.suptitle("silencing keyword experts against random ones (random: mean ± std over the draws)")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_scmoe(scmoe: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    rows = scmoe["rows"]
    betas = [r["beta"] for r in rows]
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(betas, [r["masked_bits_per_byte_inside"] for r in rows], "o-",
            label=f"on the plausible head ({1 - rows[0]['outside_fraction']:.1%} of positions)")
    ax.plot(betas, [r["raw_bits_per_byte"] for r in rows], "s--", label="unmasked contrast, all positions")
    ax.set(xlabel="beta", ylabel="bits per byte", title="SCMoE contrast: likelihood")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(betas, [r["greedy_accuracy"] for r in rows], "o-")
    ax.set(xlabel="beta", ylabel="argmax = true next byte", title="SCMoE contrast: greedy next-byte accuracy")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ------------------------------------------------------------------------------------------------------ page

def summarise(cache: Cache, keywords) -> dict[str, Any]:
    silencing = cache.get("silencing") or {}
    base = silencing.get("baseline")
    kw_record = cache.get("keywords") or {}
    table = []
    if base:
        for kw in keywords:
            if not kw_record.get(kw, {}).get("occurrences") or f"keyword/{kw}/top1" not in silencing:
                continue
            row: dict[str, Any] = {"keyword": kw, "baseline_overall": base["bits_per_byte"],
                                   "baseline_keyword": base["keyword_bits_per_byte"][kw]}
            for n in (1, 2):
                r = silencing.get(f"keyword/{kw}/top{n}")
                if r is None:
                    continue
                row[f"top{n}"] = {"experts": r["experts"], "overall": r["bits_per_byte"],
                                  "overall_delta": r["bits_per_byte"] - base["bits_per_byte"],
                                  "keyword": r["keyword_bits_per_byte"][kw],
                                  "keyword_delta": r["keyword_bits_per_byte"][kw] - base["keyword_bits_per_byte"][kw]}
                for name, prefix in ((f"random{n}", f"random/{n}/"), (f"same{n}", f"same_layer/{kw}/{n}/")):
                    draws = [v for k, v in silencing.items() if k.startswith(prefix)]
                    overall = np.array([d["bits_per_byte"] - base["bits_per_byte"] for d in draws])
                    own = np.array([d["keyword_bits_per_byte"][kw] - base["keyword_bits_per_byte"][kw]
                                    for d in draws])
                    row[name] = {"draws": len(draws),
                                 "overall_delta_mean": float(overall.mean()) if len(draws) else None,
                                 "overall_delta_std": float(overall.std(ddof=1)) if len(draws) > 1 else None,
                                 "keyword_delta_mean": float(own.mean()) if len(draws) else None,
                                 "keyword_delta_std": float(own.std(ddof=1)) if len(draws) > 1 else None,
                                 "keyword_delta_max": float(own.max()) if len(draws) else None}
            r = silencing.get(f"reinforce/{kw}/top2")
            if r is not None:
                row["reinforce"] = {"scale": r["scale"], "overall_delta": r["bits_per_byte"] - base["bits_per_byte"],
                                    "keyword_delta": r["keyword_bits_per_byte"][kw] - base["keyword_bits_per_byte"][kw]}
            table.append(row)
    return {"silencing_table": table}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


def _experts_text(experts: dict[str, list[int]] | None) -> str:
    if not experts:
        return "–"
    return ", ".join(f"L{layer}/E{e}" for layer, ids in sorted(experts.items(), key=lambda kv: int(kv[0]))
                     for e in ids)


def _show_byte(i: int) -> str:
    return {ord(" "): "␣", ord("\n"): "↵", ord("|"): "¦", ord("`"): "ˋ", 0: "⟨eos⟩"}.get(i, chr(i) if 32 < i < 127
                                                                                        else f"\\x{i:02x}")


def render_page(cache: Cache, summary: dict[str, Any], info: dict[str, Any], findings: str) -> str:
    analysis = (cache.get("analysis") or {}).get("summary", {})
    lines = [f"# Post-hoc routing analysis, steering and self-contrast decoding: {info['model']}", "",
             f"*Generated by `{info['command']}` (`experiments/posthoc_routing.py`; the text between the findings "
             "markers is hand-written and kept by reruns).*", ""]
    lines += [FINDINGS_BEGIN, findings.strip("\n"), FINDINGS_END, ""]
    lines += ["## Setup", "",
              f"- Model: `{info['checkpoint']}` (step {info['step']}), {info['params']:,} parameters, "
              f"{info['moe_layers']} MoE layers of {info['shared']} shared + {info['experts']} routed experts, "
              f"top-{info['top_k']}, router `{info['router']}` (softmax before top-k, no renormalisation: a silenced "
              f"expert's slot goes to the next-ranked expert with that expert's own probability), byte tokenizer. "
              f"The run's own validation: {_fmt(info.get('run_val_bpb'), 4)} bits/byte.",
              f"- Data: the validation split of `{info['data']}` ({info['batch_size']} x {info['seq_len']} byte "
              f"windows, the run's shape). Trace (routing analyses, choice of the keyword experts): the first "
              f"{info['trace_tokens']:,} tokens; evaluation (every bits-per-byte figure): the next "
              f"{info['eval_tokens']:,} tokens, disjoint from the trace.",
              f"- Machine: {info['machine']}. Time: {info['time']}.", ""]

    if analysis:
        lines += ["## Routing of the trained model", "",
                  "| MoE layer | " + " | ".join(str(layer) for layer in analysis["layers"]) + " |",
                  "|---|" + "---:|" * len(analysis["layers"])]
        uniform = 1 / analysis["num_experts"]
        for label, key, digits in (("largest expert fraction (uniform " + f"{uniform:.4f})", "max_expert_fraction", 4),
                                   ("max / mean load", "max_over_mean_load", 2), ("load CV", "load_cv", 2),
                                   ("router entropy, nats (max " + f"{analysis['router_entropy_max']:.2f})",
                                    "router_entropy", 2)):
            values = analysis.get(key) or [None] * len(analysis["layers"])
            lines.append(f"| {label} | " + " | ".join(_fmt(v, digits) for v in values) + " |")
        aff = analysis["affinity_top1"]
        independent = analysis["max_expert_fraction"][1:]
        lines += ["| affinity top-1 to the next layer (uniform " + f"{uniform:.4f})"
                  + " | " + " | ".join(_fmt(v, 3) for v in aff) + " | – |",
                  "| the same if the layers routed independently (the next layer's largest expert fraction) | "
                  + " | ".join(_fmt(v, 3) for v in independent) + " | – |", "",
                  "![expert frequency per layer](posthoc_routing_frequency.png)", "",
                  "![inter-layer affinity](posthoc_routing_affinity.png)", "",
                  "Affinity is P(expert j at layer l+1 | expert i at layer l) with every selected (i, j) pair of a "
                  f"token counted (k x k = {analysis['top_k'] ** 2} pairs per token), so a row's mass is spread over "
                  f"at least {analysis['top_k']} experts and the top-1 affinity is at most about 1/{analysis['top_k']}"
                  f" = {1 / analysis['top_k']:.3f} even for a perfectly predictable routing.", "",
                  "### Local routing consistency", "",
                  "| segment length m | " + " | ".join(str(m) for m in analysis["segment_lengths"]) + " |",
                  "|---|" + "---:|" * len(analysis["segment_lengths"]),
                  "| SRP (coverage: best fixed k-set of the segment) | " + " | ".join(
                      _fmt(v) for v in analysis["srp_mean"]) + " |",
                  "| SRP (F1, the paper's code) | " + " | ".join(_fmt(v) for v in analysis["srp_f1_mean"]) + " |"]
        for ci, c in enumerate(analysis["cache_sizes"]):
            lines.append(f"| SCH, cache of {c} experts | " + " | ".join(
                _fmt(row[ci]) for row in analysis["sch_mean"]) + " |")
        shuffled = cache.get("shuffled")
        if shuffled and shuffled["segment_lengths"] == analysis["segment_lengths"]:
            lines += ["| SRP (coverage), tokens shuffled: no locality | " + " | ".join(
                          _fmt(v) for v in shuffled["srp_mean"]) + " |",
                      f"| SCH, cache of {2 * analysis['top_k']}, tokens shuffled | " + " | ".join(
                          _fmt(v) for v in shuffled["sch_2k_mean"]) + " |"]
        lines += ["", "Means over the MoE layers (the plot's band: min-max over layers). SRP(m) = SCH(m, k). "
                  "*Tokens shuffled*: the same trace with its positions permuted at random (the same permutation "
                  "at every layer: the expert load and the per-token routing are kept, the order is not), so the "
                  "segments hold unrelated tokens: what SRP/SCH are without any local consistency.", "",
                  "![SRP and SCH against the segment length](posthoc_routing_local_consistency.png)", ""]

    kw_record = cache.get("keywords") or {}
    if kw_record:
        lines += ["## Experts most associated with Python keywords (nPMI)", "",
                  "Marker: every byte of a whole-word occurrence of the keyword in the trace (the positions whose "
                  "*input* byte is one of the keyword's bytes, the keyword neither preceded nor followed by "
                  "`[A-Za-z0-9_]`) is one event; nPMI between that event and the selection of each (layer, expert) "
                  "over the trace's routed slots (`steer.marker_experts` on the trace with those positions' token "
                  "id replaced by a synthetic id). *Bytes* column: the alternative marker, the nPMI with each of the "
                  "keyword's distinct byte ids wherever they occur, averaged (`steer.marker_experts(trace, "
                  "list(kw.encode()))`).", "",
                  "| keyword | occurrences (bytes) | top-5 experts by nPMI | best nPMI per layer | top-2 by bytes | "
                  "top bytes of the top-1 expert (nPMI) |", "|---|---:|---|---|---|---|"]
        for kw in [k for k in info["keywords"] if k in kw_record]:
            r = kw_record[kw]
            if not r.get("occurrences"):
                lines.append(f"| `{kw}` | 0 | – | – | – | – |")
                continue
            top5 = ", ".join(f"L{la}/E{e} ({v:.3f})" for la, e, v in r["top5"])
            best = ", ".join(f"L{la}: E{e} {v:.3f}" for la, e, v in r["best_per_layer"])
            by_bytes = ", ".join(f"L{la}/E{e} ({v:.3f})" for la, e, v in r["bytes_top2"])
            top_bytes = " ".join(f"`{_show_byte(i)}` {v:.2f}" for i, v in r["top1_top_bytes"])
            lines.append(f"| `{kw}` | {r['occurrences']} ({r['marked_bytes']}) | {top5} | {best} | {by_bytes} | "
                         f"{top_bytes} |")
        lines += ["", "Top bytes: the bytes (occurring ≥ 20 times in the trace) of highest nPMI with the keyword's "
                  "top-1 expert at its layer (`analysis.top_tokens_per_expert`).", ""]

    table = summary.get("silencing_table") or []
    silencing = cache.get("silencing") or {}
    if table:
        base = silencing["baseline"]
        draws = table[0]["random1"]["draws"]

        def spread(stats: dict[str, Any], what: str, digits: int) -> str:
            text = f"{stats[f'{what}_delta_mean']:+.{digits}f} ± {_fmt(stats[f'{what}_delta_std'], digits)}"
            return text + (f" ({stats['keyword_delta_max']:+.{digits}f})" if what == "keyword" else "")

        lines += ["## Silencing the keyword experts", "",
                  f"Model: {base['bits_per_byte']:.4f} bits/byte over the {info['eval_tokens']:,} evaluation bytes "
                  f"(`moejax.evaluate.evaluate`; the per-position pass gives {base['bits_per_byte_pass2']:.4f}). "
                  "Silenced = `mask_experts` (never selected). Δ = bits/byte minus the model's, on all evaluation "
                  "bytes and on the keyword's own bytes (kw: the target bytes inside its whole-word occurrences in "
                  "the evaluation windows). Two random controls, each "
                  f"{draws} draws of as many experts, mean ± std (and, for the keyword bytes, the largest Δ of a "
                  f"draw): *any layer*, (layer, expert) pairs uniform over all {info['moe_layers']} x "
                  f"{info['experts']} routed experts (every keyword's chosen experts excluded; the same draws for "
                  "every keyword); *same layers*, as many experts in each of the chosen experts' layers, uniform "
                  "over that layer's other experts (the keyword's top-2 excluded).", "",
                  "| keyword | kw bytes | model: kw bits/byte | silenced | Δ all | Δ kw | any layer: Δ all | "
                  "any layer: Δ kw (max) | same layers: Δ all | same layers: Δ kw (max) |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        counts = summary.get("keyword_eval_bytes", {})
        for row in table:
            for n in (1, 2):
                t = row.get(f"top{n}")
                if t is None:
                    continue
                rnd, same = row[f"random{n}"], row[f"same{n}"]
                lines.append(
                    f"| `{row['keyword']}` | {counts.get(row['keyword'], '–')} | {row['baseline_keyword']:.3f} | "
                    f"top-{n}: {_experts_text(t['experts'])} | {t['overall_delta']:+.4f} | "
                    f"{t['keyword_delta']:+.3f} | {spread(rnd, 'overall', 4)} | {spread(rnd, 'keyword', 3)} | "
                    + (f"{spread(same, 'overall', 4)} | {spread(same, 'keyword', 3)} |" if same["draws"] else
                       "– | – |"))
        lines += ["", "![silencing effect](posthoc_routing_silencing.png)", ""]
        reinforced = [row for row in table if "reinforce" in row]
        if reinforced:
            lines += [f"Reinforcing instead (RICE's direction): the top-2 experts' combine weights x "
                      f"{reinforced[0]['reinforce']['scale']:g} (`scale_experts`, after the router's weights; "
                      "this router does not renormalise).", "",
                      "| keyword | top-2 experts | Δ all | Δ kw |", "|---|---|---:|---:|"]
            lines += [f"| `{row['keyword']}` | {_experts_text(row['top2']['experts'])} | "
                      f"{row['reinforce']['overall_delta']:+.4f} | {row['reinforce']['keyword_delta']:+.3f} |"
                      for row in reinforced]
            lines.append("")
        random_rows = [(k, v) for k, v in silencing.items() if k.startswith(("random/", "same_layer/"))]
        lines += ["<details><summary>every random draw</summary>", "",
                  "| draw | experts | bits/byte |" + "".join(f" kw bytes: {kw} |" for kw in base[
                      "keyword_bits_per_byte"]), "|---|---|---:|" + "---:|" * len(base["keyword_bits_per_byte"])]
        lines += [f"| {k} | {_experts_text(v['experts'])} | {v['bits_per_byte']:.4f} |" + "".join(
            f" {x:.3f} |" for x in v["keyword_bits_per_byte"].values()) for k, v in random_rows]
        lines += ["", "</details>", ""]

    scmoe = cache.get("scmoe")
    if scmoe:
        s = scmoe["settings"]
        lines += ["## Self-contrast decoding (SCMoE): beta sweep", "",
                  f"Strong: the model; weak: `rank_only(cfg, {s['weak_rank']})` (each MoE token routed to its "
                  f"rank-{s['weak_rank']} expert alone, weight 1; the shared expert unchanged), alpha = {s['alpha']}. "
                  f"Over the {scmoe['tokens']:,} evaluation positions the plausible head z_s ≥ log(alpha) + max z_s "
                  f"holds {scmoe['mean_head_size']:.2f} bytes on average and misses the true next byte at "
                  f"{scmoe['rows'][0]['outside_fraction']:.2%} of the positions (where the contrast's "
                  "cross-entropy is infinite, whatever beta). The weak routing alone: "
                  f"{scmoe['weak_bits_per_byte']:.3f} bits/byte.", "",
                  "| beta | bits/byte on the head (renormalised, positions where the true byte is in it) | "
                  "bits/byte, unmasked contrast, all positions | greedy next-byte accuracy |", "|---:|---:|---:|---:|"]
        for r in scmoe["rows"]:
            lines.append(f"| {r['beta']} | {r['masked_bits_per_byte_inside']:.4f} | {r['raw_bits_per_byte']:.4f} | "
                         f"{r['greedy_accuracy']:.4f} |")
        lines += ["", "beta = 0 is the model itself (its head-renormalised likelihood in the first column, its "
                  "bits/byte in the second).", "", "![SCMoE beta sweep](posthoc_routing_scmoe.png)", ""]
    samples = cache.get("samples") or {}
    if samples:
        lines += ["### Greedy samples", "",
                  f"`moejax.generate.generate(..., contrast=SelfContrast(rank={info['weak_rank']}, "
                  f"alpha={info['alpha']}, beta=...))`, greedy, {info['max_new']} new bytes, stopping at the eos "
                  "byte.", ""]
        for i, prompt in enumerate(PROMPTS):
            for beta, r in sorted(samples.items(), key=lambda kv: float(kv[0])):
                lines += [f"Prompt {i + 1}, beta = {beta}:", "", "```python", prompt + r["continuations"][i], "```", ""]

    release = cache.get("release")
    if release:
        lines += ["## Mechanics on an imported release", "",
                  f"A tiny random `{release['model_type']}` release ({release['layers'].__len__()} MoE layers, "
                  f"{release['num_experts']} experts, top-{release['top_k']}, byte vocabulary) written by "
                  f"`moejax.hf.save` (files: {', '.join(release['files'])}), then `python -m moejax.posthoc trace "
                  f"--with_scores` on {release['tokens']:,} validation tokens and `python -m moejax.posthoc analyze`: "
                  f"{', '.join(release['outputs'])}, in {release['seconds']:.1f}s. Largest expert fraction per layer "
                  f"{', '.join(_fmt(v) for v in release['max_expert_fraction'])}, SRP(m = "
                  f"{release['segment_lengths'][-1]}) {_fmt(release['srp_mean'][-1])}, router entropy "
                  f"{', '.join(_fmt(v, 2) for v in release['router_entropy'] or [])} nats (max "
                  f"{math.log(release['num_experts']):.2f}). Random weights: the numbers show the path works, not "
                  "anything about routing.", ""]
    lines += ["## Reproduce", "", "```bash", info["command"], "```", "",
              f"Intermediate results: `<checkpoint>/{NAME}/` (results.json, the trace, the release); a rerun skips "
              "every finished step. All numbers: `posthoc_routing.json`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main

def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a moejax workdir (moejax.load)")
    parser.add_argument("--max_tokens", type=int, default=65536, help="validation tokens of the trace")
    parser.add_argument("--eval_tokens", type=int, default=32768, help="validation tokens evaluated (after the "
                                                                       "trace's)")
    parser.add_argument("--keywords", default=",".join(KEYWORDS))
    parser.add_argument("--random_draws", type=int, default=5)
    parser.add_argument("--reinforce", type=float, default=2.0, help="the top-2's weight factor (0: skip)")
    parser.add_argument("--betas", default=",".join(str(b) for b in BETAS))
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--weak_rank", type=int, default=2)
    parser.add_argument("--max_new", type=int, default=160, help="new bytes per greedy sample")
    parser.add_argument("--data_dir", default=None, help="where the prepared corpus is cached (data.dir)")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--render_only", action="store_true", help="rewrite the page from the cached results")
    parser.add_argument("--no_release", action="store_true", help="skip the imported-release mechanics step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(sys.argv[1:] if argv is None else argv)
    checkpoint = pathlib.Path(args.checkpoint)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(checkpoint / NAME)
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
    betas = [float(b) for b in args.betas.split(",")]
    command = (f"python -m experiments.{NAME} --checkpoint={args.checkpoint}"
               + (f" --data_dir={args.data_dir}" if args.data_dir else "")
               + (f" --max_tokens={args.max_tokens}" if args.max_tokens != 65536 else "")
               + (f" --eval_tokens={args.eval_tokens}" if args.eval_tokens != 32768 else ""))

    import jax

    import moejax.load
    from moejax import model
    from moejax.training import checkpoint as checkpoint_lib

    config, variables = moejax.load(checkpoint)
    data_config, inputs, windows, tokenizer = load_data(config, checkpoint, args.max_tokens, args.eval_tokens,
                                                        args.data_dir)
    if not args.render_only:
        cache.put("started", cache.get("started") or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        trace = step_trace(cache, config, variables, inputs, tokenizer, out)
        keywords_record = step_keywords(cache, trace, keywords, inputs[0].shape[1], config.model.vocab_size)
        step_silencing(cache, config, variables, windows, keywords_record, args.random_draws, args.reinforce)
        step_scmoe(cache, config, variables, windows, betas, args.alpha, args.weak_rank)
        step_samples(cache, config, variables, tokenizer, args.alpha, args.weak_rank, args.max_new)
        if not args.no_release:
            step_release(cache, args.data_dir)

    summary = summarise(cache, keywords)
    summary["keyword_eval_bytes"] = {kw: int(sum(keyword_mask(w, kw)[:, 1:].sum() for w in windows))
                                     for kw in keywords}
    if summary["silencing_table"]:
        plot_silencing(summary, out / f"{NAME}_silencing.png")
    if cache.get("scmoe"):
        plot_scmoe(cache.get("scmoe"), out / f"{NAME}_scmoe.png")
    seconds = {key: value.get("seconds") for key, value in cache.data.items() if isinstance(value, dict)
               and "seconds" in value}
    seconds["silencing"] = sum(v["seconds"] for v in (cache.get("silencing") or {}).values())
    seconds["keywords"] = sum(v.get("seconds", 0) for v in (cache.get("keywords") or {}).values())
    seconds["samples"] = sum(v["seconds"] for v in (cache.get("samples") or {}).values())
    seconds = {k: v for k, v in seconds.items() if v is not None}
    total = sum(seconds.values())
    run_summary = json.loads((checkpoint / "summary.json").read_text()) if (checkpoint / "summary.json").exists() \
        else {}
    cfg = config.model
    info = {"model": f"DeepSeekMoE tiny ({checkpoint.name})" if "deepseek" in checkpoint.name else checkpoint.name,
            "command": command, "checkpoint": str(checkpoint),
            "step": max(checkpoint_lib.checkpoint_steps(checkpoint)),
            "params": int(sum(x.size for x in jax.tree.leaves(variables["params"]))),
            "moe_layers": len(model.moe_layers(cfg)), "shared": cfg.moe.num_shared, "experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k, "router": cfg.moe.router.kind, "run_val_bpb": run_summary.get("val_bits_per_byte"),
            "data": data_config.data.name, "batch_size": inputs[0].shape[0], "seq_len": inputs[0].shape[1],
            "trace_tokens": sum(int(b.size) for b in inputs), "eval_tokens": sum(int(w[:, 1:].size) for w in windows),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with another job; JAX on CPU",
            "time": f"{total / 60:.1f} min of compute in all (" + ", ".join(
                f"{k} {v:.0f}s" for k, v in seconds.items()) + ")",
            "weak_rank": args.weak_rank, "alpha": args.alpha, "max_new": args.max_new, "keywords": keywords}
    page = out / f"{NAME}.md"
    page.write_text(render_page(cache, summary, info, kept_findings(page, "(to be written after a run)")))
    (out / f"{NAME}.json").write_text(json.dumps(_jsonable({"info": info, "summary": summary, **{
        k: v for k, v in cache.data.items()}}), indent=1, sort_keys=True, allow_nan=False) + "\n")
    _say(f"wrote {page} and {out / (NAME + '.json')} ({total / 60:.1f} min of compute in the cached steps)")
    return {"info": info, "summary": summary}


if __name__ == "__main__":
    main()
