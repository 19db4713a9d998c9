"""Steering a trained MoE model through its experts: find the experts most associated with a marker (a token or a
piece of text, e.g. ``<think>`` in a reasoning model), then reinforce or silence them with a routing intervention
and measure the effect with ``moejax.evaluate``.

RICE ("Two Experts Are All You Need for Steering Thinking", arXiv 2505.14681) picks the experts with the highest
normalised PMI between expert selection and the marker token over a calibration set and scales their routing weight
up; silencing (masking) the same experts is the matching ablation. Here:

1. ``marker_experts(trace, marker_ids, n)``: the nPMI of every (MoE layer, expert) with the marker's token ids
   (``moejax.posthoc.analysis.npmi``: RICE's token-level events by default, ``events='slot'`` counts routed slots;
   averaged over the marker's ids), and the n best pairs over the whole model
   (``per_layer``: the n best of every layer);
2. ``intervention_for(config, chosen, mode, scale)``: ``scale_experts`` (mode 'reinforce' or 'dampen': their
   combine weight times ``scale``, after the router's renormalisation) or ``mask_experts`` ('silence');
3. ``steer(...)``: records the routing trace of the calibration batches, chooses, and evaluates the model with and
   without the intervention on the evaluation batches (loss, perplexity, bits per byte, the routing statistics),
   plus the probability the model gives the marker's first token, averaged over the evaluation positions: the
   direct effect of steering on the marker.

CLI: ``python -m moejax.posthoc steer --checkpoint=... --marker='<think>' --experts=top2-npmi --scale=2
[--mode=reinforce|dampen|silence] [--per_layer] --out=steer.json``.
"""
from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import model
from moejax.moe import intervention as iv_lib
from moejax.posthoc import analysis
from moejax.posthoc.trace import Trace

MODES = ("reinforce", "dampen", "silence")


@dataclasses.dataclass(frozen=True)
class Chosen:
    """The experts chosen for steering: {model layer index: [expert ids]} and their nPMI with the marker."""

    experts: dict[int, list[int]]
    scores: dict[int, list[float]]
    npmi: np.ndarray  # [L, E]: every MoE layer's (trace order) experts' nPMI with the marker

    def to_json(self) -> dict[str, Any]:
        return {"experts": {str(k): v for k, v in self.experts.items()},
                "npmi": {str(k): v for k, v in self.scores.items()}}


def marker_npmi(trace: Trace, marker_ids: Sequence[int], *, events: str = "token") -> np.ndarray:
    """[L, E]: per traced MoE layer and expert, the nPMI with the marker's token ids, averaged over the ids
    (``events``: ``analysis.npmi``'s, tokens by default as RICE defines them)."""
    ids = np.asarray(sorted(set(int(i) for i in marker_ids)), np.int64)
    if not len(ids):
        raise ValueError("marker: no token ids (the marker text encodes to nothing)")
    present = np.isin(ids, np.asarray(trace.token_ids))
    if not present.any():
        raise ValueError(f"marker token ids {ids.tolist()} never occur in the calibration data: choose data that "
                         f"contains the marker")
    return np.stack([analysis.npmi(trace, layer, ids[present], events=events).mean(axis=1)
                     for layer in range(trace.num_layers)])


def marker_experts(trace: Trace, marker_ids: Sequence[int], n: int = 2, per_layer: bool = False, *,
                   events: str = "token") -> Chosen:
    """The n (layer, expert) pairs of highest nPMI with the marker over the model, or the n best of each layer
    (``per_layer``); ties go to the earlier layer, then the lower expert id. ``events``: see ``marker_npmi``."""
    scores = marker_npmi(trace, marker_ids, events=events)
    layers = list(trace.layers)
    if n < 1 or n > (scores.shape[1] if per_layer else scores.size):
        raise ValueError(f"n={n}: must be in [1, {scores.shape[1] if per_layer else scores.size}]")
    if per_layer:
        picks = [(li, e) for li in range(len(layers)) for e in np.argsort(-scores[li], kind="stable")[:n]]
    else:
        flat = np.argsort(-scores.ravel(), kind="stable")[:n]
        picks = [divmod(int(i), scores.shape[1]) for i in flat]
    experts: dict[int, list[int]] = {}
    values: dict[int, list[float]] = {}
    for li, e in sorted(picks):
        experts.setdefault(int(layers[li]), []).append(int(e))
        values.setdefault(int(layers[li]), []).append(float(scores[li, e]))
    return Chosen(experts, values, scores)


def intervention_for(config: ml_collections.ConfigDict, chosen: Mapping[int, Sequence[int]], mode: str,
                     scale: float = 2.0) -> iv_lib.Intervention:
    """The routing intervention of a steering mode on the chosen {layer: experts}."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed are {MODES}")
    if mode == "silence":
        return iv_lib.mask_experts(config, chosen)
    if mode == "reinforce" and not scale > 1 or mode == "dampen" and not 0 <= scale < 1:
        raise ValueError(f"scale={scale}: mode {mode!r} needs a factor {'> 1' if mode == 'reinforce' else 'in [0, 1)'}")
    return iv_lib.scale_experts(config, {layer: {e: scale for e in ids} for layer, ids in chosen.items()})


def marker_probability(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Sequence[Any],
                       marker_id: int, intervention: Any = None) -> float:
    """The model's mean probability of the token ``marker_id`` over every position of batches [B, S + 1]."""
    module = model.Transformer(config.model)
    extra = {} if intervention is None else {"intervention": intervention}
    prob = jax.jit(lambda v, t: jnp.mean(jax.nn.softmax(module.apply(v, t, **extra), axis=-1)[..., marker_id]))
    return float(np.mean([float(prob(variables, jnp.asarray(np.asarray(b)[:, :-1]))) for b in batches]))


def steer(config: ml_collections.ConfigDict, variables: Mapping[str, Any], calibration: Sequence[Any],
          evaluation: Sequence[Any], marker_ids: Sequence[int], *, n: int = 2, mode: str = "reinforce",
          scale: float = 2.0, per_layer: bool = False, eos_id: int | None = None,
          bytes_table: Any = None) -> dict[str, Any]:
    """Chooses the marker's experts on the calibration inputs [B, S] and evaluates windows [B, S + 1] with and
    without steering (one ``moejax.evaluate.Evaluator``, the intervention its argument; bytes_table: text bytes per
    token id): {'chosen', 'intervention', 'baseline', 'steered', 'marker_probability': {...}}."""
    from moejax import evaluate
    from moejax.posthoc import capture
    from moejax.posthoc.trace import read_trace

    with tempfile.TemporaryDirectory() as tmp:
        trace = read_trace(capture.record(config, variables, calibration, f"{tmp}/trace", eos_id=eos_id),
                           mmap=False)
    chosen = marker_experts(trace, marker_ids, n, per_layer)
    iv = intervention_for(config, chosen.experts, mode, scale)
    evaluator = evaluate.Evaluator(config, bytes_table=bytes_table)
    baseline, steered = evaluator(variables, evaluation), evaluator(variables, evaluation, intervention=iv)
    first = int(list(marker_ids)[0])  # the marker's first token
    return {"chosen": chosen.to_json(), "intervention": {"mode": mode, "scale": None if mode == "silence" else scale},
            "baseline": baseline, "steered": steered,
            "marker_probability": {"token_id": first,
                                   "baseline": marker_probability(config, variables, evaluation, first),
                                   "steered": marker_probability(config, variables, evaluation, first, iv)}}
