"""EAQuant (arXiv 2506.13329): expert-aware post-training quantisation of MoE layers, as its weights see it.

The authors' code (github.com/darren-fzq1/EAQuant: ``main.py``, ``quantize/smooth.py``, ``quantize/quantizer.py``,
``quantize/eaquant.py``) quantises OLMoE and Pangu-Pro-MoE to W4A4 (router W8A8) on top of DuQuant's rotations. Of its
three expert-aware steps, what acts on the weights is computed here:

1. **Smoothing aggregation** (``smooth_lm`` with ``fc1_scale_merge='max'``, ``alpha`` 0.6): per input channel j of
   the MoE layer's input, each routed expert e gets SmoothQuant's scale s_e = max(a_e^alpha / w_e^(1 - alpha), 1e-5),
   a_e = max(max |x_j| over the tokens routed to e, 1e-5), w_e = max(max |W_j| over its wi_0 and wi_1 rows, 1e-5)
   (``get_scale``); the layer's scale is the largest over the experts, and over the shared experts' scale (from every
   token) where the layer has them (``merge_scale``; the router's own scale takes no part in 'max'). It is folded into
   the norm before the MoE layer (scale, and bias for LayerNorm, divided by s; model.norm='rms_offset' stores the
   scale as 1 + w, and 1 + w is what is divided) and into the router kernel and every
   expert's and the shared experts' wi_0 / wi_1 rows (multiplied by s): the same function in full precision.
2. **Router alignment** (``per_channel_kl_top0`` for the router): one clipping ratio r for the whole router kernel,
   from r = 0.35 + 0.0065 i (i = 0..100, the authors' grid), scales r * amax / Q, the ratio minimising
   KL_top = 1/T sum_t sum_{j in topk(z_t)} p_tj (log p_tj - log q_tj), p = softmax(z), q = softmax(z_q) over all
   experts, z / z_q the router logits of the calibration inputs with the original / quantised kernel (+ the router
   bias), topk the original's top-k experts (``cali_kld_top_batch``, k the model's top-k); the first minimum wins.
3. **Weights** (``per_channel_tensor``): every other matched matrix takes, per scale tile (per output channel or
   group), the clipping ratio of the same grid minimising the tile's squared weight error.
4. **Calibration balance** (``expert_token_num_ratio`` 2.0): an expert's calibration statistics come from at most
   ratio x (the mean routed tokens per expert) of its tokens; an expert no calibration token reached is calibrated on
   every token (the authors' third stage).

What the weights see of the method is all of it here (no activation quantisation); the departures (docs/methods.md):
symmetric grids (the authors' default is asymmetric); the balance governs the experts' smoothing statistics (the
authors apply it to the calibration of the activation quantisers and their rotations, which weight-only quantisation
has not); no DuQuant rotations or permutations, no smoothing of the attention (q/k/v and v -> o) or of ``wo`` (the
Otsu outlier mask), which act on activation outliers; the router's calibration inputs are the full-precision model's
MoE inputs over the calibration batches (the authors use the layer inputs of the partly quantised model, averaged
over the calibration samples); every other matrix a rule matches (attention, dense, LM head) takes step 3.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import model as model_lib
from moejax import moe
from moejax.moe import expert_map
from moejax.quant import formats, transform
from moejax.quant import rules as rules_lib
from moejax.quant.rules import Matrix, Rule

CLIP_RATIOS = (0.35 + np.arange(101) * (0.65 / 100)).astype(np.float32)  # quantizer.py: bottom_bound, loop_times
DEFAULT_ALPHA = 0.6
DEFAULT_BALANCE = 2.0
ROUTER_TOKENS = 8192  # at most this many calibration inputs per MoE layer for the router's KL


def _tile_sum(x: np.ndarray, fmt: formats.Format) -> np.ndarray:
    """x [B, K, N] summed over every scale tile: [B, Gk, Gn]."""
    b, k, n = x.shape
    gk, gn = fmt.tile_for(k, n)
    rows, cols = -(-k // gk), -(-n // gn)
    return formats._pad(x, rows * gk, cols * gn).reshape(b, rows, gk, cols, gn).sum(axis=(2, 4))


def _round(w: np.ndarray, fmt: formats.Format, amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [B, K, N] on the grid with scales from the (clipped) tile maxima amax [B, Gk, Gn]."""
    scales = fmt.scale(amax)
    return fmt.grid(w / formats.expand(scales, fmt, w.shape[1], w.shape[2])), scales


def _check(fmt: formats.Format) -> None:
    if fmt.kind == "ternary":
        raise ValueError("EAQuant's clipping search needs an amax-scaled format (int, fp8, mxfp4), not ternary")


def clip_mse(w: np.ndarray, fmt: formats.Format) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: w [B, K, N] -> (grid, scales), each tile's clipping ratio minimising its squared error."""
    _check(fmt)
    w = np.asarray(w, np.float32)
    amax = formats.tile_amax(w, fmt)
    best = np.full(amax.shape, np.inf)
    ratio = np.ones(amax.shape, np.float32)
    for r in CLIP_RATIOS:
        grid, scales = _round(w, fmt, amax * r)
        error = _tile_sum((w - formats.dequantize(grid, scales, fmt)).astype(np.float64) ** 2, fmt)
        better = error < best
        ratio[better] = r
        best = np.minimum(best, error)
    return _round(w, fmt, amax * ratio)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def topk_kl(logits: np.ndarray, quantised: np.ndarray, k: int) -> float:
    """KL over the original's top-k experts: 1/T sum_t sum_{j in topk} p_tj (log p_tj - log q_tj), p and q softmax
    over all experts of logits / quantised [T, E]."""
    log_p, log_q = _log_softmax(np.asarray(logits, np.float64)), _log_softmax(np.asarray(quantised, np.float64))
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    lp, lq = np.take_along_axis(log_p, top, -1), np.take_along_axis(log_q, top, -1)
    return float(np.sum(np.exp(lp) * (lp - lq)) / logits.shape[0])


def clip_router(w: np.ndarray, fmt: formats.Format, x: np.ndarray, top_k: int, bias: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Step 2: the router kernel w [1, D, E] on inputs x [T, D] -> (grid, scales, the chosen ratio), one ratio for
    every channel minimising ``topk_kl``."""
    _check(fmt)
    w = np.asarray(w, np.float32)
    amax = formats.tile_amax(w, fmt)
    x = np.asarray(x, np.float32)
    shift = 0.0 if bias is None else np.asarray(bias, np.float32)
    logits = x @ w[0] + shift
    best, chosen = np.inf, np.float32(1.0)
    for r in CLIP_RATIOS:
        grid, scales = _round(w, fmt, amax * r)
        score = topk_kl(logits, x @ formats.dequantize(grid, scales, fmt)[0] + shift, top_k)
        if score < best:
            best, chosen = score, r
    return (*_round(w, fmt, amax * chosen), float(chosen))


def smoothing_scale(expert_absmax: np.ndarray, wi_0: np.ndarray, wi_1: np.ndarray, alpha: float,
                    shared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Step 1: the layer's smoothing scale [D] from each stored expert's input absmax [E, D], its wi_0 / wi_1
    [E, D, F], and optionally (every token's absmax [D], the shared wi_0, wi_1 [D, F])."""
    def scale(act: np.ndarray, *weights: np.ndarray) -> np.ndarray:
        w = np.max([np.abs(m).max(axis=-1) for m in weights], axis=0)
        return np.maximum(np.maximum(act, 1e-5) ** alpha / np.maximum(w, 1e-5) ** (1 - alpha), 1e-5)

    rows = [scale(expert_absmax[e], wi_0[e], wi_1[e]) for e in range(len(expert_absmax))]
    if shared is not None:
        rows.append(scale(*shared))
    return np.max(rows, axis=0).astype(np.float32)


class _Stats:
    """One MoE layer's calibration statistics: every token's input absmax [D], each stored expert's absmax over at
    most ``cap`` of its routed tokens [E, D], its token count, and up to ROUTER_TOKENS inputs for the router."""

    def __init__(self, num_stored: int, d: int, cap: int) -> None:
        self.absmax = np.zeros(d, np.float32)
        self.expert_absmax = np.zeros((num_stored, d), np.float32)
        self.counts = np.zeros(num_stored, np.int64)
        self.cap = cap
        self.inputs: list[np.ndarray] = []
        self.kept = 0

    def add(self, x: np.ndarray, stored: np.ndarray, tokens: np.ndarray) -> None:
        self.absmax = np.maximum(self.absmax, np.abs(x).max(axis=0))
        if self.kept < ROUTER_TOKENS:
            self.inputs.append(x[:ROUTER_TOKENS - self.kept])
            self.kept += len(self.inputs[-1])
        for e in np.unique(stored):
            room = self.cap - self.counts[e]
            rows = x[tokens[stored == e][:max(room, 0)]]
            if len(rows):
                self.expert_absmax[e] = np.maximum(self.expert_absmax[e], np.abs(rows).max(axis=0))
                self.counts[e] += len(rows)

    def balanced_absmax(self) -> np.ndarray:
        """[E, D]: each expert's statistics, every token's for an expert no token reached."""
        return np.where(self.counts[:, None] > 0, self.expert_absmax, self.absmax[None])


def statistics(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Sequence[Any],
               balance: float = DEFAULT_BALANCE, progress: Callable[[int], None] | None = None) -> dict[int, _Stats]:
    """``{MoE layer: _Stats}`` from one forward pass of the model over the calibration batches (token ids [B, S])."""
    from moejax.posthoc import capture
    from moejax.quant import gptq

    capture.check_supported(config)
    cfg = config.model
    total = sum(int(np.size(batch)) for batch in batches)
    step = gptq.calibration_step(config)
    apply_vars = transform.on_device(variables)
    out = {}
    for layer in model_lib.moe_layers(cfg):
        count = expert_map.stored_count(cfg.moe, layer)
        cap = max(int(balance * total * cfg.moe.top_k / count), 1)
        out[layer] = _Stats(count, cfg.d_model, cap)
    done = 0
    for batch in batches:
        arrays = jax.device_get(step(apply_vars, jnp.asarray(batch, jnp.int32)))
        for row, layer in enumerate(model_lib.moe_layers(cfg)):
            ids = np.asarray(arrays["experts"][row])
            valid = (ids >= 0) & (ids < cfg.moe.num_experts)
            tokens = np.nonzero(valid)[0]
            stored = expert_map.row(cfg.moe, layer)[ids[valid]]
            keep = stored >= 0
            out[layer].add(np.asarray(arrays["inputs"][row], np.float32), stored[keep], tokens[keep])
        done += int(np.size(batch))
        if progress is not None:
            progress(done)
    return out


def _at(tree: Any, path: Sequence[str], unit: int | None) -> tuple[Any, str | int]:
    """(the container, key) holding path[-1] (and unit) in a mutable numpy tree."""
    for key in path[:-1]:
        tree = tree[key]
    if unit is None:
        return tree, path[-1]
    return tree[path[-1]], unit


def smooth(config: ml_collections.ConfigDict, variables: Mapping[str, Any], stats: Mapping[int, _Stats],
           alpha: float = DEFAULT_ALPHA) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Step 1 on every MoE layer: (the smoothed variables, numpy; ``{layer: scale [D]}``). ValueError for a model
    without a norm before its MoE layers (model.norm_position='post')."""
    cfg = config.model
    if cfg.get("norm_position", "pre") != "pre":
        raise ValueError(f"EAQuant's smoothing folds into the norm before the MoE layer: model.norm_position="
                         f"{cfg.norm_position!r} has none (smooth=False skips it)")
    params = jax.tree.map(lambda a: np.array(a, copy=True), dict(variables["params"]))
    scales = {}
    for layer, (path, unit) in model_lib.moe_layer_paths(cfg).items():
        ffn, _ = model_lib.moe_layer_variables(cfg, {"params": params})[layer]
        experts, shared = ffn[moe.EXPERTS], ffn.get(moe.SHARED)
        st = stats[layer]
        shared_part = None if shared is None else (st.absmax, np.asarray(shared["wi_0"]), np.asarray(shared["wi_1"]))
        s = smoothing_scale(st.balanced_absmax(), np.asarray(experts["wi_0"]), np.asarray(experts["wi_1"]), alpha,
                            shared_part)
        scales[layer] = s
        norm = (*path[:-1], "ffn_norm")
        for leaf in ("scale", "bias"):
            if leaf not in _at(params, (*norm, leaf), None)[0]:
                continue
            holder, key = _at(params, (*norm, leaf), unit)
            offset = 1.0 if leaf == "scale" and cfg.norm == "rms_offset" else 0.0  # its scale is 1 + w (Qwen3-Next)
            holder[key] = ((holder[key].astype(np.float32) + offset) / s - offset).astype(holder[key].dtype)
        targets = [(moe.ROUTER, "kernel", 0), (moe.EXPERTS, "wi_0", 1), (moe.EXPERTS, "wi_1", 1)]
        if shared is not None:
            targets += [(moe.SHARED, "wi_0", 0), (moe.SHARED, "wi_1", 0)]
        for module, leaf, lead in targets:
            holder, key = _at(params, (*path, module, leaf), unit)
            w = holder[key]
            shape = (1,) * lead + (-1, 1)  # s over the input rows: [D, N] or [E, D, F]
            holder[key] = (w.astype(np.float32) * s.reshape(shape)).astype(w.dtype)
    return {**variables, "params": params}, scales


def quantize(config: ml_collections.ConfigDict, variables: Mapping[str, Any], rules: Sequence[Rule],
             batches: Sequence[Any], *, expert_bits: Mapping[int, Sequence[int]] | None = None,
             alpha: float = DEFAULT_ALPHA, balance: float = DEFAULT_BALANCE, smoothing: bool = True,
             progress: Callable[[str], None] | None = None, batch_progress: Callable[[], Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, transform.Tensor], dict[str, Any]]:
    """EAQuant on the weights the rules match (``expert_bits``: per-expert int bits, as ``transform.quantize``):
    (the quantised variables, ``{matrix: Tensor}`` (the compact form on the smoothed model), a report
    ``{'smoothed': the variables before rounding, 'router_ratio': {layer: r}, 'expert_tokens': {layer: [...]},
    'smoothing': bool}``). The quantised model computes the original's function up to the rounding; its norm scales
    before the MoE layers are the smoothed ones."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} is invalid: the smoothing strength, a number in [0, 1]")
    if not isinstance(balance, (int, float)) or isinstance(balance, bool) or not balance > 0:
        raise ValueError(f"balance={balance!r} is invalid: a number > 0 (an expert's calibration tokens at most "
                         "balance x the mean tokens per expert)")
    assignment = rules_lib.assign(config, variables["params"], rules)
    if expert_bits is not None:
        from moejax.quant import mixed

        assignment = mixed.with_expert_bits(assignment, expert_bits)
    for name, (_, chosen) in assignment.items():
        for fmt in chosen:
            if fmt is not None:
                try:
                    _check(fmt)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from e
    if progress is not None:
        progress("EAQuant: calibration statistics")
    stats = statistics(config, variables, batches, balance, None if batch_progress is None else batch_progress())
    scales: dict[int, np.ndarray] = {}
    if smoothing:
        if progress is not None:
            progress("EAQuant: smoothing aggregation")
        variables, scales = smooth(config, variables, stats, alpha)
    smoothed = variables
    layers_params = model_lib.moe_layer_variables(config.model, variables)
    ratios: dict[int, float] = {}

    def solver(matrix: Matrix, index: np.ndarray, slices: np.ndarray, fmt: formats.Format
               ) -> tuple[np.ndarray, np.ndarray]:
        if matrix.target != "router" or matrix.path[-2] != moe.ROUTER:
            return clip_mse(slices, fmt)
        grids, out_scales = [], []
        for b, w in zip(index, slices, strict=True):
            layer = matrix.layers[b]
            st = stats[layer]
            x = np.concatenate(st.inputs) / scales.get(layer, np.float32(1.0))
            bias = layers_params[layer][0][moe.ROUTER].get("bias")
            g, s, ratios[layer] = clip_router(w[None], fmt, x, config.model.moe.top_k,
                                              None if bias is None else np.asarray(bias))
            grids.append(g[0])
            out_scales.append(s[0])
        return np.stack(grids), np.stack(out_scales)

    if progress is not None:
        progress("EAQuant: clipping search")
    new, tensors = transform.apply(config, variables, assignment, solver)
    report = {"smoothed": smoothed, "router_ratio": {str(k): v for k, v in ratios.items()},
              "expert_tokens": {str(layer): st.counts.tolist() for layer, st in stats.items()},
              "smoothing": bool(smoothing)}
    return new, tensors, report
