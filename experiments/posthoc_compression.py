"""Post-hoc expert compression of a trained MoE model: validation bits per byte against the fraction of routed
experts kept, for four pruning criteria and two merging methods over several calibration sets, and the
super-expert ablation (issue 17, items 4 and 5).

    python -m experiments.posthoc_compression --checkpoint=runs/deepseekmoe [--seeds 3] [--calib_batches 4]
        [--fractions 1,0.75,0.5,0.25] [--methods frequency,soft_count,reap,easy_ep,mcsmoe,hcsmoe]
        [--random_draws 5] [--eval_batches 0] [--data_dir DIR] [--out experiments/results] [--render_only]

Compression grid: for every method, every fraction f of the E routed experts (n = round(f * E) kept per MoE layer)
and every calibration seed s:

* pruning (``frequency``, ``soft_count``, ``reap``, ``easy_ep``): ``moejax.posthoc.importance`` on the
  calibration set, ``prune.keep_by_score`` (the n best experts of every layer), ``prune.prune``;
* merging: ``merge.mcsmoe`` with the routing trace of the calibration set (``moejax.posthoc.record``) and
  ``merge.hcsmoe`` with ``importance.expert_mean_outputs`` (average linkage, frequency-weighted, as the
  ``python -m moejax.posthoc merge`` command does);
* then ``moejax.evaluate.evaluate`` on the run's validation batches (``data.eval_batches`` of the run unless
  ``--eval_batches``): bits per byte.

Calibration set of seed s: the first ``--calib_batches`` batches of the TRAINING split's iterator
(``moejax.data.train_iterator``) with ``config.seed = 1000 + s``, in the run's batch shape (``--calib_batch_size``,
default the run's ``train.batch_size``), the inputs ``[:, :-1]`` of each window.

Super experts: ``super_experts.find`` over the union of the calibration sets (the paper's rule, P99.5 and max/10),
the flagged experts per calibration seed (stability), and ``rule='top_n'`` for n = 1..3. Every flagged set S of
n experts is ablated two ways: silenced by the routing intervention (``moejax.moe.intervention.mask_experts``: S is
never selected, the next-ranked experts take its slots) and zeroed as the paper's code does (the down-projection
``wo`` of each expert set to 0: still selected, its slots contribute nothing); each against ``--random_draws``
random sets of n experts drawn from the experts no rule flagged, anywhere in the model ('random') and in the
same layers as S ('random, same layers').

Resumable: every finished result is stored in ``<checkpoint>/posthoc_compression/results.json`` as soon as it
is done (with the calibration statistics of each seed beside it), so a rerun of the same command skips it; a
progress line is printed per result. Outputs in ``--out``: ``posthoc_compression.md`` (the page; the text between
``<!-- findings:begin -->`` and ``<!-- findings:end -->`` of an existing page is kept), ``posthoc_compression.json``,
``posthoc_compression.png`` (bits/byte against the fraction kept), ``posthoc_compression_super_experts.png``
(the profile) and ``posthoc_compression_super_ablation.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

PRUNE_METHODS = ("frequency", "soft_count", "reap", "easy_ep")
MERGE_METHODS = ("mcsmoe", "hcsmoe")
METHODS = PRUNE_METHODS + MERGE_METHODS
LABELS = {"frequency": "prune: frequency", "soft_count": "prune: soft count", "reap": "prune: REAP",
          "easy_ep": "prune: EASY-EP", "mcsmoe": "merge: MC-SMoE", "hcsmoe": "merge: HC-SMoE"}
FRACTIONS = (1.0, 0.75, 0.5, 0.25)
CALIB_SEED_OFFSET = 1000
RANDOM_SEED_OFFSET = 2024
TOP_N = (1, 2, 3)
NAME = "posthoc_compression"
from experiments.runner import FINDINGS_BEGIN, FINDINGS_END, kept_findings  # noqa: E402


def _say(message: str) -> None:
    print(f"[{NAME}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------- the cache

class Cache:
    """``<checkpoint>/posthoc_compression/``: results.json ({key: record}, rewritten atomically after every
    result) and the per-seed calibration statistics (calib_seed<s>.npz, trace_seed<s>/)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "results.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("results", {})

    @property
    def results(self) -> dict[str, Any]:
        return self.data["results"]

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.results[key] = record
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def cell_key(method: str, kept: int, seed: int) -> str:
    return f"{method}/{kept}/{seed}"


# ------------------------------------------------------------------------------------------------ evaluation

class Evaluator:
    """Validation bits per byte of compressed models (``moejax.evaluate.evaluate``) and of the original model under
    a routing intervention (the same cross-entropy, one jitted function with the intervention as an argument)."""

    def __init__(self, config, batches: list[np.ndarray], tokenizer):
        from moejax import evaluate as evaluate_lib

        self.config, self.batches = config, batches
        table = evaluate_lib._bytes_table(tokenizer, config.model.vocab_size)
        self.bytes_per_token = None if table is None else (lambda t: float(table[t].sum()))
        self.tokens = sum(int(b[:, 1:].size) for b in batches)
        self.text_bytes = sum(float(b[:, 1:].size) if table is None else float(table[b[:, 1:]].sum())
                              for b in batches)
        self._intervened = None

    def bits_per_byte(self, config, variables) -> float:
        from moejax import evaluate as evaluate_lib

        result = evaluate_lib.evaluate(config, variables, self.batches, bytes_per_token=self.bytes_per_token)
        return float(result["bits_per_byte"])

    def bits_per_byte_under(self, variables, intervention) -> float:
        """The original config's model with ``variables`` under ``intervention`` (a moejax Intervention)."""
        import jax
        import jax.numpy as jnp

        from moejax import model
        from moejax.training import objectives

        if self._intervened is None:
            module = model.Transformer(self.config.model)

            def loss(v, batch, iv):
                logits = module.apply(v, batch[:, :-1], train=False, intervention=iv)
                return objectives.cross_entropy(logits, batch[:, 1:])

            self._intervened = jax.jit(loss)
        v = {key: variables[key] for key in ("params", "moe_state") if variables.get(key) is not None}
        total = 0.0
        for batch in self.batches:
            total += float(self._intervened(v, jnp.asarray(batch, jnp.int32), intervention)) * batch[:, 1:].size
        return total / (self.text_bytes * math.log(2))


# ------------------------------------------------------------------------------------------- calibration data

def calibration_batches(config, seed: int, num_batches: int, batch_size: int) -> list[np.ndarray]:
    """The model inputs [B, S] of the first ``num_batches`` training batches with ``config.seed`` = 1000 + seed."""
    import ml_collections

    from moejax import data

    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.seed = CALIB_SEED_OFFSET + seed
    if batch_size:
        cfg.train.batch_size = batch_size
    iterator = data.train_iterator(cfg)
    return [np.asarray(next(iterator))[:, :-1] for _ in range(num_batches)]


def calibration_stats(cache: Cache, config, variables, batches: list[np.ndarray], seed: int,
                      methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Per seed, what ``methods`` need, each computed once and stored in the cache: the importance scores [L, E] of
    the pruning criteria among ``methods`` and always 'frequency' (HC-SMoE weighs by it), in one forward pass; the
    experts' mean outputs [L, E, D] (HC-SMoE); the routing trace (MC-SMoE; a directory, complete once its marker
    file exists)."""
    from moejax.posthoc import capture, importance, read_trace

    path = cache.root / f"calib_seed{seed}.npz"
    trace_dir = cache.root / f"trace_seed{seed}"
    stored = dict(np.load(path)) if path.exists() else {}
    seconds: dict[str, float] = {}
    done = []
    wanted = [c for c in PRUNE_METHODS if c in methods or c == "frequency"]  # merges weigh by frequency
    missing = [c for c in wanted if f"score_{c}" not in stored]
    if missing:
        t0 = time.perf_counter()
        scores = importance.from_forward(config, variables, batches, missing)
        stored.update({f"score_{c}": scores[c] for c in missing})
        stored["seconds_scores"] = seconds["scores"] = time.perf_counter() - t0 + float(stored.get("seconds_scores", 0))
        done.append(f"importance ({', '.join(missing)}) {time.perf_counter() - t0:.1f}s")
    if "hcsmoe" in methods and "mean_outputs" not in stored:
        t0 = time.perf_counter()
        stored["mean_outputs"] = importance.expert_mean_outputs(config, variables, batches)
        stored["seconds_means"] = seconds["means"] = time.perf_counter() - t0
        done.append(f"mean outputs {seconds['means']:.1f}s")
    if done:
        np.savez(path, **stored)
    marker = trace_dir / "complete"
    if "mcsmoe" in methods and not marker.exists():
        t0 = time.perf_counter()
        capture.record(config, variables, batches, trace_dir, eos_id=0, overwrite=True,
                       metadata={"calibration_seed": seed})
        marker.write_text("recorded by experiments/posthoc_compression.py\n")
        stored["seconds_trace"] = seconds["trace"] = time.perf_counter() - t0
        np.savez(path, **stored)
        done.append(f"trace {seconds['trace']:.1f}s")
    if done:
        _say(f"calibration seed {seed}: {sum(b.size for b in batches):,} tokens, " + ", ".join(done))
    total = sum(float(stored[key]) for key in ("seconds_scores", "seconds_means", "seconds_trace") if key in stored)
    if "seconds" in stored:  # written by the first version of this script: all three at once
        total = float(stored["seconds"])
    return {"scores": {c: stored[f"score_{c}"] for c in PRUNE_METHODS if f"score_{c}" in stored},
            "mean_outputs": stored.get("mean_outputs"),
            "trace": read_trace(trace_dir) if marker.exists() else None, "seconds": total}


# --------------------------------------------------------------------------------------------- compression

def compress(method: str, kept: int, config, variables, stats: dict[str, Any]):
    """(config, variables) of the model compressed to ``kept`` routed experts per MoE layer by ``method``."""
    from moejax import model
    from moejax.posthoc import merge, prune

    layers = model.moe_layers(config.model)
    if method in PRUNE_METHODS:
        keep = prune.keep_by_score(stats["scores"][method], kept, layers=layers)
        return prune.prune(config, variables, keep)
    if method == "mcsmoe":
        return merge.mcsmoe(config, variables, stats["trace"], kept)
    if method == "hcsmoe":
        return merge.hcsmoe(config, variables, stats["mean_outputs"], kept, linkage="average",
                            frequencies=stats["scores"]["frequency"], layers=layers)
    raise ValueError(f"unknown method {method!r}: allowed are {METHODS}")


def kept_count(num_experts: int, fraction: float) -> int:
    return max(1, int(math.floor(num_experts * fraction + 0.5)))


# ------------------------------------------------------------------------------------------- super experts

def zero_experts(config, variables, experts: Sequence[tuple[int, int]]):
    """A copy of variables with the down-projection ('wo') of each (model layer, expert) set to 0: the paper's
    pruning (the expert is still selected; its output is zero)."""
    import jax
    from flax import core

    from moejax import model, moe

    new = jax.tree.map(lambda x: x, core.unfreeze(variables))  # new containers, shared arrays
    sites = model.moe_layer_paths(config.model)
    for layer, expert in experts:
        path, unit = sites[layer]
        tree = new["params"]
        for key in path:
            tree = tree[key]
        wo = np.array(tree[moe.EXPERTS]["wo"])
        wo[(expert,) if unit is None else (unit, expert)] = 0
        tree[moe.EXPERTS]["wo"] = wo
    return new


def random_sets(target: Sequence[tuple[int, int]], excluded: set[tuple[int, int]], layers: Sequence[int],
                num_experts: int, draws: int, same_layers: bool) -> list[list[tuple[int, int]]]:
    """``draws`` random sets of len(target) experts none of which is in ``excluded``: anywhere in the model, or
    (same_layers) one in the layer of each target expert."""
    out = []
    for draw in range(draws):
        rng = np.random.default_rng(RANDOM_SEED_OFFSET + draw + (1000 if same_layers else 0))
        if same_layers:
            chosen: list[tuple[int, int]] = []
            for layer, _ in target:
                pool = [(layer, e) for e in range(num_experts)
                        if (layer, e) not in excluded and (layer, e) not in chosen]
                chosen.append(pool[int(rng.integers(len(pool)))])
        else:
            pool = [(layer, e) for layer in layers for e in range(num_experts) if (layer, e) not in excluded]
            chosen = [pool[i] for i in rng.choice(len(pool), size=len(target), replace=False)]
        out.append(sorted((int(a), int(b)) for a, b in chosen))
    return out


def super_expert_experiment(args, cache: Cache, config, variables, calib: dict[int, list[np.ndarray]],
                            evaluator: Evaluator, out_dir: pathlib.Path) -> None:
    from moejax import model
    from moejax.moe import intervention as interventions
    from moejax.posthoc import super_experts

    layers = model.moe_layers(config.model)
    num_experts = config.model.moe.num_experts
    info = cache.data.get("super_profile")
    if info is None:
        started = time.perf_counter()
        union = [b for seed in sorted(calib) for b in calib[seed]]
        found = super_experts.find(config, variables, union)
        per_seed = {}
        for seed in sorted(calib):
            prof = super_experts.profile(config, variables, calib[seed])
            per_seed[str(seed)] = {
                "paper": [list(p) for p in super_experts.classify(prof, rule="paper").super_experts],
                "top3": [list(p) for p in super_experts.classify(prof, rule="top_n", top_n=3).super_experts]}
        info = {"paper": found.to_json(), "per_seed": per_seed,
                "top_n": {str(n): [list(p) for p in super_experts.classify(found.profile, rule="top_n",
                                                                          top_n=n).super_experts] for n in TOP_N},
                "seconds": time.perf_counter() - started}
        cache.data["super_profile"] = info
        cache.save()
        _say(f"super-expert profile over {found.profile.num_tokens:,} tokens in {info['seconds']:.1f}s: paper rule "
             f"flags {found.super_experts}")
    _plot_super_profile(info["paper"], out_dir / f"{NAME}_super_experts.png")
    sets = {"paper": [tuple(p) for p in info["paper"]["super_experts"]]}
    for n in TOP_N:
        sets[f"top{n}"] = [tuple(p) for p in info["top_n"][str(n)]]
    excluded = {tuple(p) for members in sets.values() for p in members}
    none_mask = interventions.mask_experts(config, {})

    def run(key: str, experts: Sequence[tuple[int, int]], how: str) -> None:
        if key in cache.results:
            return
        started = time.perf_counter()
        if how == "mask":
            by_layer: dict[int, list[int]] = {}
            for layer, expert in experts:
                by_layer.setdefault(layer, []).append(expert)
            value = evaluator.bits_per_byte_under(variables, interventions.mask_experts(config, by_layer))
        elif how == "zero":
            value = evaluator.bits_per_byte_under(zero_experts(config, variables, experts), none_mask)
        else:  # the baseline through the same function
            value = evaluator.bits_per_byte_under(variables, none_mask)
        seconds = time.perf_counter() - started
        cache.put(key, {"experts": [list(p) for p in experts], "how": how, "bits_per_byte": value,
                        "seconds": seconds})
        _say(f"{key}: {value:.4f} bits/byte ({seconds:.1f}s)")

    run("super/baseline", [], "none")
    seen: dict[frozenset, str] = {}
    aliases = cache.data.setdefault("super_aliases", {})
    for name, members in sets.items():
        if frozenset(members) in seen:  # the same experts as an earlier set: its results stand for this one
            aliases[name] = seen[frozenset(members)]
            cache.save()
            continue
        seen[frozenset(members)] = name
        if not members:
            continue
        for how in ("mask", "zero"):
            run(f"super/{name}/{how}", members, how)
        for same in (False, True):
            kind = "random_same_layers" if same else "random"
            for i, draw in enumerate(random_sets(members, excluded, layers, num_experts, args.random_draws, same)):
                for how in ("mask", "zero"):
                    run(f"super/{name}/{kind}{i}/{how}", draw, how)
    for layer, expert in sorted(excluded):  # every flagged expert alone (top1's random draws are the control)
        if [(layer, expert)] != sets["top1"]:
            for how in ("mask", "zero"):
                run(f"super/single/{layer}_{expert}/{how}", [(layer, expert)], how)


# ---------------------------------------------------------------------------------------------------- plots

def _plot_super_profile(summary: dict[str, Any], path: pathlib.Path) -> None:
    from moejax.posthoc import super_experts

    profile = super_experts.Profile(
        layers=np.asarray(summary["layers"]), max_output=np.asarray(summary["max_output"], np.float64),
        channel=np.asarray(summary["channel"]), counts=np.asarray(summary["counts"]),
        residual_max=np.asarray(summary["residual_max"], np.float64),
        residual_median=np.asarray(summary["residual_median"], np.float64), num_tokens=int(summary["num_tokens"]))
    super_experts.plot(super_experts.classify(profile, rule="paper"), path=path)


def plot_curves(summary: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for i, method in enumerate(summary["methods"]):
        xs, ys, es = [], [], []
        for cell in summary["cells"][method]:
            if cell["n"]:
                xs.append(cell["fraction"])
                ys.append(cell["mean"])
                es.append(cell["std"] or 0.0)
        if xs:
            style = "-o" if method in PRUNE_METHODS else "--s"
            ax.errorbar(np.asarray(xs) + (i - 2.5) * 0.004, ys, yerr=es, fmt=style, capsize=3, label=LABELS[method],
                        color=f"C{i}", markersize=4)
    if summary.get("baseline") is not None:
        ax.axhline(summary["baseline"], color="gray", linestyle=":", linewidth=1, label="uncompressed")
    ax.set_xlabel(f"fraction of the {summary['num_experts']} routed experts kept per MoE layer")
    ax.set_ylabel("validation bits per byte")
    ax.invert_xaxis()
    ax.set_xticks(summary["fractions"], [f"{f:.0%}\n({k})" for f, k in zip(summary["fractions"], summary["kept"],
                                                                             strict=True)])
    ax.set_title(f"post-hoc compression of {summary['checkpoint_name']} (mean ± std over "
                 f"{summary['seeds']} calibration sets)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def plot_super(summary: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    rows = [row for row in summary["super_rows"] if row["target"] is not None and not row.get("same_as")]
    if not rows:
        return
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=False)
    base = summary["super_baseline"]
    for ax, how in zip(axes, ("mask", "zero"), strict=True):
        x = np.arange(len(rows))
        for j, (what, color, label) in enumerate((("target", "C3", "flagged experts"),
                                                  ("random", "C0", "random (any layer)"),
                                                  ("random_same_layers", "C2", "random (same layers)"))):
            values = [row[how][what] for row in rows]
            if what == "target":
                heights = [v if v is not None else np.nan for v in values]
                ax.bar(x + (j - 1) * 0.27, np.asarray(heights) - base, 0.27, color=color, label=label)
            else:
                means = [np.mean(v) if v else np.nan for v in values]
                ax.bar(x + (j - 1) * 0.27, np.asarray(means) - base, 0.27, color=color, alpha=0.6, label=label)
                for k, v in enumerate(values):
                    ax.plot(np.full(len(v), x[k] + (j - 1) * 0.27), np.asarray(v) - base, ".", color="k",
                            markersize=3)
        ax.set_xticks(x, [f"{row['name']}\n(n={row['size']})" for row in rows], fontsize=8)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title({"mask": "silenced: never selected (intervention mask)",
                      "zero": "zeroed down-projection (the paper's code)"}[how], fontsize=9)
        ax.set_ylabel("Δ validation bits/byte vs baseline")
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------ summaries

def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _t_interval(diffs: Sequence[float]) -> dict[str, Any]:
    from scipy import stats

    n = len(diffs)
    mean = float(np.mean(diffs)) if n else None
    out = {"n": n, "mean": mean, "diffs": [float(d) for d in diffs]}
    if n >= 2:
        sd = float(np.std(diffs, ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out.update(std=sd, low=mean - half, high=mean + half)
    return out


def summarise(cache: Cache, meta: dict[str, Any]) -> dict[str, Any]:
    results = cache.results
    num_experts, seeds = meta["num_experts"], meta["seeds"]
    fractions = meta["fractions"]
    kept = [kept_count(num_experts, f) for f in fractions]
    cells, missing = {}, []
    for method in meta["methods"]:
        cells[method] = []
        for fraction, k in zip(fractions, kept, strict=True):
            values, seconds = [], []
            for seed in range(seeds):
                record = results.get(cell_key(method, k, seed))
                if record is None:
                    missing.append(cell_key(method, k, seed))
                else:
                    values.append(record["bits_per_byte"])
                    seconds.append(record["seconds"])
            mean, std = _mean_std(values)
            cells[method].append({"fraction": fraction, "kept": k, "n": len(values), "values": values, "mean": mean,
                                  "std": std, "seconds": float(np.mean(seconds)) if seconds else None})
    order = {}
    for i, k in enumerate(kept):
        done = [(cells[m][i]["mean"], m) for m in meta["methods"] if cells[m][i]["n"]]
        order[str(k)] = [m for _, m in sorted(done)]
    comparisons = []
    pairs = [("mcsmoe", "frequency"), ("hcsmoe", "frequency"), ("mcsmoe", "hcsmoe"), ("reap", "frequency"),
             ("easy_ep", "frequency"), ("soft_count", "frequency"), ("reap", "easy_ep")]
    for i, k in enumerate(kept):
        if k == num_experts:
            continue
        best_prune = min((cells[m][i]["mean"], m) for m in PRUNE_METHODS if m in cells and cells[m][i]["n"]) \
            if any(m in cells and cells[m][i]["n"] for m in PRUNE_METHODS) else (None, None)
        extra = [(merge_m, best_prune[1]) for merge_m in MERGE_METHODS if best_prune[1]]
        for a, b in pairs + extra:
            if a not in cells or b not in cells:
                continue
            diffs = [results[cell_key(a, k, s)]["bits_per_byte"] - results[cell_key(b, k, s)]["bits_per_byte"]
                     for s in range(seeds) if cell_key(a, k, s) in results and cell_key(b, k, s) in results]
            comparisons.append({"kept": k, "a": a, "b": b, **_t_interval(diffs)})
    seconds = [r["seconds"] for key, r in results.items() if not key.startswith("super/") and key.count("/") == 2]
    summary = {**meta, "kept": kept, "cells": cells, "missing": missing, "order": order, "comparisons": comparisons,
               "seconds_per_result": _mean_std(seconds)[0], "results_done": len(seconds),
               "baseline": (results.get("baseline") or {}).get("bits_per_byte")}
    summary.update(_summarise_super(cache))
    return summary


def _summarise_super(cache: Cache) -> dict[str, Any]:
    info = cache.data.get("super_profile")
    results = cache.results
    if info is None:
        return {"super": None}
    profile = info["paper"]
    a = np.asarray(profile["max_output"], np.float64)
    layers = profile["layers"]
    median_all = float(np.median(a))
    per_layer_median = np.median(a, axis=1)
    sets = {"paper": info["paper"]["super_experts"], **{f"top{n}": info["top_n"][str(n)] for n in TOP_N}}
    base = (results.get("super/baseline") or {}).get("bits_per_byte")
    aliases = cache.data.get("super_aliases", {})
    rows = []
    for name, members in sets.items():
        row = {"name": name, "size": len(members), "experts": members, "target": None,
               "same_as": aliases.get(name)}
        name = aliases.get(name, name)
        for how in ("mask", "zero"):
            target = (results.get(f"super/{name}/{how}") or {}).get("bits_per_byte")
            row["target"] = target if row["target"] is None else row["target"]
            row[how] = {"target": target}
            for kind in ("random", "random_same_layers"):
                values = [r["bits_per_byte"] for key, r in results.items()
                          if key.startswith(f"super/{name}/{kind}") and key.endswith(f"/{how}")
                          and key[len(f"super/{name}/{kind}"):].split("/")[0].isdigit()]
                sets_drawn = [r["experts"] for key, r in sorted(results.items())
                              if key.startswith(f"super/{name}/{kind}") and key.endswith(f"/{how}")
                              and key[len(f"super/{name}/{kind}"):].split("/")[0].isdigit()]
                row[how][kind] = values
                row[how][f"{kind}_sets"] = sets_drawn
        rows.append(row)
    flagged = []
    for layer, expert in sorted({tuple(p) for members in sets.values() for p in members},
                                key=lambda p: -a[layers.index(p[0]), p[1]]):
        row = layers.index(layer)
        alone = {}
        for how in ("mask", "zero"):
            key = f"super/top1/{how}" if [[layer, expert]] == sets["top1"] else f"super/single/{layer}_{expert}/{how}"
            alone[how] = (results.get(key) or {}).get("bits_per_byte")
        flagged.append({"layer": layer, "expert": expert, "max_output": float(a[row, expert]), "alone": alone,
                        "channel": int(profile["channel"][row][expert]), "routed": int(profile["counts"][row][expert]),
                        "layer_median": float(per_layer_median[row]),
                        "over_layer_median": float(a[row, expert] / per_layer_median[row]),
                        "over_median": float(a[row, expert] / median_all),
                        "rules": [name for name, members in sets.items() if [layer, expert] in members]})
    sorted_a = np.sort(a.reshape(-1))[::-1]
    return {"super": {"profile": {k: profile[k] for k in ("rule", "percentile", "fraction", "threshold",
                                                          "super_experts", "layers", "num_tokens", "residual_max",
                                                          "residual_median", "residual_max_over_median")},
                      "median_max_output": median_all, "largest": sorted_a[:6].tolist(),
                      "per_layer_median": per_layer_median.tolist(), "per_layer_max": a.max(axis=1).tolist(),
                      "per_seed": info["per_seed"], "flagged": flagged, "seconds": info["seconds"],
                      "evaluations": sum(1 for key in results if key.startswith("super/")),
                      "seconds_per_evaluation": _mean_std([r["seconds"] for key, r in results.items()
                                                           if key.startswith("super/")])[0]},
            "super_rows": rows, "super_baseline": base}


# ------------------------------------------------------------------------------------------------ the page

def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_page(summary: dict[str, Any], findings: str) -> str:
    s = summary
    lines = ["# Post-hoc expert compression of the tiny DeepSeekMoE: pruning, merging, super experts", "",
             "Issue 17 items 4 and 5. Generated by `experiments/posthoc_compression.py` (the text between the "
             "findings markers is hand-written and kept by reruns).", "",
             f"Command: `{s['command']}`", ""]
    lines += [FINDINGS_BEGIN, findings.strip("\n"), FINDINGS_END, ""]
    lines += ["## Setup", "",
              f"* Model: `{s['checkpoint']}` (step {s['step']}): {s['params']:,} parameters, {s['moe_layers']} MoE "
              f"layers, {s['num_shared']} shared + {s['num_experts']} routed experts of width {s['expert_ffn']}, "
              f"top-{s['top_k']}, router `{s['router']}`, byte tokenizer; "
              f"uncompressed validation {_fmt(s['baseline'])} bits/byte.",
              f"* Validation: `moejax.evaluate.evaluate` on {s['eval_batches']} batches of {s['eval_shape'][0]} x "
              f"{s['eval_shape'][1] - 1} predicted tokens of the run's validation split (`data.eval_batches`): "
              f"{s['eval_tokens']:,} tokens = {s['eval_tokens']:,} bytes. The same batches for every cell, so "
              "differences between methods are paired.",
              f"* Calibration: per seed s in 0..{s['seeds'] - 1}, the first {s['calib_batches']} batches of "
              f"{s['calib_shape'][0]} x {s['calib_shape'][1]} tokens of the TRAINING split's iterator with "
              f"`config.seed = {CALIB_SEED_OFFSET} + s`: {s['calib_tokens']:,} tokens per seed. Every method of a "
              "seed uses the same calibration set.",
              "* Pruning: `moejax.posthoc.importance` (`frequency`, `soft_count`, `reap`, `easy_ep`, one forward "
              "pass), `prune.keep_by_score` (the n best experts of every layer), `prune.prune`. Merging: "
              "`merge.mcsmoe` (dominant experts by frequency from the calibration trace, `moejax.posthoc.record`; "
              "neurons aligned by weight matching; frequency-weighted average; the dominant's router column) and "
              "`merge.hcsmoe` (average-linkage clustering of `importance.expert_mean_outputs`, frequency-weighted "
              "average of the weights and of the router columns).",
              f"* Machine: {s['machine']}. Mean time per compression result (compress + evaluate, including "
              f"recompilation for a new expert count): {_fmt(s['seconds_per_result'], 1)} s over "
              f"{s['results_done']} results; calibration statistics (importance pass, mean outputs, trace): "
              f"{_fmt(s.get('calib_seconds'), 1)} s per seed. Wall time of the whole experiment: "
              f"{_fmt(s.get('wall_seconds', None), 0)} s.", ""]
    lines += ["## Bits per byte against the fraction of routed experts kept", "",
              f"![bits/byte vs fraction kept]({NAME}.png)", "",
              "Validation bits per byte, mean ± std (ddof 1) over the calibration seeds (n = seeds finished). At "
              "100% every method returns the original model (all experts kept, groups of one), so that column is "
              "the baseline up to float rounding.", ""]
    header = "| method | " + " | ".join(f"{f:.0%} ({k})" for f, k in zip(s["fractions"], s["kept"], strict=True)) \
        + " |"
    lines += [header, "|---|" + "---|" * len(s["kept"])]
    for method in s["methods"]:
        cells = []
        for cell in s["cells"][method]:
            if not cell["n"]:
                cells.append("missing")
            elif cell["std"] is None:
                cells.append(f"{cell['mean']:.4f} (n={cell['n']})")
            else:
                cells.append(f"{cell['mean']:.4f} ± {cell['std']:.4f}" + ("" if cell["n"] == s["seeds"] else
                                                                            f" (n={cell['n']})"))
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (seed 0 / 1 / 2 ...):", "", header.replace("| method |", "| method |"),
              "|---|" + "---|" * len(s["kept"])]
    for method in s["methods"]:
        lines.append(f"| {LABELS[method]} | " + " | ".join(
            " / ".join(f"{v:.4f}" for v in cell["values"]) or "missing" for cell in s["cells"][method]) + " |")
    lines += ["", "Ordering (best first, by the mean):", ""]
    for k in s["kept"]:
        if k != s["num_experts"] and s["order"].get(str(k)):
            lines.append(f"* {k}/{s['num_experts']} kept: " + " < ".join(LABELS[m] for m in s["order"][str(k)]))
    lines += ["", "Paired differences (a − b, bits/byte; per seed the same calibration set; 95% t-interval over the "
              "seeds, t with n − 1 degrees of freedom; negative = a better):", "",
              "| kept | a | b | mean a − b | 95% interval | per seed |", "|---|---|---|---|---|---|"]
    for c in s["comparisons"]:
        interval = f"[{c['low']:+.4f}, {c['high']:+.4f}]" if "low" in c else "—"
        lines.append(f"| {c['kept']} | {LABELS[c['a']]} | {LABELS[c['b']]} | {_fmt(c['mean'])} | {interval} | "
                     + " / ".join(f"{d:+.4f}" for d in c["diffs"]) + " |")
    if s["missing"]:
        lines += ["", f"**Missing cells** ({len(s['missing'])}): " + ", ".join(f"`{m}`" for m in s["missing"])]
    else:
        lines += ["", "No cell is missing."]
    lines += [""] + _render_super(s)
    return "\n".join(lines).rstrip() + "\n"


def _render_super(s: dict[str, Any]) -> list[str]:
    sup = s.get("super")
    lines = ["## Super experts", ""]
    if sup is None:
        return lines + ["Not run (missing)."]
    p = sup["profile"]
    lines += [f"![super-expert profile]({NAME}_super_experts.png)", "",
              f"Profile: `super_experts.find` over the union of the {s['seeds']} calibration sets "
              f"({p['num_tokens']:,} training tokens): a[l, e] = max over the tokens routed to expert e of layer l of "
              f"max_d |f_e(x)_d| (its down-projection output before the gate weight), {len(p['layers'])} x "
              f"{s['num_experts']} = {len(p['layers']) * s['num_experts']} values (the profile and the per-seed "
              f"profiles took {sup['seconds']:.0f} s). Paper rule (a > P99.5 and "
              f"a > max/10): threshold {p['threshold']:.3f}, flagged {p['super_experts']}. The largest values: "
              + ", ".join(f"{v:.3f}" for v in sup["largest"]) + f"; the median expert's a: "
              f"{sup['median_max_output']:.3f}.", "",
              "| layer | expert | a = max abs output | channel | routed slots | layer median a | a / layer median | "
              "a / median of all | flagged by | alone: silenced / zeroed bits/byte |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for f in sup["flagged"]:
        lines.append(f"| {f['layer']} | {f['expert']} | {f['max_output']:.3f} | {f['channel']} | {f['routed']:,} | "
                     f"{f['layer_median']:.3f} | {f['over_layer_median']:.2f} | {f['over_median']:.2f} | "
                     f"{', '.join(f['rules'])} | {_fmt(f['alone']['mask'])} / {_fmt(f['alone']['zero'])} |")
    lines += ["", "Per MoE layer: the largest a, the median a, and the residual stream's max |h_after| / median "
              "|h_after| (massive activations):", "",
              "| layer | max a | median a | max abs h_after | median abs h_after | max / median |",
              "|---|---|---|---|---|---|"]
    for i, layer in enumerate(p["layers"]):
        ratio = p["residual_max_over_median"][i]
        lines.append(f"| {layer} | {sup['per_layer_max'][i]:.3f} | {sup['per_layer_median'][i]:.3f} | "
                     f"{p['residual_max'][i]:.3f} | {p['residual_median'][i]:.4f} | "
                     f"{'inf' if ratio is None else f'{ratio:.1f}'} |")
    lines += ["", "Stability over the calibration sets (paper rule; the top three): " + "; ".join(
        f"seed {seed}: {v['paper']} (top 3 {v['top3']})" for seed, v in sup["per_seed"].items()), ""]
    lines += [f"![super-expert ablation]({NAME}_super_ablation.png)", "",
              f"Ablation, validation bits per byte (baseline {_fmt(s['super_baseline'])}, through the same function "
              "as the ablations). Two ways to remove a set of experts: **silenced** = the routing intervention "
              "`moejax.moe.intervention.mask_experts` (the experts are never selected; the next-ranked experts take "
              "their slots, with their own softmax weights since this router does not renormalise); **zeroed** = "
              "what the paper's released code does (`Super-Experts-Profilling`, `eval_utils.py`: the expert's "
              "`down_proj` weight set to zero, the router unchanged, so the expert is still selected and its slot "
              "contributes nothing). Random sets: the same number of experts drawn from those no rule flagged, "
              "anywhere (random) or in the flagged experts' layers (same layers); mean ± std over the draws, "
              f"min–max in brackets. {sup['evaluations']} evaluations of {_fmt(sup['seconds_per_evaluation'], 1)} s "
              "on average.", "",
              "| set | experts | silenced: flagged | silenced: random | silenced: random, same layers | "
              "zeroed: flagged | zeroed: random | zeroed: random, same layers |",
              "|---|---|---|---|---|---|---|---|"]

    def dist(values: list[float]) -> str:
        if not values:
            return "missing"
        mean, std = _mean_std(values)
        return f"{mean:.4f} ± {std or 0:.4f} [{min(values):.4f}–{max(values):.4f}] (n={len(values)})"

    for row in s["super_rows"]:
        if not row["size"]:
            lines.append(f"| {row['name']} | none flagged | | | | | | |")
            continue
        same = f" (the same set as {row['same_as']})" if row["same_as"] else ""
        lines.append(f"| {row['name']} | {row['experts']}{same} | {_fmt(row['mask']['target'])} | "
                     f"{dist(row['mask']['random'])} | {dist(row['mask']['random_same_layers'])} | "
                     f"{_fmt(row['zero']['target'])} | {dist(row['zero']['random'])} | "
                     f"{dist(row['zero']['random_same_layers'])} |")
    return lines


def write_outputs(cache: Cache, meta: dict[str, Any], out_dir: pathlib.Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(cache, meta)
    page = out_dir / f"{NAME}.md"
    findings = kept_findings(page, "(not written yet)")
    (out_dir / f"{NAME}.json").write_text(json.dumps({"summary": summary, "results": cache.results}, indent=1,
                                                     sort_keys=True) + "\n")
    plot_curves(summary, out_dir / f"{NAME}.png")
    if summary.get("super_rows"):
        plot_super(summary, out_dir / f"{NAME}_super_ablation.png")
        info = cache.data.get("super_profile")
        if info is not None:
            _plot_super_profile(info["paper"], out_dir / f"{NAME}_super_experts.png")
    page.write_text(render_page(summary, findings))
    return summary


# ---------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trained moejax workdir")
    p.add_argument("--seeds", type=int, default=3, help="calibration seeds (calibration sets)")
    p.add_argument("--calib_batches", type=int, default=4, help="training batches per calibration set")
    p.add_argument("--calib_batch_size", type=int, default=0, help="rows per calibration batch (0: the run's)")
    p.add_argument("--eval_batches", type=int, default=0, help="validation batches (0: the run's data.eval_batches)")
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS),
                   help="fractions of the routed experts kept per layer")
    p.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}")
    p.add_argument("--random_draws", type=int, default=5, help="random expert sets per super-expert set")
    p.add_argument("--no_super", action="store_true", help="skip the super-expert experiment")
    p.add_argument("--data_dir", default=None, help="where the prepared corpus is cached (data.dir)")
    p.add_argument("--out", default="experiments/results", help="where the page, JSON and plots go")
    p.add_argument("--compile_cache", default="", help="persistent XLA compilation cache (default "
                   "<checkpoint>/posthoc_compression/jax_cache; none: off)")
    p.add_argument("--render_only", action="store_true", help="rewrite the page from the cached results")
    return p.parse_args(argv)


def _command(argv: list[str] | None) -> str:
    return " ".join(["python -m experiments.posthoc_compression", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    if unknown or not methods:
        print(f"error: --methods={args.methods!r}: allowed are {','.join(METHODS)}", file=sys.stderr)
        return 2
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        print(f"error: --fractions={args.fractions!r}: each must lie in (0, 1]", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.calib_batches < 1 or args.random_draws < 1 or args.eval_batches < 0:
        print("error: --seeds, --calib_batches and --random_draws must be >= 1, --eval_batches >= 0", file=sys.stderr)
        return 2
    checkpoint = pathlib.Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        print(f"error: --checkpoint={args.checkpoint!r} holds no moejax workdir (config.json)", file=sys.stderr)
        return 2
    cache = Cache(checkpoint / NAME)

    import jax

    if args.compile_cache != "none" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # same-shape models reuse their compiled evaluation (process-wide setting: tests pass none)
        jax.config.update("jax_compilation_cache_dir", args.compile_cache or str(cache.root / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import ml_collections

    import moejax.load
    from moejax import data, model
    from moejax.data import tokenizers

    started = time.perf_counter()
    config, variables = moejax.load(checkpoint)
    config = ml_collections.ConfigDict(config.to_dict())
    if args.data_dir:
        config.data.dir = args.data_dir
    eval_config = ml_collections.ConfigDict(config.to_dict())
    if args.eval_batches:
        eval_config.data.eval_batches = args.eval_batches
    val = data.eval_batches(eval_config)
    tokenizer = tokenizers.for_checkpoint(checkpoint, config)
    evaluator = Evaluator(config, val, tokenizer)
    cfg = config.model
    num_experts = cfg.moe.num_experts
    calib_rows = args.calib_batch_size or config.train.batch_size
    steps = sorted(int(p.name) for p in (checkpoint / "checkpoints").glob("*") if p.name.isdigit())
    step = steps[-1] if steps else None
    meta = {"command": _command(argv), "checkpoint": str(checkpoint), "checkpoint_name": checkpoint.name,
            "step": step, "params": int(sum(np.size(x) for x in jax.tree.leaves(variables["params"]))),
            "moe_layers": len(model.moe_layers(cfg)), "num_experts": num_experts, "num_shared": cfg.moe.num_shared,
            "expert_ffn": cfg.moe.expert_ffn, "top_k": cfg.moe.top_k,
            "router": f"{cfg.moe.router.kind}, {cfg.moe.router.score}, softmax_before_topk="
                      f"{cfg.moe.router.softmax_before_topk}, norm_topk_prob={cfg.moe.router.norm_topk_prob}",
            "methods": methods, "fractions": fractions, "seeds": args.seeds, "calib_batches": args.calib_batches,
            "calib_shape": [calib_rows, config.train.seq_len],
            "calib_tokens": args.calib_batches * calib_rows * config.train.seq_len,
            "eval_batches": len(val), "eval_shape": list(val[0].shape), "eval_tokens": evaluator.tokens,
            "random_draws": args.random_draws,
            "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with "
                       f"other jobs; jax {jax.__version__} on {jax.default_backend()}"}
    out_dir = pathlib.Path(args.out)
    if args.render_only:
        meta.update(cache.data.get("meta_extra", {}))
        write_outputs(cache, meta, out_dir)
        _say(f"wrote {out_dir / (NAME + '.md')}")
        return 0

    kept = [kept_count(num_experts, f) for f in fractions]
    todo = [(m, k, s) for s in range(args.seeds) for k in kept for m in methods
            if cell_key(m, k, s) not in cache.results]
    total = len(methods) * len(kept) * args.seeds
    _say(f"{checkpoint}: {total - len(todo)}/{total} results cached; validation {len(val)} batches, "
         f"{evaluator.tokens:,} tokens; calibration {meta['calib_tokens']:,} training tokens per seed")
    if "baseline" not in cache.results:
        t0 = time.perf_counter()
        value = evaluator.bits_per_byte(config, variables)
        cache.put("baseline", {"bits_per_byte": value, "seconds": time.perf_counter() - t0})
        _say(f"baseline: {value:.4f} bits/byte ({time.perf_counter() - t0:.1f}s)")
    calib: dict[int, list[np.ndarray]] = {}
    calib_seconds = []
    done = total - len(todo)
    for seed in range(args.seeds):
        calib[seed] = calibration_batches(config, seed, args.calib_batches, calib_rows)
        pending = [(m, k) for m, k, s in todo if s == seed]
        if not pending:
            continue
        stats = calibration_stats(cache, config, variables, calib[seed], seed, methods)
        calib_seconds.append(stats["seconds"])
        for method, k in pending:
            t0 = time.perf_counter()
            new_config, new_variables = compress(method, k, config, variables, stats)
            t1 = time.perf_counter()
            value = evaluator.bits_per_byte(new_config, new_variables)
            t2 = time.perf_counter()
            done += 1
            cache.put(cell_key(method, k, seed), {"method": method, "kept": k, "seed": seed, "bits_per_byte": value,
                                                  "compress_seconds": t1 - t0, "eval_seconds": t2 - t1,
                                                  "seconds": t2 - t0})
            _say(f"[{done}/{total}] {method} kept {k}/{num_experts} seed {seed}: {value:.4f} bits/byte "
                 f"(compress {t1 - t0:.1f}s, evaluate {t2 - t1:.1f}s)")
    extra = cache.data.setdefault("meta_extra", {})
    extra["command"] = meta["command"]
    if calib_seconds:
        extra["calib_seconds"] = float(np.mean(calib_seconds))
    if not args.no_super:
        super_expert_experiment(args, cache, config, variables, calib, evaluator, out_dir)
    extra["wall_seconds"] = extra.get("wall_seconds", 0.0) + (time.perf_counter() - started)
    cache.save()
    meta.update(extra)
    write_outputs(cache, meta, out_dir)
    _say(f"wrote {out_dir / (NAME + '.md')} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
