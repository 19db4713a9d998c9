"""GPTQ (arXiv 2210.17323) for MoE layers: each routed expert quantised with its own routed calibration tokens,
the MoE layers one after the other, every layer calibrated on the model whose earlier layers are already quantised.

The solver (``solve``) follows the authors' ``GPTQ.fasterquant`` (github.com/IST-DASLab/gptq, ``gptq.py``) on
W [out, in] and H = 2/n sum_t x_t x_t^T [in, in]: dead inputs (H_ii = 0) get H_ii = 1 and their weights zeroed;
H += percdamp * mean(diag H) I; the upper Cholesky factor of H^-1; columns quantised in order in blocks of
``blocksize``, each column's error err = (w - q) / [H^-1]_ii spread onto the block's later columns, the block's
errors onto the later blocks at its end (the lazy batch update); per-group scales computed when a group's first
column is reached, from the weights as they stand at the block's start (as the authors' code reads ``W``); per-channel
scales from the weights before dead columns are zeroed. The quantiser is the format's (``moejax.quant.formats``):
symmetric int<b> per channel or per group, FP8 blocks, MXFP4 groups; an FP8 block's scale spans 128 outputs, so its
rows take one scale from the block's largest magnitude.

The calibration (``quantize``), per MoE layer in order:

1. a forward pass over the calibration batches (``moejax.posthoc.capture.stream``) with the variables as they are:
   the attention, dense and other non-MoE weights the rules match were rounded to nearest before the first layer,
   the earlier MoE layers are already GPTQ-quantised;
2. for each stored routed expert e, from the MoE inputs of the tokens routed to it (each selected slot; logical
   experts bound to one stored expert pooled; capacity drops not applied): H_e = 2/n_e X_e^T X_e for wi_0 and wi_1,
   and for wo the same of its hidden activations act(X_e wi_0) * (X_e wi_1) (GPT-OSS: its clamped gate) computed
   with the layer's unquantised weights (the authors' default: every sub-layer of a block calibrated on the block's
   full-precision forward); the shared experts and the router from every token (the shared wo from the shared
   GLU's hidden activations);
3. every matched matrix of the layer through ``solve`` with its Hessian, the new weights written back.

An expert routed fewer than ``min_tokens`` tokens (default 32; at least 1) is rounded to nearest instead: its
Hessian is then mostly the damping term, and GPTQ would fit the weights to a handful of tokens (an expert no token
reached would have every input dead, and the authors' rule would zero it). ``percdamp`` (default the authors' 0.01)
applies to every expert alike. What ``quantize`` reports per layer: the tokens per expert and the experts rounded
to nearest for want of tokens.

Departures from the authors' code: the Hessian is accumulated as a float64 sum and scaled by 2/n at the end (the
authors keep a float32 running mean); no activation ordering (``--act-order``) or static groups; the quantisers are
symmetric (the authors' default is asymmetric min-max with a zero point); Hessians come from a full forward of the
model per MoE layer (the authors run one block at a time on stored block inputs), so a model of L MoE layers costs L
forward passes over the calibration data; attention, dense layers and the LM head are rounded to nearest.
"""
from __future__ import annotations

import functools
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
from moejax.quant import formats, transform
from moejax.quant import rules as rules_lib
from moejax.quant.rules import Matrix, Rule

GPTQ_TARGETS = ("experts", "shared", "router")  # the MoE layer's matrices GPTQ calibrates; the rest is RTN
DEFAULT_MIN_TOKENS = 32


# ------------------------------------------------------------------------------------------------ the solver


@functools.partial(jax.jit, static_argnames=("fmt", "blocksize"))
def _solve(w: jax.Array, h: jax.Array, percdamp: jax.Array, *, fmt: formats.Format, blocksize: int
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """w [N, K] (the authors' [out, in]), h [K, K] -> (grid values [N, K], scale per column [N, K], loss)."""
    n, k = w.shape
    gk, gn = fmt.tile_for(k)
    n_pad = -(-n // gn) * gn
    w = jnp.pad(w.astype(jnp.float32), ((0, n_pad - n), (0, 0)))
    h = h.astype(jnp.float32)

    def row_scales(block: jax.Array) -> jax.Array:  # [n_pad, g] -> one scale per row, shared by gn rows
        amax = jnp.abs(block).max(axis=1).reshape(-1, gn).max(axis=1)
        return jnp.repeat(fmt.scale(amax, jnp), gn)

    scale = row_scales(w)  # per channel: from W before its dead columns are zeroed (the authors' find_params(W))
    grouped = gk < k
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[None, :], 0.0, w)
    h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)
    factor = jnp.linalg.cholesky(h)
    hinv = jnp.linalg.cholesky(jax.scipy.linalg.cho_solve((factor, True), jnp.eye(k, dtype=jnp.float32))).T
    grid = jnp.zeros((n_pad, k), jnp.float32)
    col_scales = jnp.zeros((n_pad, k), jnp.float32)
    loss = jnp.zeros((), jnp.float32)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        count = i2 - i1
        hinv1 = hinv[i1:i2, i1:i2]
        at_start = jnp.pad(w, ((0, 0), (0, gk))) if grouped else None  # W as the block starts (groups read it)

        def body(i, carry, i1=i1, count=count, hinv1=hinv1, at_start=at_start):
            w1, q1, s1, err1, loss, scale = carry
            col = i1 + i
            if grouped:
                scale = jax.lax.cond(col % gk == 0,
                                     lambda: row_scales(jax.lax.dynamic_slice_in_dim(at_start, col, gk, axis=1)),
                                     lambda: scale)
            column = w1[:, i]
            d = hinv1[i, i]
            g = fmt.grid(column / scale, jnp)
            q = g * scale
            err = (column - q) / d
            w1 = w1 - jnp.outer(err, jnp.where(jnp.arange(count) >= i, hinv1[i], 0.0))
            return (w1, q1.at[:, i].set(g), s1.at[:, i].set(scale), err1.at[:, i].set(err),
                    loss + jnp.sum((column - q) ** 2) / d ** 2 / 2, scale)

        zeros = jnp.zeros((n_pad, count), jnp.float32)
        _, q1, s1, err1, loss, scale = jax.lax.fori_loop(0, count, body, (w[:, i1:i2], zeros, zeros, zeros, loss,
                                                                           scale))
        grid = grid.at[:, i1:i2].set(q1)
        col_scales = col_scales.at[:, i1:i2].set(s1)
        w = w.at[:, i2:].add(-err1 @ hinv[i1:i2, i2:])
    return grid[:n], col_scales[:n], loss


def solve(w: np.ndarray, h: np.ndarray, fmt: formats.Format, *, percdamp: float = 0.01, blocksize: int = 128
          ) -> tuple[np.ndarray, np.ndarray, float]:
    """GPTQ of one matrix w [K, N] (``y = x @ w``) with Hessian h [K, K] in format fmt: (grid values [K, N], scales
    [Gk, Gn], the authors' loss sum (w - q)^2 / [H^-1]_ii^2 / 2). The dequantised weights are
    ``formats.dequantize(grid[None], scales[None], fmt)[0]``."""
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"the Hessian of shape {h.shape} does not fit a [K, N] = {w.shape} weight")
    with jax.default_matmul_precision("highest"):
        grid, col_scales, loss = _solve(jnp.asarray(w, jnp.float32).T, jnp.asarray(h, jnp.float32),
                                        jnp.float32(percdamp), fmt=fmt, blocksize=int(blocksize))
    gk, gn = fmt.tile_for(k)
    return np.asarray(grid).T, np.asarray(col_scales)[::gn, ::gk].T, float(loss)


# ------------------------------------------------------------------------------------------ the calibration


class _LayerStats:
    """Running sums of one MoE layer: per stored expert X^T X of its tokens' inputs and of its hidden activations
    (float64) and the token counts; over all tokens X^T X and the shared experts' hidden H^T H."""

    def __init__(self, num_stored: int, d: int, hidden: int, shared: int) -> None:
        self.xx = np.zeros((num_stored, d, d))
        self.hh = np.zeros((num_stored, hidden, hidden))
        self.counts = np.zeros(num_stored, np.int64)
        self.all_xx = np.zeros((d, d))
        self.shared_hh = np.zeros((shared, shared)) if shared else None
        self.tokens = 0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# numpy versions of moejax.moe.experts.ACTIVATIONS (jax.nn.gelu's default is the tanh approximation): the hidden
# activations of every expert's own rows, whose count varies, without a compiled program per count
_NUMPY_ACTIVATIONS = {"silu": lambda x: x * _sigmoid(x), "relu": lambda x: np.maximum(x, 0.0),
                      "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))}


def _activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    if name in _NUMPY_ACTIVATIONS:
        return _NUMPY_ACTIVATIONS[name]
    act = experts_lib.ACTIVATIONS[name]
    return lambda x: np.asarray(act(jnp.asarray(x)), np.float32)


def _glu_hidden(x: np.ndarray, wi_0: np.ndarray, wi_1: np.ndarray, activation: str) -> np.ndarray:
    return (_activation(activation)(x @ wi_0) * (x @ wi_1)).astype(np.float32)


def _expert_hidden(expert: Any, x: np.ndarray, weights: Mapping[str, np.ndarray], e: int) -> np.ndarray:
    """Stored expert e's hidden activations (wo's input) on rows x [m, D]."""
    w = {name: np.asarray(value[e], np.float32) for name, value in weights.items()}
    if isinstance(expert, experts_lib.GPTOSSExperts):  # GPTOSSExperts.gate in numpy
        gate = np.minimum(x @ w["wi_0"] + w["bi_0"], expert.limit)
        up = np.clip(x @ w["wi_1"] + w["bi_1"], -expert.limit, expert.limit)
        return ((up + 1) * (gate * _sigmoid(gate * expert.alpha))).astype(np.float32)
    return _glu_hidden(x, w["wi_0"], w["wi_1"], expert.activation)


def calibration_step(config: ml_collections.ConfigDict, mesh: Any = None) -> Callable[[Any, Any], dict]:
    """A jitted forward (``moejax.posthoc.capture.forward``) giving every MoE layer's inputs [L, T, D] (float32) and
    selected experts [L, T, k]: compiled once per batch shape and used for every layer's pass (only the variables
    change between them). ``mesh``: the forward on this device mesh (expert-parallel MoE layers; the variables and
    tokens placed by ``capture.place_variables`` / ``place_batch``)."""
    from moejax.posthoc import capture

    def fn(variables: Any, tokens: Any) -> dict:
        c = capture.forward(config, variables, tokens, mesh=mesh)
        return {"inputs": jnp.stack([layer.inputs.astype(jnp.float32) for layer in c.layers]),
                "experts": jnp.stack([layer.routing.experts for layer in c.layers])}

    return jax.jit(fn)


def layer_stats(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any], layer: int,
                progress: Callable[[int], None] | None = None, step: Callable[[Any, Any], dict] | None = None,
                mesh: Any = None) -> _LayerStats:
    """The calibration sums of MoE layer ``layer`` over ``batches`` (token ids [B, S]) with ``variables``; ``step``:
    a ``calibration_step`` to reuse (of the same ``mesh``: the forward on that device mesh)."""
    from moejax.posthoc import capture

    cfg = config.model
    row = model_lib.moe_layers(cfg).index(layer)
    params, _ = model_lib.moe_layer_variables(cfg, variables)[layer]
    expert = experts_lib.from_config(cfg.moe)
    weights = {name: np.asarray(params[moe.EXPERTS][name], np.float32) for name in expert.param_names}
    mapping = expert_map.row(cfg.moe, layer)
    num_stored = weights["wi_0"].shape[0]
    shared = params.get(moe.SHARED)
    stats = _LayerStats(num_stored, cfg.d_model, weights["wi_0"].shape[-1],
                        0 if shared is None else int(np.shape(shared["wi_0"])[-1]))

    step = calibration_step(config, mesh) if step is None else step
    apply_vars = transform.on_device(variables) if mesh is None else capture.place_variables(variables, mesh)
    done = 0
    for index, batch in enumerate(batches):
        tokens = np.asarray(batch, np.int32)
        arrays = step(apply_vars, jnp.asarray(tokens) if mesh is None else capture.place_batch(tokens, mesh, index))
        x = np.asarray(arrays["inputs"][row], np.float32)
        ids = np.asarray(arrays["experts"][row])
        done += int(np.size(batch))
        if progress is not None:
            progress(done)
        stats.tokens += x.shape[0]
        stats.all_xx += (x.T @ x).astype(np.float64)
        if shared is not None:
            hidden = _glu_hidden(x, np.asarray(shared["wi_0"], np.float32), np.asarray(shared["wi_1"], np.float32),
                                 cfg.moe.activation)
            stats.shared_hh += (hidden.T @ hidden).astype(np.float64)
        valid = (ids >= 0) & (ids < cfg.moe.num_experts)
        tokens = np.nonzero(valid)[0]
        stored = mapping[ids[valid]]
        keep = stored >= 0
        tokens, stored = tokens[keep], stored[keep]
        for e in np.unique(stored):
            rows = x[tokens[stored == e]]
            stats.counts[e] += rows.shape[0]
            stats.xx[e] += (rows.T @ rows).astype(np.float64)
            hidden = _expert_hidden(expert, rows, weights, int(e))
            stats.hh[e] += (hidden.T @ hidden).astype(np.float64)
    return stats


def _hessian(xx: np.ndarray, count: int) -> np.ndarray:
    return (2.0 / max(count, 1)) * xx


def quantize(config: ml_collections.ConfigDict, variables: Mapping[str, Any], rules: Sequence[Rule],
             batches: Sequence[Any], *, expert_bits: Mapping[int, Sequence[int]] | None = None,
             min_tokens: int = DEFAULT_MIN_TOKENS, percdamp: float = 0.01, blocksize: int = 128,
             progress: Callable[[str], None] | None = None, batch_progress: Callable[[], Any] | None = None,
             mesh: Any = None) -> tuple[dict[str, Any], dict[str, transform.Tensor], dict[str, Any]]:
    """GPTQ on the MoE layers' matrices the rules match (routed experts, shared experts, router), round to nearest
    on the others: (new variables, ``{matrix: Tensor}``, a report ``{'layers': {layer: {'tokens': [per stored
    expert], 'rtn_experts': [...], 'loss': {matrix: GPTQ loss}}}}``). ``batches``: calibration token ids [B, S] (a
    sequence: every MoE layer passes over it). ``progress(what)`` names each step; ``batch_progress()`` gives a
    fresh per-batch progress callback for each pass (or None). ``mesh``: the calibration passes run on this device
    mesh (``moejax.parallel.make_mesh``; the routed experts split over 'expert'); the statistics then equal the
    one-device ones up to float rounding."""
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens={min_tokens!r} is invalid: an integer >= 1 (experts routed fewer tokens are "
                         "rounded to nearest)")
    if not isinstance(percdamp, (int, float)) or isinstance(percdamp, bool) or not percdamp > 0:
        raise ValueError(f"percdamp={percdamp!r} is invalid: a number > 0 (the damping, a fraction of the mean "
                         "Hessian diagonal)")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r} is invalid: an integer >= 1")
    assignment = rules_lib.assign(config, variables["params"], rules)
    if expert_bits is not None:
        from moejax.quant import mixed

        assignment = mixed.with_expert_bits(assignment, expert_bits)
    for name, (_, chosen) in assignment.items():
        if any(fmt is not None and fmt.kind == "ternary" for fmt in chosen):
            raise ValueError(f"GPTQ has no ternary solver ({name} is ternary): round ternary weights to nearest "
                             "(method rtn)")
    moe_layers = set(model_lib.moe_layers(config.model))
    from moejax.posthoc import capture

    capture.check_supported(config)
    step = calibration_step(config, mesh)

    def in_gptq(matrix: Matrix, layer: int) -> bool:
        return matrix.target in GPTQ_TARGETS and layer in moe_layers

    rtn_part = {name: (m, [f if not in_gptq(m, layer) else None for f, layer in zip(chosen, m.layers, strict=True)])
                for name, (m, chosen) in assignment.items()}
    rtn_part = {name: value for name, value in rtn_part.items() if any(f is not None for f in value[1])}
    variables, tensors = transform.apply(config, variables, rtn_part, progress=progress)
    tensors = dict(tensors)
    report: dict[str, Any] = {"layers": {}}
    for layer in model_lib.moe_layers(config.model):
        todo = {name: (m, [f if layer_b == layer and in_gptq(m, layer_b) else None
                           for f, layer_b in zip(chosen, m.layers, strict=True)])
                for name, (m, chosen) in assignment.items()}
        todo = {name: value for name, value in todo.items() if any(f is not None for f in value[1])}
        if not todo:
            continue
        if progress is not None:
            progress(f"GPTQ layer {layer}: calibration pass")
        stats = layer_stats(config, variables, batches, layer,
                            progress=None if batch_progress is None else batch_progress(), step=step, mesh=mesh)
        rtn_experts = sorted(int(e) for e in np.nonzero(stats.counts < min_tokens)[0])
        losses: dict[str, float] = {}

        def solver(matrix: Matrix, index: np.ndarray, slices: np.ndarray, fmt: formats.Format,
                   stats=stats, losses=losses) -> tuple[np.ndarray, np.ndarray]:
            grids, scales = [], []
            for b, w in zip(index, slices, strict=True):
                leaf = matrix.path[-1]
                if matrix.target == "experts":
                    e = matrix.experts[b]
                    if stats.counts[e] < min_tokens:
                        g, s = formats.quantize(w[None], fmt)
                        grids.append(g[0])
                        scales.append(s[0])
                        continue
                    h = _hessian(stats.hh[e] if leaf == "wo" else stats.xx[e], int(stats.counts[e]))
                elif matrix.target == "shared" and leaf == "wo":
                    h = _hessian(stats.shared_hh, stats.tokens)
                else:
                    h = _hessian(stats.all_xx, stats.tokens)
                g, s, loss = solve(w, h, fmt, percdamp=percdamp, blocksize=blocksize)
                losses[f"{matrix.name}[{b}]"] = loss
                grids.append(g)
                scales.append(s)
            return np.stack(grids), np.stack(scales)

        if progress is not None:
            progress(f"GPTQ layer {layer}: {', '.join(todo)}")
        variables, new = transform.apply(config, variables, todo, solver)
        for name, tensor in new.items():
            if name in tensors:
                tensors[name].parts.extend(tensor.parts)
            else:
                tensors[name] = tensor
        report["layers"][str(layer)] = {"tokens": stats.counts.tolist(), "rtn_experts": rtn_experts,
                                        "loss": losses}
    return variables, tensors, report
