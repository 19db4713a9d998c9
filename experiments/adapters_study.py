"""Adapters study: the tiny DeepSeekMoE fine-tuned on a domain it never saw, fully or through adapters; how much
each way learns of the new domain and forgets of the old one. Writes experiments/results/adapters.{md,json,png}.

    python -m experiments.adapters_study [--bases runs/posthoc_pages/seed0,runs/posthoc_pages/seed1,...]
        [--seeds 3] [--workdir runs/adapters_study] [--out experiments/results] [--budget steps=50,...]
        [--render_only]

Per base checkpoint (one per training seed of ``SEEDS_PREREGISTERED``, fixed before any run; by default the tiny
DeepSeekMoE runs of experiments/posthoc_pages.py, trained on the standard library with its test folders left out):

1. The new domain: the standard library's test files (``text:<stdlib>/test/test_*.py``), which the pre-training
   corpus excludes; its validation split is its own held-out files (``data.val_fraction``).
2. Fine-tunings from the base (``init_from='run:<base>'``), each ``steps`` steps of the same batches (the
   fine-tuning seed is the base's): full fine-tuning, LoRA on the attention projections, LoRA on the experts (every
   routed expert its own adapter, and the shared expert), and LoRAMoE (E LoRA experts and a router on each matrix
   of the shared expert, with the localized balancing constraint; moejax/adapters/mixture.py); a fifth arm, plain
   LoRA on the shared expert (LoRAMoE's own baseline), was added after the first four had run.
3. Every model, the base too, scored on both domains' validation windows (the same windows for every row of a
   seed): the new domain's loss (learning) and the pre-training corpus's (forgetting).

Runs live in ``<workdir>/seed<s>/<arm>`` (a finished one is skipped, an interrupted one resumes) and every loss is
cached in ``<workdir>/seed<s>/results.json``, so a rerun does only what is missing. The page pairs arms within
seeds (t-intervals, Holm over the page's claims) and is a function of its JSON (``--render_only`` rewrites it).
"""
from __future__ import annotations

import argparse
import pathlib
import sysconfig
import time
from typing import Any

import numpy as np

from experiments import posthoc_common as common
from experiments import seed_stats

NAME = "adapters"
PLACEHOLDER = "(not written yet)"
# The training seeds of the bases, fixed before the first run of this study.
SEEDS_PREREGISTERED = (0, 1, 2)
DEFAULT_BASES = "runs/posthoc_pages/seed{seed}"
# Fine-tuning budget, fixed before running: the same steps and batches for every arm; LoRA's usual higher learning
# rate for the adapters (the base is frozen), a tenth of the pre-training peak for full fine-tuning.
BUDGET = {"steps": 30, "batch_size": 8, "seq_len": 128, "full_lr": 1e-3, "lora_lr": 3e-3, "rank": 8,
          "alpha": 16.0, "loramoe_experts": 4, "blc_alpha": 0.1, "blc_weight": 1e-4, "eval_tokens": 8192}
ARMS = ("full", "lora_attn", "lora_experts", "loramoe", "lora_shared")
LABELS = {"base": "base (before fine-tuning)", "full": "full fine-tuning",
          "lora_attn": "LoRA on attention (q, k, v, o)",
          "lora_experts": "LoRA on the experts (routed, per expert, and shared)",
          "loramoe": "LoRAMoE on the shared expert",
          "lora_shared": "LoRA on the shared expert (added after the first four arms had run)"}
METRICS = {"new": "new domain", "old": "pre-training corpus"}


def domain() -> str:
    """The new domain: the test files of the standard library this Python runs from."""
    return f"text:{sysconfig.get_paths()['stdlib']}/test/test_*.py"


def arm_fields(arm: str, budget: dict[str, Any]) -> dict[str, Any]:
    """The config fields of one arm ('model.lora.targets' style)."""
    if arm == "full":
        return {"train.learning_rate": budget["full_lr"]}
    lora = {"train.learning_rate": budget["lora_lr"], "model.lora.rank": budget["rank"],
            "model.lora.alpha": budget["alpha"]}
    if arm == "lora_attn":
        return {**lora, "model.lora.targets": ("attn/(q|k|v|o)/kernel",)}
    if arm == "lora_experts":
        return {**lora, "model.lora.targets": ("ffn/experts/(wi_0|wi_1|wo)", "ffn/shared/(wi_0|wi_1|wo)")}
    if arm == "lora_shared":  # LoRAMoE's own baseline: plain LoRA on the same matrices
        return {**lora, "model.lora.targets": ("ffn/shared/(wi_0|wi_1|wo)",)}
    if arm == "loramoe":
        return {**lora, "model.lora.targets": ("ffn/shared/(wi_0|wi_1|wo)",),
                "model.lora.mixture.num_experts": budget["loramoe_experts"],
                "model.lora.mixture.balance": "loramoe", "model.lora.mixture.task_type": 0,
                "model.lora.mixture.blc_alpha": budget["blc_alpha"],
                "model.lora.mixture.balance_coef": budget["blc_weight"]}
    raise ValueError(f"arm={arm!r} is not one of {ARMS}")


def run_config(base_dir: pathlib.Path, seed: int, arm: str, budget: dict[str, Any], data: str,
               data_dir: str | None = None) -> Any:
    """The fine-tuning config of one arm: DeepSeekMoE's tiny training fields, the base's model (``init_from``), the
    new domain with the base's tokenizer."""
    from moejax.configs import deepseekmoe

    config = deepseekmoe.get_config("tiny")
    config.seed = seed
    config.init_from = f"run:{base_dir}"
    config.data.update(name=data, tokenizer="bytes", eval_batches=2)  # 'bytes': the source's tokenizer
    if data_dir:
        config.data.dir = data_dir
    steps = budget["steps"]
    config.train.update(steps=steps, batch_size=budget["batch_size"], seq_len=budget["seq_len"],
                        warmup_steps=max(1, steps // 10), schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0,
                        eval_every=0, log_every=max(1, steps // 5))
    config.checkpoint.every_steps = max(1, steps // 2)
    for dotted, value in arm_fields(arm, budget).items():
        *parents, name = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[name] = value
    return config


say = common.speaker(NAME)


def study_seed(seed: int, base_dir: pathlib.Path, workdir: pathlib.Path, budget: dict[str, Any], data: str,
               data_dir: str | None = None, arms: tuple[str, ...] = ARMS) -> dict[str, dict[str, float]]:
    """{row: {'new', 'old': validation loss, 'trainable': parameters trained, 'seconds'}} of one seed (cached in
    <workdir>/results.json)."""
    import moejax
    from moejax import data as data_lib
    from moejax import evaluate
    from moejax.adapters import lora
    from moejax.training import loop

    cache = common.ResultCache(workdir)
    base_config, base_variables = moejax.load(base_dir)
    windows = {}
    _, windows["new"], _ = data_lib.checkpoint_windows(base_config, base_dir, data=data,
                                                       max_tokens=budget["eval_tokens"], data_dir=data_dir)
    _, windows["old"], _ = data_lib.checkpoint_windows(base_config, base_dir, max_tokens=budget["eval_tokens"])
    evaluators: dict[str, Any] = {}

    def score(row: str, config: Any, variables: Any, **extra: Any) -> None:
        key = config.model.to_json()
        if key not in evaluators:
            evaluators[key] = evaluate.Evaluator(config)
        losses = {m: float(evaluators[key](variables, batches)["loss"]) for m, batches in windows.items()}
        cache.put(row, {**losses, **extra})
        say(f"seed {seed} {row}: new {losses['new']:.4f}, old {losses['old']:.4f}")

    if cache.get("base") is None:
        score("base", base_config, base_variables, trainable=common.parameter_count(base_variables), seconds=0.0)
    for arm in arms:
        if cache.get(arm) is not None:
            continue
        started = time.perf_counter()
        run_dir = workdir / arm
        if not (run_dir / "summary.json").exists():
            loop.run(run_config(base_dir, seed, arm, budget, data, data_dir), run_dir, config_name=f"{arm} seed{seed}")
        seconds = time.perf_counter() - started
        config, variables = moejax.load(run_dir)
        adapters = lora.split(variables["params"])[1]
        trainable = (common.parameter_count({"params": adapters}) if adapters else
                     common.parameter_count(variables))
        score(arm, config, variables, trainable=trainable, seconds=seconds)
    return {row: cache.get(row) for row in ("base", *arms) if cache.get(row) is not None}


# ---------------------------------------------------------------------------------------------- the page

# (row, reference, metric, what the paper reports, the word for a mean below 0, the word for a mean above 0)
CLAIMS = (
    ("lora_attn", "full", "new", "LoRA (arXiv 2106.09685): LoRA on the attention matrices adapts as well as full "
     "fine-tuning (on par: a resolved difference either way departs)", "LoRA better (departs)",
     "LoRA worse (departs)"),
    ("lora_attn", "full", "new", "LoRA Learns Less and Forgets Less (arXiv 2405.09673): LoRA learns less of the new "
     "domain than full fine-tuning", "LoRA learns more (contradicted)", "LoRA learns less (reproduced)"),
    ("lora_attn", "full", "old", "LoRA Learns Less and Forgets Less: LoRA forgets less of the source domain",
     "LoRA forgets less (reproduced)", "LoRA forgets more (contradicted)"),
    ("loramoe", "full", "old", "LoRAMoE (arXiv 2312.09979): LoRAMoE keeps the base's knowledge that full "
     "fine-tuning loses", "LoRAMoE forgets less (reproduced)", "LoRAMoE forgets more (contradicted)"),
    ("loramoe", "lora_shared", "new", "LoRAMoE: LoRAMoE learns the downstream data better than plain LoRA on the "
     "same matrices", "LoRAMoE better (reproduced)", "LoRAMoE worse (contradicted)"),
    ("loramoe", "lora_experts", "new", "LoRAMoE against plain LoRA on every expert (not the paper's comparison: "
     "15x the trained parameters)", "LoRAMoE better", "LoRAMoE worse"),
)


def _metric(seeds: dict[str, dict[str, dict[str, float]]], row: str, metric: str) -> dict[int, dict[str, float]]:
    return {int(s): {"val": by_row[row][metric]} for s, by_row in seeds.items() if row in by_row}


def claims(payload: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row, reference, metric, reported, lower, higher in CLAIMS:
        c = seed_stats.paired_over_seeds(_metric(payload["seeds"], row, metric),
                                         _metric(payload["seeds"], reference, metric))
        c.update(row=row, reference=reference, metric=metric, reported=reported, lower=lower, higher=higher)
        out.append(c)
    return seed_stats.decide(out)


def _cell(values: list[float], digits: int = 4) -> str:
    if not values:
        return "–"
    std = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{np.mean(values):.{digits}f}{std}"


def render(payload: dict[str, Any], findings: str) -> str:
    seeds, b = payload["seeds"], payload["budget"]
    shown = [row for row in ("base", *ARMS) if any(row in r for r in seeds.values())]
    lines = ["# Fine-tuning the tiny DeepSeekMoE on a new domain: full, LoRA and LoRAMoE", "",
             f"Generated by `experiments/adapters_study.py` on {payload['machine']} in {payload['seconds']:.0f} s "
             f"(CPU shared with other jobs, run under `nice`); bases of training seeds "
             f"{sorted(int(s) for s in seeds)} (fixed before running: {list(SEEDS_PREREGISTERED)}).", "",
             "Command: `" + payload["command"] + "`", "", "<!-- findings:begin -->", findings.strip(),
             "<!-- findings:end -->", "", "## Setup", "",
             f"Bases: {', '.join(payload['bases'])} (configs/deepseekmoe.py:tiny on the standard library, BPE 8192, "
             "test folders left out of its corpus). New domain: `" + payload["domain"] + "` (the standard "
             "library's tests), scored on its own held-out files; the pre-training corpus is scored on the bases' "
             "validation windows. Both with the bases' tokenizer, "
             f"{b['eval_tokens']:,} tokens each, the same windows for every row of a seed.", "",
             f"Every arm: {b['steps']} steps of {b['batch_size']} x {b['seq_len']} tokens of the new domain (the "
             f"same batches for every arm of a seed), cosine schedule with {max(1, b['steps'] // 10)} warm-up "
             f"steps, no weight decay. Full fine-tuning at peak LR {b['full_lr']:g}; the LoRA arms at "
             f"{b['lora_lr']:g}, rank {b['rank']}, alpha {b['alpha']:g}; LoRAMoE: {b['loramoe_experts']} LoRA "
             f"experts of that rank on each matrix of the shared expert with a dense softmax router, the localized "
             f"balancing constraint with blc_alpha {b['blc_alpha']:g}, weight {b['blc_weight']:g}, the new domain "
             "as task type 0 ([docs/adapters.md](../../docs/adapters.md)).", "",
             "## Validation loss (nats per token; mean ± std over seeds)", "",
             "| row | new domain | pre-training corpus | trained parameters | seconds |", "|---|---|---|---|---|"]
    for row in shown:
        rows = [r[row] for r in seeds.values() if row in r]
        trainable = int(np.mean([r["trainable"] for r in rows]))
        lines.append(f"| {LABELS[row]} | {_cell([r['new'] for r in rows])} | {_cell([r['old'] for r in rows])} | "
                     f"{trainable:,} | {_cell([r['seconds'] for r in rows], 0)} |")
    lines += ["", "## What the papers report, and whether it holds here", "",
              "Each claim compares one loss within seeds (row − reference; negative: the row's loss is lower), a 95% "
              "t-interval over seeds and Holm over the page's claims at family-wise 0.05.", "",
              "| claim (paper) | loss | row − reference | 95% interval | p | p (Holm) | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in claims(payload):
        mean = "–" if c.get("mean") is None else f"{c['mean']:+.4f}"
        lines.append(f"| {c['reported']} ({c['row']} vs {c['reference']}) | {METRICS[c['metric']]} | {mean} | "
                     f"{seed_stats.interval(c)} | {seed_stats._p(c.get('p'))} | {seed_stats._p(c.get('p_holm'))} | "
                     f"{c['verdict']} |")
    n = len(seeds)
    lines += ["", seed_stats.n_sentence(n, len(CLAIMS)) if n >= 2 else "One seed: no interval.", "",
              f"![learning against forgetting]({NAME}.png)", ""]
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    seeds = payload["seeds"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, row in enumerate(("base", *ARMS)):
        rows = [r[row] for r in seeds.values() if row in r]
        if not rows:
            continue
        color = f"C{i}"
        ax.plot([r["new"] for r in rows], [r["old"] for r in rows], ".", color=color, alpha=0.5)
        ax.plot(np.mean([r["new"] for r in rows]), np.mean([r["old"] for r in rows]), "o", color=color,
                label=LABELS[row], ms=8)
    ax.set_xlabel("new-domain validation loss (learning: left is better)")
    ax.set_ylabel("pre-training validation loss (forgetting: down is better)")
    ax.set_title("each seed (dots), mean over seeds (circles)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", default="", help="comma-separated base run directories, one per seed (default: "
                   f"{DEFAULT_BASES.format(seed='<s>')})")
    p.add_argument("--seeds", type=int, default=len(SEEDS_PREREGISTERED), help="how many of SEEDS_PREREGISTERED")
    p.add_argument("--workdir", default="runs/adapters_study")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--data", default="", help="the new domain, text:<glob> (default: the stdlib's test files)")
    p.add_argument("--data_dir", default=None, help="where the prepared corpora are cached (data.dir)")
    p.add_argument("--budget", default="", help="BUDGET overrides, key=value,... (e.g. steps=2)")
    p.add_argument("--render_only", action="store_true", help="rewrite the page from its JSON")
    args = p.parse_args(argv)
    if not 1 <= args.seeds <= len(SEEDS_PREREGISTERED):
        p.error(f"--seeds={args.seeds}: must be in 1..{len(SEEDS_PREREGISTERED)}")
    return args


def parse_budget(text: str) -> dict[str, Any]:
    return common.parse_fields(text, BUDGET)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    if args.render_only:
        common.rerender(out, NAME, render, PLACEHOLDER)
        return {}
    budget = parse_budget(args.budget)
    seeds_run = SEEDS_PREREGISTERED[:args.seeds]
    bases = ([pathlib.Path(b) for b in args.bases.split(",")] if args.bases else
             [pathlib.Path(DEFAULT_BASES.format(seed=s)) for s in seeds_run])
    if len(bases) != len(seeds_run):
        raise SystemExit(f"--bases: {len(bases)} directories for {len(seeds_run)} seeds")
    for base in bases:
        if not (base / "summary.json").exists():
            raise SystemExit(f"--bases: {base} is not a finished run (no summary.json): train it with "
                             f"python -m experiments.posthoc_pages first")
    data = args.data or domain()
    from moejax import cli

    cli.enable_compile_cache(cli.default_compile_cache())  # the seeds' runs of one arm compile once
    workdir = pathlib.Path(args.workdir)
    started = time.perf_counter()
    seeds = {str(s): study_seed(s, base, workdir / f"seed{s}", budget, data, args.data_dir)
             for s, base in zip(seeds_run, bases, strict=True)}
    payload = {"seeds": seeds, "budget": budget, "domain": data, "bases": [str(b) for b in bases]}
    return common.finish_study(workdir, out, NAME, payload, render=render, placeholder=PLACEHOLDER, plot=plot, say=say,
                               started=started, argv=argv)


if __name__ == "__main__":
    main()
