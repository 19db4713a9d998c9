"""The page of experiments/posthoc_routing.py: the summary of its silencing results (``summarise``), the page
rendered from its JSON (``render_page``, a function of the JSON alone) and the silencing and SCMoE plots.
"""
from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import runner
from experiments.posthoc_common import fixed, splits_text
from experiments.stats import mean_std


def summarise(data: dict[str, Any], keywords: Sequence[str]) -> dict[str, Any]:
    """{'silencing_table': per keyword with experts, the model's bits per byte and the change when its top-1 and
    top-2 experts are silenced or reinforced, beside the random controls (mean, std and largest change over the
    draws)} from the cache's data."""
    silencing = data.get("silencing") or {}
    base = silencing.get("baseline")
    kw_record = data.get("keywords") or {}
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
                    overall_mean, overall_std = mean_std([d["bits_per_byte"] - base["bits_per_byte"] for d in draws])
                    own = [d["keyword_bits_per_byte"][kw] - base["keyword_bits_per_byte"][kw] for d in draws]
                    own_mean, own_std = mean_std(own)
                    row[name] = {"draws": len(draws), "overall_delta_mean": overall_mean,
                                 "overall_delta_std": overall_std, "keyword_delta_mean": own_mean,
                                 "keyword_delta_std": own_std, "keyword_delta_max": max(own) if own else None}
            r = silencing.get(f"reinforce/{kw}/top2")
            if r is not None:
                row["reinforce"] = {"scale": r["scale"], "overall_delta": r["bits_per_byte"] - base["bits_per_byte"],
                                    "keyword_delta": r["keyword_bits_per_byte"][kw] - base["keyword_bits_per_byte"][kw]}
            table.append(row)
    return {"silencing_table": table}


def _experts_text(experts: dict[str, list[int]] | None) -> str:
    if not experts:
        return "–"
    return ", ".join(f"L{layer}/E{e}" for layer, ids in sorted(experts.items(), key=lambda kv: int(kv[0]))
                     for e in ids)


def _show_byte(i: int) -> str:
    return {ord(" "): "␣", ord("\n"): "↵", ord("|"): "¦", ord("`"): "ˋ", 0: "⟨eos⟩"}.get(i, chr(i) if 32 < i < 127
                                                                                        else f"\\x{i:02x}")


def _interval_cell(value: Any, low: Any, high: Any) -> str:
    return fixed(value, 3) + ("" if low is None or high is None else f" [{fixed(low, 3)}, {fixed(high, 3)}]")


def consistency_lines(analysis: dict[str, Any], shuffled: dict[str, Any] | None) -> list[str]:
    """The page's local routing consistency table: the whole-model SRP and SCH as arXiv 2505.16056's code computes
    them (with bootstrap intervals), then the hindsight coverage variants, and the same on the shuffled trace. A
    summary written before ``moejax.posthoc.locality`` (coverage only, keys srp_mean / srp_f1_mean / sch_mean) is
    rendered as it was."""
    lengths = analysis["segment_lengths"]
    lines = ["### Local routing consistency", "",
             "| segment length m | " + " | ".join(str(m) for m in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    if "srp_model" not in analysis:  # a summary of the earlier format
        lines += ["| SRP (coverage: best fixed k-set of the segment) | " + " | ".join(
                      fixed(v, 3) for v in analysis["srp_mean"]) + " |",
                  "| SRP (F1, the paper's code) | " + " | ".join(fixed(v, 3) for v in analysis["srp_f1_mean"]) + " |"]
        for ci, c in enumerate(analysis["cache_sizes"]):
            lines.append(f"| SCH, cache of {c} experts | " + " | ".join(
                fixed(row[ci], 3) for row in analysis["sch_mean"]) + " |")
        if shuffled and "srp_mean" in shuffled and shuffled["segment_lengths"] == lengths:
            lines += ["| SRP (coverage), tokens shuffled: no locality | " + " | ".join(
                          fixed(v, 3) for v in shuffled["srp_mean"]) + " |",
                      f"| SCH, cache of {2 * analysis['top_k']}, tokens shuffled | " + " | ".join(
                          fixed(v, 3) for v in shuffled["sch_2k_mean"]) + " |"]
        return lines + ["", "Means over the MoE layers (the plot's band: min-max over layers). SRP(m) = SCH(m, k). "
                        "*Tokens shuffled*: the same trace with its positions permuted at random (the same "
                        "permutation at every layer: the expert load and the per-token routing are kept, the order "
                        "is not), so the segments hold unrelated tokens: what SRP/SCH are without any local "
                        "consistency.", "",
                        "![SRP and SCH against the segment length](posthoc_routing_local_consistency.png)", ""]
    layers, experts, k = len(analysis["layers"]), analysis["num_experts"], analysis["top_k"]
    level = analysis["bootstrap"]["confidence"]
    lines.append(f"| SRP, whole model [{level:.0%} interval] | " + " | ".join(_interval_cell(*cell) for cell in zip(
        analysis["srp_model"], analysis["srp_model_low"], analysis["srp_model_high"], strict=True)) + " |")
    lines.append("| SRP, mean over the layers | " + " | ".join(fixed(v, 3) for v in analysis["srp_mean"]) + " |")
    for ci, rho in enumerate(analysis["cache_multiples"]):
        lines.append(f"| SCH, whole model, cache rho = {rho:g} ({rho * layers * k:g} of {layers * experts}) "
                     f"[{level:.0%} interval] | " + " | ".join(_interval_cell(*cell) for cell in zip(
                         *([row[ci] for row in analysis[key]] for key in ("sch_model", "sch_model_low",
                                                                          "sch_model_high")), strict=True)) + " |")
    lines.append("| coverage: best fixed k-set of a segment, mean over the layers | " + " | ".join(
        fixed(v, 3) for v in analysis["srp_coverage_mean"]) + " |")
    for ci, c in enumerate(analysis["cache_sizes"]):
        lines.append(f"| coverage: best fixed {c} experts of a segment, mean over the layers | " + " | ".join(
            fixed(row[ci], 3) for row in analysis["sch_coverage_mean"]) + " |")
    if shuffled and "srp_model" in shuffled and shuffled["segment_lengths"] == lengths:
        lines.append("| SRP, whole model, tokens shuffled: no locality | " + " | ".join(
            fixed(v, 3) for v in shuffled["srp_model"]) + " |")
        for ci, rho in enumerate(shuffled["cache_multiples"]):
            lines.append(f"| SCH, whole model, rho = {rho:g}, tokens shuffled | " + " | ".join(
                fixed(row[ci], 3) for row in shuffled["sch_model"]) + " |")
        lines.append("| coverage: best fixed k-set, tokens shuffled | " + " | ".join(
            fixed(v, 3) for v in shuffled["srp_coverage_mean"]) + " |")
    return lines + [
        "", "SRP and SCH as the authors of arXiv 2505.16056 compute them (`moejax.posthoc.locality`): SRP(m) the best "
        "F1 of routing every window of m tokens to the experts that at least t of its tokens use (one threshold t for "
        "the model, the layers' counts summed); SCH(m, rho) the hit rate of one cache of rho x (MoE layers x top-k) "
        "(layer, expert) pairs that evicts the expert with the fewest uses in the next m tokens. Intervals: the "
        f"documents resampled {analysis['bootstrap']['n_boot']} times (basic bootstrap). *Coverage*: the share of a "
        "disjoint segment's routed slots that its best fixed expert set in hindsight covers. *Tokens shuffled*: the "
        "same trace with its positions permuted at random (the same permutation at every layer: the expert load and "
        "the per-token routing are kept, the order is not): the values without any local consistency.", "",
        "![SRP and SCH against the segment length](posthoc_routing_local_consistency.png)", ""]


def render_page(payload: dict[str, Any], findings: str) -> str:
    """The page of the JSON payload ({'info', 'summary'} and the cache's records, ``posthoc_routing.main``), with the
    hand-written findings."""
    info, summary = payload["info"], payload["summary"]
    analysis = (payload.get("analysis") or {}).get("summary", {})
    lines = [f"# Post-hoc routing analysis, steering and self-contrast decoding: {info['model']}", "",
             f"*Generated by `{info['command']}` (`experiments/posthoc_routing.py`; the text between the findings "
             "markers is hand-written and kept by reruns).*", ""]
    lines += [runner.FINDINGS_BEGIN, findings.strip("\n"), runner.FINDINGS_END, ""]
    lines += ["## Setup", "",
              f"- Model: `{info['checkpoint']}` (step {info['step']}), {info['params']:,} parameters, "
              f"{info['moe_layers']} MoE layers of {info['shared']} shared + {info['experts']} routed experts, "
              f"top-{info['top_k']}, router `{info['router']}` (softmax before top-k, no renormalisation: a silenced "
              f"expert's slot goes to the next-ranked expert with that expert's own probability), byte tokenizer. "
              f"The run's own validation: {fixed(info.get('run_val_bpb'), 4)} bits/byte.",
              f"- Data: `{info['data']}` ({info['batch_size']} x {info['seq_len']} byte windows, the run's shape), "
              + splits_text(info.get("calibration_split", "validation"), info.get("eval_split", "validation"),
                            f": the trace (routing analyses, choice of the keyword experts) is its first "
                            f"{info['trace_tokens']:,} tokens, the evaluation (every bits-per-byte figure) the next "
                            f"{info['eval_tokens']:,} tokens, disjoint from the trace"),
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
            lines.append(f"| {label} | " + " | ".join(fixed(v, digits) for v in values) + " |")
        aff = analysis["affinity_top1"]
        independent = analysis["max_expert_fraction"][1:]
        lines += ["| affinity top-1 to the next layer (uniform " + f"{uniform:.4f})"
                  + " | " + " | ".join(fixed(v, 3) for v in aff) + " | – |",
                  "| the same if the layers routed independently (the next layer's largest expert fraction) | "
                  + " | ".join(fixed(v, 3) for v in independent) + " | – |", "",
                  "![expert frequency per layer](posthoc_routing_frequency.png)", "",
                  "![inter-layer affinity](posthoc_routing_affinity.png)", "",
                  "Affinity is P(expert j at layer l+1 | expert i at layer l) with every selected (i, j) pair of a "
                  f"token counted (k x k = {analysis['top_k'] ** 2} pairs per token), so a row's mass is spread over "
                  f"at least {analysis['top_k']} experts and the top-1 affinity is at most about 1/{analysis['top_k']}"
                  f" = {1 / analysis['top_k']:.3f} even for a perfectly predictable routing.", ""]
        lines += consistency_lines(analysis, payload.get("shuffled"))

    kw_record = payload.get("keywords") or {}
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
    silencing = payload.get("silencing") or {}
    if table:
        base = silencing["baseline"]
        draws = table[0]["random1"]["draws"]

        def spread(stats: dict[str, Any], what: str, digits: int) -> str:
            text = f"{stats[f'{what}_delta_mean']:+.{digits}f} ± {fixed(stats[f'{what}_delta_std'], digits)}"
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

    scmoe = payload.get("scmoe")
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
    samples = payload.get("samples") or {}
    if samples:
        lines += ["### Greedy samples", "",
                  f"`moejax.generate.generate(..., contrast=SelfContrast(rank={info['weak_rank']}, "
                  f"alpha={info['alpha']}, beta=...))`, greedy, {info['max_new']} new bytes, stopping at the eos "
                  "byte.", ""]
        for i, prompt in enumerate(next(iter(samples.values()))["prompts"]):
            for beta, r in sorted(samples.items(), key=lambda kv: float(kv[0])):
                lines += [f"Prompt {i + 1}, beta = {beta}:", "", "```python", prompt + r["continuations"][i], "```", ""]

    release = payload.get("release")
    if release:
        lines += ["## Mechanics on an imported release", "",
                  f"A tiny random `{release['model_type']}` release ({release['layers'].__len__()} MoE layers, "
                  f"{release['num_experts']} experts, top-{release['top_k']}, byte vocabulary) written by "
                  f"`moejax.hf.save` (files: {', '.join(release['files'])}), then `python -m moejax.posthoc trace "
                  f"--with_scores --calibration_split={release.get('calibration_split', 'validation')}` on "
                  f"{release['tokens']:,} {release.get('calibration_split', 'validation')} tokens and "
                  f"`python -m moejax.posthoc analyze`: "
                  f"{', '.join(release['outputs'])}, in {release['seconds']:.1f}s. Largest expert fraction per layer "
                  f"{', '.join(fixed(v, 3) for v in release['max_expert_fraction'])}, SRP(m = "
                  f"{release['segment_lengths'][-1]}) {fixed(release['srp_mean'][-1], 3)}, router entropy "
                  f"{', '.join(fixed(v, 2) for v in release['router_entropy'] or [])} nats (max "
                  f"{math.log(release['num_experts']):.2f}). Random weights: the numbers show the path works, not "
                  "anything about routing.", ""]
    lines += ["## Reproduce", "", "```bash", info["command"], "```", "",
              "Intermediate results: `<checkpoint>/posthoc_routing/` (results.json, the trace, the release); a rerun "
              "skips every finished step. All numbers: `posthoc_routing.json`.", ""]
    return "\n".join(lines)


def plot_silencing(summary: dict[str, Any], path: pathlib.Path) -> None:
    """The change in bits per byte when each keyword's experts are silenced, beside the random controls."""
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
    """The SCMoE sweep's likelihoods and greedy accuracy against beta."""
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
