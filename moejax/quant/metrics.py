"""What quantisation did to an MoE model, against the original on the same tokens.

* ``evaluation``: loss (nats per token), perplexity and bits per byte of both models on evaluation batches
  (``moejax.evaluator.Evaluator``: one compiled step for both, the same config) and their differences;
* ``routing``: per MoE layer, over calibration batches, both models run end to end (so a layer's routing also moves
  with the quantisation of the layers before it):
  - ``flips``: the fraction of tokens whose set of selected experts changes (the top-k ids as a set; null experts,
    ids >= E, count as one null id), ``routing_flips``;
  - ``slot_changes``: the mean fraction of a token's k slots whose expert is not in the other model's set;
  - ``kl``: the mean over tokens of KL(p || q), p and q the softmax of the original and quantised router logits over
    the E real experts (the router's distribution for a softmax router; for a sigmoid router a normalised view of
    the same logits), ``router_kl``;
* ``weight_errors``: per stored routed expert, ||W_q - W||_F / ||W||_F over its matrices (wi_0, wi_1, wo together),
  and per quantised matrix the same over the whole parameter;
* ``model_bytes``: the parameters' bytes as stored originally, and with the quantised slices in their compact form
  (codes and scales, ``moejax.quant.transform.Tensor.nbytes``) and the rest as stored; bits per quantised weight.

``compare`` gathers them for ``python -m moejax.posthoc quantise``, ``against`` for ``python -m moejax.evaluate
--quantise / --against`` (with the quantised model's full evaluation; ``activations``: rules whose activation
formats the quantised model's forward applies, moejax/quant/activation.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import model as model_lib
from moejax import moe
from moejax.quant import transform


def _sets(ids: np.ndarray, num_experts: int) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    return np.sort(np.where((ids >= 0) & (ids < num_experts), ids, num_experts), axis=-1)


def routing_flips(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """[T] bool: whether token t's set of selected experts differs between a and b ([T, k] ids each)."""
    return np.any(_sets(a, num_experts) != _sets(b, num_experts), axis=-1)


def slot_changes(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """[T]: the fraction of a's k slots whose expert is not among b's (null ids as one id)."""
    sa, sb = _sets(a, num_experts), _sets(b, num_experts)
    found = (sa[:, :, None] == sb[:, None, :]).any(-1)
    return 1.0 - found.mean(-1)


def router_kl(logits_a: np.ndarray, logits_b: np.ndarray, num_experts: int) -> np.ndarray:
    """[T] float64: KL(softmax(a) || softmax(b)) over the first num_experts logits."""
    a = np.asarray(logits_a, np.float64)[:, :num_experts]
    b = np.asarray(logits_b, np.float64)[:, :num_experts]
    log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def _routing_arrays(c: Any) -> dict[str, jax.Array]:
    return {"experts": jnp.stack([layer.routing.experts for layer in c.layers]),
            "logits": jnp.stack([layer.logits.astype(jnp.float32) for layer in c.layers])}


def routing(config: ml_collections.ConfigDict, original: Mapping[str, Any], quantised: Mapping[str, Any],
            batches: Sequence[Any], progress: Callable[[int], None] | None = None, mesh: Any = None,
            activations: Sequence[Any] = ()) -> dict[str, Any]:
    """Per MoE layer (``moe_layers`` order) the routing flips, slot changes and router KL of quantised against
    original over batches (token ids [B, S]); see the module docstring. ``mesh``: both models run on this device
    mesh (``moejax.posthoc.capture``'s placement: the routed experts split over 'expert'). ``activations``: rules
    whose activation formats the quantised model's forward applies (moejax/quant/activation.py)."""
    from moejax.posthoc import capture
    from moejax.quant import activation

    layers = model_lib.moe_layers(config.model)
    num_experts = config.model.moe.num_experts
    flips = np.zeros(len(layers))
    changes = np.zeros(len(layers))
    kl = np.zeros(len(layers))
    tokens = 0
    step = jax.jit(lambda v, t: _routing_arrays(capture.forward(config, v, t, mesh=mesh)))  # one for both models

    def quantised_forward(v: Any, t: Any) -> dict[str, jax.Array]:
        with activation.context(config, v["params"], activations):
            return _routing_arrays(capture.forward(config, v, t, mesh=mesh))

    quantised_step = jax.jit(quantised_forward) if any(rule.act for rule in activations) else step
    place = transform.on_device if mesh is None else lambda v: capture.place_variables(v, mesh)
    original, quantised = place(original), place(quantised)
    for index, batch in enumerate(batches):
        tokens_in = (jnp.asarray(batch, jnp.int32) if mesh is None
                     else capture.place_batch(np.asarray(batch, np.int32), mesh, index))
        a, b = jax.device_get(step(original, tokens_in)), jax.device_get(quantised_step(quantised, tokens_in))
        if progress is not None:
            progress(tokens + int(np.size(batch)))
        count = a["experts"].shape[1]
        tokens += count
        for row in range(len(layers)):
            flips[row] += routing_flips(a["experts"][row], b["experts"][row], num_experts).sum()
            changes[row] += slot_changes(a["experts"][row], b["experts"][row], num_experts).sum()
            kl[row] += router_kl(a["logits"][row], b["logits"][row], num_experts).sum()
    if not tokens:
        raise ValueError("routing: no batches")
    return {"layers": layers, "tokens": tokens, "flips": (flips / tokens).tolist(),
            "slot_changes": (changes / tokens).tolist(), "kl": (kl / tokens).tolist()}


def weight_errors(config: ml_collections.ConfigDict, original: Mapping[str, Any], quantised: Mapping[str, Any],
                  tensors: Mapping[str, transform.Tensor] | None = None) -> dict[str, Any]:
    """'experts': [L][E] relative error of every stored routed expert (``moe_layers`` order); 'matrices': {matrix:
    relative error} for the quantised matrices (``tensors``' names; without them, every matrix that changed)."""
    cfg = config.model
    rows = []
    a_layers = model_lib.moe_layer_variables(cfg, original)
    b_layers = model_lib.moe_layer_variables(cfg, quantised)
    for layer in model_lib.moe_layers(cfg):
        a, b = a_layers[layer][0][moe.EXPERTS], b_layers[layer][0][moe.EXPERTS]
        diff = norm = 0.0
        for name in ("wi_0", "wi_1", "wo"):
            wa, wb = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
            diff = diff + ((wb - wa) ** 2).sum(axis=(1, 2))
            norm = norm + (wa ** 2).sum(axis=(1, 2))
        rows.append(np.sqrt(diff / np.maximum(norm, 1e-300)).tolist())
    from moejax.quant import rules

    matrices = {}
    for matrix in rules.matrices(config, original["params"]):
        if tensors is not None and matrix.name not in tensors:
            continue
        wa = np.asarray(transform.get_path(original["params"], matrix.path), np.float64)
        wb = np.asarray(transform.get_path(quantised["params"], matrix.path), np.float64)
        error = float(np.sqrt(((wb - wa) ** 2).sum() / max((wa ** 2).sum(), 1e-300)))
        if tensors is not None or error > 0:
            matrices[matrix.name] = error
    return {"experts": rows, "matrices": matrices}


def model_bytes(variables: Mapping[str, Any], tensors: Mapping[str, transform.Tensor]) -> dict[str, Any]:
    """'original': the params' bytes as stored; 'quantised': the quantised slices in their compact form plus every
    other parameter (and slice) as stored; 'quantised_weights': how many weights are quantised and their
    'bits_per_weight' (codes and scales)."""
    leaves = jax.tree.leaves(variables["params"])
    original = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves)
    replaced = compact = weights = 0
    for tensor in tensors.values():
        m = tensor.matrix
        itemsize = transform._dtype_from_name(tensor.dtype).itemsize
        count = sum(len(part.index) for part in tensor.parts) * m.k * m.n
        weights += count
        replaced += count * itemsize
        compact += tensor.nbytes
    return {"original": original, "quantised": original - replaced + compact, "quantised_weights": weights,
            "ratio": (original - replaced + compact) / max(original, 1),
            "bits_per_weight": 8.0 * compact / weights if weights else None}


EVALUATION_KEYS = ("loss", "perplexity", "bits_per_byte", "tokens")


def _evaluate_both(config: ml_collections.ConfigDict, original: Mapping[str, Any], quantised: Mapping[str, Any],
                   batches: Iterable[Any], bytes_table: np.ndarray | None, *, with_load: bool,
                   progress: Callable[[int], None] | None = None, activations: Sequence[Any] = ()
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``moejax.evaluator.Evaluator`` results of both models on the batches, through one compiled step (two
    when the quantised model's activations are quantised: another forward)."""
    from moejax import evaluator as evaluator_lib

    batches = list(batches)
    evaluator = evaluator_lib.Evaluator(config, bytes_table=bytes_table)
    quantised_evaluator = evaluator
    if any(rule.act for rule in activations):
        quantised_evaluator = evaluator_lib.Evaluator(config, bytes_table=bytes_table, activations=activations)
    base = evaluator(transform.on_device(original), batches, with_load=with_load)
    new = quantised_evaluator(transform.on_device(quantised), batches, with_load=with_load, progress=progress)
    return base, new


def _differences(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    base, new = ({key: float(r[key]) for key in EVALUATION_KEYS} for r in (base, new))
    return {"original": base, "quantised": new, "delta_loss": new["loss"] - base["loss"],
            "delta_bits_per_byte": new["bits_per_byte"] - base["bits_per_byte"]}


def evaluation(config: ml_collections.ConfigDict, original: Mapping[str, Any], quantised: Mapping[str, Any],
               batches: Iterable[Any], bytes_table: np.ndarray | None = None) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of both models on evaluation batches [B, S + 1] and their differences
    (quantised - original), through one ``moejax.evaluator.Evaluator``."""
    return _differences(*_evaluate_both(config, original, quantised, batches, bytes_table, with_load=False))


def against(config: ml_collections.ConfigDict, original: Mapping[str, Any], quantised: Mapping[str, Any],
            tensors: Mapping[str, transform.Tensor] | None, batches: Iterable[Any], *,
            bytes_table: np.ndarray | None = None, progress: Callable[[int], None] | None = None,
            activations: Sequence[Any] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``moejax.evaluate`` reports for a quantised model against its original on evaluation windows [B, S + 1]:
    (the quantised model's full evaluation, with the per-layer statistics and expert loads; the metrics above:
    'original', 'quantised', 'delta_loss', 'delta_bits_per_byte' as ``evaluation``, 'routing' as ``routing`` on the
    windows' input tokens (None for a model without MoE layers or with Chain-of-Experts), 'weights' as
    ``weight_errors`` and 'bytes' as ``model_bytes`` (None without the compact form ``tensors``)). ``activations``:
    rules whose activation formats the quantised model's forward applies (moejax/quant/activation.py)."""
    batches = [np.asarray(b) for b in batches]
    base, new = _evaluate_both(config, original, quantised, batches, bytes_table, with_load=True, progress=progress,
                               activations=activations)
    out = _differences(base, new)
    cfg = config.model
    routed = bool(model_lib.moe_layers(cfg)) and cfg.moe.chain_iterations == 1
    out["routing"] = (routing(config, original, quantised, [b[:, :-1] for b in batches], activations=activations)
                      if routed else None)
    out["weights"] = weight_errors(config, original, quantised, tensors)
    out["bytes"] = None if tensors is None else model_bytes(original, tensors)
    return new, out


def compare(config: ml_collections.ConfigDict, original: Mapping[str, Any], quantised: Mapping[str, Any],
            tensors: Mapping[str, transform.Tensor], *, calibration: Sequence[Any] | None = None,
            evaluation_batches: Iterable[Any] | None = None, bytes_table: np.ndarray | None = None,
            progress: Callable[[int], None] | None = None, mesh: Any = None) -> dict[str, Any]:
    """Every metric above: 'bytes', 'weights', and with the batches 'routing' (calibration token ids [B, S]; on
    ``mesh`` when given) and 'evaluation' (evaluation windows [B, S + 1], on one device)."""
    out: dict[str, Any] = {"bytes": model_bytes(original, tensors),
                           "weights": weight_errors(config, original, quantised, tensors)}
    if calibration is not None:
        out["routing"] = routing(config, original, quantised, calibration, progress=progress, mesh=mesh)
    if evaluation_batches is not None:
        out["evaluation"] = evaluation(config, original, quantised, evaluation_batches, bytes_table)
    return out
