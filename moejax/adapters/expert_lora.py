"""LoRA on the routed experts: one adapter per expert stacked on the expert axis (or one every expert shares), run
inside the grouped matmul on the routed slots only (``AdaptedExperts``), never on every expert for every token.

The rules, the initialisers and the names of the adapters are moejax/adapters/lora.py's; this module holds what the
MoE layer (moejax/moe/layer.py) asks for its routed experts: which matrices the rules pick (``expert_targets``),
their adapters declared in the experts' module (``expert_adapters``) and the wrapping expert kind.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.adapters.lora import DROPOUT_STREAMS, LoraSpec, a_init, adapter_names
from moejax.moe import experts as moe_experts


def expert_targets(lora: LoraSpec | None, module_path: Sequence[str], expert: Any) -> tuple[str, ...]:
    """The matrices of an expert kind that ``lora`` picks under the experts' module path."""
    if lora is None:
        return ()
    return tuple(name for name in expert.matrices if lora.picks((*module_path, name)))


def expert_adapters(module: nn.Module, lora: LoraSpec, expert: Any, names: Iterable[str], num_experts: int,
                    shapes: Mapping[str, tuple[int, ...]], param_dtype: Any) -> tuple[jax.Array, ...]:
    """Declares the routed experts' adapters of matrices ``names`` (shapes: the kind's [E, in, out]) in module and
    returns them stacked on the expert axis, A [E, in, r] and B [E, r, out] for each, in ``AdaptedExperts`` order
    (a shared adapter broadcast to every expert)."""
    out = []
    shared = lora.experts == "shared"
    for name in names:
        _, d_in, d_out = shapes[name]
        a_name, b_name = adapter_names(name, shared)
        lead = () if shared else (num_experts,)
        a = module.param(a_name, a_init(lora, d_in), (*lead, d_in, lora.rank), param_dtype)
        b = module.param(b_name, nn.initializers.zeros, (*lead, lora.rank, d_out), param_dtype)
        if shared:
            a = jnp.broadcast_to(a, (num_experts, *a.shape))
            b = jnp.broadcast_to(b, (num_experts, *b.shape))
        out += [a, b]
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class AdaptedExperts:
    """An expert kind with LoRA on some of its matrices: expert e maps rows through its kind's ``forward`` with each
    adapted product h W_e (+ b_e) plus scaling * (h A_e) B_e. Parameters: the kind's, then A [E, in, r] and B
    [E, r, out] of each adapted matrix (``<name>_lora_a``, ``<name>_lora_b``). The grouped-matmul backends, the
    tiled custom VJP and the expert-parallel specs read it as any kind."""

    base: Any  # an expert kind of moejax/moe/experts.py
    adapted: tuple[str, ...]
    scaling: float
    # With dropout in this pass: each adapted matrix's input width; the rows then carry, after their D columns, one
    # keep mask per adapted matrix (``dropout_masks``, gathered per routed slot by moejax/moe/pipeline.py), and the
    # outputs keep that width (zeros past D).
    dropout_widths: tuple[int, ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.base.param_names + tuple(n for name in self.adapted for n in adapter_names(name))

    @property
    def param_axes(self) -> dict[str, tuple[str | None, ...]]:
        axes = dict(self.base.param_axes)
        for name in self.adapted:
            a_name, b_name = adapter_names(name)
            lead, d_in, d_out = self.base.param_axes[name]
            axes[a_name], axes[b_name] = (lead, d_in, None), (lead, None, d_out)
        return axes

    @property
    def zero_init(self) -> tuple[str, ...]:
        return self.base.zero_init

    @property
    def after_contraction(self) -> tuple[str, ...]:
        return self.base.after_contraction

    @property
    def matrices(self) -> tuple[str, ...]:
        return self.base.matrices

    @property
    def biases(self) -> dict[str, str]:
        return self.base.biases

    def param_shapes(self, num_experts: int, d_model: int, hidden: int) -> dict[str, tuple[int, ...]]:
        return self.base.param_shapes(num_experts, d_model, hidden)

    def _split(self, weights: Sequence[jax.Array]) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
        n = len(self.base.param_names)
        return tuple(weights[:n]), dict(zip(self.param_names[n:], weights[n:], strict=True))

    def forward(self, x: jax.Array, linear: moe_experts.Linear) -> jax.Array:
        return self.base.forward(x, linear)

    def _with_masks(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the rows' tokens [m, D], {adapted matrix: its dropout keep mask [m, in], 1/(1-p) or 0}) of rows x that
        carry their masks as trailing columns (``dropout_widths``); no masks without them."""
        if not self.dropout_widths:
            return x, {}
        width = x.shape[-1] - sum(self.dropout_widths)
        cuts = np.cumsum((width, *self.dropout_widths))
        tokens, *masks = jnp.split(x, cuts[:-1], axis=-1)
        return tokens, dict(zip(self.adapted, masks, strict=True))

    def _padded(self, y: jax.Array) -> jax.Array:
        """y [m, D] with zero columns where the rows carried masks (the grouped matmul keeps the rows' width)."""
        if not self.dropout_widths:
            return y
        return jnp.concatenate([y, jnp.zeros((y.shape[0], sum(self.dropout_widths)), y.dtype)], axis=-1)

    def apply_one(self, x: jax.Array, *weights: jax.Array) -> jax.Array:
        """One expert's weights (no expert axis) on x [m, D (+ masks)] -> [m, D (+ zeros)]: the dense reference."""
        base, adapters = self._split(weights)
        x, masks = self._with_masks(x)
        inner = moe_experts.one_linear(self.base, base)

        def linear(h: jax.Array, name: str) -> jax.Array:
            out = inner(h, name)
            if name not in self.adapted:
                return out
            a_name, b_name = adapter_names(name)
            h = h * masks[name] if name in masks else h
            return out + self.scaling * ((h @ adapters[a_name]) @ adapters[b_name])

        return self._padded(self.base.forward(x, linear))

    def apply_ragged(self, rows: jax.Array, weights: moe_experts.Weights,
                     matmul: moe_experts.GroupedMatmul) -> jax.Array:
        """Every expert on its consecutive group of rows [R, D (+ masks)]: the adapters through the same grouped
        matmul."""
        base, adapters = self._split(weights)
        rows, masks = self._with_masks(rows)
        inner = moe_experts.ragged_linear(self.base, base, rows, matmul)

        def linear(h: jax.Array, name: str) -> jax.Array:
            out = inner(h, name)
            if name not in self.adapted:
                return out
            a_name, b_name = adapter_names(name)
            h = h * masks[name] if name in masks else h
            return out + self.scaling * matmul(matmul(h, adapters[a_name]), adapters[b_name])

        return self._padded(self.base.forward(rows, linear))


def dropout_masks(key: jax.Array, rate: float, num_slots: int, widths: Sequence[int], dtype: Any) -> jax.Array:
    """[num_slots, sum(widths)] keep masks of the routed slots' adapter inputs, one block of columns per adapted
    matrix (its input width): 1/(1-rate) where kept, 0 where dropped (PEFT's lora_dropout on the input of A, drawn
    per routed slot and per matrix)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, (num_slots, sum(widths)))
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(dtype)


def slot_dropout(module: nn.Module, lora: LoraSpec | None, expert: Any, num_slots: int, d_model: int, hidden: int,
                 dtype: Any) -> tuple[Any, jax.Array | None]:
    """(expert, masks [num_slots, M]) for a routed pass of module (the MoE layer): with ``lora.dropout`` on adapted
    routed experts in a forward pass that carries one of lora's DROPOUT_STREAMS, the expert kind that reads the masks
    (``dropout_widths``) and masks drawn per routed slot (``dropout_masks``); else (expert, None)."""
    if not isinstance(expert, AdaptedExperts) or lora is None or not lora.dropout or module.is_initializing():
        return expert, None
    stream = next((s for s in DROPOUT_STREAMS if module.has_rng(s)), None)
    if stream is None:
        return expert, None
    shapes = expert.base.param_shapes(1, d_model, hidden)
    widths = tuple(shapes[name][1] for name in expert.adapted)
    masks = dropout_masks(module.make_rng(stream), lora.dropout, num_slots, widths, dtype)
    return dataclasses.replace(expert, dropout_widths=widths), masks
