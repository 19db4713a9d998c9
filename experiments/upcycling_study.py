"""Upcycling and assembly study: small dense moejax models trained on different slices of the standard library,
then combined in every way moejax offers; writes experiments/results/upcycling.{md,json,png}.

    python -m experiments.upcycling_study [--seeds 3] [--workdir runs/upcycling_study] [--out experiments/results]
        [--render_only]

Per training seed of ``SEEDS_PREREGISTERED`` (fixed before any run):

1. Domains (``domains``): 'lib', the standard library's top-level modules (``text:<stdlib>/[a-z]*.py``), and
   'tests', its test files (``text:<stdlib>/test/test_*.py``). Each keeps its own validation split (files picked
   by the hash of their path, ``data.val_fraction``); the mixture is a directory of links to the two domains'
   training files only (``mixture_glob``), so no model ever trains on a domain's held-out files.
2. A base model (``BUDGET``) trained on the mixture, then one branch per domain continued from it on that domain
   alone (``init_from='run:<base>'``, as BTX branches its experts from one seed model).
3. Rows, each evaluated on both domains' validation split and on the mixture (the mean of the two domain losses):
   each source alone; their parameter average; DUME (ridge-regression router, no training) and FlexOlmo-style
   domain-embedding routers (no training) from ``moejax.posthoc.assemble`` with each source's domain as its
   calibration data (training split); BTX (a fresh router, then the whole MoE trained on the mixture for
   ``post_steps``); sparse upcycling of source 'lib' (four copies of its FFN, top-2 renormalised, trained on the
   mixture for the same ``post_steps``) and, as the sparse-upcycling paper's baseline, the same source trained
   densely on the mixture for those steps.

Every run is a moejax training run in ``<workdir>/seed<s>/<row>`` (a finished one, with summary.json, is skipped;
an interrupted one resumes from its checkpoint) and every evaluated loss is cached in
``<workdir>/seed<s>/results.json``, so a rerun of the command does only what is missing. The page pairs rows
within training seeds (t-intervals, Holm over the page's claims) and is a function of its JSON
(``--render_only`` rewrites it).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sysconfig
import time
from typing import Any

import numpy as np

from experiments import posthoc_common as common
from experiments import posthoc_seeds

NAME = "upcycling"
PLACEHOLDER = "(not written yet)"
# The training seeds, fixed before the first run of this study.
SEEDS_PREREGISTERED = (0, 1, 2)
# The budget: a 2-layer byte-level model (d_model 64, SwiGLU 256) in batches of 8 x 128 bytes, sized so that the
# three seeds fit about 40 minutes of a shared 2-core CPU.
BUDGET = {"d_model": 64, "num_layers": 2, "num_heads": 2, "ffn_dim": 256, "batch_size": 8, "seq_len": 128,
          "base_steps": 300, "branch_steps": 200, "post_steps": 80, "base_lr": 3e-3, "branch_lr": 1e-3,
          "post_lr": 1e-3, "eval_tokens": 16384, "calib_tokens": 8192, "val_fraction": 0.05}
# Sparse upcycling and dense continued training start from the first domain's source ('lib').
# Sparse upcycling: 4 copies of the source's FFN, top-2 (renormalised), so that a token activates two FFNs as in the
# BTX row (top-2 of its two experts) while the router chooses between copies (with 2 copies and top-2 every copy would
# see every token, and the copies would stay equal).
UPCYCLED_EXPERTS = 4
LABELS = {"base": "base (mixture, before branching)", "average": "parameter average", "dume": "DUME (ridge router)",
          "flexolmo": "FlexOlmo-style (domain embeddings)", "btx": "BTX (router + MoE trained)",
          "upcycled": "sparse upcycling of source 0 (4 copies, top-2)", "dense_continued": "source 0 continued densely"}


def rows(names) -> list[str]:
    """The page's rows for domains ``names`` (source i is the model branched on domain i)."""
    return ["base", *(f"source:{n}" for n in names), "average", "dume", "flexolmo", "btx", "upcycled",
            "dense_continued"]


def label(row: str) -> str:
    return f"source '{row[7:]}' alone" if row.startswith("source:") else LABELS[row]
say = common.speaker(NAME)


def domains() -> dict[str, str]:
    """The two domains of the standard library this Python runs from: {name: 'text:<glob>'}."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return {"lib": f"text:{stdlib}/[a-z]*.py", "tests": f"text:{stdlib}/test/test_*.py"}


def mixture_glob(named: dict[str, str], root: pathlib.Path, val_fraction: float) -> str:
    """'text:<root>/*/*': a directory per domain holding links to that domain's training files (the files its
    'text:' corpus does not put in its validation split), so that training on the mixture never reads a domain's
    held-out files."""
    import glob

    from moejax.data import corpora

    for name, spec in named.items():
        pattern = os.path.expanduser(spec[len("text:"):])
        top = corpora._glob_root(pattern)
        target = root / name
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)):
            rel = pathlib.Path(path).relative_to(top).as_posix()
            link = target / rel.replace("/", "__")
            if not corpora._is_val(rel, val_fraction) and not link.exists():
                link.symlink_to(os.path.abspath(path))
    return f"text:{root}/*/*"


def run_config(budget: dict[str, Any], seed: int, data: str, steps: int, lr: float, data_dir: str | None,
               **fields: Any) -> Any:
    """A dense training config of the study's model on ``data``; ``fields``: dotted config fields to set
    (``model__moe__top_k`` style, '__' for '.')."""
    from moejax.configs import base

    config = base.get_config()
    config.seed = seed
    config.model.update(d_model=budget["d_model"], num_layers=budget["num_layers"], num_heads=budget["num_heads"],
                        ffn_dim=budget["ffn_dim"], moe_every=0, vocab_size=256)
    config.data.name = data
    config.data.eval_batches = 2
    config.data.val_fraction = budget["val_fraction"]
    if data_dir:
        config.data.dir = data_dir
    config.train.update(steps=steps, batch_size=budget["batch_size"], seq_len=budget["seq_len"], learning_rate=lr,
                        warmup_steps=max(1, min(20, steps // 10)), eval_every=0, log_every=max(1, steps // 4))
    config.checkpoint.every_steps = max(1, steps // 2)
    for dotted, value in fields.items():
        *parents, name = dotted.split("__")
        node = config
        for part in parents:
            node = node[part]
        node[name] = value
    return config


def train(config: Any, workdir: pathlib.Path, label: str) -> pathlib.Path:
    """Trains config in workdir (``moejax.training.loop.run``) unless it has finished (summary.json)."""
    from moejax.training import loop

    if not (workdir / "summary.json").exists():
        started = time.perf_counter()
        loop.run(config, workdir, config_name=label)
        say(f"trained {label} in {time.perf_counter() - started:.0f}s")
    return workdir


def study_seed(seed: int, workdir: pathlib.Path, budget: dict[str, Any], named: dict[str, str],
               data_dir: str | None) -> dict[str, dict[str, float]]:
    """{row: {domain: validation loss}} of one training seed (cached in <workdir>/results.json)."""
    import moejax
    from moejax import data as data_lib
    from moejax import evaluate
    from moejax.posthoc import assemble, capture
    from moejax.training import checkpoint

    cache = common.ResultCache(workdir)
    b = budget
    mixture = mixture_glob(named, workdir.parent / "mixture", b["val_fraction"])
    base_dir = train(run_config(b, seed, mixture, b["base_steps"], b["base_lr"], data_dir), workdir / "base",
                     f"base seed{seed}")
    sources = {}
    for name, spec in named.items():
        sources[name] = train(run_config(b, seed, spec, b["branch_steps"], b["branch_lr"], data_dir,
                                         init_from=f"run:{base_dir}"), workdir / f"source_{name}",
                              f"source {name} seed{seed}")
    windows = {}
    base_config, _ = moejax.load(base_dir)
    for name, spec in named.items():
        _, windows[name], _ = data_lib.checkpoint_windows(base_config, base_dir, data=spec,
                                                          max_tokens=b["eval_tokens"], data_dir=data_dir)

    evaluators: dict[str, Any] = {}  # one compiled evaluation per model config

    def score(row: str, config: Any, variables: Any) -> None:
        key = config.model.to_json()
        if key not in evaluators:
            evaluators[key] = evaluate.Evaluator(config)
        losses = {name: float(evaluators[key](variables, batches)["loss"]) for name, batches in windows.items()}
        losses["mixture"] = float(np.mean([losses[name] for name in named]))
        cache.put(row, losses)
        say(f"seed {seed} {row}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    loaded = {name: moejax.load(path) for name, path in sources.items()}
    if cache.get("base") is None:
        score("base", *moejax.load(base_dir))
    for name, (config, variables) in loaded.items():
        if cache.get(f"source:{name}") is None:
            score(f"source:{name}", config, variables)
    pairs = [loaded[name] for name in named]
    if cache.get("average") is None:
        config = pairs[0][0]
        variables = {"params": assemble._average([v["params"] for _, v in pairs])}
        score("average", config, variables)
    calib = None
    for recipe in ("dume", "flexolmo"):
        if cache.get(recipe) is None:
            if calib is None:
                calib = [capture.calibration_batches(config, sources[name], split="train", data=named[name],
                                                     max_tokens=b["calib_tokens"], data_dir=data_dir)[1]
                         for name, (config, _) in loaded.items()]
            score(recipe, *assemble.assemble(pairs, recipe, calib, seed=seed))
    btx_init = workdir / "btx_init"
    if not (btx_init / "config.json").exists():
        config, variables = assemble.assemble(pairs, "btx", seed=seed)
        checkpoint.save_variables(btx_init, config, variables)
    first = sources[next(iter(named))]
    post = {"btx": run_config(b, seed, mixture, b["post_steps"], b["post_lr"], data_dir, init_from=f"run:{btx_init}"),
            "upcycled": run_config(b, seed, mixture, b["post_steps"], b["post_lr"], data_dir,
                                   model__moe_every=1, model__moe__num_experts=UPCYCLED_EXPERTS, model__moe__top_k=2,
                                   model__moe__expert_ffn=b["ffn_dim"], model__moe__router__norm_topk_prob=True,
                                   upcycle__enabled=True, upcycle__dense_checkpoint=str(first),
                                   upcycle__granularity=1),
            "dense_continued": run_config(b, seed, mixture, b["post_steps"], b["post_lr"], data_dir,
                                          init_from=f"run:{first}")}
    for row, config in post.items():
        if cache.get(row) is None:
            path = train(config, workdir / row, f"{row} seed{seed}")
            score(row, *moejax.load(path))
    return {row: cache.get(row) for row in rows(named) if cache.get(row) is not None}


# ---------------------------------------------------------------------------------------------- the page

# (row, reference, what the paper reports) per claim; each claim says the row's mixture loss is lower.
CLAIMS = (
    ("dume", "average", "DUME (arXiv 2603.29765): the ridge router beats merging the experts' weights"),
    ("btx", "average", "BTX (arXiv 2403.07816): the MoE of the branches beats averaging them (BTM merge)"),
    ("flexolmo", "average", "FlexOlmo (arXiv 2507.07024): the MoE of the experts beats model merging"),
    ("btx", "upcycled", "BTX: at equal compute BTX beats sparse upcycling"),
    ("upcycled", "dense_continued", "sparse upcycling (arXiv 2212.05055): the upcycled MoE beats the dense "
                                    "model trained as long"),
    ("dume", "best_source", "DUME and FlexOlmo: the assembled MoE beats each expert alone on the mixture"),
    ("flexolmo", "best_source", "FlexOlmo: the assembled MoE beats each expert alone on the mixture"),
    ("dume", "btx", "DUME: training-free DUME outperforms its baselines, BTX's trained router among them"),
)


def _mixture(seeds: dict[str, dict[str, dict[str, float]]], row: str) -> dict[int, dict[str, float]]:
    out = {}
    for seed, by_row in seeds.items():
        if row == "best_source":
            values = [v["mixture"] for r, v in by_row.items() if r.startswith("source:")]
            if len(values) == 2:
                out[int(seed)] = {"val": min(values)}
        elif row in by_row:
            out[int(seed)] = {"val": by_row[row]["mixture"]}
    return out


def claims(payload: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row, reference, reported in CLAIMS:
        c = posthoc_seeds.paired_over_seeds(_mixture(payload["seeds"], row), _mixture(payload["seeds"], reference))
        c.update(row=row, reference=reference, reported=reported, lower=f"{row} lower", higher=f"{row} higher")
        out.append(c)
    return posthoc_seeds.decide(out)


def domain_order(payload: dict[str, Any]) -> list[str]:
    """The domains in the order the study ran them (source 0 first); the JSON's dicts are sorted by key."""
    return payload.get("domain_order") or list(payload["domains"])


def render(payload: dict[str, Any], findings: str) -> str:
    seeds, b = payload["seeds"], payload["budget"]
    order = domain_order(payload)
    every = rows(order)
    ran = [row for row in every if any(row in r for r in seeds.values())]
    lines = ["# Upcycling and assembling dense moejax models on two standard-library domains", "",
             f"Generated by `experiments/upcycling_study.py` on {payload['machine']} in {payload['seconds']:.0f} s "
             f"(CPU shared with other jobs, run under `nice`); training seeds {sorted(int(s) for s in seeds)} "
             f"(fixed before running: {list(SEEDS_PREREGISTERED)}).", "", "Command: `" + payload["command"] + "`",
             "", "<!-- findings:begin -->", findings.strip(), "<!-- findings:end -->", "", "## Setup", "",
             "Domains (byte tokens): " + "; ".join(f"'{k}' = `{payload['domains'][k]}`" for k in order)
             + ". Each domain's validation split is its own held-out files; the mixture that the base model, BTX, "
               "the upcycled and the dense-continued models train on links only the domains' training files. The "
               f"mixture loss is the mean of the two domain losses. Source 0 (the one sparse upcycling and dense "
               f"continuation start from) is '{order[0]}'.", "",
             f"Model: {b['num_layers']} layers, d_model {b['d_model']}, {b['num_heads']} heads, SwiGLU FFN "
             f"{b['ffn_dim']}, vocabulary 256 (bytes); batches of {b['batch_size']} x {b['seq_len']}. Base: "
             f"{b['base_steps']} steps on the mixture (lr {b['base_lr']:g}); each source: {b['branch_steps']} more "
             f"steps on its domain from the base (lr {b['branch_lr']:g}); BTX, sparse upcycling and dense "
             f"continuation: {b['post_steps']} steps on the mixture (lr {b['post_lr']:g}), so they share one budget. "
             f"Evaluation: {b['eval_tokens']:,} validation tokens per domain; DUME and FlexOlmo calibrate on "
             f"{b['calib_tokens']:,} training tokens of each source's domain.", "",
             f"Rows that ran: {', '.join(ran)}" + ("" if len(ran) == len(every) else
                                                   f"; not run: {', '.join(r for r in every if r not in ran)}") + ".",
             "", "## Validation loss (nats per byte; mean ± std over training seeds)", "",
             "| row | " + " | ".join(order) + " | mixture |", "|---|" + "---|" * (len(order) + 1)]
    for row in ran:
        cells = []
        for key in [*order, "mixture"]:
            values = [r[row][key] for r in seeds.values() if row in r]
            std = f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.4f}{std}")
        lines.append(f"| {label(row)} | " + " | ".join(cells) + " |")
    lines += ["", "## What the papers report, and whether it holds here", "",
              "Each claim compares mixture losses within training seeds (row − reference; negative: the row is "
              "better), a 95% t-interval over seeds and Holm over the page's claims at family-wise 0.05.", "",
              "| claim (paper) | row − reference | 95% interval | p | p (Holm) | verdict |",
              "|---|---|---|---|---|---|"]
    for c in claims(payload):
        mean = "–" if c.get("mean") is None else f"{c['mean']:+.4f}"
        lines.append(f"| {c['reported']} ({c['row']} vs {c['reference']}) | {mean} | {posthoc_seeds._interval(c)} | "
                     f"{posthoc_seeds._p(c.get('p'))} | {posthoc_seeds._p(c.get('p_holm'))} | {c['verdict']} |")
    n = len(seeds)
    lines += ["", f"With n = {n} training seeds a t-interval has {n - 1} degrees of freedom, and Holm over "
              f"{len(CLAIMS)} claims needs the per-seed differences to agree almost exactly before it resolves one; "
              "'not resolved' is not evidence of no effect. A resolved verdict holds for these tiny byte-level "
              "models, these two domains and this budget only." if n >= 2 else "One training seed: no interval.",
              "", "## Each domain against its own source", "",
              "Domain loss of a combined model minus the loss of the source branched on that domain (paired within "
              "seeds, 95% t-interval; positive: the combination lost some of the source's fit to its own domain). "
              "Not part of the claims above.", "",
              "| row | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for row in ("average", "dume", "flexolmo", "btx"):
        if row not in ran:
            continue
        cells = []
        for domain in order:
            def loss(name: str, d: str = domain) -> dict[int, dict[str, float]]:
                return {int(s): {"val": r[name][d]} for s, r in seeds.items() if name in r}

            c = posthoc_seeds.paired_over_seeds(loss(row), loss(f"source:{domain}"))
            cells.append("–" if c.get("mean") is None else f"{c['mean']:+.4f} {posthoc_seeds._interval(c)}")
        lines.append(f"| {label(row)} | " + " | ".join(cells) + " |")
    lines += ["", "![mixture loss per row](upcycling.png)", ""]
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    seeds = payload["seeds"]
    shown = [row for row in rows(domain_order(payload)) if any(row in r for r in seeds.values())]
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    for i, row in enumerate(shown):
        values = [r[row]["mixture"] for r in seeds.values() if row in r]
        ax.bar(i, np.mean(values), color="tab:blue", alpha=0.5)
        ax.plot([i] * len(values), values, "k.", ms=5)
    ax.set_xticks(range(len(shown)), [label(r) for r in shown], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("mixture validation loss (nats/byte)")
    low = min(r[row]["mixture"] for r in seeds.values() for row in shown if row in r)
    high = max(r[row]["mixture"] for r in seeds.values() for row in shown if row in r)
    ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    ax.set_title("mean over training seeds (bars), each seed (dots)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=len(SEEDS_PREREGISTERED), help="how many of SEEDS_PREREGISTERED")
    p.add_argument("--workdir", default="runs/upcycling_study")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--data_dir", default=None, help="where the prepared corpora are cached (data.dir)")
    p.add_argument("--domains", default="", help="name=text:<glob>,name=text:<glob> (default: stdlib lib, tests)")
    p.add_argument("--budget", default="", help="BUDGET overrides, key=value,... (e.g. base_steps=4)")
    p.add_argument("--compile_cache", default=None, help="JAX's persistent compilation cache (default: "
                   "moejax's, $MOEJAX_COMPILE_CACHE; 'off': none): the runs of one model shape compile once")
    p.add_argument("--render_only", action="store_true", help="rewrite the page from its JSON")
    args = p.parse_args(argv)
    if not 1 <= args.seeds <= len(SEEDS_PREREGISTERED):
        p.error(f"--seeds={args.seeds}: must be in 1..{len(SEEDS_PREREGISTERED)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    if args.render_only:
        common.rerender(out, NAME, render, PLACEHOLDER)
        return {}
    budget = common.parse_fields(args.budget, BUDGET)
    named = dict(item.split("=", 1) for item in args.domains.split(",")) if args.domains else domains()
    if len(named) != 2:
        raise SystemExit(f"--domains={args.domains!r}: needs two name=text:<glob> domains")
    from moejax import cli

    cli.enable_compile_cache(cli.default_compile_cache() if args.compile_cache is None else args.compile_cache)
    workdir = pathlib.Path(args.workdir)
    started = time.perf_counter()
    seeds = {}
    for seed in SEEDS_PREREGISTERED[:args.seeds]:
        seeds[str(seed)] = study_seed(seed, workdir / f"seed{seed}", budget, named, args.data_dir)
    payload = {"seeds": seeds, "budget": budget, "domains": named, "domain_order": list(named)}
    return common.finish_study(workdir, out, NAME, payload, render=render, placeholder=PLACEHOLDER, plot=plot, say=say,
                               started=started, argv=argv)


if __name__ == "__main__":
    main()
