"""Quantisation study: post-training quantisation (RTN, GPTQ, EAQuant at 8, 4 and mixed bits) and quantisation-aware
training against it, on the tiny DeepSeekMoE trained with three seeds and on a small Qwen3-MoE trained here and
imported from its transformers layout; writes experiments/results/quantisation.{md,json,png}.

    python -m experiments.quantisation_study [--checkpoints runs/posthoc_pages/seed0,...] [--budget k=v,...]
        [--out experiments/results] [--render_only]

Per model (each a training seed; every result cached in ``<model>/quantisation/results.json``, so a rerun resumes):

1. Calibration: ``calib_tokens`` tokens of the training split (``capture.calibration_batches``); evaluation: the
   validation windows (``data.eval_batches``), bits per byte (``moejax.evaluate``). Routing flips: the fraction of
   calibration tokens whose top-k expert set differs from the original model's, mean over the MoE layers.
2. PTQ of the MoE layers' weights, the other weights kept: rules ``experts=int<b>;shared=int<b>;router=int8`` (the
   router at 8 bits, as EAQuant's setting; ``shared`` where the model has shared experts) at b = 8 and 4, and
   'mixed': the routed experts' bits per expert among 2, 4, 8 at a budget of 4 mean bits (``moejax.quant.mixed``,
   HOBBIT's gate-weight importance), the rest as int4; each by RTN, GPTQ and EAQuant (``moejax.quant``).
3. QAT against PTQ at equal bits (the tiny DeepSeekMoE only): from each trained checkpoint, ``qat_steps`` more steps
   of ``python -m moejax.main`` (``init_from='run:'``) with ``quant.rules`` the int4 rules, with ``experts=ternary``
   (MoTE: ternary routed experts, the shared expert in full precision), and without quantisation (the control: the
   same steps in full precision); each trained model rounded to nearest with its rules (``posthoc quantise``'s
   RTN, which equals the QAT forward) and evaluated. PTQ of the control at int4 and ternary is the equal-budget
   baseline (same data, same steps).

The imported family: ``qwen3_seeds`` small Qwen3-MoE models (configs/qwen3_moe.py with ``qwen3_*`` sizes, byte tokens,
the same standard-library corpus) trained here for ``qwen3_steps`` steps, exported by ``moejax.hf.save`` (the
transformers ``qwen3_moe`` layout) and read back by ``moejax.load``: PTQ runs on the imported model.

Claims (fixed before running, ``CLAIMS``): paired over training seeds (t-interval of the per-seed differences, Holm
over the family; ``experiments.seed_stats``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
from typing import Any

import numpy as np

from experiments import posthoc_common as common
from experiments import seed_stats

NAME = "quantisation"
PLACEHOLDER = "(not written yet)"
METHODS = ("rtn", "gptq", "eaquant")
SETTINGS = ("int8", "int4", "mixed")
SEEDS_PREREGISTERED = (0, 1, 2)
BUDGET = {"calib_tokens": 2048, "eval_batches": 2, "qat_steps": 30, "qat_batch": 8, "qat_lr": 1e-3,
          "qwen3_seeds": 3, "qwen3_steps": 150, "qwen3_batch": 16, "qwen3_seq": 128, "qwen3_d_model": 64,
          "qwen3_experts": 16, "qwen3_top_k": 4, "qwen3_expert_ffn": 64, "qwen3_data": "stdlib", "data_dir": "",
          "mixed_choices": "2+4+8", "mixed_budget": 4.0, "methods": "+".join(METHODS), "settings": "+".join(SETTINGS),
          "gptq_settings": "int4+int8+mixed", "qat": 1, "qwen3_only": -1}
# (family, a, b, metric, what the paper says): a - b, lower is better for a (bits per byte, or routing flips)
CLAIMS = (
    ("deepseekmoe", "eaquant/int4", "rtn/int4", "bpb", "EAQuant (arXiv 2506.13329) beats its baseline PTQ"),
    ("deepseekmoe", "eaquant/int4", "gptq/int4", "bpb", "EAQuant beats GPTQ"),
    ("deepseekmoe", "eaquant/int4", "rtn/int4", "flips", "EAQuant keeps the routing (fewer flips)"),
    ("deepseekmoe", "rtn/mixed", "rtn/int4", "bpb", "HOBBIT (arXiv 2411.01433): importance-driven mixed precision "
                                                    "beats uniform bits at equal mean bits"),
    ("deepseekmoe", "gptq/mixed", "gptq/int4", "bpb", "HOBBIT's mixed precision, with GPTQ"),
    ("deepseekmoe", "qat/int4", "control_rtn/int4", "bpb", "QAT beats PTQ at equal bits and training"),
    ("deepseekmoe", "qat/ternary", "control_rtn/ternary", "bpb", "MoTE (arXiv 2506.14435): ternary experts trained "
                                                                 "with QAT beat ternary PTQ"),
    ("deepseekmoe", "qat/ternary", "control/fp", "bpb", "MoTE: ternary experts + a full-precision shared expert come "
                                                        "close to full precision (a gap, not a win, is expected)"),
    ("qwen3_moe", "eaquant/int4", "rtn/int4", "bpb", "EAQuant beats its baseline PTQ (imported family)"),
    ("qwen3_moe", "rtn/mixed", "rtn/int4", "bpb", "HOBBIT's mixed precision (imported family)"),
)
say = common.speaker(NAME)


def parse_budget(text: str) -> dict[str, Any]:
    return common.parse_fields(text, BUDGET)


def runs(budget: dict) -> list[tuple[str, str]]:
    """The (method, setting) pairs of the budget: GPTQ, the slowest method, only at ``gptq_settings``."""
    return [(m, s) for m in budget["methods"].split("+") for s in budget["settings"].split("+")
            if m != "gptq" or s in budget["gptq_settings"].split("+")]


def rules_for(config: Any, variables: dict[str, Any], setting: str) -> list[Any]:
    from moejax.quant import rules

    present = {m.target for m in rules.matrices(config, variables["params"])}
    if setting == "ternary":
        return rules.parse("experts=ternary")
    bits = 8 if setting == "int8" else 4
    text = f"experts=int{bits};router=int8" + (f";shared=int{bits}" if "shared" in present else "")
    return rules.parse(text)


class Model:
    """One model's data and reference numbers: its calibration and evaluation batches, evaluator and original
    bits per byte and routing."""

    def __init__(self, config: Any, variables: dict[str, Any], data_checkpoint: pathlib.Path, budget: dict) -> None:
        from moejax import data as data_lib
        from moejax import evaluate
        from moejax.posthoc import capture

        self.config, self.variables = config, variables
        data_config, self.batches, tokenizer = capture.calibration_batches(
            config, data_checkpoint, split="train", max_tokens=budget["calib_tokens"])
        data_config.data.eval_batches = budget["eval_batches"]
        self.evaluation = list(data_lib.eval_batches(data_config))
        self.evaluator = evaluate.Evaluator(config, bytes_table=evaluate.text_bytes_table(tokenizer,
                                                                                          config.model.vocab_size))

    def bpb(self, variables: dict[str, Any]) -> float:
        from moejax.quant import transform

        return float(self.evaluator(transform.on_device(variables), self.evaluation, with_load=False)["bits_per_byte"])

    def flips(self, variables: dict[str, Any]) -> float:
        from moejax.quant import metrics

        return float(np.mean(metrics.routing(self.config, self.variables, variables, self.batches)["flips"]))


def ptq(model: Model, method: str, setting: str, budget: dict) -> dict[str, Any]:
    from moejax.posthoc import importance
    from moejax.quant import eaquant, gptq, metrics, mixed, transform

    config, variables = model.config, model.variables
    rule_list = rules_for(config, variables, setting)
    expert_bits = None
    if setting == "mixed":
        choices = [int(b) for b in budget["mixed_choices"].split("+")]
        scores = importance.from_forward(config, variables, model.batches, "soft_count")
        expert_bits = mixed.from_importance(config, variables, scores, choices, budget["mixed_budget"])
    if method == "rtn":
        new, tensors = transform.quantize(config, variables, rule_list, expert_bits=expert_bits)
    elif method == "gptq":
        new, tensors, _ = gptq.quantize(config, variables, rule_list, model.batches, expert_bits=expert_bits)
    else:
        new, tensors, _ = eaquant.quantize(config, variables, rule_list, model.batches, expert_bits=expert_bits)
    size = metrics.model_bytes(variables, tensors)
    return {"bpb": model.bpb(new), "flips": model.flips(new), "bits_per_weight": size["bits_per_weight"],
            "bytes": size["quantised"]}


def finetune(checkpoint: pathlib.Path, workdir: pathlib.Path, rules_text: str, budget: dict) -> pathlib.Path:
    """``qat_steps`` more steps from the checkpoint (QAT with rules_text, or full precision with ''), same seed and
    data order for every variant."""
    from moejax.configs import base

    from moejax.training import loop

    if (workdir / "summary.json").exists():
        return workdir
    stored = json.loads((checkpoint / "config.json").read_text())
    config = base.get_config()
    config.data.update(stored["data"])
    config.update({"seed": 0, "init_from": f"run:{checkpoint}"})
    config.train.update(steps=budget["qat_steps"], batch_size=budget["qat_batch"], seq_len=stored["train"]["seq_len"],
                        learning_rate=budget["qat_lr"], warmup_steps=0, log_every=10, eval_every=0)
    config.checkpoint.every_steps = budget["qat_steps"]
    config.quant.update(rules=rules_text, ste="identity")
    loop.run(config, workdir)
    return workdir


def study_deepseek(checkpoint: pathlib.Path, budget: dict) -> dict[str, Any]:
    import moejax
    from moejax.quant import rules, transform

    cache = common.ResultCache(checkpoint / NAME)
    out = cache.section("results")
    qat_keys = ["qat/int4", "qat/ternary", "control/fp", "control_rtn/int4", "control_rtn/ternary"]
    needed = ["original", "rtn/ternary", *(f"{m}/{s}" for m, s in runs(budget)), *(qat_keys if budget["qat"] else [])]
    if all(key in out for key in needed):
        return {"checkpoint": str(checkpoint), "results": out}
    config, variables = moejax.load(checkpoint)
    model = Model(config, variables, checkpoint, budget)
    if "original" not in out:
        out["original"] = {"bpb": model.bpb(variables), "flips": 0.0}
        cache.save()
    for method, setting in runs(budget):
        key = f"{method}/{setting}"
        if key not in out:
            t0 = time.perf_counter()
            out[key] = ptq(model, method, setting, budget)
            cache.save()
            say(f"{checkpoint.name} {key}: bpb {out[key]['bpb']:.4f}, flips {out[key]['flips']:.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    int4 = ";".join(f"{r.target}={r.format}" for r in rules_for(config, variables, "int4"))
    variants = {"qat/int4": int4, "qat/ternary": "experts=ternary", "control": ""} if budget["qat"] else {}
    for name, text in variants.items():
        key = name if name != "control" else "control/fp"
        if key in out and (name != "control" or "control_rtn/ternary" in out):
            continue
        workdir = finetune(checkpoint, checkpoint / NAME / name.replace("/", "_"), text, budget)
        trained_config, trained = moejax.load(workdir)
        if name == "control":
            out["control/fp"] = {"bpb": model.bpb(trained), "flips": model.flips(trained)}
            for setting in ("int4", "ternary"):
                new, _ = transform.quantize(trained_config, trained, rules_for(trained_config, trained, setting))
                out[f"control_rtn/{setting}"] = {"bpb": model.bpb(new), "flips": model.flips(new)}
        else:
            new, _ = transform.quantize(trained_config, trained, rules.parse(text))
            out[key] = {"bpb": model.bpb(new), "flips": model.flips(new)}
        cache.save()
        say(f"{checkpoint.name} {name}: done")
    if "rtn/ternary" not in out:
        new, _ = transform.quantize(config, variables, rules_for(config, variables, "ternary"))
        out["rtn/ternary"] = {"bpb": model.bpb(new), "flips": model.flips(new)}
        cache.save()
    return {"checkpoint": str(checkpoint), "results": out}


def qwen3_config(seed: int, budget: dict) -> Any:
    """configs/qwen3_moe.py:small at the budget's sizes, byte tokens on ``qwen3_data``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qwen3_moe", pathlib.Path(__file__).parents[1] / "configs" /
                                                  "qwen3_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("small")
    d = budget["qwen3_d_model"]
    config.model.update(vocab_size=256, d_model=d, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=d // 4,
                        ffn_dim=4 * d)
    config.model.moe.update(num_experts=budget["qwen3_experts"], top_k=budget["qwen3_top_k"],
                            expert_ffn=budget["qwen3_expert_ffn"])
    config.data.update(name=budget["qwen3_data"], tokenizer="bytes", dir=budget["data_dir"])
    config.train.update(steps=budget["qwen3_steps"], batch_size=budget["qwen3_batch"], seq_len=budget["qwen3_seq"],
                        log_every=50, eval_every=0)
    config.checkpoint.every_steps = budget["qwen3_steps"]
    config.seed = seed
    return config


def study_qwen3(root: pathlib.Path, seed: int, budget: dict) -> dict[str, Any]:
    import moejax
    from moejax import hf
    from moejax.training import loop

    workdir = root / f"qwen3_moe_seed{seed}"
    if not (workdir / "summary.json").exists():
        loop.run(qwen3_config(seed, budget), workdir)
    exported = workdir / "hf"
    if not (exported / "config.json").exists():
        hf.save(*moejax.load(workdir), exported)
    cache = common.ResultCache(workdir / NAME)
    out = cache.section("results")
    if all(key in out for key in ["original", *(f"{m}/{s}" for m, s in runs(budget))]):
        return {"checkpoint": str(exported), "results": out}
    config, variables = moejax.load(exported)  # the imported model
    model = Model(config, variables, workdir, budget)
    if "original" not in out:
        out["original"] = {"bpb": model.bpb(variables), "flips": 0.0}
        cache.save()
    for method, setting in runs(budget):
        key = f"{method}/{setting}"
        if key not in out:
            out[key] = ptq(model, method, setting, budget)
            cache.save()
            say(f"qwen3 seed {seed} {key}: bpb {out[key]['bpb']:.4f}, flips {out[key]['flips']:.3f}")
    return {"checkpoint": str(exported), "results": out}


def _values(seeds: list[dict], key: str, metric: str) -> dict[int, dict[int, float]]:
    """{training seed: {0: value}}: one calibration set per seed."""
    return {i: {0: s["results"][key][metric]} for i, s in enumerate(seeds) if key in s["results"]}


def claims(payload: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for family, a, b, metric, reported in CLAIMS:
        seeds = payload["families"].get(family, [])

        c = seed_stats.paired_over_seeds(_values(seeds, a, metric), _values(seeds, b, metric))
        c.update(family=family, a=a, b=b, metric=metric, reported=reported, lower=f"{a} lower",
                 higher=f"{a} higher")
        out.append(c)
    return seed_stats.decide(out)


def cell(seeds: list[dict], key: str, metric: str, digits: int = 4) -> str:
    values = [s["results"][key][metric] for s in seeds if metric in s["results"].get(key, {})]
    if not values:
        return "–"
    spread = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{np.mean(values):.{digits}f}{spread}"


def render(payload: dict[str, Any], findings: str) -> str:
    b = payload["budget"]
    fams = payload["families"]
    decided = claims(payload)
    lines = ["# Quantising MoE models: RTN, GPTQ, EAQuant, mixed precision and QAT", "",
             f"Generated by `experiments/quantisation_study.py` on {payload['machine']} "
             + (f"in {payload['seconds']:.0f} s " if payload.get("seconds") is not None else
                "from the per-model result caches (`--collect`: the models were computed by several resumed runs, "
                "one process per model) ")
             + "(CPU shared with other jobs, run under `nice`); training seeds fixed before running: "
             f"{list(SEEDS_PREREGISTERED)}.", "", "Command: `" + payload["command"] + "`", "",
             "<!-- findings:begin -->", findings.strip(), "<!-- findings:end -->", "", "## Setup", "",
             "- **deepseekmoe**: the tiny DeepSeekMoE of `experiments/posthoc_pages.py` (configs/deepseekmoe.py:tiny, "
             "4 MoE layers of 63 routed experts (top-7) and one shared expert, BPE 8192 on the standard-library "
             "corpus, 250 steps), one model per training seed.",
             f"- **qwen3_moe**: a small Qwen3-MoE layout trained here ({b['qwen3_steps']} steps of "
             f"{b['qwen3_batch']} x {b['qwen3_seq']} byte tokens, d_model {b['qwen3_d_model']}, 2 layers of "
             f"{b['qwen3_experts']} experts top-{b['qwen3_top_k']} of width {b['qwen3_expert_ffn']}), exported to a "
             "transformers `qwen3_moe` directory by `moejax.hf.save` and imported back by `moejax.load`: the PTQ "
             "runs on the imported model. It is a moejax-trained model in a released family's layout, not a "
             "released checkpoint.",
             f"- Calibration: {b['calib_tokens']:,} tokens of the training split; evaluation: {b['eval_batches']} "
             "validation batches; bits per byte of the validation text. Routing flips: the fraction of calibration "
             "tokens whose top-k expert set differs from the original model's (mean over MoE layers).",
             "- PTQ rules: `experts=int<b>;shared=int<b>;router=int8` (attention, embeddings and the LM head kept), "
             f"b = 8 or 4; 'mixed': the routed experts' bits per expert among {b['mixed_choices'].replace('+', ', ')} "
             f"at a mean of "
             f"{b['mixed_budget']:g} bits (HOBBIT-style importance, `moejax.quant.mixed`), the rest as int4. "
             "Methods: round to nearest, GPTQ (routed experts on their own tokens) and EAQuant as implemented for "
             "weight-only quantisation (docs/methods.md lists its departures from the authors' W4A4 code)."
             + ("" if set(b.get("gptq_settings", "").split("+")) >= set(b["settings"].split("+")) else
                f" GPTQ ran only at {b['gptq_settings'].replace('+', ', ')}, so its other cells and claims are "
                "empty."),
             f"- QAT (deepseekmoe): {b['qat_steps']} more steps from each checkpoint (batch {b['qat_batch']}, lr "
             f"{b['qat_lr']:g}, constant) with the int4 rules (`qat/int4`), with `experts=ternary` (`qat/ternary`, "
             "MoTE's ternary routed experts, shared expert in full precision), and in full precision (`control/fp`); "
             "the QAT models rounded to nearest with their rules; `control_rtn/*` is the control rounded to nearest "
             "at the same formats: PTQ at the same bits after the same training.", ""]
    for family, seeds in fams.items():
        keys = ["original"] + [f"{m}/{s}" for m in METHODS for s in SETTINGS]
        if family == "deepseekmoe":
            keys += ["rtn/ternary", "control/fp", "control_rtn/int4", "qat/int4", "control_rtn/ternary",
                     "qat/ternary"]
        lines += [f"## {family}: bits per byte and routing flips ({len(seeds)} seeds, mean ± std over seeds)", "",
                  "| model | bits/byte | − original (mean over seeds) | routing flips | bits per quantised weight |",
                  "|---|---|---|---|---|"]
        for key in keys:
            deltas = [s["results"][key]["bpb"] - s["results"]["original"]["bpb"] for s in seeds if key in s["results"]]
            delta = f"{np.mean(deltas):+.5f}" if deltas else "–"
            lines.append(f"| {key} | {cell(seeds, key, 'bpb')} | {delta} | {cell(seeds, key, 'flips', 3)} | "
                         f"{cell(seeds, key, 'bits_per_weight', 2) if key.split('/')[0] in METHODS else '–'} |")
        lines.append("")
    lines += ["## Claims", "", "Paired differences a − b over training seeds (95% t-interval), Holm over the "
              f"{len(decided)} claims (family-wise alpha 0.05).", "",
              "| family | claim (paper) | a − b | metric | mean | 95% interval | p | p (Holm) | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in decided:
        lines.append(f"| {c['family']} | {c['reported']} | {c['a']} − {c['b']} | {c['metric']} | "
                     f"{seed_stats.fixed(c.get('mean'), 4)} | {seed_stats.interval(c)} | "
                     f"{seed_stats.p_text(c.get('p'))} | {seed_stats.p_text(c.get('p_holm'))} | {c['verdict']} |")
    n = min((len(s) for s in fams.values()), default=0)
    if n >= 2:
        lines += ["", seed_stats.n_sentence(n, len(decided))]
    lines += ["", f"![bits per byte]({NAME}.png)", ""]
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = {family: seeds for family, seeds in payload["families"].items() if seeds}
    fig, axes = plt.subplots(1, len(fams), figsize=(6 * len(fams), 4), squeeze=False)
    for ax, (family, seeds) in zip(axes[0], fams.items(), strict=True):
        x = np.arange(len(SETTINGS))
        for i, method in enumerate(METHODS):
            means = [np.mean([s["results"][f"{method}/{st}"]["bpb"] - s["results"]["original"]["bpb"]
                              for s in seeds if f"{method}/{st}" in s["results"]] or [np.nan]) for st in SETTINGS]
            ax.bar(x + (i - 1) * 0.25, means, 0.25, label=method)
        ax.set_xticks(x, SETTINGS)
        ax.set_ylabel("bits/byte − original")
        ax.set_title(family)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=",".join(f"runs/posthoc_pages/seed{s}" for s in SEEDS_PREREGISTERED))
    parser.add_argument("--qwen3_root", default="runs/quantisation_study")
    parser.add_argument("--budget", default="", help=f"k=v,... overriding {BUDGET} (lists joined by '+')")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--render_only", action="store_true")
    parser.add_argument("--collect", action="store_true", help="the page from the models' cached results as they "
                                                               "stand, computing nothing")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.render_only:
        return common.rerender(out, NAME, render, PLACEHOLDER)
    budget = parse_budget(args.budget)
    started = time.perf_counter()
    qwen3_seeds = [seed for seed in SEEDS_PREREGISTERED[:budget["qwen3_seeds"]] if budget["qwen3_only"] in (-1, seed)]
    checkpoints = [pathlib.Path(c) for c in args.checkpoints.split(",") if c]
    if args.collect:
        def cached(model: pathlib.Path, shown: pathlib.Path) -> dict[str, Any]:
            return {"checkpoint": str(shown), "results": common.ResultCache(model / NAME).section("results")}

        qwen3 = [pathlib.Path(args.qwen3_root) / f"qwen3_moe_seed{seed}" for seed in qwen3_seeds]
        families = {"deepseekmoe": [cached(c, c) for c in checkpoints],
                    "qwen3_moe": [cached(w, w / "hf") for w in qwen3]}
    else:
        families = {"deepseekmoe": [study_deepseek(c, budget) for c in checkpoints],
                    "qwen3_moe": [study_qwen3(pathlib.Path(args.qwen3_root), seed, budget) for seed in qwen3_seeds]}
    payload = {"families": families, "budget": budget,
               "seconds": None if args.collect else time.perf_counter() - started,
               "machine": f"{platform.machine()} ({platform.processor() or 'cpu'})",
               "command": " ".join(["python -m experiments.quantisation_study", *(sys.argv[1:] if argv is None
                                                                                     else argv)])}
    out.mkdir(parents=True, exist_ok=True)
    plot(payload, out / f"{NAME}.png")
    common.write_page(out, NAME, payload, render, PLACEHOLDER)
    return payload


if __name__ == "__main__":
    main()
