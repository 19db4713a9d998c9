"""Expert importance from a forward pass over a calibration set: which routed experts a model can lose.

    from moejax.posthoc import importance
    scores = importance.importance(config, variables, batches, "reap")         # [L, E], rows: moe_layers order
    every = importance.importance(config, variables, batches, importance.CRITERIA)   # {criterion: [L, E]}

With, at MoE layer l, token t routed to expert e in one of its slots (null slots left out), gate weight g_{t,e} (the
combine weight the layer uses: after any renormalisation and ``routed_scaling_factor``), expert output
f_e(x_t) (the expert's output on the token's MoE input, before the gate weight; ``capture.slot_outputs``), and the
residual stream h_before (entering the FFN part) and h_after (the block's output) of the token:

* ``frequency``  = sum_t 1[e in S_t]                           (routed slots)
* ``soft_count`` = sum_t g_{t,e}                                (gate-weight mass)
* ``reap``       = (1 / |X_e|) sum_{t in X_e} g_{t,e} ||f_e(x_t)||_2, X_e the tokens routed to e; 0 when X_e is
  empty (REAP, "Router-weighted Expert Activation Pruning", arXiv 2510.13999)
* ``easy_ep``    = sum_{t in X_e} g_{t,e} ||f_e(x_t)||_2 max(1 - cos(h_before_t, h_after_t), 0) (EASY-EP, arXiv
  2504.06792: output-aware expert importance weighted by the token's contribution, measured by how much the layer
  turns its hidden state)

``frequency`` and ``soft_count`` need the routing alone; they are ``moejax.posthoc.prune.importance`` applied to each
batch's routing (a one-batch ``Trace``), summed over the batches, so a corpus gives exactly what
``prune.importance(read_trace(...))`` gives on its recorded trace. Use ``prune.importance(trace, ...)`` when a
trace exists (no forward pass) and this module for the output-aware criteria or straight from a checkpoint.

``moejax.posthoc.importance`` is this module, callable as ``importance`` (``moejax.posthoc.importance(config,
variables, batches, "reap")``). Also here: ``expert_mean_outputs`` (each expert's mean output over every
calibration token, HC-SMoE's expert representation for ``moejax.posthoc.merge.hcsmoe``).
"""
from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import moe
from moejax.moe import experts as experts_lib
from moejax.posthoc import capture, prune
from moejax.posthoc.trace import Trace

ROUTING_CRITERIA = prune.CRITERIA  # ('frequency', 'soft_count'): from the routing alone
OUTPUT_CRITERIA = ("reap", "easy_ep")  # weighted by the experts' output norms
CRITERIA = (*ROUTING_CRITERIA, *OUTPUT_CRITERIA)


def _slot_values(config: ml_collections.ConfigDict, with_outputs: bool) -> Callable[[capture.Capture], dict]:
    """A stream reduction: the routing [L, T, k] and, with_outputs, each slot's ||f_e(x_t)||_2 [L, T, k] and each
    token's max(1 - cos(h_before, h_after), 0) [L, T] (float32)."""

    def fn(c: capture.Capture) -> dict:
        out = {"tokens": c.tokens, "experts": jnp.stack([layer.routing.experts for layer in c.layers]),
               "weights": jnp.stack([layer.routing.weights.astype(jnp.float32) for layer in c.layers])}
        if with_outputs:
            norms, turns = [], []
            for layer in c.layers:
                outputs = capture.slot_outputs(config, layer).astype(jnp.float32)
                norms.append(jnp.linalg.norm(outputs, axis=-1))
                before, after = layer.h_before.astype(jnp.float32), layer.h_after.astype(jnp.float32)
                cos = (before * after).sum(-1) / jnp.maximum(
                    jnp.linalg.norm(before, axis=-1) * jnp.linalg.norm(after, axis=-1), 1e-30)
                turns.append(jnp.maximum(1.0 - cos, 0.0))
            out["norms"], out["turn"] = jnp.stack(norms), jnp.stack(turns)
        return out

    return fn


def _criteria(criterion: str | Sequence[str]) -> list[str]:
    names = [criterion] if isinstance(criterion, str) else list(criterion)
    unknown = [name for name in names if name not in CRITERIA]
    if unknown or not names:
        raise ValueError(f"unknown importance criterion {unknown[0] if unknown else criterion!r}: allowed are "
                         f"{CRITERIA}")
    return names


def importance(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any],
               criterion: str | Sequence[str] = "frequency", *, intervention: Any = None,
               progress: Callable[[int], None] | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """[L, E] float64 importance of every routed expert at every MoE layer (rows in the order of
    ``moejax.model.moe_layers(config.model)``) over ``batches`` (token ids [B, S], the model's inputs), by
    ``criterion`` (one of ``CRITERIA``; see the module docstring for the formulas). A sequence of criteria gives
    ``{criterion: [L, E]}`` from one forward pass over the data. ``intervention``: the model routing under a
    ``moejax.moe.intervention.Intervention`` (``capture.forward``)."""
    names = _criteria(criterion)
    layers = capture.check_supported(config)
    num_experts = config.model.moe.num_experts
    with_outputs = any(name in OUTPUT_CRITERIA for name in names)
    routing_names = sorted({*(n for n in names if n in ROUTING_CRITERIA), *(("frequency",) if with_outputs else ())})
    totals = {name: np.zeros((len(layers), num_experts), np.float64) for name in routing_names}
    saliency = np.zeros((len(layers), num_experts), np.float64)  # sum g ||f||
    easy = np.zeros((len(layers), num_experts), np.float64)  # sum g ||f|| max(1 - cos, 0)
    for arrays in capture.stream(config, variables, batches, _slot_values(config, with_outputs),
                                 intervention=intervention, progress=progress):
        experts, weights = np.asarray(arrays["experts"]), np.asarray(arrays["weights"])
        batch = Trace(experts=experts, weights=weights, token_ids=np.asarray(arrays["tokens"]).reshape(-1),
                      layers=layers, num_experts=num_experts)
        for name in routing_names:
            totals[name] += prune.importance(batch, name)
        if with_outputs:
            slot = weights.astype(np.float64) * np.asarray(arrays["norms"], np.float64)
            turn = np.asarray(arrays["turn"], np.float64)[..., None]
            for row in range(len(layers)):
                valid = (experts[row] >= 0) & (experts[row] < num_experts)
                ids = experts[row][valid].astype(np.int64)
                saliency[row] += np.bincount(ids, weights=slot[row][valid], minlength=num_experts)
                easy[row] += np.bincount(ids, weights=(slot[row] * turn[row])[valid], minlength=num_experts)
    result = dict(totals)
    if "reap" in names:
        counts = totals["frequency"]
        result["reap"] = np.divide(saliency, counts, out=np.zeros_like(saliency), where=counts > 0)
    if "easy_ep" in names:
        result["easy_ep"] = easy
    return result[names[0]] if isinstance(criterion, str) else {name: result[name] for name in names}


def expert_mean_outputs(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any], *,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """[L, E, D] float64: each routed expert's mean output (before any gate weight) over every token of
    ``batches`` (each expert applied to all tokens' MoE inputs, routed to it or not), rows in the order of
    ``moejax.model.moe_layers``: HC-SMoE's expert representation (arXiv 2410.08589) for
    ``moejax.posthoc.merge.hcsmoe``. One expert at a time per layer (``jax.lax.map``), so memory stays at [T, D]."""
    capture.check_supported(config)
    cfg = config.model.moe
    dtype = jnp.dtype(config.model.dtype)
    expert = experts_lib.from_config(cfg)

    def fn(c: capture.Capture) -> tuple[jax.Array, jax.Array]:
        sums = []
        for layer in c.layers:
            x = layer.inputs.astype(dtype)
            weights = tuple(jnp.asarray(layer.params[moe.EXPERTS][name], dtype) for name in expert.param_names)
            sums.append(jax.lax.map(lambda w, x=x: expert.apply_one(x, *w).astype(jnp.float32).sum(0), weights))
        return jnp.stack(sums), jnp.asarray(c.tokens.size, jnp.int32)

    total, tokens = None, 0
    for sums, count in capture.stream(config, variables, batches, fn, progress=progress):
        total = np.asarray(sums, np.float64) if total is None else total + sums
        tokens += int(count)
    if total is None:
        raise ValueError("expert_mean_outputs: no batches")
    return total / tokens


class _CallableModule(types.ModuleType):
    """``moejax.posthoc.importance(config, variables, batches, criterion)`` calls ``importance.importance``: the
    package attribute is this module (as for ``moejax.load``), callable the same way."""

    def __call__(self, config, variables, batches, criterion="frequency", *, intervention=None, progress=None):
        return importance(config, variables, batches, criterion, intervention=intervention, progress=progress)


sys.modules[__name__].__class__ = _CallableModule
