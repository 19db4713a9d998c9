"""Activation quantisation: the inputs of the matrices a rule gives an activation format (``Rule.act``, on the command
line ``TARGET=FORMAT,ACT``: ``experts=int4,a8``) are fake-quantised in the forward pass, per token with dynamic scales
(computed from each token's own values at every call, as W8A8 schemes quantise activations: SmoothQuant, arXiv
2211.10438; LLM.int8(), arXiv 2208.07339, per row).

The formats (``moejax.quant.rules.ACT_HELP``) are weight formats (``moejax.quant.formats``) applied to the inputs
viewed as [1, K, T], the K inputs of T tokens, so that a scale tile of gk inputs by one output is one token's scale:

=========== ======================================= ==============================================================
act         grid                                    scale
=========== ======================================= ==============================================================
a<b>        integers |q| <= Q = 2^(b-1) - 1         amax / Q over the token's K inputs
a<b>/g<G>   as above                                amax / Q per token and group of G inputs
afp8        FP8 E4M3 (+-448)                        amax / 448 per token and 128 inputs (DeepSeek-V3's 1 x 128
                                                    activation tiles)
amxfp4      FP4 E2M1 (+-6)                          2^ceil(log2(amax / 6)) per token and 32 inputs (MX)
=========== ======================================= ==============================================================

The quantised input is cast back to the input's dtype before the product. The gradient is the straight-through
estimator (dL/dx = dL/dx_q; the absmax scales clip nothing; the scales are constants), so the same rules train
(``config.quant.rules``, moejax/quant/qat.py) and evaluate (``moejax.evaluate``'s ``quantise=``).

Where: ``context(config, params, rules)`` runs a forward pass under ``flax.linen.intercept_methods`` with an
interceptor that (the model code is not touched)

* quantises the input of the attention projections, the router kernels and the LM head (their modules' inputs,
  over the contracted axes: the heads and head width of the attention output);
* runs the shared experts' and dense layers' GLU (``moejax.moe.layer.GLU``) as ``QuantisedInputs`` of the expert kind
  ``GLUExperts``: the same products, with wi_0's and wi_1's input and wo's input (the hidden activation) quantised;
* gives the MoE layer's routed pass (``MoE._routed``) its expert kind wrapped in ``QuantisedInputs``, whose
  ``linear`` quantises each matrix's rows before the product on every grouped-matmul backend (the tiled loop and
  its custom VJP, ragged_dot, megablox, tokamax) and under expert parallelism. A row is one routed slot of one
  token, so its scale is the token's.

A scanned stack (``model.scan_layers``) whose layers take different activation formats is refused (a module of the
scanned block runs every layer); a GLU with LoRA adapters on a matrix whose input is quantised is refused too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.adapters import expert_lora
from moejax.moe import experts as experts_lib
from moejax.moe import layer as moe_layer
from moejax.quant import formats
from moejax.quant import rules as rules_lib


def _fake(x: jax.Array, fmt: formats.Format) -> jax.Array:
    """x [..., K] fake-quantised per token (the leading axes) in float32, cast back to x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    out = formats.fake_quantize(rows.T[None], fmt, jnp.float32, jnp)[0].T
    return out.reshape(x.shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quantize(x: jax.Array, fmt: formats.Format) -> jax.Array:
    """x [..., K] quantised and dequantised per token (its K inputs) in ``fmt`` (``rules.activation_format``), with
    the straight-through gradient."""
    return _fake(x, fmt)


def _forward(x: jax.Array, fmt: formats.Format) -> tuple[jax.Array, None]:
    return _fake(x, fmt), None


def _backward(fmt: formats.Format, residual: None, g: jax.Array) -> tuple[jax.Array]:
    del fmt, residual
    return (g,)


fake_quantize.defvjp(_forward, _backward)


def quantise_inputs(x: jax.Array, fmt: formats.Format, contracted: int = 1) -> jax.Array:
    """x [..., K1, ..., Kc] with its ``contracted`` trailing axes (a matrix's input) fake-quantised per token."""
    if fmt is None:
        return x
    lead, inner = x.shape[:x.ndim - contracted], x.shape[x.ndim - contracted:]
    return fake_quantize(x.reshape(*lead, math.prod(inner)), fmt).reshape(x.shape)


# ------------------------------------------------------------------------------------------------ experts


@dataclasses.dataclass(frozen=True)
class QuantisedInputs:
    """An expert kind (moejax/moe/experts.py) whose matrices in ``acts`` ((name, activation format), ...) take
    fake-quantised inputs: ``forward`` quantises each product's rows before the kind's own ``linear``. Parameters,
    axes and the rest are the base kind's."""

    base: Any
    acts: tuple[tuple[str, formats.Format], ...]

    param_names = property(lambda self: self.base.param_names)
    param_axes = property(lambda self: self.base.param_axes)
    zero_init = property(lambda self: self.base.zero_init)
    after_contraction = property(lambda self: self.base.after_contraction)
    matrices = property(lambda self: self.base.matrices)
    biases = property(lambda self: self.base.biases)

    def param_shapes(self, num_experts: int, d_model: int, hidden: int) -> dict[str, tuple[int, ...]]:
        return self.base.param_shapes(num_experts, d_model, hidden)

    def forward(self, x: jax.Array, linear: experts_lib.Linear) -> jax.Array:
        table = dict(self.acts)
        return self.base.forward(x, lambda h, name: linear(quantise_inputs(h, table.get(name)), name))

    def apply_one(self, x: jax.Array, *weights: jax.Array) -> jax.Array:
        return self.forward(x, experts_lib.one_linear(self, weights))

    def apply_ragged(self, rows: jax.Array, weights: experts_lib.Weights,
                     matmul: experts_lib.GroupedMatmul) -> jax.Array:
        return self.forward(rows, experts_lib.ragged_linear(self, weights, rows, matmul))


def with_inputs_quantised(expert: Any, acts: tuple[tuple[str, formats.Format], ...]) -> Any:
    """The expert kind with ``acts``' inputs quantised; LoRA's ``AdaptedExperts`` keeps its place outside (so its
    adapters see the quantised rows too, and its routed-slot dropout still finds it)."""
    if isinstance(expert, expert_lora.AdaptedExperts):
        return dataclasses.replace(expert, base=QuantisedInputs(expert.base, acts))
    return QuantisedInputs(expert, acts)


EXPERT_TYPES = (*experts_lib.EXPERT_KINDS.values(), expert_lora.AdaptedExperts)


# ------------------------------------------------------------------------------------------------ the forward


def table(config: ml_collections.ConfigDict, params: Mapping[str, Any], rules: Sequence[rules_lib.Rule]
          ) -> dict[tuple[str, ...], formats.Format]:
    """``{parameter path: activation format}`` of every matrix whose inputs the rules quantise. ValueError for a
    scanned stack whose layers differ, naming the matrix."""
    out = {}
    for name, (matrix, chosen) in rules_lib.activations(config, params, rules).items():
        if len(set(chosen)) > 1:
            names = sorted({rules_lib.activation_name(f) for f in chosen})
            raise ValueError(f"activation formats differ between the layers {sorted(set(matrix.layers))} of the "
                             f"scanned stack {name} ({names}): one module runs them all; use model.scan_layers=False "
                             f"or the same activation format for them")
        if chosen[0] is not None:
            out[matrix.path] = chosen[0]
    return out


def _contracted(module: nn.Module) -> int:
    axis = getattr(module, "axis", -1)
    return len(axis) if isinstance(axis, (tuple, list)) else 1


def _glu(module: moe_layer.GLU, x: jax.Array, acts: dict[str, formats.Format]) -> jax.Array:
    """The GLU module's forward (``GLU.__call__``: weights and input in its dtype, ``GLUExperts``' products) with
    the inputs of ``acts``' matrices quantised."""
    lora = module.lora
    if lora is not None and any(lora.picks((*module.path, name)) for name in acts):
        raise ValueError(f"activation quantisation of {'/'.join(module.path)}: its GLU has LoRA adapters "
                         f"(model.lora), which the quantised-input GLU does not run; quantise other targets")
    weights = [jnp.asarray(module.get_variable("params", name)).astype(module.dtype)
               for name in rules_lib.GLU_MATRICES]
    expert = QuantisedInputs(experts_lib.GLUExperts(module.activation), tuple(acts.items()))
    return expert.apply_one(x.astype(module.dtype), *weights)


def _inner(me: Any, fun: Any, context: Any) -> Any:
    """``fun`` wrapped in the interceptors entered after ``me`` (the inner ones, e.g. ``moejax.posthoc.capture``'s,
    which sows the shared experts' output), as flax wraps the module's own method: a replaced method passes them."""
    from flax.linen import module as flax_module

    inner = []
    for other in getattr(flax_module, "_global_interceptor_stack", ()):  # the innermost first
        if other is me:
            break
        inner.append(other)
    for other in inner:
        fun = functools.partial(lambda f, i, *a, **k: i(f, a, k, context), fun, other)
    return fun


def interceptor(found: Mapping[tuple[str, ...], formats.Format]) -> Any:
    """The ``flax.linen.intercept_methods`` interceptor of a ``table``."""

    def intercept(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if module.is_initializing():
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if context.method_name == "_routed" and isinstance(module, moe_layer.MoE):
            acts = tuple((name, found[key]) for name in rules_lib.GLU_MATRICES
                         if (key := (*path, "experts", name)) in found)
            if acts:
                at = next((i for i, a in enumerate(args) if isinstance(a, (*EXPERT_TYPES, QuantisedInputs))), None)
                if at is None:
                    raise RuntimeError(f"activation quantisation of {'/'.join(path)}: the MoE layer's routed pass "
                                       f"(MoE._routed) took no expert kind among its positional arguments")
                args = (*args[:at], with_inputs_quantised(args[at], acts), *args[at + 1:])
            return next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, moe_layer.GLU):
            acts = {name: found[(*path, name)] for name in rules_lib.GLU_MATRICES if (*path, name) in found}
            if acts:
                return _inner(intercept, functools.partial(_glu, module, acts=acts), context)(*args, **kwargs)
        elif isinstance(module, (nn.Dense, nn.DenseGeneral, moe_layer.RouterKernel)) and (*path, "kernel") in found:
            args = (quantise_inputs(args[0], found[(*path, "kernel")], _contracted(module)), *args[1:])
        return next_fun(*args, **kwargs)

    return intercept


@contextlib.contextmanager
def context(config: ml_collections.ConfigDict, params: Mapping[str, Any], rules: Sequence[rules_lib.Rule]
            ) -> Iterator[None]:
    """Forward passes of the model (``params``: its tree, arrays or tracers) run inside have the inputs of the
    rules' activation-quantised matrices fake-quantised; nothing changes without activation formats."""
    found = table(config, params, rules) if any(rule.act for rule in rules) else {}
    if not found:
        yield
        return
    with nn.intercept_methods(interceptor(found)):
        yield
