"""The post-hoc routing page pooled over training seeds (``posthoc_routing.md``): its summary of the per-checkpoint
results, its markdown and its plots. ``experiments.posthoc_seeds`` writes it."""
from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import posthoc_common as common
from experiments import runner
from experiments.posthoc_seeds import LOCALITY_CLAIM_LENGTHS, doc_link, training_lines
from experiments.seed_stats import _interval, _p, decide, fixed, n_sentence, paired_over_seeds, pool

ROUTING_STATS_TEXT = ("the training seed is the unit: each checkpoint has one trace and one evaluation set, so a "
                      "cell is the mean ± std (ddof 1) over training seeds of the checkpoints' values, and a "
                      "comparison a − b is paired within each training seed (one difference per seed), then the 95% "
                      "t-interval over training seeds (t with n − 1 degrees of freedom) and the two-sided t-test p. "
                      "The claims are fixed in code (`experiments/posthoc_seeds.py`) and Holm-adjusted together "
                      "(`experiments/stats.py`, family-wise alpha 0.05); a verdict word appears only where Holm "
                      "rejects, otherwise 'not resolved at n=3'. The random controls' draws are averaged within a seed "
                      "before pairing.")


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
