"""``python -m moejax.posthoc assemble``: an MoE from several dense moejax models (``moejax.posthoc.assemble``:
DUME's ridge-regression router, BTX's learned router, FlexOlmo's domain embeddings), written as a moejax model.

    python -m moejax.posthoc assemble --sources=DIR,DIR[,...] --recipe=dume|btx|flexolmo
        [--domains=text:<glob>,text:<glob>,...] [--domain_tokens=N] --out=DIR
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
from typing import Any

from moejax import cli
from moejax.posthoc import command_steps as steps


def add_flags(parser: argparse.ArgumentParser) -> None:
    from moejax.posthoc import assemble

    parser.add_argument("--sources", required=True, help="comma-separated dense moejax workdirs of one architecture "
                                                         "(expert i of every layer is source i's FFN)")
    parser.add_argument("--recipe", choices=assemble.RECIPES, default="dume",
                        help="dume: ridge-regression router on each source's domain data; btx: a fresh router to "
                             "train; flexolmo: router rows from the domains' mean hidden states")
    parser.add_argument("--domains", default="", help="dume, flexolmo: one corpus per source, comma-separated "
                                                      "(stdlib | text:<glob> | tfds:<name>; default each source's "
                                                      "own data.name); its training split is read")
    parser.add_argument("--top_k", type=int, default=0, help="experts per token (0: the recipe's, 1 or 2)")
    parser.add_argument("--lam", type=float, default=1e-2, help="dume: the ridge regularisation")
    parser.add_argument("--domain_tokens", type=int, default=0, help="tokens per domain (0: as many as the "
                                                                     "config's evaluation batches)")
    parser.add_argument("--batch_size", type=int, default=0, help="rows per calibration batch (0: the config's)")
    parser.add_argument("--seq_len", type=int, default=0, help="tokens per row (0: the config's)")
    parser.add_argument("--data_dir", default=None, help="where the prepared corpora are cached (data.dir)")
    parser.add_argument("--out", required=True, help="the new model's directory (must not exist, or be empty)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moejax.posthoc import assemble, capture
    from moejax.training import checkpoint

    dirs = [d for d in args.sources.split(",") if d]
    if len(dirs) < 2:
        raise cli.flag_error("sources", args.sources, "needs at least two comma-separated model directories")
    domains = [d for d in args.domains.split(",") if d] if args.domains else [None] * len(dirs)
    if len(domains) != len(dirs):
        raise cli.flag_error("domains", args.domains, f"needs one corpus per source ({len(dirs)})")
    if args.top_k < 0:
        raise cli.flag_error("top_k", args.top_k, "must be an integer >= 0 (0: the recipe's)")
    out = pathlib.Path(args.out)
    steps.check_out_dir("out", out)
    sources = []
    for d in dirs:
        opened = cli.open_checkpoint(argparse.Namespace(checkpoint=d, step=None))
        sources.append((opened.config, opened.variables, opened.path))
    batches = None
    if args.recipe != "btx":
        batches = []
        for (config, _, path), domain in zip(sources, domains, strict=True):
            data_config, domain_batches, _ = capture.calibration_batches(
                config, path, split="train", data=domain, max_tokens=args.domain_tokens,
                batch_size=args.batch_size, seq_len=args.seq_len, data_dir=args.data_dir)
            steps.say(f"{path}: {len(domain_batches)} batches from {data_config.data.name} (training split)")
            batches.append(domain_batches)
    try:
        config, variables = assemble.assemble([(c, v) for c, v, _ in sources], args.recipe, batches,
                                              top_k=args.top_k or None, lam=args.lam)
    except ValueError as e:
        raise cli.flag_error("sources", args.sources, str(e)) from e
    with cli.removed_on_failure(out):
        checkpoint.save_variables(out, config, variables)
        for name in steps.TOKENIZER_FILES:
            if (sources[0][2] / name).is_file():
                shutil.copy(sources[0][2] / name, out / name)
        what = {"operation": "assemble", "recipe": args.recipe, "sources": [str(p) for _, _, p in sources],
                "domains": domains, "top_k": config.model.moe.top_k, "num_experts": config.model.moe.num_experts}
        steps.write_json(out / "posthoc.json", what)
    steps.say(f"wrote the assembled model ({len(sources)} experts per layer, top-{config.model.moe.top_k}, "
              f"{args.recipe}) to {out}")
    return what
