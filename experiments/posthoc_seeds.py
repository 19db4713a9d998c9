"""The two post-hoc results pages pooled over training seeds (``experiments.posthoc_pages``): the compression page
(``posthoc_compression.md``) and the routing page (``posthoc_routing.md``), each from the per-checkpoint caches of
its study on every trained checkpoint.

Statistics (``pool`` and ``paired_over_seeds``; tests/experiments/test_posthoc_seeds.py checks them against numpy):
the training seed is the unit. A cell's value per training seed is the mean over the calibration sets run on that
checkpoint; a cell is reported as the mean over training seeds ± the std (ddof 1) over training seeds. A comparison
a − b is paired twice: within a training seed at the same calibration set (the same calibration data for both),
averaged over the calibration sets, giving one difference per training seed; then the 95% t-interval of those n
differences (t with n − 1 degrees of freedom) and the two-sided one-sample t-test p-value. The calibration sets'
own spread (the std of the difference over calibration sets within a seed, averaged over seeds) is shown beside it.
Every page declares its family of claims in code (``COMPRESSION_CLAIMS``, ``routing_claims``) before any result is
read; Holm-Bonferroni over the family (``experiments.stats.holm``, family-wise alpha 0.05) decides the verdict word:
'better' / 'worse' (or the claim's own words) only where Holm rejects, else 'not resolved at n=<seeds>'.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import posthoc_common as common
from experiments import runner
from experiments.stats import FAMILY_ALPHA, holm, mean_std, t_interval, t_test_p

METHODS_DOC = "../../docs/methods.md"
DOC = {"frequency": "frequency-and-soft-count", "soft_count": "frequency-and-soft-count",
       "reap": "reap-expert-importance", "easy_ep": "easy-ep-expert-importance", "prune": "expert-pruning",
       "mcsmoe": "mc-smoe-expert-merging", "hcsmoe": "hc-smoe-expert-merging", "rice": "rice-npmi",
       "steering": "expert-steering", "scmoe": "scmoe-self-contrast-decoding",
       "locality": "local-routing-consistency-sch-srp", "super": "super-experts"}
LABELS = {"frequency": "prune: frequency", "soft_count": "prune: soft count", "reap": "prune: REAP",
          "easy_ep": "prune: EASY-EP", "mcsmoe": "merge: MC-SMoE", "hcsmoe": "merge: HC-SMoE"}
# The compression page's claims (a, b): a − b in bits/byte at every compressed size of the grid, lower = a better.
COMPRESSION_CLAIMS = (("mcsmoe", "frequency"), ("mcsmoe", "soft_count"), ("hcsmoe", "frequency"),
                      ("hcsmoe", "soft_count"), ("mcsmoe", "hcsmoe"), ("reap", "frequency"),
                      ("easy_ep", "frequency"), ("soft_count", "frequency"), ("reap", "easy_ep"))
# The routing page's local-consistency claims: SRP and SCH at these segment lengths against the shuffled order.
LOCALITY_CLAIM_LENGTHS = (4, 64)
COMPRESSION_PLACEHOLDER = "(not written yet)"
ROUTING_PLACEHOLDER = "(to be written after a run)"


def doc_link(method: str, text: str | None = None) -> str:
    """A markdown link to the method's entry (with its departures from the authors) in docs/methods.md."""
    return f"[{text or 'docs/methods.md'}]({METHODS_DOC}#{DOC[method]})"


# ---------------------------------------------------------------------------------------------- statistics

def pool(values: Mapping[int, Sequence[float]]) -> dict[str, Any]:
    """One cell over training seeds: values {training seed: [value per calibration set]}. Returns 'per_seed'
    {seed: mean over its calibration sets}, 'n' (seeds with a value), 'mean' and 'std' (ddof 1) over the per-seed
    means, and 'calib_std' (the std, ddof 1, over calibration sets within a seed, averaged over the seeds with at
    least two; None if none)."""
    per_seed = {int(s): float(np.mean(v)) for s, v in sorted(values.items()) if len(v)}
    mean, std = mean_std(list(per_seed.values()))
    within = [float(np.std(v, ddof=1)) for v in values.values() if len(v) > 1]
    return {"per_seed": per_seed, "n": len(per_seed), "mean": mean, "std": std,
            "calib_std": float(np.mean(within)) if within else None}


def paired_over_seeds(a: Mapping[int, Mapping[Any, float]], b: Mapping[int, Mapping[Any, float]]) -> dict[str, Any]:
    """a − b paired within each training seed at the same calibration sets: a, b {training seed: {calibration set:
    value}}. Per seed present in both with at least one common calibration set: the mean over those sets of a − b
    ('per_seed'); over the seeds: the t-interval of those means (``stats.t_interval``: 'n', 'mean', 'std', 't',
    'low', 'high'), 'p' (``stats.t_test_p``) and 'calib_std' (the std over calibration sets of a − b within a seed,
    averaged over the seeds with two or more)."""
    per_seed, within = {}, []
    for seed in sorted(set(a) & set(b)):
        common_sets = sorted(set(a[seed]) & set(b[seed]), key=str)
        if not common_sets:
            continue
        diffs = [a[seed][c] - b[seed][c] for c in common_sets]
        per_seed[int(seed)] = float(np.mean(diffs))
        if len(diffs) > 1:
            within.append(float(np.std(diffs, ddof=1)))
    values = list(per_seed.values())
    return {"per_seed": per_seed, **t_interval(values), "p": t_test_p(values),
            "calib_std": float(np.mean(within)) if within else None}


def decide(claims: list[dict[str, Any]], alpha: float = FAMILY_ALPHA) -> list[dict[str, Any]]:
    """Holm over the family ``claims`` (each with 'p', 'mean', 'n' and the words 'lower' / 'higher' for a mean below
    / above 0): adds 'p_holm', 'rejected' and 'verdict' (the word of the mean's side where Holm rejects, else 'not
    resolved at n=<n>'), 'family_size' and 'alpha'."""
    rejected, adjusted = holm([c.get("p") for c in claims], alpha)
    for claim, r, p_holm in zip(claims, rejected, adjusted, strict=True):
        mean = claim.get("mean")
        if r and mean is not None and mean != 0:
            word = claim["lower"] if mean < 0 else claim["higher"]
        else:
            word = f"not resolved at n={claim.get('n', 0)}"
        claim.update(p_holm=p_holm, rejected=bool(r), verdict=word, family_size=len(claims), alpha=alpha)
    return claims


def _interval(c: Mapping[str, Any], digits: int = 4) -> str:
    if c.get("low") is None:
        return "–"
    return f"[{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"


def _p(value: float | None) -> str:
    return "–" if value is None else (f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}")


def n_sentence(n: int, family: int) -> str:
    """What n training seeds can and cannot show (the same sentence on both pages); family: the page's claims."""
    from scipy import stats

    t = float(stats.t.ppf(0.975, n - 1)) if n >= 2 else None
    t_holm = float(stats.t.isf(FAMILY_ALPHA / (2 * family), n - 1)) if n >= 2 and family else None
    return (f"**What {n} training seeds can and cannot show.** With n = {n} the t-interval uses t = "
            f"{fixed(t, 2)} on {n - 1} degrees of freedom, so an effect is resolved only when it is large against "
            f"how much it varies between training seeds; Holm over the page's {family} claims then needs p < "
            f"{FAMILY_ALPHA / max(family, 1):.2g} for the first claim it rejects, i.e. |mean| / (sd / sqrt(n)) above "
            f"{fixed(t_holm, 1)}: the per-seed differences must agree almost exactly. A resolved verdict says "
            "that the effect has the same sign on these small models across "
            "training seeds and calibration sets; it says nothing about larger models, other corpora, longer "
            "training or fine-tuning after compression. 'Not resolved' is not evidence of no effect: at n = "
            f"{n} a real difference of moderate size is usually not resolved. The spread over training seeds "
            "also includes the calibration sets' spread (each seed's value averages them).")


def fixed(value: Any, digits: int) -> str:
    return common.fixed(value, digits)


def _load(path: pathlib.Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _runs(workdirs: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
    """Per training run: its seed, summary.json and the two studies' per-checkpoint JSON (None where missing)."""
    out = []
    for workdir in workdirs:
        config = _load(workdir / "config.json") or {}
        out.append({"workdir": workdir, "seed": config.get("seed"), "summary": _load(workdir / "summary.json"),
                    "config": config,
                    "compression": _load(workdir / "posthoc_compression" / "page" / "posthoc_compression.json"),
                    "compression_cache": _load(workdir / "posthoc_compression" / "results.json"),
                    "routing": _load(workdir / "posthoc_routing" / "page" / "posthoc_routing.json")})
    return out


def training_lines(runs: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The setup lines on the trained models, shared by both pages."""
    done = [r for r in runs if r["summary"]]
    rates = [r["summary"].get("train_tokens_per_s") for r in done if r["summary"].get("train_tokens_per_s")]
    walls = [r["summary"].get("wall_seconds") for r in done if r["summary"].get("wall_seconds")]
    vals = [r["summary"].get("val_bits_per_byte") for r in done]
    cfg = (done[0]["config"] if done else {}).get("model", {})
    moe = cfg.get("moe", {})
    lines = [f"* Models: `{meta['config']}` (DeepSeekMoE tiny: {cfg.get('num_layers')} layers, d_model "
             f"{cfg.get('d_model')}, {moe.get('num_shared')} shared + {moe.get('num_experts')} routed experts of width "
             f"{moe.get('expert_ffn')}, top-{moe.get('top_k')}) on the ablation tables' corpus "
             f"(`experiments.tables.CORPUS`: the stdlib corpus in `{meta['corpus']['data.tokenizer']}` tokens, "
             f"vocabulary {meta['corpus']['model.vocab_size']}), {meta['steps']} steps of 32 x 128 tokens "
             f"({meta['steps'] * 32 * 128:,} tokens), one run per training seed of `TRAIN_SEEDS_PREREGISTERED` = "
             f"{tuple(meta['train_seeds'])} (fixed in `experiments/posthoc_pages.py` before the first run). "
             f"Finished: {len(done)} of {len(runs)}; validation bits/byte of each (the run's own evaluation, "
             f"{meta['budget'].get('data.eval_batches')} batches): "
             + ", ".join(f"seed {r['seed']} {fixed(v, 4)}" for r, v in zip(done, vals, strict=True)) + ".",
             "* Training cost on this machine (2 CPU cores shared with other work; jax on CPU): "
             + (f"{np.mean(rates):,.0f} training tokens/s on average ({min(rates):,.0f}–{max(rates):,.0f}), "
                if rates else "")
             + (f"{np.mean(walls) / 60:.1f} min of wall time per run. " if walls else "")
             + "Budget of the whole command (3 trainings + both studies on 3 checkpoints): about 70 minutes of wall "
             "time, which fixed the step count (the tiny preset's 400 steps did not fit) and the studies' grids."]
    return lines


# --------------------------------------------------------------------------------------------- compression

def compression_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pooled compression results: per method and size the cell over training seeds, the stored experts, the
    claims with their Holm verdicts, the per-run baselines and costs."""
    done = [r for r in runs if r["compression"] and r["compression_cache"]]
    if not done:
        return {"runs": 0}
    first = done[0]["compression"]["summary"]
    methods, kept = first["methods"], [k for k in first["kept"] if k != first["num_experts"]]
    values: dict[str, dict[int, dict[int, dict[int, float]]]] = {m: {k: {} for k in kept} for m in methods}
    stored: dict[str, dict[int, list[int]]] = {m: {k: [] for k in kept} for m in methods}
    baseline: dict[int, float] = {}
    for r in done:
        results = r["compression_cache"]["results"]
        seed = int(r["seed"])
        baseline[seed] = results.get("baseline", {}).get("bits_per_byte")
        for key, rec in results.items():
            if key.count("/") != 2 or rec.get("method") not in values or rec["kept"] not in values[rec["method"]]:
                continue
            values[rec["method"]][rec["kept"]].setdefault(seed, {})[int(rec["seed"])] = rec["bits_per_byte"]
            if "stored_total" in rec:
                stored[rec["method"]][rec["kept"]].append(rec["stored_total"])
    cells = {m: {str(k): {**pool({s: list(v.values()) for s, v in values[m][k].items()}),
                          "stored_total": sorted(set(stored[m][k])),
                          "delta": pool({s: [x - baseline[s] for x in v.values()] for s, v in values[m][k].items()})}
                 for k in kept} for m in methods}
    claims = []
    for k in kept:
        for a, b in COMPRESSION_CLAIMS:
            if a in values and b in values:
                c = paired_over_seeds(values[a][k], values[b][k])
                claims.append({"kept": k, "a": a, "b": b, **c, "lower": f"{LABELS[a]} better",
                               "higher": f"{LABELS[a]} worse",
                               "stored_a": sorted(set(stored[a][k])), "stored_b": sorted(set(stored[b][k]))})
    decide(claims)
    costs = [r["compression"]["summary"] for r in done]
    return {"runs": len(done), "seeds": [int(r["seed"]) for r in done], "methods": methods, "kept": kept,
            "fractions": [f for f, k in zip(first["fractions"], first["kept"], strict=True)
                          if k != first["num_experts"]],
            "num_experts": first["num_experts"], "moe_layers": first["moe_layers"], "d_model": first.get("d_model"),
            "expert_ffn": first["expert_ffn"], "calib_sets": first["seeds"], "calib_tokens": first["calib_tokens"],
            "calib_shape": first["calib_shape"], "eval_tokens": first["eval_tokens"], "eval_shape": first["eval_shape"],
            "eval_batches": first["eval_batches"], "params": [c["params"] for c in costs],
            "baseline": baseline, "baseline_pool": pool({s: [v] for s, v in baseline.items()}), "cells": cells,
            "claims": claims,
            "seconds_per_result": float(np.mean([c["seconds_per_result"] for c in costs if c["seconds_per_result"]])),
            "calib_seconds": float(np.mean([c.get("calib_seconds") or 0 for c in costs])),
            "wall_seconds": [c.get("wall_seconds") for c in costs],
            "missing": {int(r["seed"]): r["compression"]["summary"]["missing"] for r in done}}


def render_compression(payload: dict[str, Any], findings: str) -> str:
    meta, s, runs = payload["meta"], payload["summary"], payload["runs"]
    lines = ["# Post-hoc expert compression of the tiny DeepSeekMoE over training seeds: pruning and merging", "",
             "Generated by `experiments/posthoc_pages.py` (pooled by `experiments/posthoc_seeds.py`; the text between "
             "the findings markers is hand-written and kept by reruns).", "", f"Command: `{meta['command']}`", ""]
    lines += [runner.FINDINGS_BEGIN, findings.strip("\n"), runner.FINDINGS_END, ""]
    if not s.get("runs"):
        return "\n".join(lines + ["No compression results yet."]) + "\n"
    n = s["runs"]
    param_per_expert = 3 * (s["d_model"] or 0) * s["expert_ffn"]
    lines += ["## Setup", ""] + training_lines(runs, meta) + [
        f"* Data: {common.splits_text('train', 'validation')} Validation: the first {s['eval_batches']} batches of "
        f"{s['eval_shape'][0]} x {s['eval_shape'][1] - 1} predicted tokens of each run's validation windows "
        f"({s['eval_tokens']:,} tokens), the same for every cell of a run. Calibration: {s['calib_sets']} sets per "
        f"checkpoint, set c = the first {s['calib_tokens'] // (s['calib_shape'][0] * s['calib_shape'][1])} batches of "
        f"{s['calib_shape'][0]} x {s['calib_shape'][1]} tokens of the training split's iterator with "
        f"`config.seed = 1000 + c` ({s['calib_tokens']:,} tokens per set); every method of a set uses the same data.",
        f"* Methods (per MoE layer n = round(f x {s['num_experts']}) experts kept, or n merged experts on average): "
        f"pruning by {doc_link('frequency', 'frequency and soft count')}, {doc_link('reap', 'REAP')} and "
        f"{doc_link('easy_ep', 'EASY-EP')} (`prune.keep_by_score`, the n best of every layer; "
        f"{doc_link('prune', 'pruning')}); merging by {doc_link('mcsmoe', 'MC-SMoE')} (`merge.mcsmoe` with the "
        "calibration tokens' router logits, `merge.router_logits`: the authors' router-logit similarity; their global "
        "group counts, uneven per layer, n per layer on average; neurons aligned to each layer's first expert) and "
        f"{doc_link('hcsmoe', 'HC-SMoE')} (`merge.hcsmoe`: average linkage on the experts' mean outputs, "
        "frequency-weighted averages). Each link leads to the method's entry in docs/methods.md, whose **Departures** "
        "list where moejax differs from the authors' code (e.g. usage counted over all k routed slots, not the top-1 "
        "or top-2 of the raw logits; calibration on this corpus instead of the authors' data). Merges keep the "
        "router's 63 logical experts and bind each group member to its merged expert (`moejax.moe.expert_map`). No "
        "fine-tuning follows any compression.",
        f"* Stored parameters: each MoE layer l stores S_l routed experts (`moejax.moe.expert_map.stored_count`); "
        f"the page counts the total sum_l S_l, each stored expert {param_per_expert:,} parameters (wi_0, wi_1: "
        f"{s['d_model']} x {s['expert_ffn']}, wo: {s['expert_ffn']} x {s['d_model']}). Pruning and HC-SMoE store n "
        "in every layer; MC-SMoE stores uneven S_l with the same total (n x layers, fewer only on ties at its "
        "threshold; the table lists the totals measured). Not counted: the router, which pruning shrinks to the kept "
        f"columns and merging keeps whole ({s['num_experts']} x {s['d_model']} per layer), the expert map (integers) "
        "and the shared expert and attention, which no method changes. So at equal stored experts a merged model has "
        f"{s['moe_layers']} x ({s['num_experts']} − n) x {s['d_model']} more router parameters than a pruned one.",
        f"* Statistics: {STATS_TEXT}",
        f"* Cost: {fixed(s['seconds_per_result'], 1)} s per compression result (compress + evaluate, compilation "
        f"included, persistent XLA cache), {fixed(s['calib_seconds'], 1)} s of calibration statistics per set; "
        "study wall time per checkpoint: " + ", ".join(f"{fixed(w, 0)} s" for w in s["wall_seconds"]) + ".", "",
        n_sentence(n, len(s["claims"])), ""]
    lines += ["## Validation bits per byte", "", "![bits/byte vs fraction kept](posthoc_compression.png)", "",
              f"Mean over {n} training seeds ± std over training seeds (each seed's value: the mean over its "
              f"{s['calib_sets']} calibration sets); in brackets the change from each seed's uncompressed model. "
              f"Uncompressed: {fixed(s['baseline_pool']['mean'], 4)} ± {fixed(s['baseline_pool']['std'], 4)} "
              "(" + ", ".join(f"seed {k} {v:.4f}" for k, v in sorted(s["baseline"].items(), key=lambda kv: int(kv[0])))
              + "). Stored routed experts in all layers: listed per cell.", ""]
    header = "| method | " + " | ".join(f"{f:.0%} kept ({k} per layer)" for f, k in zip(s["fractions"], s["kept"],
                                                                                        strict=True)) + " |"
    lines += [header, "|---|" + "---|" * len(s["kept"])]
    for m in s["methods"]:
        row = []
        for k in s["kept"]:
            c = s["cells"][m][str(k)]
            if not c["n"]:
                row.append("missing")
                continue
            row.append(f"{c['mean']:.4f} ± {fixed(c['std'], 4)} ({c['delta']['mean']:+.3f}); stored "
                       + "/".join(str(t) for t in c["stored_total"]) + ("" if c["n"] == n else f"; n={c['n']}"))
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    lines += ["", "Per training seed (mean over its calibration sets; seed " + " / ".join(str(x) for x in s["seeds"])
              + "):", "", header, "|---|" + "---|" * len(s["kept"])]
    for m in s["methods"]:
        lines.append(f"| {LABELS[m]} | " + " | ".join(" / ".join(f"{v:.4f}" for v in s["cells"][m][str(k)][
            "per_seed"].values()) or "missing" for k in s["kept"]) + " |")
    lines += ["", f"## Claims: paired differences over training seeds, Holm over {len(s['claims'])} claims", "",
              "a − b in bits/byte (negative: a better), per training seed averaged over its calibration sets; 95% "
              f"t-interval over the training seeds; p: two-sided t-test; Holm: adjusted p over this page's "
              f"{len(s['claims'])} claims at family-wise alpha {FAMILY_ALPHA}; calib. std: the std of a − b over "
              "the calibration sets within a seed, averaged over seeds. Stored experts a / b: sums over layers.", "",
              "| kept per layer | a | b | stored a / b | mean a − b | 95% interval | per training seed | calib. std | "
              "p | Holm p | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in s["claims"]:
        lines.append(f"| {c['kept']} | {LABELS[c['a']]} | {LABELS[c['b']]} | "
                     f"{'/'.join(map(str, c['stored_a']))} / {'/'.join(map(str, c['stored_b']))} | "
                     f"{fixed(c['mean'], 4)} | {_interval(c)} | "
                     + " / ".join(f"{v:+.4f}" for v in c["per_seed"].values()) + f" | {fixed(c['calib_std'], 4)} | "
                     f"{_p(c['p'])} | {_p(c['p_holm'])} | {c['verdict']} |")
    missing = {k: v for k, v in s["missing"].items() if v}
    lines += ["", "Missing cells: " + ("; ".join(f"seed {k}: {', '.join(v)}" for k, v in missing.items())
                                       if missing else "none") + (
        f". Training runs without compression results: {len(runs) - n}." if len(runs) > n else "."), "",
              "## Super experts", "",
              f"Not run in this pooled study ({doc_link('super', 'super experts')}): the 70-minute budget went to "
              "three training seeds of the compression grid. The single-model result earlier on this page (byte "
              "tokenizer, one training seed) is not carried over."]
    return "\n".join(lines).rstrip() + "\n"


STATS_TEXT = ("the training seed is the unit. A cell per training seed is the mean over its calibration sets; the "
              "tables give mean ± std (ddof 1) over training seeds. A comparison a − b is paired within each training "
              "seed at the same calibration set, averaged over the calibration sets (one difference per training "
              "seed), then the 95% t-interval over training seeds (t with n − 1 degrees of freedom) and the "
              "two-sided t-test p. The page's claims are fixed in code (`experiments/posthoc_seeds.py`) and "
              "Holm-adjusted together (`experiments/stats.py`, family-wise alpha 0.05); a verdict word appears only "
              "where Holm rejects, otherwise 'not resolved at n=3'. The calibration sets' own spread is reported "
              "beside each claim.")


ROUTING_STATS_TEXT = ("the training seed is the unit: each checkpoint has one trace and one evaluation set, so a "
                      "cell is the mean ± std (ddof 1) over training seeds of the checkpoints' values, and a "
                      "comparison a − b is paired within each training seed (one difference per seed), then the 95% "
                      "t-interval over training seeds (t with n − 1 degrees of freedom) and the two-sided t-test p. "
                      "The claims are fixed in code (`experiments/posthoc_seeds.py`) and Holm-adjusted together "
                      "(`experiments/stats.py`, family-wise alpha 0.05); a verdict word appears only where Holm "
                      "rejects, otherwise 'not resolved at n=3'. The random controls' draws are averaged within a seed "
                      "before pairing.")


def plot_compression(s: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for i, m in enumerate(s["methods"]):
        xs, ys, es = [], [], []
        for f, k in zip(s["fractions"], s["kept"], strict=True):
            c = s["cells"][m][str(k)]
            if c["n"]:
                xs.append(f)
                ys.append(c["mean"])
                es.append(c["std"] or 0.0)
        if xs:
            ax.errorbar(np.asarray(xs) + (i - 2.5) * 0.004, ys, yerr=es, fmt="-o" if m in ("frequency", "soft_count",
                        "reap", "easy_ep") else "--s", capsize=3, label=LABELS[m], color=f"C{i}", markersize=4)
    ax.axhline(s["baseline_pool"]["mean"], color="gray", linestyle=":", linewidth=1, label="uncompressed")
    ax.set_xlabel(f"fraction of the {s['num_experts']} routed experts kept (or merged experts) per MoE layer")
    ax.set_ylabel("validation bits per byte")
    ax.invert_xaxis()
    ax.set_xticks(s["fractions"], [f"{f:.0%}\n({k})" for f, k in zip(s["fractions"], s["kept"], strict=True)])
    ax.set_title(f"mean ± std over {s['runs']} training seeds (each: mean over {s['calib_sets']} calibration sets)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------- routing

def _seed_map(runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
              ) -> dict[int, dict[int, float]]:
    """{training seed: {0: value}} of a routing quantity (one calibration trace per checkpoint), missing left out."""
    out = {}
    for r in runs:
        v = value(r["routing"])
        if v is not None:
            out[int(r["seed"])] = {0: float(v)}
    return out


def routing_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pooled routing results: local consistency against the shuffled order, keyword silencing against random
    controls, SCMoE against beta 0; the claims with their Holm verdicts."""
    done = [r for r in runs if r["routing"] and (r["routing"].get("analysis") or {}).get("summary")]
    if not done:
        return {"runs": 0}
    first = done[0]["routing"]
    a0 = first["analysis"]["summary"]
    lengths = a0["segment_lengths"]
    multiples = a0["cache_multiples"]
    claims = []

    def add(name: str, a: Mapping, b: Mapping, lower: str, higher: str, **extra: Any) -> None:
        claims.append({"name": name, **paired_over_seeds(a, b), "lower": lower, "higher": higher, **extra})

    locality = {}
    for i, m in enumerate(lengths):
        srp = _seed_map(done, lambda d, i=i: d["analysis"]["summary"]["srp_model"][i])
        srp_shuffled = _seed_map(done, lambda d, i=i: (d.get("shuffled") or {}).get("srp_model", [None] * 99)[i])
        sch = _seed_map(done, lambda d, i=i: d["analysis"]["summary"]["sch_model"][i][0])
        sch_shuffled = _seed_map(done, lambda d, i=i: ((d.get("shuffled") or {}).get("sch_model")
                                                       or [[None]] * 99)[i][0])
        locality[str(m)] = {"srp": pool({s: list(v.values()) for s, v in srp.items()}),
                            "srp_shuffled": pool({s: list(v.values()) for s, v in srp_shuffled.items()}),
                            "sch": pool({s: list(v.values()) for s, v in sch.items()}),
                            "sch_shuffled": pool({s: list(v.values()) for s, v in sch_shuffled.items()}),
                            "srp_interval": {int(r["seed"]): [r["routing"]["analysis"]["summary"]["srp_model_low"][i],
                                                              r["routing"]["analysis"]["summary"]["srp_model_high"][i]]
                                             for r in done}}
        if m in LOCALITY_CLAIM_LENGTHS and srp and srp_shuffled:
            add(f"SRP({m}), whole model: trace order − shuffled", srp, srp_shuffled, "lower than shuffled",
                "higher than shuffled", kind="locality")
            add(f"SCH({m}, rho={multiples[0]:g}), whole model: trace order − shuffled", sch, sch_shuffled,
                "lower than shuffled", "higher than shuffled", kind="locality")
    keywords = [kw for kw in first["info"]["keywords"]]
    silencing = {}
    for kw in keywords:
        rows = {}
        for r in done:
            for row in r["routing"]["summary"]["silencing_table"]:
                if row["keyword"] == kw:
                    rows[int(r["seed"])] = row
        if not rows:
            continue

        def get(path: Sequence[str], rows: dict = rows) -> dict[int, dict[int, float]]:
            out = {}
            for seed, row in rows.items():
                node: Any = row
                for part in path:
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None:
                    out[seed] = {0: float(node)}
            return out

        silencing[kw] = {name: pool({s: list(v.values()) for s, v in get(path).items()}) for name, path in {
            "baseline_keyword": ("baseline_keyword",), "top1_keyword": ("top1", "keyword_delta"),
            "top2_keyword": ("top2", "keyword_delta"), "top2_overall": ("top2", "overall_delta"),
            "random2_keyword": ("random2", "keyword_delta_mean"), "same2_keyword": ("same2", "keyword_delta_mean"),
            "random2_overall": ("random2", "overall_delta_mean"), "reinforce_keyword": ("reinforce", "keyword_delta"),
            "reinforce_overall": ("reinforce", "overall_delta")}.items()}
        silencing[kw]["experts"] = {seed: row.get("top2", {}).get("experts") for seed, row in rows.items()}
        add(f"'{kw}': top-2 keyword experts silenced − random 2 experts (any layer), keyword bits/byte change",
            get(("top2", "keyword_delta")), get(("random2", "keyword_delta_mean")), "less harmful than random",
            "more harmful than random", kind="silencing")
        add(f"'{kw}': top-2 keyword experts silenced − random experts of the same layers, keyword bits/byte change",
            get(("top2", "keyword_delta")), get(("same2", "keyword_delta_mean")), "less harmful than random",
            "more harmful than random", kind="silencing")
    scmoe = {}
    betas = [row["beta"] for row in (first.get("scmoe") or {}).get("rows", [])]
    for j, beta in enumerate(betas):
        raw = _seed_map(done, lambda d, j=j: (d.get("scmoe") or {}).get("rows", [{}] * 99)[j].get("raw_bits_per_byte"))
        head = _seed_map(done, lambda d, j=j: (d.get("scmoe") or {}).get("rows", [{}] * 99)[j].get(
            "masked_bits_per_byte_inside"))
        acc = _seed_map(done, lambda d, j=j: (d.get("scmoe") or {}).get("rows", [{}] * 99)[j].get("greedy_accuracy"))
        scmoe[str(beta)] = {"raw": pool({s: list(v.values()) for s, v in raw.items()}),
                            "head": pool({s: list(v.values()) for s, v in head.items()}),
                            "accuracy": pool({s: list(v.values()) for s, v in acc.items()})}
        if j:
            raw0 = _seed_map(done, lambda d: d["scmoe"]["rows"][0]["raw_bits_per_byte"])
            head0 = _seed_map(done, lambda d: d["scmoe"]["rows"][0]["masked_bits_per_byte_inside"])
            add(f"SCMoE beta {beta:g} − beta 0, bits/byte of the unmasked contrast", raw, raw0, "better", "worse",
                kind="scmoe")
            add(f"SCMoE beta {beta:g} − beta 0, bits/byte on the plausible head", head, head0, "better", "worse",
                kind="scmoe")
    outside = pool({int(r["seed"]): [r["routing"]["scmoe"]["rows"][0]["outside_fraction"]] for r in done
                    if r["routing"].get("scmoe")})
    weak = pool({int(r["seed"]): [r["routing"]["scmoe"]["weak_bits_per_byte"]] for r in done
                 if r["routing"].get("scmoe")})
    decide(claims)
    balance = {key: pool({int(r["seed"]): [float(np.mean(r["routing"]["analysis"]["summary"][key]))] for r in done})
               for key in ("max_expert_fraction", "load_cv", "router_entropy")
               if key in a0 and a0[key] is not None}
    return {"runs": len(done), "seeds": [int(r["seed"]) for r in done], "info": first["info"],
            "lengths": lengths, "multiples": multiples, "locality": locality, "silencing": silencing,
            "keywords": keywords, "betas": betas, "scmoe": scmoe, "scmoe_outside": outside, "scmoe_weak": weak,
            "claims": claims, "balance": balance, "bootstrap": a0.get("bootstrap"),
            "keyword_ids": {kw: (first.get("keywords") or {}).get(kw, {}).get("token_ids") for kw in keywords},
            "occurrences": {int(r["seed"]): {kw: (r["routing"].get("keywords") or {}).get(kw, {}).get("occurrences")
                                             for kw in keywords} for r in done},
            "eval_occurrences": {int(r["seed"]): r["routing"]["summary"].get("keyword_eval_bytes") for r in done},
            "times": {int(r["seed"]): r["routing"]["info"].get("time") for r in done},
            "samples": {int(r["seed"]): r["routing"].get("samples") for r in done}}


def _cell(c: Mapping[str, Any], digits: int = 3) -> str:
    if not c or not c.get("n"):
        return "missing"
    return f"{c['mean']:.{digits}f} ± {fixed(c['std'], digits)}"


def _signed(c: Mapping[str, Any], digits: int = 4) -> str:
    if not c or not c.get("n"):
        return "missing"
    return f"{c['mean']:+.{digits}f} ± {fixed(c['std'], digits)}"


def render_routing(payload: dict[str, Any], findings: str) -> str:
    meta, s, runs = payload["meta"], payload["summary"], payload["runs"]
    lines = ["# Post-hoc routing analysis, steering and self-contrast decoding of the tiny DeepSeekMoE over "
             "training seeds", "",
             "Generated by `experiments/posthoc_pages.py` (pooled by `experiments/posthoc_seeds.py`; the text between "
             "the findings markers is hand-written and kept by reruns).", "", f"Command: `{meta['command']}`", ""]
    lines += [runner.FINDINGS_BEGIN, findings.strip("\n"), runner.FINDINGS_END, ""]
    if not s.get("runs"):
        return "\n".join(lines + ["No routing results yet."]) + "\n"
    info, n = s["info"], s["runs"]
    lines += ["## Setup", ""] + training_lines(runs, meta) + [
        f"* Data: {common.splits_text(info['calibration_split'], info['eval_split'])} The routing trace (every "
        f"routing analysis, and the choice of the keyword experts) is {info['trace_tokens']:,} tokens of the "
        "training split's iterator (`capture.calibration_batches`, split 'train', seed 1000); every bits/byte "
        f"figure is on the first {info['eval_tokens']:,} predicted tokens of each run's validation windows. One "
        "trace per checkpoint, so the training seed is the only replicate here.",
        f"* Local routing consistency ({doc_link('locality', 'SRP/SCH entry and departures')}): "
        "`moejax.posthoc.locality` as the authors' code computes them (whole-model SRP with one threshold, SCH with "
        f"one cache of rho x layers x top-k (layer, expert) pairs), per checkpoint with a bootstrap interval over "
        f"documents ({(s.get('bootstrap') or {}).get('n_boot')} resamples); the reference is the same trace with its "
        "positions shuffled (the same permutation at every layer).",
        f"* Keyword experts ({doc_link('rice', 'RICE nPMI')}, {doc_link('steering', 'steering')}): with the BPE "
        "tokenizer a keyword is the set of token ids whose text is the keyword with or without surrounding "
        "whitespace (" + "; ".join(f"'{kw}': ids {ids}" for kw, ids in s["keyword_ids"].items()) + "); its top-2 "
        "(layer, expert) pairs by nPMI over the model (`steer.marker_experts`) are silenced "
        "(`intervention.mask_experts`) against random controls (2 draws each: any layer, and the same layers), and "
        "reinforced x2 (`scale_experts`). Keyword bits/byte: the cross-entropy at positions whose target is a "
        "keyword token over those tokens' bytes.",
        f"* SCMoE ({doc_link('scmoe', 'SCMoE entry and departures')}): `moejax.generate.SelfContrast`, the weak "
        f"model routes each token to its rank-{info['weak_rank']} expert alone (`intervention.rank_only`, the "
        f"authors' weight for this router), plausibility alpha = {info['alpha']}; betas {s['betas']}.",
        f"* Statistics: {ROUTING_STATS_TEXT}",
        "* Cost per checkpoint: " + "; ".join(f"seed {k}: {v}" for k, v in s["times"].items()) + ".", "",
        n_sentence(n, len(s["claims"])), ""]
    lines += [f"## Claims, Holm over {len(s['claims'])}", "",
              "| claim | mean | 95% interval | per training seed | p | Holm p | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in s["claims"]:
        lines.append(f"| {c['name']} | {fixed(c['mean'], 4)} | {_interval(c)} | "
                     + " / ".join(f"{v:+.4f}" for v in c["per_seed"].values())
                     + f" | {_p(c['p'])} | {_p(c['p_holm'])} | {c['verdict']} |")
    lines += ["", "## Local routing consistency", "", "![SRP against the segment length, per training seed]"
              "(posthoc_routing_local_consistency.png)", "",
              "Whole-model SRP and SCH (cache rho = " + f"{s['multiples'][0]:g}), mean ± std over {n} training seeds; "
              "per seed in brackets the bootstrap interval of SRP over documents (its own trace's sampling error).", "",
              "| segment length m | SRP | SRP per seed [interval] | SRP, shuffled | SCH | SCH, shuffled |",
              "|---|---|---|---|---|---|"]
    for m in s["lengths"]:
        c = s["locality"][str(m)]
        per = "; ".join(f"{fixed(c['srp']['per_seed'].get(str(k), c['srp']['per_seed'].get(k)), 3)} "
                        f"[{fixed(lo, 3)}, {fixed(hi, 3)}]" for k, (lo, hi) in c["srp_interval"].items())
        lines.append(f"| {m} | {_cell(c['srp'])} | {per} | {_cell(c['srp_shuffled'])} | {_cell(c['sch'])} | "
                     f"{_cell(c['sch_shuffled'])} |")
    lines += ["", f"SRP needs a window of m tokens inside one sequence; the traced rows are {info['seq_len']} tokens, "
              "so it is missing for longer m."]
    if s["balance"]:
        lines += ["", "Expert load of the trace (mean over MoE layers, then mean ± std over training seeds): "
                  + "; ".join(f"{k} {_cell(v, 3)}" for k, v in s["balance"].items()) + "."]
    lines += ["", f"Expert frequency and inter-layer affinity of training seed {s['seeds'][0]}'s trace:", "",
              "![expert frequency](posthoc_routing_frequency.png) "
              "![inter-layer affinity](posthoc_routing_affinity.png)"]
    lines += ["", "## Keyword experts: silencing and reinforcing", "", "![silencing](posthoc_routing_silencing.png)",
              "", "Change in bits/byte (on the keyword's tokens, and overall) when the keyword's top-2 experts are "
              "silenced, beside the random controls' mean change; mean ± std over training seeds.", "",
              "| keyword | occurrences in the trace (per seed) | keyword bits/byte | top-1 silenced | top-2 silenced | "
              "random 2, any layer | random, same layers | top-2 silenced, overall | top-2 x2, keyword |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kw, v in s["silencing"].items():
        occ = " / ".join(str((s["occurrences"].get(str(k)) or s["occurrences"].get(k) or {}).get(kw))
                         for k in s["seeds"])
        lines.append(f"| {kw} | {occ} | {_cell(v['baseline_keyword'])} | {_signed(v['top1_keyword'])} | "
                     f"{_signed(v['top2_keyword'])} | {_signed(v['random2_keyword'])} | {_signed(v['same2_keyword'])} "
                     f"| {_signed(v['top2_overall'])} | {_signed(v['reinforce_keyword'])} |")
    lines += ["", "The experts chosen differ between training seeds (a trained model's expert ids are arbitrary): "
              + "; ".join(f"'{kw}': " + ", ".join(f"seed {k} {v['experts'].get(str(k), v['experts'].get(k))}"
                                                   for k in s["seeds"]) for kw, v in s["silencing"].items()) + ".",
              "", "## SCMoE", "", "![SCMoE](posthoc_routing_scmoe.png)", "",
              f"The true next token lies outside the plausible head at {_cell(s['scmoe_outside'], 3)} of the "
              f"positions (fraction, mean ± std over seeds); the weak model alone: {_cell(s['scmoe_weak'])} bits/byte.",
              "", "| beta | bits/byte, unmasked contrast | bits/byte on the head | greedy accuracy |",
              "|---|---|---|---|"]
    for beta in s["betas"]:
        c = s["scmoe"][str(beta)]
        lines.append(f"| {beta:g} | {_cell(c['raw'], 4)} | {_cell(c['head'], 4)} | {_cell(c['accuracy'], 4)} |")
    sample = s["samples"].get(str(s["seeds"][0])) or s["samples"].get(s["seeds"][0])
    if sample:
        lines += ["", f"Greedy continuations of training seed {s['seeds'][0]} (up to 32 tokens):", ""]
        for beta, rec in sample.items():
            for prompt, text in zip(rec["prompts"], rec["continuations"], strict=True):
                lines.append(f"* beta {beta}: `{prompt!r}` → `{text!r}`")
    return "\n".join(lines).rstrip() + "\n"


def plot_routing(s: dict[str, Any], out: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for j, seed in enumerate(s["seeds"]):
        for key, style in (("srp", "-o"), ("srp_shuffled", ":x")):
            xs = [m for m in s["lengths"] if s["locality"][str(m)][key]["per_seed"].get(seed) is not None]
            ys = [s["locality"][str(m)][key]["per_seed"][seed] for m in xs]
            ax.plot(xs, ys, style, color=f"C{j}", label=f"seed {seed}" + (", shuffled" if "shuffled" in key else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment length m (tokens)")
    ax.set_ylabel("SRP, whole model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(out / "posthoc_routing_local_consistency.png", dpi=110)

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    names = [("top1_keyword", "top-1"), ("top2_keyword", "top-2"), ("random2_keyword", "random 2"),
             ("same2_keyword", "random, same layers"), ("reinforce_keyword", "top-2 x2")]
    width = 0.8 / max(1, len(s["silencing"]))
    for i, (kw, v) in enumerate(s["silencing"].items()):
        ys = [v[key]["mean"] if v[key]["n"] else 0.0 for key, _ in names]
        es = [v[key]["std"] or 0.0 for key, _ in names]
        ax.bar(np.arange(len(names)) + i * width, ys, width, yerr=es, capsize=3, label=kw)
    ax.set_xticks(np.arange(len(names)) + width * (len(s["silencing"]) - 1) / 2, [label for _, label in names])
    ax.set_ylabel("change in bits/byte on the keyword's tokens")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set_title(f"mean ± std over {s['runs']} training seeds", fontsize=10)
    fig.savefig(out / "posthoc_routing_silencing.png", dpi=110)

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("raw", "unmasked contrast"), ("head", "on the plausible head")):
        ax.errorbar(s["betas"], [s["scmoe"][str(b)][key]["mean"] for b in s["betas"]],
                    yerr=[s["scmoe"][str(b)][key]["std"] or 0.0 for b in s["betas"]], fmt="-o", capsize=3,
                    label=label)
    ax.set_xlabel("beta")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"SCMoE, mean ± std over {s['runs']} training seeds", fontsize=10)
    fig.savefig(out / "posthoc_routing_scmoe.png", dpi=110)


# ------------------------------------------------------------------------------------------------- writing

def write_pages(workdirs: Sequence[pathlib.Path], meta: dict[str, Any], out: pathlib.Path,
                say: Callable[[str], None]) -> list[pathlib.Path]:
    """Both pages, their JSON and plots from the runs' per-checkpoint results; returns the pages' paths."""
    out.mkdir(parents=True, exist_ok=True)
    runs = _runs(list(workdirs))
    public = [{"seed": r["seed"], "workdir": str(r["workdir"]), "summary": r["summary"],
               "config": {"model": r["config"].get("model", {})}} for r in runs]
    written = []
    comp = compression_summary(runs)
    if comp.get("runs"):
        plot_compression(comp, out / "posthoc_compression.png")
    written.append(common.write_page(out, "posthoc_compression", {"meta": meta, "summary": comp, "runs": public},
                                     _with_runs(render_compression), COMPRESSION_PLACEHOLDER))
    say(f"compression page: {comp.get('runs', 0)} training seeds")
    rout = routing_summary(runs)
    if rout.get("runs"):
        plot_routing(rout, out)
        seed0 = next((r for r in runs if r["routing"]), None)
        if seed0 is not None:
            for name in ("frequency", "affinity"):
                src = seed0["workdir"] / "posthoc_routing" / "page" / f"posthoc_routing_{name}.png"
                if src.exists():
                    shutil.copyfile(src, out / f"posthoc_routing_{name}.png")
    written.append(common.write_page(out, "posthoc_routing", {"meta": meta, "summary": rout, "runs": public},
                                     _with_runs(render_routing), ROUTING_PLACEHOLDER))
    say(f"routing page: {rout.get('runs', 0)} training seeds")
    return written


def _with_runs(render: Callable[[dict[str, Any], str], str]) -> Callable[[dict[str, Any], str], str]:
    """render with the payload's runs turned back into the shape ``training_lines`` reads."""
    def wrapped(payload: dict[str, Any], findings: str) -> str:
        runs = [{**r, "workdir": pathlib.Path(r["workdir"])} for r in payload["runs"]]
        return render({**payload, "runs": runs}, findings)
    return wrapped


def rerender_pages(out: pathlib.Path) -> list[pathlib.Path]:
    """Rewrites both pages from their JSON alone (no checkpoint)."""
    return [common.rerender(out, "posthoc_compression", _with_runs(render_compression), COMPRESSION_PLACEHOLDER),
            common.rerender(out, "posthoc_routing", _with_runs(render_routing), ROUTING_PLACEHOLDER)]

