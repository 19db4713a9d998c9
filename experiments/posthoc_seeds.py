"""The two post-hoc results pages pooled over training seeds (``experiments.posthoc_pages``): the compression page
(``posthoc_compression.md``, ``experiments.posthoc_seeds_compression``) and the routing page (``posthoc_routing.md``,
``experiments.posthoc_seeds_routing``), each from the per-checkpoint caches of its study on every trained checkpoint.
This module holds what both share (the claims, method links, the runs and their setup lines) and writes them.

Statistics (``experiments.seed_stats``: ``pool`` and ``paired_over_seeds``, re-exported here; tests/experiments/
test_posthoc_seeds.py checks them against numpy):
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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments import posthoc_common as common
from experiments.seed_stats import _interval, _p, decide, fixed, interval, n_sentence, p_text, paired_over_seeds, pool  # noqa: F401  # noqa: F401  (re-exported: other pages use them here)

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



# ------------------------------------------------------------------------------------------------- writing

def write_pages(workdirs: Sequence[pathlib.Path], meta: dict[str, Any], out: pathlib.Path,
                say: Callable[[str], None]) -> list[pathlib.Path]:
    """Both pages, their JSON and plots from the runs' per-checkpoint results; returns the pages' paths."""
    from experiments.posthoc_seeds_compression import compression_summary, plot_compression, render_compression
    from experiments.posthoc_seeds_routing import plot_routing, render_routing, routing_summary

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
    from experiments.posthoc_seeds_compression import render_compression
    from experiments.posthoc_seeds_routing import render_routing

    return [common.rerender(out, "posthoc_compression", _with_runs(render_compression), COMPRESSION_PLACEHOLDER),
            common.rerender(out, "posthoc_routing", _with_runs(render_routing), ROUTING_PLACEHOLDER)]

