"""Mixed precision per routed expert: the bits of every expert chosen from an importance score under a bit budget.

HOBBIT (arXiv 2411.01433) serves experts in mixed precision at run time: on a cache miss, an expert whose gate
weight for the token is below a threshold is loaded in low precision, the others in high precision, so the experts
that matter little to a token cost few bits. A checkpoint cannot decide per token; here the choice is made once per
expert, from an importance score aggregated over calibration tokens (``moejax.posthoc.importance``; the default
``soft_count``, the gate-weight mass, is HOBBIT's per-token criterion summed over the tokens), and the bit widths
are allocated under a budget (the mean bits per routed-expert weight):

    minimise  sum_{l,e} s_{l,e} err_{l,e}(b_{l,e})   subject to   sum_{l,e} n_{l,e} b_{l,e} <= budget sum_{l,e} n_{l,e}

with s the importance normalised to sum 1 in every layer (so a criterion's units do not matter and every layer
weighs the same), err_{l,e}(b) the expert's relative squared round-to-nearest error at b bits (``expert_errors``;
without it the model 4^-b, the variance of a uniform rounding step halving per bit) and n the expert's parameter
count. ``allocate`` solves it greedily: every expert starts at the fewest bits; the upgrade to an expert's next
width that removes the most weighted error per added bit is applied while the budget allows (a multiple-choice
knapsack's greedy); an upgrade that removes no weighted error is not made (an expert of importance 0 keeps the
fewest bits, and the budget need not be spent). 16 among the choices keeps an expert unquantised.
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from moejax import model as model_lib
from moejax import moe
from moejax.moe import expert_map
from moejax.quant import formats
from moejax.quant.rules import Matrix

KEEP_BITS = 16  # a choice that leaves the expert unquantised


def check_choices(choices: Sequence[int], field: str = "choices") -> list[int]:
    values = sorted(set(int(c) for c in choices)) if isinstance(choices, (list, tuple)) else []
    if len(values) < 1 or any(c not in formats.INT_BITS and c != KEEP_BITS for c in values):
        raise ValueError(f"{field}={choices!r} is invalid: a non-empty list of int bit widths in 2..8, or "
                         f"{KEEP_BITS} (kept)")
    return values


def allocate(importance: np.ndarray, choices: Sequence[int], budget: float, *, errors: np.ndarray | None = None,
             sizes: np.ndarray | None = None, per_layer: bool = False) -> np.ndarray:
    """[L, E] int bits per expert (see the module docstring). ``importance`` [L, E] >= 0; ``choices`` bit widths;
    ``budget`` the mean bits per weight (>= the fewest choice); ``errors`` [L, E, C] the relative squared error at
    each choice (default 4^-b, 0 for 16); ``sizes`` [L, E] parameters per expert (default equal); ``per_layer``: the
    budget holds in every layer rather than over all."""
    bits = check_choices(list(choices))
    scores = np.asarray(importance, np.float64)
    if scores.ndim != 2 or not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError(f"importance of shape {scores.shape}: expected [L, E] finite scores >= 0")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not bits[0] <= budget:
        raise ValueError(f"budget={budget!r} is invalid: the mean bits per routed-expert weight, a number >= the "
                         f"fewest bits among the choices ({bits[0]})")
    layers, experts = scores.shape
    totals = scores.sum(1, keepdims=True)
    weights = np.where(totals > 0, scores / np.where(totals > 0, totals, 1.0), 1.0 / experts)
    if errors is None:
        errors = np.broadcast_to(np.asarray([0.0 if b == KEEP_BITS else 4.0 ** -b for b in bits]),
                                 (layers, experts, len(bits)))
    errors = np.asarray(errors, np.float64)
    if errors.shape != (layers, experts, len(bits)):
        raise ValueError(f"errors of shape {errors.shape}: expected [L, E, C] = {(layers, experts, len(bits))}")
    sizes = np.ones((layers, experts)) if sizes is None else np.asarray(sizes, np.float64)
    groups = [[(row, e) for e in range(experts)] for row in range(layers)] if per_layer else \
        [[(row, e) for row in range(layers) for e in range(experts)]]
    level = np.zeros((layers, experts), np.int64)
    for group in groups:
        spare = sum(sizes[c] for c in group) * (budget - bits[0])
        heap: list[tuple[float, int, int, int]] = []

        def push(row: int, e: int, heap: list = heap) -> None:
            c = level[row, e]
            if c + 1 < len(bits):
                gain = weights[row, e] * (errors[row, e, c] - errors[row, e, c + 1])
                if gain > 0:  # no bits for nothing: an expert of zero importance keeps the fewest
                        heapq.heappush(heap, (-gain / ((bits[c + 1] - bits[c]) * sizes[row, e]), row, e, c))

        for row, e in group:
            push(row, e)
        while heap:
            _, row, e, c = heapq.heappop(heap)
            cost = (bits[c + 1] - bits[c]) * sizes[row, e]
            if cost <= spare + 1e-9:
                spare -= cost
                level[row, e] = c + 1
                push(row, e)
    return np.asarray(bits)[level]


def stored_scores(config: ml_collections.ConfigDict, scores: np.ndarray) -> list[np.ndarray]:
    """Per MoE layer (``moe_layers`` order), the logical experts' scores [L, E] summed onto the stored experts they
    are bound to (``moejax.moe.expert_map``; the identity without a map)."""
    cfg = config.model.moe
    out = []
    for row, layer in enumerate(model_lib.moe_layers(config.model)):
        mapping = expert_map.row(cfg, layer)
        stored = np.zeros(expert_map.stored_count(cfg, layer))
        keep = mapping >= 0
        np.add.at(stored, mapping[keep], np.asarray(scores[row], np.float64)[keep])
        out.append(stored)
    return out


def expert_errors(config: ml_collections.ConfigDict, variables: Mapping[str, Any], choices: Sequence[int],
                  group_size: int = 0) -> np.ndarray:
    """[L, E, C]: each stored routed expert's relative squared round-to-nearest error sum ||W - Q(W)||^2 /
    sum ||W||^2 over its matrices (wi_0, wi_1, wo) at every choice of int<b> (groups of group_size inputs; 0 per
    channel); 0 for 16. Rows in ``moe_layers`` order; all MoE layers hold the same stored count (``allocate``'s
    [L, E])."""
    bits = check_choices(list(choices))
    rows = []
    for _, (params, _) in model_lib.moe_layer_variables(config.model, variables).items():
        experts = params[moe.EXPERTS]
        total = None
        errs = []
        for name in ("wi_0", "wi_1", "wo"):
            w = np.asarray(experts[name], np.float32)
            norm = (w.astype(np.float64) ** 2).sum(axis=(1, 2))
            total = norm if total is None else total + norm
            errs.append([np.zeros(w.shape[0]) if b == KEEP_BITS else
                         ((formats.fake_quantize(w, formats.int_format(b, group_size), np.float32) - w)
                          .astype(np.float64) ** 2).sum(axis=(1, 2)) for b in bits])
        rows.append(np.stack([sum(e[c] for e in errs) for c in range(len(bits))], axis=-1)
                    / np.maximum(total, 1e-30)[:, None])
    return np.stack(rows)


def from_importance(config: ml_collections.ConfigDict, variables: Mapping[str, Any], scores: np.ndarray,
                    choices: Sequence[int], budget: float, *, group_size: int = 0, per_layer: bool = False,
                    measured_errors: bool = True) -> dict[int, np.ndarray]:
    """``{MoE layer: bits per stored routed expert}`` from importance ``scores`` [L, E] (``moe_layers`` order,
    logical experts; ``moejax.posthoc.importance``) under ``budget`` mean bits (``allocate``), with the experts'
    measured round-to-nearest errors (``measured_errors``) or the 4^-b model."""
    layers = model_lib.moe_layers(config.model)
    stored = stored_scores(config, np.asarray(scores))
    if len({len(s) for s in stored}) != 1:
        raise ValueError("mixed precision needs the same number of stored experts in every MoE layer")
    errors = expert_errors(config, variables, choices, group_size) if measured_errors else None
    bits = allocate(np.stack(stored), choices, budget, errors=errors, per_layer=per_layer)
    return {layer: bits[row] for row, layer in enumerate(layers)}


def with_expert_bits(assignment: Mapping[str, tuple[Matrix, Sequence[Any]]], expert_bits: Mapping[int, Sequence[int]]
                     ) -> dict[str, tuple[Matrix, list[Any]]]:
    """The assignment with each routed expert's format replaced by int<bits> of ``expert_bits[layer][e]`` (its
    rule's group size; 16: kept), where a rule gave the expert an int format; experts a rule kept stay kept.
    ValueError naming the layer or the format when the bits do not fit."""
    out = {}
    for name, (matrix, chosen) in assignment.items():
        chosen = list(chosen)
        if matrix.target == "experts":
            for b, (layer, e) in enumerate(zip(matrix.layers, matrix.experts, strict=True)):
                if chosen[b] is None or layer not in expert_bits:
                    continue
                row = list(expert_bits[layer])
                if e >= len(row):
                    raise ValueError(f"expert_bits[{layer}] has {len(row)} entries; the layer stores at least "
                                     f"{e + 1} routed experts")
                if chosen[b].kind != "int":
                    raise ValueError(f"expert_bits: {name} has format {chosen[b].name}; per-expert bits replace an "
                                     f"int format (int<b> or int<b>/g<G>)")
                value = row[e]
                if value != KEEP_BITS and value not in formats.INT_BITS:
                    raise ValueError(f"expert_bits[{layer}][{e}]={value!r} is invalid: int bits in 2..8, or "
                                     f"{KEEP_BITS} (kept)")
                value = int(value)
                chosen[b] = None if value == KEEP_BITS else formats.int_format(value, chosen[b].tile[0])
        out[name] = (matrix, chosen)
    return out
