"""Post-hoc expert compression of a trained MoE model: validation bits per byte against the fraction of routed
experts kept, for four pruning criteria and two merging methods over several calibration sets, and the
super-expert ablation (issue 17, items 4 and 5).

    python -m experiments.posthoc_compression --checkpoint=runs/deepseekmoe [--seeds 3] [--calib_batches 4]
        [--fractions 1,0.75,0.5,0.25] [--methods frequency,soft_count,reap,easy_ep,mcsmoe,hcsmoe]
        [--random_draws 5] [--eval_batches 0] [--data_dir DIR] [--out experiments/results] [--render_only]

Compression grid: for every method, every fraction f of the E routed experts (n = round(f * E) kept per MoE layer)
and every calibration seed s:

* pruning by every criterion of ``moejax.posthoc.importance.CRITERIA`` (``frequency``, ``soft_count``, ``reap``,
  ``easy_ep``): ``importance.from_forward`` on the calibration set, ``prune.keep_by_score`` (the n best experts of
  every layer), ``prune.prune``;
* merging: ``merge.mcsmoe`` with the routing trace of the calibration set (``moejax.posthoc.record``) and its
  tokens' router logits (``merge.router_logits``: the authors' router-logit similarity; their global group counts,
  uneven per layer, averaging n per layer; neurons aligned to each layer's first expert, ``align='first'``) and
  ``merge.hcsmoe`` with ``importance.expert_mean_outputs`` (average linkage, frequency-weighted, as the
  ``python -m moejax.posthoc merge`` command does). Merges keep the router's E logical experts and bind each group
  member to its merged expert (``moejax.moe.expert_map``); every result records the routed experts each MoE layer
  stores, S_l (``expert_map.stored_count``), their sum and the model's parameter count, so methods are compared at
  equal stored experts;
* then ``moejax.evaluate.Evaluator`` (one per compressed config, compiled once) on the run's validation windows
  (``moejax.data.checkpoint_windows``: ``data.eval_batches`` of the run unless ``--eval_batches``): bits per byte.

Calibration set of seed s: the first ``--calib_batches`` batches of the TRAINING split's iterator
(``moejax.posthoc.capture.calibration_batches`` with ``split='train'``, ``seed=1000 + s``), in the run's batch shape
(``--calib_batch_size``, default the run's ``train.batch_size``), the inputs ``[:, :-1]`` of each window: disjoint
from the validation windows every result is evaluated on.

Super experts: ``super_experts.find`` over the union of the calibration sets (the paper's rule, P99.5 and max/10),
the flagged experts per calibration seed (stability), and ``rule='top_n'`` for n = 1..3. Every flagged set S of
n experts is ablated two ways: silenced by the routing intervention (``moejax.moe.intervention.mask_experts``: S is
never selected, the next-ranked experts take its slots) and zeroed as the paper's code does (the down-projection
``wo`` of each expert set to 0: still selected, its slots contribute nothing); each against ``--random_draws``
random sets of n experts drawn from the experts no rule flagged, anywhere in the model ('random') and in the
same layers as S ('random, same layers'); the original model's Evaluator under the intervention gives the bits per
byte (experiments/posthoc_super_experts.py).

Resumable: every finished result is stored in ``<checkpoint>/posthoc_compression/results.json`` as soon as it
is done (with the calibration statistics of each seed beside it), so a rerun of the same command skips it; a
progress line is printed per result. Outputs in ``--out``: ``posthoc_compression.md`` (the page; the text between
``<!-- findings:begin -->`` and ``<!-- findings:end -->`` of an existing page is kept), ``posthoc_compression.json``,
``posthoc_compression.png`` (bits/byte against the fraction kept), ``posthoc_compression_super_experts.png``
(the profile) and ``posthoc_compression_super_ablation.png``. ``--render_only`` rewrites the page from the JSON in
``--out`` alone (experiments/posthoc_compression_page.py renders it).
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from experiments import posthoc_common as common
from experiments import posthoc_super_experts
from moejax.posthoc import importance

NAME = "posthoc_compression"
PRUNE_METHODS = tuple(importance.CRITERIA)  # every importance criterion prunes
MERGE_METHODS = ("mcsmoe", "hcsmoe")
METHODS = PRUNE_METHODS + MERGE_METHODS
LABELS = {"frequency": "prune: frequency", "soft_count": "prune: soft count", "reap": "prune: REAP",
          "easy_ep": "prune: EASY-EP", "mcsmoe": "merge: MC-SMoE", "hcsmoe": "merge: HC-SMoE"}
FRACTIONS = (1.0, 0.75, 0.5, 0.25)
CALIB_SEED_OFFSET = 1000
CALIBRATION_SPLIT, EVAL_SPLIT = "train", "validation"  # calibration never sees the windows that are evaluated
PLACEHOLDER = "(not written yet)"  # the findings of a new page
say = common.speaker(NAME)


def label(method: str) -> str:
    """The method's name on the page and the plot (a criterion without a LABELS entry: 'prune: <criterion>')."""
    return LABELS.get(method, f"prune: {method}")


def cell_key(method: str, kept: int, seed: int) -> str:
    """The cache key of one result of the grid."""
    return f"{method}/{kept}/{seed}"


def calibration_batches(config: ml_collections.ConfigDict, seed: int, num_batches: int,
                        batch_size: int) -> list[np.ndarray]:
    """The model inputs [B, S] of the first ``num_batches`` batches of the CALIBRATION_SPLIT (training) split's
    iterator with ``config.seed`` = 1000 + seed (``capture.calibration_batches``; config: the data config, its
    tokenizer pinned)."""
    from moejax.posthoc import capture

    batch_size = batch_size or config.train.batch_size
    _, batches, _ = capture.calibration_batches(config, split=CALIBRATION_SPLIT, seed=CALIB_SEED_OFFSET + seed,
                                                max_tokens=num_batches * batch_size * config.train.seq_len,
                                                batch_size=batch_size)
    return batches


def calibration_stats(cache: common.ResultCache, config: ml_collections.ConfigDict, variables: dict[str, Any],
                      batches: list[np.ndarray], seed: int, methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Per seed, what ``methods`` need, each computed once and stored in the cache: the importance scores [L, E] of
    the pruning criteria among ``methods`` and always 'frequency' (HC-SMoE weighs by it), in one forward pass; the
    experts' mean outputs [L, E, D] (HC-SMoE); the routing trace (MC-SMoE; a directory, complete once its marker
    file exists)."""
    from moejax.posthoc import capture, read_trace

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
    if "mcsmoe" in methods and not any(key.startswith("router_logits_") for key in stored):
        from moejax.posthoc import merge

        t0 = time.perf_counter()
        for layer, logits in merge.router_logits(config, variables, batches).items():
            stored[f"router_logits_{layer}"] = logits
        stored["seconds_logits"] = seconds["logits"] = time.perf_counter() - t0
        np.savez(path, **stored)
        done.append(f"router logits {seconds['logits']:.1f}s")
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
        say(f"calibration seed {seed}: {sum(b.size for b in batches):,} tokens, " + ", ".join(done))
    total = sum(float(stored[key]) for key in ("seconds_scores", "seconds_means", "seconds_trace", "seconds_logits")
                if key in stored)
    if "seconds" in stored:  # written by the first version of this script: all three at once
        total = float(stored["seconds"])
    return {"scores": {c: stored[f"score_{c}"] for c in PRUNE_METHODS if f"score_{c}" in stored},
            "mean_outputs": stored.get("mean_outputs"),
            "router_logits": {int(key.rsplit("_", 1)[1]): stored[key] for key in stored
                              if key.startswith("router_logits_")} or None,
            "trace": read_trace(trace_dir) if marker.exists() else None, "seconds": total}


def compress(method: str, kept: int, config: ml_collections.ConfigDict, variables: dict[str, Any],
             stats: dict[str, Any]) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, variables) of the model compressed to ``kept`` routed experts per MoE layer by ``method``."""
    from moejax import model
    from moejax.posthoc import merge, prune

    layers = model.moe_layers(config.model)
    if method in PRUNE_METHODS:
        keep = prune.keep_by_score(stats["scores"][method], kept, layers=layers)
        return prune.prune(config, variables, keep)
    if method == "mcsmoe":
        return merge.mcsmoe(config, variables, stats["trace"], kept, router_logits=stats["router_logits"])
    if method == "hcsmoe":
        return merge.hcsmoe(config, variables, stats["mean_outputs"], kept, linkage="average",
                            frequencies=stats["scores"]["frequency"], layers=layers)
    raise ValueError(f"unknown method {method!r}: allowed are {METHODS}")


def stored_experts(config: ml_collections.ConfigDict) -> list[int]:
    """The routed experts each MoE layer of a (compressed) model stores, S_l
    (``moejax.moe.expert_map.stored_count``): a merged model binds several logical experts to one stored expert,
    so its S_l counts the merged experts, not the router's E logical ones."""
    from moejax import model
    from moejax.moe import expert_map

    return [expert_map.stored_count(config.model.moe, layer) for layer in model.moe_layers(config.model)]


def kept_count(num_experts: int, fraction: float) -> int:
    """Routed experts kept per MoE layer at ``fraction``: round(num_experts * fraction), at least 1."""
    return max(1, int(math.floor(num_experts * fraction + 0.5)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained moejax workdir (not needed with --render_only)")
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
    p.add_argument("--render_only", action="store_true", help=f"rewrite --out's {NAME}.md from its {NAME}.json "
                   "(no checkpoint, nothing computed, the plots left as they are)")
    args = p.parse_args(argv)
    if not args.render_only and not args.checkpoint:
        p.error("--checkpoint is required (except with --render_only)")
    return args


def write_outputs(cache: common.ResultCache, meta: dict[str, Any], out_dir: pathlib.Path) -> dict[str, Any]:
    """The plots, the JSON and the page of the cached results; returns the page's summary."""
    from experiments import posthoc_compression_page as page

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = page.summarise(cache.data, meta)
    page.plot_curves(summary, out_dir / f"{NAME}.png")
    if summary.get("super_rows"):
        posthoc_super_experts.plot_ablation(summary, out_dir / f"{NAME}_super_ablation.png")
        info = cache.get("super_profile")
        if info is not None:
            posthoc_super_experts.plot_profile(info["paper"], out_dir / f"{NAME}_super_experts.png")
    common.write_page(out_dir, NAME, {"summary": summary, "results": cache.section("results")}, page.render_page,
                      PLACEHOLDER)
    return summary


def _command(argv: list[str] | None) -> str:
    return " ".join(["python -m experiments.posthoc_compression", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = pathlib.Path(args.out)
    if args.render_only:
        from experiments import posthoc_compression_page as page

        if not (out_dir / f"{NAME}.json").exists():
            print(f"error: --render_only: {out_dir / (NAME + '.json')} does not exist", file=sys.stderr)
            return 2
        say(f"wrote {common.rerender(out_dir, NAME, page.render_page, PLACEHOLDER)}")
        return 0
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
    cache = common.ResultCache(checkpoint / NAME)
    results = cache.section("results")

    import jax

    if args.compile_cache != "none" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # same-shape models reuse their compiled evaluation (process-wide setting: tests pass none)
        jax.config.update("jax_compilation_cache_dir", args.compile_cache or str(cache.root / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import moejax
    from moejax import data, evaluate, model
    from moejax.training import checkpoint as checkpoint_lib

    started = time.perf_counter()
    config, variables = moejax.load(checkpoint)
    config, val, tokenizer = data.checkpoint_windows(
        config, checkpoint, max_tokens=args.eval_batches * config.train.batch_size * config.train.seq_len,
        data_dir=args.data_dir)
    bytes_table = evaluate.text_bytes_table(tokenizer, config.model.vocab_size)
    evaluators: dict[str, evaluate.Evaluator] = {}

    def bits_per_byte(cfg: ml_collections.ConfigDict, values: dict[str, Any], intervention: Any = None) -> float:
        """Validation bits per byte of a model under an intervention: one Evaluator (compiled once) per config."""
        key = cfg.to_json_best_effort(sort_keys=True)
        if key not in evaluators:
            evaluators[key] = evaluate.Evaluator(cfg, bytes_table=bytes_table)
        return float(evaluators[key](values, val, intervention=intervention, with_load=False)["bits_per_byte"])

    cfg = config.model
    num_experts = cfg.moe.num_experts
    calib_rows = args.calib_batch_size or config.train.batch_size
    steps = checkpoint_lib.checkpoint_steps(checkpoint)
    meta = {"command": _command(argv), "checkpoint": str(checkpoint), "checkpoint_name": checkpoint.name,
            "step": steps[-1] if steps else None, "params": common.parameter_count(variables),
            "moe_layers": len(model.moe_layers(cfg)), "num_experts": num_experts, "num_shared": cfg.moe.num_shared,
            "expert_ffn": cfg.moe.expert_ffn, "top_k": cfg.moe.top_k, "tokenizer": config.data.tokenizer,
            "d_model": cfg.d_model, "vocab_size": cfg.vocab_size,
            "router": f"{cfg.moe.router.kind}, {cfg.moe.router.score}, softmax_before_topk="
                      f"{cfg.moe.router.softmax_before_topk}, norm_topk_prob={cfg.moe.router.norm_topk_prob}",
            "methods": methods, "fractions": fractions, "seeds": args.seeds, "calib_batches": args.calib_batches,
            "calibration_split": CALIBRATION_SPLIT, "eval_split": EVAL_SPLIT,
            "calib_shape": [calib_rows, config.train.seq_len],
            "calib_tokens": args.calib_batches * calib_rows * config.train.seq_len,
            "eval_batches": len(val), "eval_shape": list(val[0].shape),
            "eval_tokens": sum(int(b[:, 1:].size) for b in val), "random_draws": args.random_draws,
            "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with "
                       f"other jobs; jax {jax.__version__} on {jax.default_backend()}"}
    kept = [kept_count(num_experts, f) for f in fractions]
    todo = [(m, k, s) for s in range(args.seeds) for k in kept for m in methods if cell_key(m, k, s) not in results]
    total = len(methods) * len(kept) * args.seeds
    say(f"{checkpoint}: {total - len(todo)}/{total} results cached; validation {len(val)} batches, "
        f"{meta['eval_tokens']:,} tokens; calibration {meta['calib_tokens']:,} training tokens per seed")
    if "baseline" not in results:
        t0 = time.perf_counter()
        value = bits_per_byte(config, variables)
        results["baseline"] = {"bits_per_byte": value, "seconds": time.perf_counter() - t0}
        cache.save()
        say(f"baseline: {value:.4f} bits/byte ({time.perf_counter() - t0:.1f}s)")
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
            value = bits_per_byte(new_config, new_variables)
            t2 = time.perf_counter()
            done += 1
            stored = stored_experts(new_config)
            results[cell_key(method, k, seed)] = {"method": method, "kept": k, "seed": seed, "bits_per_byte": value,
                                                  "stored_per_layer": stored, "stored_total": sum(stored),
                                                  "params": common.parameter_count(new_variables),
                                                  "compress_seconds": t1 - t0, "eval_seconds": t2 - t1,
                                                  "seconds": t2 - t0}
            cache.save()
            say(f"[{done}/{total}] {method} kept {k}/{num_experts} seed {seed}: {value:.4f} bits/byte "
                f"(compress {t1 - t0:.1f}s, evaluate {t2 - t1:.1f}s; stored experts per layer {stored})")
    extra = cache.section("meta_extra")
    extra["command"] = meta["command"]
    if calib_seconds:
        extra["calib_seconds"] = float(np.mean(calib_seconds))
    if not args.no_super:
        posthoc_super_experts.run(cache, config, variables, calib, lambda v, iv: bits_per_byte(config, v, iv),
                                  args.random_draws, out_dir / f"{NAME}_super_experts.png", say)
    extra["wall_seconds"] = extra.get("wall_seconds", 0.0) + (time.perf_counter() - started)
    cache.save()
    meta.update(extra)
    write_outputs(cache, meta, out_dir)
    say(f"wrote {out_dir / (NAME + '.md')} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
