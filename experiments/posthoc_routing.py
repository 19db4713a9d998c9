"""Post-hoc routing analysis, steering and self-contrast decoding of a trained MoE model (issue 16, item 6):
the results page ``experiments/results/posthoc_routing.md``.

    python -m experiments.posthoc_routing --checkpoint=runs/deepseekmoe [--max_tokens 65536]
        [--eval_tokens 32768] [--keywords def,return,self,import] [--random_draws 5] [--betas 0,0.25,0.5,1.0]
        [--alpha 0.1] [--weak_rank 2] [--data_dir DIR] [--out experiments/results] [--render_only] [--no_release]

Data: the run's corpus read with the checkpoint's tokenizer, in the run's batch shape. The trace (routing analyses,
and where the keyword experts are chosen) is the first ``--max_tokens`` tokens (rounded up to whole batches) of the
TRAINING split's iterator (``moejax.posthoc.capture.calibration_batches``, split='train', seed 1000); every
bits-per-byte figure comes from the first ``--eval_tokens`` tokens of the run's VALIDATION windows
(``moejax.data.checkpoint_windows``), so the experts are never chosen on the text they are evaluated on
(``CALIBRATION_SPLIT`` and ``EVAL_SPLIT``, stated on the page).

1. Routing trace (``moejax.posthoc.record``, with router scores, eos = the tokenizer's) and its analyses
   (``moejax.posthoc.analysis``, ``moejax.posthoc.locality``): expert frequency per layer, inter-layer affinity,
   SRP/SCH against the segment length (arXiv 2505.16056's, with bootstrap intervals, and the hindsight coverage
   variants), the summary numbers; SRP/SCH again on the trace with its positions shuffled (the same permutation at
   every layer), the reference without any local consistency.
2. Keyword experts (experiments/posthoc_keywords.py). With a subword tokenizer (BPE) a keyword's marker is the
   set of token ids whose text is the keyword with or without surrounding whitespace (``keyword_ids``). With the
   byte tokenizer a keyword is several tokens, so the
   marker is an *event*, not a token id: a position is marked when its input byte belongs to a whole-word occurrence
   of the keyword (the regex ``(?<![A-Za-z0-9_])kw(?![A-Za-z0-9_])`` inside a batch row; every byte of the
   occurrence is marked). The trace's token ids are replaced by one synthetic id (the vocabulary size) at the marked
   positions and ``moejax.posthoc.steer.marker_experts(trace, [that id], n)`` gives the n (layer, expert) pairs of
   highest nPMI with the marker over the model (RICE). For comparison, the byte-level alternative:
   ``marker_experts`` with the keyword's byte ids (nPMI averaged over its distinct bytes, wherever they occur).
3. Silencing: ``moejax.moe.intervention.mask_experts`` on the top-1 and top-2 keyword experts, against two
   controls of ``--random_draws`` random sets of as many experts each: (layer, expert) pairs drawn uniformly from
   the model's routed experts (any MoE layer; every keyword's chosen experts excluded; shared by all keywords), and
   as many experts in each of the chosen experts' layers (the keyword's top-2 excluded). Also the top-2 reinforced
   (``scale_experts`` x ``--reinforce``, RICE's direction). Validation bits per byte from one
   ``moejax.evaluate.Evaluator`` (compiled once, the intervention an argument) over the evaluation set, and, from
   its per-position cross-entropy under the same intervention (``Evaluator.token_losses``), the bits per byte on
   the keyword's bytes (the positions whose *target* byte lies in a whole-word occurrence of the keyword in the
   evaluation windows).
4. SCMoE beta sweep (``moejax.generate.SelfContrast``; experiments/posthoc_scmoe.py): per evaluation position the
   strong logits (the model) and the weak ones (``moejax.moe.intervention.rank_only(cfg, weak_rank)``: each MoE
   token routed to its rank-r expert alone, weight 1; the shared expert unchanged); the contrast
   ``(1 + beta) z_s - beta z_w`` on the plausible head ``z_s >= log(alpha) + max z_s`` (others -inf) is
   ``SelfContrast.combine``. The true byte falls outside the head at some positions (infinite cross-entropy there),
   so reported are: that fraction, the bits per byte over the other positions (the masked contrast renormalised on
   the head), the bits per byte of the unmasked contrast softmax((1 + beta) z_s - beta z_w) over every position, and
   the greedy (argmax) next-byte accuracy. Then greedy samples from
   ``moejax.generate.generate(..., contrast=SelfContrast(beta=...))`` for two prompts.
5. Mechanics on an imported release: a tiny random Mixtral-layout model written by ``moejax.hf.save`` (as
   tests/posthoc/test_commands.py), traced and analysed through ``python -m moejax.posthoc trace|analyze``
   (``moejax.posthoc.__main__.main``) on the same corpus.

Resumable: every finished step is stored in ``<checkpoint>/posthoc_routing/results.json`` (the trace and the
release beside it) as soon as it is done, and a rerun skips it; a progress line is printed per step. Outputs in
``--out``: ``posthoc_routing.md`` (the text between ``<!-- findings:begin -->`` and ``<!-- findings:end -->`` of an
existing page is kept), ``posthoc_routing.json`` and the plots ``posthoc_routing_*.png``. ``--render_only`` rewrites
the page from the JSON in ``--out`` alone (experiments/posthoc_routing_page.py renders it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import time
import zlib
from typing import Any

import ml_collections
import numpy as np

from experiments import posthoc_common as common
from experiments import posthoc_keywords, posthoc_scmoe
from experiments import posthoc_routing_page as page

NAME = "posthoc_routing"
KEYWORDS = ("def", "return", "self", "import")
BETAS = (0.0, 0.25, 0.5, 1.0)
PROMPTS = ("def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n")
RANDOM_SEED = 2024
# The trace (calibration: routing analyses, the keyword experts) comes from the training split's iterator
# (``capture.calibration_batches``, seed CALIBRATION_SEED), every evaluated figure from the validation split.
CALIBRATION_SPLIT, EVAL_SPLIT = "train", "validation"
CALIBRATION_SEED = 1000
PLACEHOLDER = "(to be written after a run)"  # the findings of a new page
say = common.speaker(NAME)


# ------------------------------------------------------------------------------------------------------ data

def load_data(config: ml_collections.ConfigDict, checkpoint: pathlib.Path, max_tokens: int, eval_tokens: int,
              data_dir: str | None) -> tuple[ml_collections.ConfigDict, list[np.ndarray], list[np.ndarray], Any]:
    """(data config, trace inputs [B, S] list, evaluation windows [B, S + 1] list, tokenizer): the trace is the
    first max_tokens tokens' batches of the training split's iterator (``capture.calibration_batches``,
    split='train', seed CALIBRATION_SEED), the evaluation the run's validation windows
    (``moejax.data.checkpoint_windows``) of eval_tokens tokens, each rounded up to whole batches."""
    from moejax import data
    from moejax.posthoc import capture

    per_batch = config.train.batch_size * config.train.seq_len
    n_trace, n_eval = max(1, math.ceil(max_tokens / per_batch)), max(1, math.ceil(eval_tokens / per_batch))
    _, inputs, _ = capture.calibration_batches(config, checkpoint, split=CALIBRATION_SPLIT, seed=CALIBRATION_SEED,
                                               max_tokens=n_trace * per_batch, data_dir=data_dir)
    config, windows, tokenizer = data.checkpoint_windows(config, checkpoint, max_tokens=n_eval * per_batch,
                                                         data_dir=data_dir)
    return config, inputs, windows, tokenizer


# ------------------------------------------------------------------------------------------------ the steps

def step_trace(cache: common.ResultCache, config: ml_collections.ConfigDict, variables: dict[str, Any],
               inputs: list[np.ndarray], tokenizer: Any, out: pathlib.Path) -> Any:
    """The routing trace (recorded once) and its analyses + the three plots."""
    from moejax.posthoc import analysis, capture, read_trace, trace_report

    trace_dir = cache.root / "trace"
    record = cache.get("trace")
    if record is None or not (trace_dir / "manifest.json").exists():
        started = time.perf_counter()
        total = sum(int(b.size) for b in inputs)
        say(f"recording the routing trace of {total:,} {CALIBRATION_SPLIT} tokens ({len(inputs)} batches of "
            f"{inputs[0].shape[0]} x {inputs[0].shape[1]})")
        capture.record(config, variables, inputs, trace_dir, with_scores=True, eos_id=tokenizer.eos_id,
                       overwrite=True, metadata={"calibration_split": CALIBRATION_SPLIT, "batches": len(inputs)},
                       progress=capture.progress_bar(total))
        record = cache.put("trace", {"seconds": time.perf_counter() - started, "tokens": total})
        say(f"trace recorded in {record['seconds']:.1f}s")
    trace = read_trace(trace_dir)
    if cache.get("analysis") is None:
        started = time.perf_counter()
        summary = trace_report.summary(trace)
        cache.put("analysis", {"summary": summary, "seconds": time.perf_counter() - started,
                               "gate_mass_max": common.jsonable(analysis.gate_mass(trace).max(-1))})
        say(f"analyses in {time.perf_counter() - started:.1f}s")
    if cache.get("shuffled") is None:  # the no-locality reference: the same routing in a random token order
        started = time.perf_counter()
        order = np.random.default_rng(RANDOM_SEED).permutation(trace.num_tokens)
        shuffled = dataclasses.replace(trace, experts=np.asarray(trace.experts)[:, order],
                                       weights=np.asarray(trace.weights)[:, order], scores=None,
                                       token_ids=np.asarray(trace.token_ids)[order])
        summary = trace_report.summary(shuffled, cache_sizes=[2 * trace.top_k])
        cache.put("shuffled", {key: summary[key] for key in ("segment_lengths", "cache_multiples", "srp_model",
                                                             "sch_model", "srp_coverage_mean", "sch_coverage_mean")}
                  | {"seconds": time.perf_counter() - started})
        say(f"shuffled-order reference in {time.perf_counter() - started:.1f}s")
    if not all((out / f"{NAME}_{p}.png").exists() for p in ("frequency", "affinity", "local_consistency")):
        trace_report.plot_frequency(trace, path=out / f"{NAME}_frequency.png")
        trace_report.plot_affinity(trace, path=out / f"{NAME}_affinity.png")
        analysed = (cache.get("analysis") or {}).get("summary") or {}
        trace_report.plot_local_consistency(trace, path=out / f"{NAME}_local_consistency.png",
                                            summary=analysed if "srp_model" in analysed else None)
        say("plots written")
    return trace


def same_layer_sets(chosen: dict[int, list[int]], num_experts: int, draws: int, exclude: set[tuple[int, int]],
                    seed: int) -> list[dict[int, list[int]]]:
    """``draws`` sets with as many experts in each layer as ``chosen``, drawn uniformly from that layer's routed
    experts minus ``exclude`` (seeded by ``seed`` + draw)."""
    out = []
    for draw in range(draws):
        rng = np.random.default_rng(seed + draw)
        sets = {}
        for layer, ids in sorted(chosen.items()):
            pool = [e for e in range(num_experts) if (layer, e) not in exclude]
            sets[int(layer)] = sorted(int(e) for e in rng.choice(pool, size=len(ids), replace=False))
        out.append(sets)
    return out


def step_silencing(cache: common.ResultCache, config: ml_collections.ConfigDict, variables: dict[str, Any],
                   windows: list[np.ndarray], keywords_record: dict[str, Any], random_draws: int,
                   reinforce: float = 2.0, bytes_table: np.ndarray | None = None) -> dict[str, Any]:
    """The cached 'silencing' record, completed: bits per byte (``keyword_bits``) of the model, with each keyword's
    top-1 and top-2 experts silenced, with the random controls silenced, and with the top-2 reinforced."""
    from moejax import evaluate, model
    from moejax.moe import intervention as iv_lib

    keywords = [kw for kw, r in keywords_record.items() if r.get("occurrences")]
    masks = {kw: [posthoc_keywords.keyword_mask(w, kw, keywords_record[kw].get("token_ids"))[:, 1:]
                  for w in windows] for kw in keywords}
    evaluator = evaluate.Evaluator(config, bytes_table=bytes_table)
    record = cache.section("silencing")

    def run(key: str, chosen: dict[int, list[int]] | None, scale: float | None = None) -> None:
        if key in record:
            return
        if chosen is None:
            iv = None
        elif scale is None:
            iv = iv_lib.mask_experts(config, chosen)
        else:
            iv = iv_lib.scale_experts(config, {layer: {e: scale for e in ids} for layer, ids in chosen.items()})
        result = posthoc_keywords.keyword_bits(evaluator, variables, windows, masks, iv, bytes_table)
        record[key] = {"experts": None if chosen is None else {str(k): v for k, v in chosen.items()},
                       "scale": scale, **result}
        cache.save()
        kw_text = ", ".join(f"{kw} {v:.3f}" for kw, v in result["keyword_bits_per_byte"].items())
        say(f"silencing {key}: {result['bits_per_byte']:.4f} bits/byte (keyword bytes: {kw_text}) "
            f"[{result['seconds']:.1f}s]")

    run("baseline", None)
    exclude = set()
    for kw in keywords:
        for n in (1, 2):
            chosen = {int(layer): ids for layer, ids in keywords_record[kw][f"top{n}"].items()}
            exclude |= {(layer, e) for layer, ids in chosen.items() for e in ids}
            run(f"keyword/{kw}/top{n}", chosen)
    layers = model.moe_layers(config.model)
    for n in (1, 2):
        for draw in range(random_draws):
            chosen: dict[int, list[int]] = {}
            for layer, e in common.random_experts(np.random.default_rng(RANDOM_SEED + 100 * n + draw), layers,
                                                  config.model.moe.num_experts, n, exclude):
                chosen.setdefault(layer, []).append(e)
            run(f"random/{n}/{draw}", chosen)
    for kw in keywords:  # the tighter control: random experts of the same layers as the keyword's
        own = {(int(layer), e) for layer, ids in keywords_record[kw]["top2"].items() for e in ids}
        for n in (1, 2):
            chosen = {int(layer): ids for layer, ids in keywords_record[kw][f"top{n}"].items()}
            seed = RANDOM_SEED + zlib.crc32(kw.encode()) % 10_000 + 100 * n
            for draw, sets in enumerate(same_layer_sets(chosen, config.model.moe.num_experts, random_draws, own,
                                                        seed)):
                run(f"same_layer/{kw}/{n}/{draw}", sets)
    if reinforce:
        for kw in keywords:
            chosen = {int(layer): ids for layer, ids in keywords_record[kw]["top2"].items()}
            run(f"reinforce/{kw}/top2", chosen, scale=reinforce)
    return record


def step_release(cache: common.ResultCache, data_dir: str | None) -> dict[str, Any]:
    """A tiny random Mixtral-layout release (moejax.hf.save), traced and analysed by the CLI."""
    record = cache.get("release")
    if record is not None:
        return record
    import jax
    from moejax.configs import base

    from moejax import hf
    from moejax.posthoc import __main__ as cli

    started = time.perf_counter()
    root = cache.root / "release"
    shutil.rmtree(root, ignore_errors=True)
    config = base.get_config()
    config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, vocab_size=256)
    config.model.moe.update(num_experts=4, top_k=2, expert_ffn=16)
    config.model.moe.router.softmax_before_topk = False
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: rng.normal(0, 0.3, leaf.shape).astype(np.float32),
                          hf.abstract_variables(config.model)["params"])
    directory = hf.save(config, {"params": params}, root / "model")
    files = sorted(p.name for p in directory.iterdir())
    flags = ["--checkpoint", str(directory), "--data", "stdlib", "--batch_size", "8", "--seq_len", "64",
             "--max_tokens", "4096", "--calibration_split", CALIBRATION_SPLIT] + \
        (["--data_dir", data_dir] if data_dir else [])
    trace_dir = cli.main(["trace", *flags, "--out", str(root / "trace"), "--with_scores"])
    result = cli.main(["analyze", "--trace", str(trace_dir), "--out", str(root / "analysis")])
    s = result["summary"]
    record = cache.put("release", {
        "files": files, "model_type": json.loads((directory / "config.json").read_text()).get("model_type"),
        "calibration_split": CALIBRATION_SPLIT,
        "tokens": s["num_tokens"], "layers": s["layers"], "num_experts": s["num_experts"], "top_k": s["top_k"],
        "max_expert_fraction": s["max_expert_fraction"], "srp_mean": s["srp_mean"], "segment_lengths":
        s["segment_lengths"], "router_entropy": s["router_entropy"],
        "outputs": sorted(p.name for p in (root / "analysis").iterdir()),
        "seconds": time.perf_counter() - started})
    say(f"imported release: {files} traced and analysed in {record['seconds']:.1f}s")
    return record


# ------------------------------------------------------------------------------------------------------ main

def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a moejax workdir (moejax.load; not needed with --render_only)")
    parser.add_argument("--max_tokens", type=int, default=65536, help="training tokens of the trace")
    parser.add_argument("--eval_tokens", type=int, default=32768, help="validation tokens evaluated (after the "
                                                                       "trace's)")
    parser.add_argument("--keywords", default=",".join(KEYWORDS))
    parser.add_argument("--random_draws", type=int, default=5)
    parser.add_argument("--reinforce", type=float, default=2.0, help="the top-2's weight factor (0: skip)")
    parser.add_argument("--betas", default=",".join(str(b) for b in BETAS))
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--weak_rank", type=int, default=2)
    parser.add_argument("--max_new", type=int, default=160, help="new bytes per greedy sample")
    parser.add_argument("--data_dir", default=None, help="where the prepared corpus is cached (data.dir)")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--render_only", action="store_true", help=f"rewrite --out's {NAME}.md from its {NAME}.json "
                        "(no checkpoint, nothing computed, the plots left as they are)")
    parser.add_argument("--no_release", action="store_true", help="skip the imported-release mechanics step")
    args = parser.parse_args(argv)
    if not args.render_only and not args.checkpoint:
        parser.error("--checkpoint is required (except with --render_only)")
    if args.render_only and not (pathlib.Path(args.out) / f"{NAME}.json").exists():
        parser.error(f"--render_only: {pathlib.Path(args.out) / (NAME + '.json')} does not exist")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the steps not yet in the cache and writes the page, its JSON and plots; returns {'info', 'summary'}."""
    args = parse(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    if args.render_only:
        say(f"wrote {common.rerender(out, NAME, page.render_page, PLACEHOLDER)} from {NAME}.json")
        payload = json.loads((out / f"{NAME}.json").read_text())
        return {"info": payload["info"], "summary": payload["summary"]}
    checkpoint = pathlib.Path(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    cache = common.ResultCache(checkpoint / NAME)
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
    betas = [float(b) for b in args.betas.split(",")]
    command = (f"python -m experiments.{NAME} --checkpoint={args.checkpoint}"
               + (f" --data_dir={args.data_dir}" if args.data_dir else "")
               + (f" --max_tokens={args.max_tokens}" if args.max_tokens != 65536 else "")
               + (f" --eval_tokens={args.eval_tokens}" if args.eval_tokens != 32768 else ""))

    import moejax
    from moejax import evaluate, model
    from moejax.training import checkpoint as checkpoint_lib

    config, variables = moejax.load(checkpoint)
    data_config, inputs, windows, tokenizer = load_data(config, checkpoint, args.max_tokens, args.eval_tokens,
                                                        args.data_dir)
    cache.put("started", cache.get("started") or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    bytes_table = evaluate.text_bytes_table(tokenizer, config.model.vocab_size)
    trace = step_trace(cache, config, variables, inputs, tokenizer, out)
    keywords_record = posthoc_keywords.step_keywords(cache, trace, keywords, inputs[0].shape[1],
                                                     config.model.vocab_size, say, tokenizer)
    step_silencing(cache, config, variables, windows, keywords_record, args.random_draws, args.reinforce,
                   bytes_table)
    posthoc_scmoe.step_scmoe(cache, config, variables, windows, betas, args.alpha, args.weak_rank, say, bytes_table)
    posthoc_scmoe.step_samples(cache, config, variables, tokenizer, PROMPTS, args.alpha, args.weak_rank, args.max_new,
                               say)
    if not args.no_release:
        step_release(cache, args.data_dir)

    summary = page.summarise(cache.data, keywords)
    summary["keyword_eval_bytes"] = {
        kw: int(sum(posthoc_keywords.keyword_mask(w, kw, (keywords_record.get(kw) or {}).get("token_ids"))[:, 1:]
                    .sum() for w in windows)) for kw in keywords}
    if summary["silencing_table"]:
        page.plot_silencing(summary, out / f"{NAME}_silencing.png")
    if cache.get("scmoe"):
        page.plot_scmoe(cache.get("scmoe"), out / f"{NAME}_scmoe.png")
    seconds = {key: value.get("seconds") for key, value in cache.data.items() if isinstance(value, dict)
               and "seconds" in value}
    seconds["silencing"] = sum(v["seconds"] for v in (cache.get("silencing") or {}).values())
    seconds["keywords"] = sum(v.get("seconds", 0) for v in (cache.get("keywords") or {}).values())
    seconds["samples"] = sum(v["seconds"] for v in (cache.get("samples") or {}).values())
    seconds = {k: v for k, v in seconds.items() if v is not None}
    total = sum(seconds.values())
    run_summary = json.loads((checkpoint / "summary.json").read_text()) if (checkpoint / "summary.json").exists() \
        else {}
    cfg = config.model
    info = {"model": f"DeepSeekMoE tiny ({checkpoint.name})" if "deepseek" in checkpoint.name else checkpoint.name,
            "command": command, "checkpoint": str(checkpoint),
            "step": max(checkpoint_lib.checkpoint_steps(checkpoint)), "params": common.parameter_count(variables),
            "moe_layers": len(model.moe_layers(cfg)), "shared": cfg.moe.num_shared, "experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k, "router": cfg.moe.router.kind, "tokenizer": data_config.data.tokenizer,
            "run_val_bpb": run_summary.get("val_bits_per_byte"),
            "data": data_config.data.name, "batch_size": inputs[0].shape[0], "seq_len": inputs[0].shape[1],
            "calibration_split": CALIBRATION_SPLIT, "eval_split": EVAL_SPLIT,
            "trace_tokens": sum(int(b.size) for b in inputs), "eval_tokens": sum(int(w[:, 1:].size) for w in windows),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with another job; JAX on CPU",
            "time": f"{total / 60:.1f} min of compute in all (" + ", ".join(
                f"{k} {v:.0f}s" for k, v in seconds.items()) + ")",
            "weak_rank": args.weak_rank, "alpha": args.alpha, "max_new": args.max_new, "keywords": keywords}
    written = common.write_page(out, NAME, {"info": info, "summary": summary, **cache.data}, page.render_page,
                                PLACEHOLDER)
    say(f"wrote {written} and {out / (NAME + '.json')} ({total / 60:.1f} min of compute in the cached steps)")
    return {"info": info, "summary": summary}


if __name__ == "__main__":
    main()
