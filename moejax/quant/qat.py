"""Quantisation-aware training: the forward pass of every training step runs on fake-quantised weights, the gradient
reaches the full-precision weights the optimizer keeps through a straight-through estimator (STE).

The weights and formats are chosen by the same rules as post-training quantisation (``moejax.quant.rules``:
``TARGET=FORMAT[@LAYERS];...`` over the parameter paths) with the formats QAT supports: ``int<b>`` per output channel,
``int<b>/g<G>`` per group of G inputs, and ``ternary`` ({-1, 0, 1} times the matrix's mean |w|, BitNet b1.58's absmean
as MoTE, arXiv 2506.14435, trains its routed experts: ``config.quant.rules='experts=ternary'`` keeps the shared
experts, the attention and the router in full precision). The forward value of a quantised weight is exactly
``moejax.quant.formats.fake_quantize`` of it (the same float32 operations, in jax), so ``python -m moejax.posthoc
quantise --method=rtn --rules=<the same rules>`` on the trained checkpoint gives the weights the training forward
used, bit for bit.

The gradient (``ste``):

* 'identity' (BitNet's ``w + (quant(w) - w).detach()``): dL/dw = dL/dw_q everywhere;
* 'clipped': dL/dw = dL/dw_q where w lies within the grid's reach (|w / s| <= qmax + 1/2, s the weight's scale), 0
  where the grid clipped it. The absmax scales of the int formats clip nothing (the gradient is the identity); the
  ternary absmean scale clips every weight beyond 1.5 mean |w|.

The scales are treated as constants in the backward pass (as in BitNet's code, where they sit inside the detach).
The checkpoint keeps the full-precision weights: the deployable model is the posthoc quantisation above.

A rule's activation format (``TARGET=FORMAT,ACT``, e.g. ``experts=int4,a8``) also fake-quantises the inputs of its
matrices per token in the training forward and the validation (``Quantiser.activations``: moejax/quant/activation.py,
straight-through gradients).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from moejax import checks
from moejax.quant import activation, formats, transform
from moejax.quant import rules as rules_lib

STE_MODES = ("identity", "clipped")
QAT_KINDS = ("int", "ternary")


def parse(config: ml_collections.ConfigDict) -> list[rules_lib.Rule]:
    """The rules of ``config.quant`` ([] when QAT is off); ConfigError naming the field, the value and what is
    allowed."""
    quant = config.get("quant")
    if quant is None or not quant.rules:
        return []
    checks.choice("quant.ste", quant.ste, STE_MODES)
    try:
        rules = rules_lib.parse(quant.rules, "quant.rules", activations=True)
    except ValueError as e:
        raise checks.ConfigError(f"config field quant.rules={quant.rules!r} is invalid: {e}") from e
    for rule in rules:
        fmt = formats.parse(rule.format)
        if fmt is not None and fmt.kind not in QAT_KINDS:
            checks.fail("quant.rules", quant.rules, f"{rule.target}={rule.format}: quantisation-aware training "
                                                    "supports int<b>, int<b>/g<G> (b in 2..8), ternary and none")
    return rules


def validate(config: ml_collections.ConfigDict, params: Any | None = None) -> None:
    """Checks ``config.quant``; with ``params`` (arrays or shapes) also that every rule matches a matrix."""
    rules = parse(config)
    if rules and params is not None:
        try:
            rules_lib.assign(config, params, rules)
        except ValueError as e:
            raise checks.ConfigError(f"config field quant.rules={config.quant.rules!r} is invalid: {e}") from e


# ------------------------------------------------------------------------------------------------ the STE


def _fake(w: jax.Array, fmt: formats.Format) -> jax.Array:
    """w [B, K, N] fake-quantised in float32 (formats.quantize / dequantize in jax)."""
    return formats.fake_quantize(w, fmt, jnp.float32, jnp)


def _in_reach(w: jax.Array, fmt: formats.Format) -> jax.Array:
    """[B, K, N] bool: the weights the grid does not clip (|w / s| <= qmax + 1/2)."""
    _, scales = formats.quantize(w, fmt, jnp)
    ratio = w.astype(jnp.float32) / formats.expand(scales, fmt, w.shape[1], w.shape[2], jnp)
    return jnp.abs(ratio) <= fmt.qmax + 0.5


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quantize_ste(w: jax.Array, fmt: formats.Format, ste: str = "identity") -> jax.Array:
    """w [B, K, N] fake-quantised in float32 (exactly ``formats.fake_quantize``), with the straight-through gradient
    ``ste`` ('identity' | 'clipped')."""
    return _fake(w, fmt)


def _ste_forward(w: jax.Array, fmt: formats.Format, ste: str) -> tuple[jax.Array, Any]:
    # residuals: the mask of weights in reach ('clipped'), and an empty array carrying w's dtype
    return _fake(w, fmt), (_in_reach(w, fmt) if ste == "clipped" else None, jnp.zeros((0,), w.dtype))


def _ste_backward(fmt: formats.Format, ste: str, residual: Any, g: jax.Array) -> tuple[jax.Array]:
    del fmt, ste
    mask, like = residual
    return ((g if mask is None else jnp.where(mask, g, 0.0)).astype(like.dtype),)


fake_quantize_ste.defvjp(_ste_forward, _ste_backward)


def quantize_params(config: ml_collections.ConfigDict, params: Mapping[str, Any], rules: list[rules_lib.Rule],
                    ste: str = "identity") -> dict[str, Any]:
    """params with every matrix the rules match fake-quantised (in the parameter's dtype) with STE gradients; the
    stacked indices (scanned layers, experts) a rule leaves out keep their values."""
    new = {}
    for matrix, chosen in rules_lib.assign(config, params, rules).values():
        value = transform.get_path(params, matrix.path)
        stack = matrix.view(value)
        out = stack
        for fmt in dict.fromkeys(f for f in chosen if f is not None):
            picked = jnp.asarray([f == fmt for f in chosen])[:, None, None]
            out = jnp.where(picked, fake_quantize_ste(stack, fmt, ste).astype(value.dtype), out)
        new[matrix.path] = out.reshape(matrix.shape)
    return transform.set_paths(params, new)


@dataclasses.dataclass(frozen=True, eq=False)
class Quantiser:
    """``params -> fake-quantised params`` (``quantize_params``) of a config's rules; ``activations(params)`` the
    context in which the forward pass quantises the inputs of the rules' activation formats
    (moejax/quant/activation.py; a null context without them)."""

    config: ml_collections.ConfigDict
    rules: tuple[rules_lib.Rule, ...]
    ste: str = "identity"

    def __call__(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return quantize_params(self.config, params, list(self.rules), self.ste)

    def activations(self, params: Mapping[str, Any]) -> contextlib.AbstractContextManager:
        return activation.context(self.config, params, self.rules)


def activations(quantise: Callable[[Any], Any] | None, params: Mapping[str, Any]
                ) -> contextlib.AbstractContextManager:
    """The activation context of a ``Quantiser`` (a null context for None or another params transform)."""
    if isinstance(quantise, Quantiser):
        return quantise.activations(params)
    return contextlib.nullcontext()


def from_config(config: ml_collections.ConfigDict) -> Quantiser | None:
    """The ``Quantiser`` of the config's ``quant`` section, or None when QAT is off."""
    rules = parse(config)
    if not rules:
        return None
    return Quantiser(config, tuple(rules), config.quant.ste)


class QuantisedEvaluator:
    """An evaluator (``moejax.evaluate.Evaluator``) called on the fake-quantised params: the validation of a QAT run
    measures the model its training forward computes. ``shardings``: the params' shardings (kept)."""

    def __init__(self, evaluator: Any, quantise: Callable[[Any], Any], shardings: Any = None) -> None:
        self.evaluator, self.quantiser = evaluator, quantise
        self.quantise = jax.jit(quantise, out_shardings=shardings)

    def __call__(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        # the evaluator's step is traced here, so its forward runs the activation quantisers too (this evaluator is
        # only ever called through this class)
        with activations(self.quantiser, variables["params"]):
            return self.evaluator({**variables, "params": self.quantise(variables["params"])}, *args, **kwargs)
