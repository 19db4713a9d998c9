"""Both post-hoc results pages (``experiments/results/posthoc_compression.md``, ``posthoc_routing.md``) from the
tiny DeepSeekMoE trained once per training seed, by one command:

    python -m experiments.posthoc_pages [--train_seeds 3] [--workdir runs/posthoc_pages] [--steps 250]
        [--out experiments/results] [--stage all|train|studies|pages]

1. Training: ``configs/deepseekmoe.py:tiny`` with the ablation tables' corpus (``experiments.tables.CORPUS``: the
   stdlib corpus in ``bpe:8192`` tokens, ``model.vocab_size`` 8192) and ``BUDGET`` below, once per seed of
   ``TRAIN_SEEDS_PREREGISTERED`` (fixed before any of these runs, as ``SEEDS_PREREGISTERED`` in the tables), through
   ``experiments.runner.run_all``: a run whose ``summary.json`` matches its overrides is skipped, an interrupted one
   resumes from its newest checkpoint.
2. Studies: ``experiments.posthoc_compression`` and ``experiments.posthoc_routing`` on every trained checkpoint, with
   the grids of ``COMPRESSION_ARGS`` and ``ROUTING_ARGS`` (chosen to fit the measured budget, see the pages). Each
   study caches every finished result in ``<checkpoint>/<study>/results.json`` and skips it on a rerun; its
   per-checkpoint page goes to ``<checkpoint>/<study>/page``.
3. Pages: each page from the results of all training seeds (``experiments.posthoc_seeds`` pools them: per training
   seed the mean over calibration sets, then paired t-intervals over training seeds, Holm over each page's claims).

Every stage prints progress lines; a rerun of the command skips what is done.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

from experiments import posthoc_common as common
from experiments import runner, tables

NAME = "posthoc_pages"
CONFIG = "configs/deepseekmoe.py:tiny"
# The training seeds, fixed before the first of these runs trained. 3 seeds: the unit every pooled comparison of
# both pages resamples over.
TRAIN_SEEDS_PREREGISTERED = (0, 1, 2)
# The training budget: measured on this machine (2 shared CPU cores) at about 0.6 steps/s (2,500 BPE tokens/s) for
# this model, so 250 steps (1,024,000 tokens) take about 7 minutes per seed; the tiny preset's 400 would not fit
# three seeds and both studies into the 70-minute budget of the whole command.
STEPS = 250
BUDGET = {"train.eval_every": 0, "train.log_every": 10, "data.eval_batches": 8, "checkpoint.every_steps": 50}
# The studies' grids (fewer cells, three training seeds): see the pages' setup sections for the measured cost.
COMPRESSION_ARGS = ["--seeds", "2", "--calib_batches", "2", "--fractions", "0.75,0.5,0.25",
                    "--methods", "frequency,soft_count,reap,easy_ep,mcsmoe,hcsmoe", "--no_super"]
ROUTING_ARGS = ["--max_tokens", "32768", "--eval_tokens", "16384", "--keywords", "def,return",
                "--random_draws", "2", "--betas", "0,0.5,1.0", "--max_new", "32", "--no_release"]
say = common.speaker(NAME)


def training_runs(workdir: pathlib.Path, seeds: tuple[int, ...], steps: int) -> list[runner.Run]:
    """One ``runner.Run`` per training seed: the tiny DeepSeekMoE on the tables' BPE corpus with BUDGET."""
    config = runner.load_config(CONFIG)
    overrides = {"seed": None, **tables.CORPUS, **BUDGET, "train.steps": steps}
    runs = []
    for seed in seeds:
        overrides["seed"] = seed
        runs.append(runner.Run(f"deepseekmoe seed{seed}", CONFIG, workdir / f"seed{seed}",
                               {field: runner.typed_value(config, field, value, NAME)
                                for field, value in overrides.items()}))
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--train_seeds", type=int, default=len(TRAIN_SEEDS_PREREGISTERED),
                   help="how many of TRAIN_SEEDS_PREREGISTERED to train and pool")
    p.add_argument("--workdir", default="runs/posthoc_pages", help="where the trained runs go (one per seed)")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
    p.add_argument("--data_dir", default=None, help="where the prepared corpus is cached (data.dir)")
    p.add_argument("--out", default="experiments/results", help="where the two pages, their JSON and plots go")
    p.add_argument("--stage", default="all", choices=("all", "train", "studies", "pages"),
                   help="'all' (default): train, run the studies, write the pages; or one stage alone")
    args = p.parse_args(argv)
    if not 1 <= args.train_seeds <= len(TRAIN_SEEDS_PREREGISTERED):
        p.error(f"--train_seeds={args.train_seeds}: must be in 1..{len(TRAIN_SEEDS_PREREGISTERED)} (the seeds are "
                "fixed in TRAIN_SEEDS_PREREGISTERED)")
    return args


def command(argv: list[str] | None) -> str:
    return " ".join([f"python -m experiments.{NAME}", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = TRAIN_SEEDS_PREREGISTERED[:args.train_seeds]
    workdir = pathlib.Path(args.workdir)
    runs = training_runs(workdir, seeds, args.steps)
    started = time.perf_counter()
    if args.stage in ("all", "train"):
        say(f"training {len(runs)} runs of {CONFIG} ({args.steps} steps, {tables.CORPUS['data.tokenizer']}) in "
            f"{workdir}")
        if args.data_dir:
            for run in runs:
                run.overrides["data.dir"] = args.data_dir
        outcomes = runner.run_all(runs, 1, name=f"{NAME} training")
        failed = [o.run.label for o in outcomes if o.status == "failed"]
        if failed:
            say(f"training failed for {failed}: the studies run on the others")
    finished = [run for run in runs if run.summary_path.exists()]
    data_dir = ["--data_dir", args.data_dir] if args.data_dir else []
    if args.stage in ("all", "studies"):
        from experiments import posthoc_compression, posthoc_routing

        for i, run in enumerate(finished):
            say(f"[{i + 1}/{len(finished)}] compression study on {run.workdir}")
            posthoc_compression.main(["--checkpoint", str(run.workdir), *COMPRESSION_ARGS, *data_dir,
                                      "--compile_cache", str(workdir / "jax_cache"),
                                      "--out", str(run.workdir / posthoc_compression.NAME / "page")])
            say(f"[{i + 1}/{len(finished)}] routing study on {run.workdir}")
            posthoc_routing.main(["--checkpoint", str(run.workdir), *ROUTING_ARGS, *data_dir,
                                  "--out", str(run.workdir / posthoc_routing.NAME / "page")])
    if args.stage in ("all", "pages"):
        from experiments import posthoc_seeds

        meta: dict[str, Any] = {"command": command(argv), "train_seeds": list(seeds), "steps": args.steps,
                                "config": CONFIG, "corpus": tables.CORPUS, "budget": BUDGET,
                                "compression_args": COMPRESSION_ARGS, "routing_args": ROUTING_ARGS,
                                "runs": [str(run.workdir) for run in runs]}
        for path in posthoc_seeds.write_pages([run.workdir for run in runs], meta, pathlib.Path(args.out), say):
            say(f"wrote {path}")
    say(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
