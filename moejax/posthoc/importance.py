"""Expert importance: which routed experts a model can lose. Every criterion is registered once in ``CRITERIA`` and
computed alike from a routing trace (``from_trace``, no forward pass) or from a forward pass over a calibration set
(``from_forward``, straight from a checkpoint).

    from moejax.posthoc import importance, read_trace
    scores = importance.from_trace(read_trace("traces/run1"), "soft_count")           # [L, E]
    scores = importance.from_forward(config, variables, batches, "reap")              # [L, E], moe_layers order
    every = importance.from_forward(config, variables, batches, list(importance.CRITERIA))   # {criterion: [L, E]}

A criterion is one function ``fn(LayerBatch) -> [E]`` registered with ``@register(name, needs=..., reduce=...)``: it
gets one MoE layer's view of one batch of tokens (from a trace: a block of its tokens) and returns the batch's
contribution per expert, usually ``batch.per_expert(values per slot)``. ``needs`` says what the view must hold
(``NEEDS``): 'routing' (the selected experts and their gate weights; every view has it), 'scores' (the router's
probabilities of the E real experts), 'outputs' (each slot's expert output norm) and 'hidden' (how much the routed
experts turn each token's hidden state). A trace holds the routing, and the scores when recorded ``with_scores``; the
outputs and hidden states need the forward pass. ``reduce`` says how the contributions combine over batches
(``REDUCTIONS``): 'sum', or 'mean', the sum divided by the expert's routed slots over all batches (0 for an expert
no token was routed to).

With, at MoE layer l, token t routed to expert e in one of its slots (null slots, ids outside [0, E), left out), gate
weight g_{t,e} (the combine weight the layer uses: after any renormalisation and ``routed_scaling_factor``), expert
output f_e(x_t) (the expert's output on the token's MoE input, before the gate weight; ``capture.slot_outputs``), the
residual stream h_t entering the FFN part (``capture.LayerCapture.h_before``) and the routed experts' combined output
r_t = sum_{e in S_t} g_{t,e} f_e(x_t) (``capture.LayerCapture.routed``; shared experts left out):

* ``frequency``  = sum_t 1[e in S_t]                           (routed slots)
* ``soft_count`` = sum_t g_{t,e}                                (gate-weight mass)
* ``reap``       = (1 / |X_e|) sum_{t in X_e} g_{t,e} ||f_e(x_t)||_2, X_e the tokens routed to e; 0 when X_e is
  empty (REAP, "Router-weighted Expert Activation Pruning", arXiv 2510.13999)
* ``easy_ep``    = sum_{t in X_e} g_{t,e} ||f_e(x_t)||_2 max(1 - cos(h_t, h_t + r_t), 0) (EASY-EP, arXiv
  2504.06792: output-aware expert importance weighted by the token's contribution, measured by how much the routed
  experts turn its hidden state; the authors' RUCAIBox/EASYEP ``pruning/model_new.py`` ``Block.forward``
  ``cos_sim_0_1`` and ``pruning/expert_selection.py``, summed over every calibration token)

The sums run in float64 on the host, batch by batch, so a corpus passes through a bounded amount of memory and a
trace recorded from the same batches gives ``from_forward``'s routing criteria exactly. Also here:
``expert_mean_outputs`` (each expert's mean output over every calibration token, HC-SMoE's expert representation
for ``moejax.posthoc.merge.hcsmoe``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import model as model_lib
from moejax import moe
from moejax.moe import expert_map
from moejax.moe import experts as experts_lib
from moejax.posthoc import capture
from moejax.posthoc.trace import Trace

NEEDS = ("routing", "scores", "outputs", "hidden")
REDUCTIONS = ("sum", "mean")
_BLOCK_TOKENS = 1 << 20  # trace tokens read at once


@dataclasses.dataclass(frozen=True)
class LayerBatch:
    """One MoE layer on one batch of T tokens (k slots each, E experts), numpy; the fields a criterion did not ask
    for (``needs``) are None.

    experts: [T, k] integer expert ids; ids outside [0, E) are null slots.
    weights: [T, k] float64 gate weights.
    scores:  [T, E] float64 router probabilities of the E real experts ('scores').
    norms:   [T, k] float64 ||f_e(x_t)||_2, the output norm of each slot's expert on its token ('outputs').
    turn:    [T] float64 max(1 - cos(h_t, h_t + r_t), 0) of each token: h_t the residual stream entering the FFN
             part, r_t the routed experts' combined output, shared experts left out ('hidden').
    """

    experts: np.ndarray
    weights: np.ndarray
    num_experts: int
    scores: np.ndarray | None = None
    norms: np.ndarray | None = None
    turn: np.ndarray | None = None

    def per_expert(self, values: np.ndarray | None = None) -> np.ndarray:
        """[E]: the sum of ``values`` [T, k] over each expert's routed slots (None: 1 per slot, the slot count)."""
        valid = (self.experts >= 0) & (self.experts < self.num_experts)
        return np.bincount(self.experts[valid].astype(np.int64), weights=None if values is None else values[valid],
                           minlength=self.num_experts)


CriterionFn = Callable[[LayerBatch], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``fn(LayerBatch) -> [E]`` a batch's contribution, what it needs (a subset of
    ``NEEDS``) and how the contributions reduce over batches (one of ``REDUCTIONS``)."""

    fn: CriterionFn
    needs: frozenset[str]
    reduce: str


CRITERIA: dict[str, Criterion] = {}


def register(name: str, *, needs: Sequence[str] = ("routing",), reduce: str = "sum"
             ) -> Callable[[CriterionFn], CriterionFn]:
    """Decorator adding an importance criterion under ``name``; ValueError for a name already registered, a need
    outside ``NEEDS`` or a reduction outside ``REDUCTIONS``."""
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"importance criterion {name!r}: needs={list(needs)} has {unknown}; allowed are {NEEDS}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"importance criterion {name!r}: reduce={reduce!r}; allowed are {REDUCTIONS}")

    def add(fn: CriterionFn) -> CriterionFn:
        if name in CRITERIA:
            raise ValueError(f"importance criterion {name!r} is already registered (by {CRITERIA[name].fn.__module__}."
                             f"{CRITERIA[name].fn.__qualname__}): register {fn.__qualname__} under another name")
        CRITERIA[name] = Criterion(fn, frozenset({"routing", *needs}), reduce)
        return fn

    return add


@register("frequency")
def frequency(batch: LayerBatch) -> np.ndarray:
    """The routed slots per expert."""
    return batch.per_expert()


@register("soft_count")
def soft_count(batch: LayerBatch) -> np.ndarray:
    """The gate-weight mass per expert."""
    return batch.per_expert(batch.weights)


@register("reap", needs=("outputs",), reduce="mean")
def reap(batch: LayerBatch) -> np.ndarray:
    """REAP: the gate-weighted expert output norm, averaged over the expert's routed slots."""
    return batch.per_expert(batch.weights * batch.norms)


@register("easy_ep", needs=("outputs", "hidden"))
def easy_ep(batch: LayerBatch) -> np.ndarray:
    """EASY-EP: the gate-weighted expert output norm times how much the routed experts turn the token's hidden
    state (h_t against h_t + r_t; the shared experts' output is not part of the turn)."""
    return batch.per_expert(batch.weights * batch.norms * batch.turn[:, None])


# ------------------------------------------------------------------------------------------------ the sums

def _names(criterion: str | Sequence[str]) -> list[str]:
    names = [criterion] if isinstance(criterion, str) else list(criterion)
    unknown = [name for name in names if name not in CRITERIA]
    if unknown or not names:
        raise ValueError(f"unknown importance criterion {unknown[0] if unknown else criterion!r}: allowed are "
                         f"{tuple(CRITERIA)}")
    return names


class _Sums:
    """The running [L, E] float64 sums of some criteria over batches, and the routed slots per expert that 'mean'
    divides by."""

    def __init__(self, names: Sequence[str], num_layers: int, num_experts: int) -> None:
        self.names = list(names)
        self.sums = {name: np.zeros((num_layers, num_experts), np.float64) for name in self.names}
        self.slots = np.zeros((num_layers, num_experts), np.float64)
        self.any_mean = any(CRITERIA[name].reduce == "mean" for name in self.names)

    def add(self, row: int, batch: LayerBatch) -> None:
        for name in self.names:
            self.sums[name][row] += CRITERIA[name].fn(batch)
        if self.any_mean:
            self.slots[row] += batch.per_expert()

    def result(self, criterion: str | Sequence[str]) -> np.ndarray | dict[str, np.ndarray]:
        out = {}
        for name in self.names:
            total = self.sums[name]
            if CRITERIA[name].reduce == "mean":
                total = np.divide(total, self.slots, out=np.zeros_like(total), where=self.slots > 0)
            out[name] = total
        return out[self.names[0]] if isinstance(criterion, str) else out


# ------------------------------------------------------------------------------------------------ from a trace

def _held(trace: Trace) -> set[str]:
    return {"routing"} | ({"scores"} if trace.scores is not None else set())


def trace_criteria(trace: Trace) -> list[str]:
    """The criteria a trace can give: those needing only its routing, and its router scores when it has them."""
    return [name for name, spec in CRITERIA.items() if spec.needs <= _held(trace)]


def _check_trace(trace: Trace, criterion: str | Sequence[str]) -> list[str]:
    """The criteria named, when the trace holds what each needs; ValueError naming the criterion otherwise (the
    forward pass, ``from_forward``, gives every criterion)."""
    names = _names(criterion)
    for name in names:
        missing = sorted(CRITERIA[name].needs - _held(trace))
        if missing:
            raise ValueError(f"importance criterion {name!r} needs {missing}, which this routing trace does not hold "
                             f"(a trace holds the routing, and the router scores when recorded with_scores): use "
                             f"moejax.posthoc.importance.from_forward(config, variables, batches, {name!r}) (a forward "
                             f"pass over calibration data); from this trace use one of {trace_criteria(trace)}")
    return names


def from_trace(trace: Trace, criterion: str | Sequence[str] = "frequency", *,
               config: ml_collections.ConfigDict | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """[L, E] float64 importance of every expert at every layer of a routing trace by ``criterion`` (those of
    ``trace_criteria``; a sequence gives ``{criterion: [L, E]}``). Rows: the trace's layers in its order (the model's
    layer index of row l is ``trace.layers[l]``); with ``config``, the model's MoE layers in ``moe_layers`` order,
    ValueError when the trace lacks one of them or has another expert count."""
    names = _check_trace(trace, criterion)
    rows = list(range(trace.num_layers))
    if config is not None:
        if trace.num_experts != config.model.moe.num_experts:
            raise ValueError(f"the trace has {trace.num_experts} experts per layer, the model "
                             f"{config.model.moe.num_experts}")
        by_layer = {int(layer): row for row, layer in enumerate(trace.layers)}
        layers = model_lib.moe_layers(config.model)
        missing = [layer for layer in layers if layer not in by_layer]
        if missing:
            raise ValueError(f"the trace (layers {trace.layers.tolist()}) lacks the model's MoE layers {missing}")
        rows = [by_layer[layer] for layer in layers]
    with_scores = any("scores" in CRITERIA[name].needs for name in names)
    sums = _Sums(names, len(rows), trace.num_experts)
    for out_row, row in enumerate(rows):
        for start in range(0, trace.num_tokens, _BLOCK_TOKENS):
            block = slice(start, start + _BLOCK_TOKENS)
            sums.add(out_row, LayerBatch(
                experts=np.asarray(trace.experts[row, block]), weights=np.asarray(trace.weights[row, block],
                                                                                   np.float64),
                num_experts=trace.num_experts,
                scores=np.asarray(trace.scores[row, block], np.float64) if with_scores else None))
    return sums.result(criterion)


# ------------------------------------------------------------------------------------------ from a forward pass

def _batch_arrays(config: ml_collections.ConfigDict, needs: set[str]) -> Callable[[capture.Capture], dict]:
    """A ``capture.stream`` reduction: the routing, experts and weights [L, T, k], and what ``needs`` asks for:
    'scores' [L, T, E], 'norms' [L, T, k] (||f_e(x_t)||_2 per slot), 'turn' [L, T] (float32; h_t against h_t + r_t,
    the routed experts' output only)."""
    num_experts = config.model.moe.num_experts

    def fn(c: capture.Capture) -> dict:
        out = {"experts": jnp.stack([layer.routing.experts for layer in c.layers]),
               "weights": jnp.stack([layer.routing.weights.astype(jnp.float32) for layer in c.layers])}
        if "scores" in needs:
            out["scores"] = jnp.stack([layer.routing.probs[:, :num_experts].astype(jnp.float32) for layer in c.layers])
        if "outputs" in needs:
            out["norms"] = jnp.stack([jnp.linalg.norm(capture.slot_outputs(config, layer).astype(jnp.float32), axis=-1)
                                      for layer in c.layers])
        if "hidden" in needs:
            turns = []
            for layer in c.layers:
                before = layer.h_before.astype(jnp.float32)  # EASY-EP: x against x + the routed experts' output
                after = before + layer.routed.astype(jnp.float32)
                cos = (before * after).sum(-1) / jnp.maximum(
                    jnp.linalg.norm(before, axis=-1) * jnp.linalg.norm(after, axis=-1), 1e-30)
                turns.append(jnp.maximum(1.0 - cos, 0.0))
            out["turn"] = jnp.stack(turns)
        return out

    return fn


def from_forward(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any],
                 criterion: str | Sequence[str] = "frequency", *, intervention: Any = None,
                 progress: Callable[[int], None] | None = None, mesh: Any = None
                 ) -> np.ndarray | dict[str, np.ndarray]:
    """[L, E] float64 importance of every routed expert at every MoE layer (rows in the order of
    ``moejax.model.moe_layers(config.model)``) over ``batches`` (token ids [B, S], the model's inputs), by
    ``criterion`` (one of ``CRITERIA``; see the module docstring for the formulas). A sequence of criteria gives
    ``{criterion: [L, E]}`` from one forward pass over the data. ``intervention``: the model routing under a
    ``moejax.moe.intervention.Intervention`` (``capture.forward``). ``mesh``: the forward sharded over a device mesh
    (``capture.stream``; the same scores up to float rounding)."""
    names = _names(criterion)
    layers = capture.check_supported(config)
    num_experts = config.model.moe.num_experts
    needs = set().union(*(CRITERIA[name].needs for name in names))
    sums = _Sums(names, len(layers), num_experts)
    for arrays in capture.stream(config, variables, batches, _batch_arrays(config, needs), intervention=intervention,
                                 progress=progress, mesh=mesh):
        arrays = {key: np.asarray(value) if key == "experts" else np.asarray(value, np.float64)
                  for key, value in arrays.items()}
        for row in range(len(layers)):
            sums.add(row, LayerBatch(num_experts=num_experts, **{key: value[row] for key, value in arrays.items()}))
    return sums.result(criterion)


def expert_mean_outputs(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any], *,
                        progress: Callable[[int], None] | None = None, mesh: Any = None) -> np.ndarray:
    """[L, E, D] float64: each routed expert's mean output (before any gate weight) over every token of
    ``batches`` (each expert applied to all tokens' MoE inputs, routed to it or not), rows in the order of
    ``moejax.model.moe_layers``: HC-SMoE's expert representation (arXiv 2410.08589) for
    ``moejax.posthoc.merge.hcsmoe``. One expert at a time per layer (``jax.lax.map``), so memory stays at [T, D].
    ``mesh``: the forward on a device mesh (``capture.stream``); the expert loop is left to XLA's partitioner there,
    which may gather one expert's weights at a time."""
    capture.check_supported(config)
    cfg = config.model.moe
    dtype = jnp.dtype(config.model.dtype)
    expert = experts_lib.from_config(cfg)

    def fn(c: capture.Capture) -> tuple[jax.Array, jax.Array]:
        sums = []
        for layer in c.layers:
            x = layer.inputs.astype(dtype)
            weights = tuple(jnp.asarray(layer.params[moe.EXPERTS][name], dtype) for name in expert.param_names)
            stored = jax.lax.map(lambda w, x=x: expert.apply_one(x, *w).astype(jnp.float32).sum(0), weights)
            row = expert_map.row(cfg, layer.layer)  # per logical expert (its stored expert's; 0 when removed)
            sums.append(jnp.where(jnp.asarray(row >= 0)[:, None], stored[np.maximum(row, 0)], 0.0))
        return jnp.stack(sums), jnp.asarray(c.tokens.size, jnp.int32)

    total, tokens = None, 0
    for sums, count in capture.stream(config, variables, batches, fn, progress=progress, mesh=mesh):
        total = np.asarray(sums, np.float64) if total is None else total + sums
        tokens += int(count)
    if total is None:
        raise ValueError("expert_mean_outputs: no batches")
    return total / tokens
