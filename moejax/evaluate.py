"""Evaluate any checkpoint on a corpus: loss, perplexity and bits per byte, and per MoE layer the expert load,
router entropy and experts per token.

    python -m moejax.evaluate --checkpoint=<workdir | transformers dir> [--data=stdlib|text:<glob>|tfds:<name>]
        [--max_tokens=N] [--batch_size=B --seq_len=S] [--set model.moe.dispatch=dropless ...] [--out=eval.json]
        [--quantise='experts=int4/g128;attention=int8' | --against=<original>]

The data is the corpus's validation split, read by the same pipeline and tokenizer as training (the checkpoint's
own: a workdir's ``data.tokenizer``/tokenizer.json, a transformers directory's tokenizer.json), in the run's batch
shape unless given. Every number comes from the training loop's own evaluation (``moejax.training.step.eval_step``
and its metrics), so a workdir evaluated on its own data gives the loss its run logged. Bits per byte divide the
summed loss by the number of text bytes the predicted tokens stand for (1 per token with the byte tokenizer).
``--set FIELD=VALUE`` (repeatable) evaluates the same weights computed another way: one of EVAL_FIELDS, the fields
that say how the experts are dispatched and in which dtype, never what the weights are. For example a model trained
with capacity factor 1.0 evaluated dropless (``--set model.moe.dispatch=dropless``) or at another capacity factor
(``--set model.moe.eval_capacity_factor=1.0``) separates what the training's capacity did to the weights from the
tokens its evaluation drops. ``--quantise=RULES`` evaluates the checkpoint rounded to nearest under the rules
(``TARGET=FORMAT[@LAYERS];...``, docs/quantisation.md) against the checkpoint, ``--against=DIR`` a quantised checkpoint
against its original DIR: the quantised model's numbers, and under 'quantisation' both models' loss and bits per
byte and their change, the routing flips and router KL per MoE layer on the evaluated tokens, per-expert weight
errors and the bytes (``moejax.quant.metrics.against``). ``evaluate(config, variables, batches)`` is the library
form (``quantise=``, ``against=``). The JSON is written to --out (default ``<workdir>/eval_<data>[_<set>].json``; a
transformers directory needs --out) and the summary printed. Flags, errors and exit status as moejax/cli.py describes.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from moejax import cli, console
from moejax.configs import base
from moejax.evaluator import EVAL_FIELDS, Evaluator, apply_set, text_bytes_table  # re-exported
from moejax.training import metrics as metrics_lib

__all__ = ["EVAL_FIELDS", "Evaluator", "apply_set", "evaluate", "main", "text_bytes_table"]


def evaluate(config: ml_collections.ConfigDict, variables: dict[str, Any], batches: Iterable[np.ndarray], *,
             bytes_table: np.ndarray | None = None, progress: Callable[[int], None] | None = None,
             intervention: Any = None, quantise: str | Sequence[Any] | None = None,
             against: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None) -> dict[str, Any]:
    """``Evaluator(config, bytes_table=bytes_table)(variables, batches, ...)``: the function form, for one
    evaluation; keep an Evaluator to evaluate the same model again without compiling again.

    A quantised model against its original: ``quantise`` (rules ``TARGET=FORMAT[@LAYERS];...`` or a list of
    ``moejax.quant.Rule``; ``TARGET=FORMAT,ACT`` also quantises the matrices' inputs in the forward pass,
    moejax/quant/activation.py) evaluates ``variables`` rounded to nearest under the rules, against ``variables``;
    ``against`` (the original's variables) evaluates ``variables`` as the quantised model of that original
    (``tensors``: its compact form ``{matrix: moejax.quant.Tensor}``, for the bytes). The result is the quantised
    model's, with 'quantisation' holding the metrics of ``moejax.quant.metrics.against``: both models' loss and bits
    per byte and their differences, routing flips and router KL per MoE layer on the evaluated tokens, per-expert
    weight errors and (with the compact form) the model's bytes."""
    if quantise is None and against is None:
        return Evaluator(config, bytes_table=bytes_table)(variables, batches, intervention=intervention,
                                                          progress=progress)
    from moejax.quant import metrics, transform
    from moejax.quant import rules as rules_lib

    if quantise is not None and against is not None:
        raise ValueError("evaluate: quantise= (rules applied to these variables) and against= (the original of "
                         "quantised variables) exclude each other")
    if intervention is not None:
        raise ValueError("evaluate: an intervention is not applied to a quantised model's comparison (quantise=, "
                         "against=); evaluate it without one")
    what: dict[str, Any] = {}
    if quantise is not None:
        rule_list = (rules_lib.parse(quantise, "quantise", activations=True) if isinstance(quantise, str)
                     else list(quantise))
        original = variables
        variables, tensors = transform.quantize(config, original, rule_list)
        what["rules"] = [{"target": r.target, "format": r.format, "layers": r.layers, "act": r.act}
                         for r in rule_list]
    else:
        rule_list = []
        original = against
        _check_same_model(original["params"], variables["params"])
    result, comparison = metrics.against(config, original, variables, tensors, batches, bytes_table=bytes_table,
                                         progress=progress, activations=rule_list)
    result["quantisation"] = {**what, **comparison}
    return result


def _check_same_model(original: Any, quantised: Any) -> None:
    shapes = [jax.tree.map(lambda x: tuple(np.shape(x)), p) for p in (original, quantised)]
    if jax.tree.structure(shapes[0]) != jax.tree.structure(shapes[1]) or shapes[0] != shapes[1]:
        raise ValueError("evaluate: against= holds another model than the evaluated one (their parameter trees or "
                         "shapes differ): pass the original the quantised model was made from")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m moejax.evaluate", description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_flags(parser)
    cli.add_data_flags(parser)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"evaluate with a field changed (repeatable); FIELD one of {', '.join(EVAL_FIELDS)}")
    parser.add_argument("--quantise", default=None, metavar="RULES",
                        help="evaluate the checkpoint rounded to nearest under RULES (TARGET=FORMAT[,ACT][@LAYERS];"
                             "..., docs/quantisation.md; ACT quantises the matrices' inputs per token, e.g. "
                             "experts=int4,a8) against the checkpoint itself: loss and bits per byte change, routing "
                             "flips and router KL per MoE layer, per-expert weight errors, bytes")
    parser.add_argument("--against", default=None, metavar="DIR",
                        help="the original (a workdir or a transformers directory) of the quantised --checkpoint: "
                             "the same metrics, the checkpoint as the quantised model")
    parser.add_argument("--out", default=None, help="the JSON file to write (default: <workdir>/eval_<data>[_<set>]"
                                                    "[_quantise_<rules> | _against].json; required for a transformers "
                                                    "directory)")
    args = parser.parse_args(argv)
    cli.check_data_flags(args)
    for assignment in args.set:  # field and type checked before loading; the values against the model after
        apply_set(base.get_config(), assignment, validate=False)
    _check_quantisation_flags(args)
    if args.out is None and cli.check_checkpoint(args) is None:
        raise cli.UsageError(f"--out is required for a transformers checkpoint directory ({args.checkpoint}): the "
                             f"evaluation of a workdir goes to <workdir>/eval_<data>.json, that of a transformers "
                             f"directory to the JSON file --out names")
    return args


def _check_quantisation_flags(args: argparse.Namespace) -> None:
    """--quantise's rules and --against's directory, before anything loads."""
    from moejax.quant import rules as rules_lib

    if args.quantise is not None and args.against is not None:
        raise cli.flag_error("against", args.against, "--quantise quantises the checkpoint itself and compares it with "
                                                      "itself; --against names the original of a quantised checkpoint: "
                                                      "give one of them")
    if args.quantise is not None:
        try:
            rules_lib.parse(args.quantise, "quantise", activations=True)
        except ValueError as e:
            raise cli.flag_error("quantise", args.quantise, str(e)) from e
    if args.against is not None:
        try:
            cli.check_checkpoint(argparse.Namespace(checkpoint=args.against, step=None))
        except cli.UsageError as e:
            raise cli.flag_error("against", args.against, str(e).replace("--checkpoint=", "the directory ")) from e


def _open_against(args: argparse.Namespace, path: pathlib.Path) -> dict[str, Any]:
    """--against's variables and, where the quantised checkpoint has one (``python -m moejax.posthoc quantise``'s
    output), its compact form."""
    from moejax.loading import load
    from moejax.quant import transform

    _, original = load(pathlib.Path(args.against))
    stored = path / transform.TENSORS_FILE
    return {"against": original, "tensors": transform.load_tensors(stored) if stored.is_file() else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m moejax.evaluate`` with argv (default sys.argv[1:]): the result it writes."""
    from moejax import data

    args = _parse(sys.argv[1:] if argv is None else argv)
    opened = cli.open_checkpoint(args)
    path = opened.path
    config, batches, tokenizer = data.checkpoint_windows(opened.config, path, data=args.data,
                                                         max_tokens=args.max_tokens, batch_size=args.batch_size,
                                                         seq_len=args.seq_len, data_dir=args.data_dir)
    for assignment in args.set:
        apply_set(config, assignment)
    per_batch = config.train.batch_size * config.train.seq_len
    total = len(batches) * per_batch
    print(f"evaluating {path} on {config.data.name} (validation split): {len(batches)} batches of "
          f"{config.train.batch_size} x {config.train.seq_len} tokens", file=sys.stderr)
    compare = _open_against(args, path) if args.against else {"quantise": args.quantise}
    try:
        result = evaluate(config, opened.variables, batches, progress=console.progress_bar(total),
                          bytes_table=text_bytes_table(tokenizer, config.model.vocab_size), **compare)
    except ValueError as e:
        if args.against is None:
            raise
        raise cli.flag_error("against", args.against, str(e)) from e
    result.update(checkpoint=str(path), data=config.data.name, tokenizer=tokenizer.spec,
                  batch_size=config.train.batch_size, seq_len=config.train.seq_len)
    if args.set:
        result["set"] = list(args.set)
    if args.against:
        result["against"] = str(args.against)
    _report(result)
    name = _slug(config.data.name) + "".join(f"_{_slug(assignment)}" for assignment in args.set)
    name += f"_quantise_{_slug(args.quantise)}" if args.quantise else "_against" if args.against else ""
    out = pathlib.Path(args.out) if args.out else path / f"eval_{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[:60]


def _report(result: dict[str, Any]) -> None:
    print(f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.3f} | "
          f"{result['bits_per_byte']:.4f} bits/byte over {result['tokens']:,} tokens")
    layers = metrics_lib.layer_names(result)
    if layers:
        print(f"{'layer':<10} {'max/mean load':>13} {'router entropy':>15} {'experts/token':>14} {'dropped':>8}")
        for layer in layers:
            print(f"{layer:<10} {result[f'{layer}_max_over_mean_load']:>13.3f} "
                  f"{result[f'{layer}_router_entropy']:>15.3f} {result[f'{layer}_experts_per_token']:>14.3f} "
                  f"{result.get(f'{layer}_drop_fraction', 0.0):>8.4f}")
    quantisation = result.get("quantisation")
    if quantisation is None:
        return
    base = quantisation["original"]
    print(f"original: loss {base['loss']:.4f} nats/token | {base['bits_per_byte']:.4f} bits/byte; quantised - "
          f"original: loss {quantisation['delta_loss']:+.4f}, bits/byte {quantisation['delta_bits_per_byte']:+.4f}")
    routed = quantisation["routing"]
    if routed is not None:
        print(f"{'MoE layer':<10} {'routing flips':>13} {'router KL':>10} {'max expert error':>17}")
        for row, layer in enumerate(routed["layers"]):
            errors = quantisation["weights"]["experts"][row]
            print(f"{layer:<10} {routed['flips'][row]:>13.2%} {routed['kl'][row]:>10.3g} "
                  f"{max(errors) if errors else 0.0:>17.4f}")
    size = quantisation["bytes"]
    if size is not None:
        print(f"bytes {size['original']:,} -> {size['quantised']:,} ({size['ratio']:.3f}); "
              f"{size['bits_per_weight'] or 0:.3f} bits per quantised weight")


if __name__ == "__main__":
    cli.run(main)
