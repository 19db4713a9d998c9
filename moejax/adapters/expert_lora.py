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

from moejax.adapters.lora import LoraSpec, a_init, adapter_names
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

    def apply_one(self, x: jax.Array, *weights: jax.Array) -> jax.Array:
        """One expert's weights (no expert axis) on x [m, D] -> [m, D]: the dense reference."""
        base, adapters = self._split(weights)
        inner = moe_experts.one_linear(self.base, base)

        def linear(h: jax.Array, name: str) -> jax.Array:
            out = inner(h, name)
            if name not in self.adapted:
                return out
            a_name, b_name = adapter_names(name)
            return out + self.scaling * ((h @ adapters[a_name]) @ adapters[b_name])

        return self.base.forward(x, linear)

    def apply_ragged(self, rows: jax.Array, weights: moe_experts.Weights,
                     matmul: moe_experts.GroupedMatmul) -> jax.Array:
        """Every expert on its consecutive group of rows [R, D]: the adapters through the same grouped matmul."""
        base, adapters = self._split(weights)
        inner = moe_experts.ragged_linear(self.base, base, rows, matmul)

        def linear(h: jax.Array, name: str) -> jax.Array:
            out = inner(h, name)
            if name not in self.adapted:
                return out
            a_name, b_name = adapter_names(name)
            return out + self.scaling * matmul(matmul(h, adapters[a_name]), adapters[b_name])

        return self.base.forward(rows, linear)
