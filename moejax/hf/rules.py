"""Tensor-name / layout rules: what a family's table is made of (torchtitan's state-dict-adapter style, not a script
per model), and the rule groups several families share. Each family's table is in its module (moejax/hf/families/).

A table maps a moejax parameter path (inside ``layers_{i}`` for layer parameters) to a ``Rule``: the checkpoint's
tensor name (``{i}`` the layer, ``{j}`` the expert of a per-expert tensor) and the layout change, one of

* ``copy``      the same array (norm scales, embeddings, full-width biases, attention sinks, selection biases)
* ``reshape``   a flat [H * Dh] bias <-> [H, Dh]
* ``linear``    an ``nn.Linear`` weight [out, in] <-> a kernel [in, ...out] (transpose, then split the out axis)
* ``linear2``   the same for kernels with two input axes (the attention output [H, Dh, D])
* ``even``/``odd``  the gate / up halves of GPT-OSS's interleaved packed ``gate_up_proj`` [E, D, 2F] (and bias)
* ``first``/``second``  the gate / up halves of Llama 4's ``gate_up_proj`` [E, D, 2F] (gate the first F columns)
* ``zeros``     no checkpoint tensor: the MoE layer's selection bias of a family without one (must stay 0 to save)
* ``row``       a [1, ...] tensor <-> the array without its leading axis (ERNIE 4.5's selection bias [1, E])
* ``conv``      a depthwise ``nn.Conv1d`` weight [C, 1, K] <-> a kernel [K, C] (Qwen3-Next's linear attention)

A rule with ``fused`` reads its rows of a tensor several parameters share along its first axis (``fused_rules``:
Phi-3's qkv_proj and gate_up_proj), split on load and concatenated on save.

Per-expert tensors (``experts.{j}.w1.weight``) are stacked into the [E, ...] parameter as they are read; GPT-OSS
stores its experts stacked already. A rule applies only where the model config has the parameter (q/bias only
with qkv_bias, the dense GLU only in dense layers, ...).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


PAIRS = {"even": ("even", "odd"), "odd": ("even", "odd"), "first": ("first", "second"),
         "second": ("first", "second")}  # the kinds whose two parameters make one tensor, in its order


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # checkpoint name; {i} = layer, {j} = expert (per-expert tensors); {pair}, {sub}: see ``name``
    kind: str = "copy"  # copy | reshape | linear | linear2 | even | odd | first | second | zeros | row
    # A checkpoint tensor several parameters share (Phi-3's qkv_proj, gate_up_proj): the moejax paths inside the
    # layer whose checkpoint tensors (each by its own rule's kind) are concatenated along the first axis, in this
    # order, this rule's among them; () = a tensor of its own.
    fused: tuple[str, ...] = ()

    @property
    def per_expert(self) -> bool:
        return "{j}" in self.hf

    def name(self, i: int | None, **more: Any) -> str:
        """The checkpoint name of layer i (``more``: the expert ``j``). ``{pair}`` and ``{sub}`` stand for i // 2 and
        i % 2: the decoder layer and sublayer of families whose checkpoint layer holds two moejax layers
        (LongCat-Flash's two attention + FFN sublayers)."""
        if i is None:
            return self.hf.format(**more)
        return self.hf.format(i=i, pair=i // 2, sub=i % 2, **more)


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint tensor's shape for a moejax array of ``shape`` (one expert's for per-expert rules)."""
    if kind in ("copy", "zeros"):
        return tuple(shape)
    if kind == "reshape":
        return (math.prod(shape),)
    if kind == "row":
        return (1, *shape)
    if kind == "conv":
        return (shape[1], 1, shape[0])
    if kind in ("linear", "linear2"):
        n_in = 1 if kind == "linear" else 2
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if kind in PAIRS:
        return (*shape[:-1], 2 * shape[-1])
    raise ValueError(f"unknown rule kind {kind!r}")


def to_moejax(kind: str, array: Any, shape: tuple[int, ...]) -> Any:
    """A checkpoint array (numpy) in the layout of a moejax array of ``shape``."""
    if kind == "copy":
        return array
    if kind in ("reshape", "row"):
        return array.reshape(shape)
    if kind == "conv":
        return array[:, 0, :].T
    if kind in ("linear", "linear2"):
        return array.T.reshape(shape)
    if kind == "even":
        return array[..., 0::2]
    if kind == "odd":
        return array[..., 1::2]
    if kind in ("first", "second"):
        half = array.shape[-1] // 2
        return array[..., :half] if kind == "first" else array[..., half:]
    raise ValueError(f"rule kind {kind!r} has no checkpoint tensor")


def to_hf(kind: str, arrays: list[Any]) -> Any:
    """The checkpoint array of the moejax arrays of one tensor (two for the PAIRS kinds, in their order)."""
    if kind in ("first", "second"):
        return np.concatenate(arrays, axis=-1)
    if kind in ("even", "odd"):
        even, odd = arrays
        packed = np.empty((*even.shape[:-1], 2 * even.shape[-1]), even.dtype)
        packed[..., 0::2], packed[..., 1::2] = even, odd
        return packed
    (array,) = arrays
    if kind == "copy":
        return array
    if kind == "reshape":
        return array.reshape(-1)
    if kind == "row":
        return array[None]
    if kind == "conv":
        return array.T[:, None, :]
    if kind in ("linear", "linear2"):
        n_in = 1 if kind == "linear" else 2
        return array.reshape(math.prod(array.shape[:n_in]), -1).T
    raise ValueError(f"rule kind {kind!r} has no checkpoint tensor")


TOP_RULES = {  # the top-level parameters, named alike in every family
    "embed/embedding": Rule("model.embed_tokens.weight"),
    "final_norm/scale": Rule("model.norm.weight"),
    "lm_head/kernel": Rule("lm_head.weight", "linear"),
}
NORM_RULES = {
    "attn_norm/scale": Rule("model.layers.{i}.input_layernorm.weight"),
    "ffn_norm/scale": Rule("model.layers.{i}.post_attention_layernorm.weight"),
}
_ATTN = "model.layers.{i}.self_attn."
GQA_RULES = {
    **{f"attn/{p}/kernel": Rule(f"{_ATTN}{p}_proj.weight", "linear") for p in "qkv"},
    **{f"attn/{p}/bias": Rule(f"{_ATTN}{p}_proj.bias", "reshape") for p in "qkv"},
    "attn/o/kernel": Rule(f"{_ATTN}o_proj.weight", "linear2"),
    "attn/o/bias": Rule(f"{_ATTN}o_proj.bias"),
    "attn/q_norm/scale": Rule(f"{_ATTN}q_norm.weight"),
    "attn/k_norm/scale": Rule(f"{_ATTN}k_norm.weight"),
    "attn/sinks": Rule(f"{_ATTN}sinks"),
}
MLA_RULES = {
    "attn/q/kernel": Rule(f"{_ATTN}q_proj.weight", "linear"),
    "attn/q_a/kernel": Rule(f"{_ATTN}q_a_proj.weight", "linear"),
    "attn/q_a_norm/scale": Rule(f"{_ATTN}q_a_layernorm.weight"),
    "attn/q_b/kernel": Rule(f"{_ATTN}q_b_proj.weight", "linear"),
    "attn/kv_a/kernel": Rule(f"{_ATTN}kv_a_proj_with_mqa.weight", "linear"),
    "attn/kv_a_norm/scale": Rule(f"{_ATTN}kv_a_layernorm.weight"),
    "attn/kv_b/kernel": Rule(f"{_ATTN}kv_b_proj.weight", "linear"),
    "attn/o/kernel": Rule(f"{_ATTN}o_proj.weight", "linear2"),
}


def glu_rules(moejax_prefix: str, hf_prefix: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
              ) -> dict[str, Rule]:
    """wi_0 / wi_1 / wo of a GLU <- the gate / up / down Linear weights under hf_prefix."""
    return {f"{moejax_prefix}/{p}": Rule(f"{hf_prefix}.{n}.weight", "linear")
            for p, n in zip(("wi_0", "wi_1", "wo"), names, strict=True)}


def moe_rules(mlp: str, experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> dict[str, Rule]:
    """Router and per-expert GLU experts under ``model.layers.{i}.<mlp>``; the selection bias stays 0."""
    base_name = f"model.layers.{{i}}.{mlp}"
    return {"ffn/router/kernel": Rule(f"{base_name}.gate.weight", "linear"),
            **glu_rules("ffn/experts", f"{base_name}.experts.{{j}}", experts),
            "ffn/router_bias": Rule("", "zeros")}


DENSE_RULES = glu_rules("ffn", "model.layers.{i}.mlp")


def fused_rules(hf: str, paths: tuple[str, ...], kind: str = "linear") -> dict[str, Rule]:
    """The rules of the parameters ``paths`` (inside the layer) whose checkpoint tensors are the consecutive row
    blocks of one tensor ``hf`` (e.g. q, k, v of Phi-3's ``qkv_proj``), each in the layout ``kind``."""
    return {path: Rule(hf, kind, tuple(paths)) for path in paths}
