"""Which architecture features of a converted config the moejax model actually implements.

A released family can need model features (config fields of configs/base.py) that moejax declares before its model
reads them. Loading such a model would silently compute something else, so every feature a config uses is probed
once per process: a tiny model with the feature on and the same model with it off are traced
(``jax.make_jaxpr`` of ``init_with_output``: parameters and forward pass, nothing compiled). When both traces are
the same the model ignores the field, and loading raises ``MissingFeatureError`` naming it; so does a model that
refuses the field (an exception while tracing).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from moejax.configs import base


class MissingFeatureError(NotImplementedError):
    """The converted config uses a model feature that moejax's model does not implement (yet)."""


def _tiny(attention: str) -> ml_collections.ConfigDict:
    m = base.get_config().model
    m.update(vocab_size=32, d_model=16, num_layers=2, num_heads=2, ffn_dim=16, attention=attention)
    m.mla.update(q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    m.moe.update(num_experts=4, top_k=2, expert_ffn=8)
    return m


def _set(**fields) -> Callable[[ml_collections.ConfigDict], None]:
    def apply(m: ml_collections.ConfigDict) -> None:
        for path, value in fields.items():
            *parents, leaf = path.split("__")
            node = m
            for p in parents:
                node = node[p]
            node[leaf] = value

    return apply


# name -> (is it used by model config m, (base setup, feature on) for the probe). Names are the config fields.
FEATURES: dict[str, tuple[Callable[[ml_collections.ConfigDict], bool], Callable, Callable]] = {
    "model.head_dim": (lambda m: bool(m.head_dim), _set(), _set(head_dim=4)),
    "model.qkv_bias": (lambda m: bool(m.qkv_bias), _set(), _set(qkv_bias=True)),
    "model.o_bias": (lambda m: bool(m.o_bias), _set(), _set(o_bias=True)),
    "model.qk_norm_scope='proj'": (lambda m: m.qk_norm and m.qk_norm_scope == "proj", _set(qk_norm=True),
                                   _set(qk_norm_scope="proj")),
    "model.clip_qkv": (lambda m: bool(m.clip_qkv), _set(), _set(clip_qkv=0.01)),
    "model.dense_layers": (lambda m: bool(m.dense_layers), _set(), _set(dense_layers=(1,))),
    "model.moe.shared_ffn": (lambda m: m.moe.num_shared > 0 and m.moe.shared_ffn not in (
        0, m.moe.num_shared * m.moe.expert_ffn), _set(moe__num_shared=1), _set(moe__shared_ffn=12)),
    "model.rope_interleave": (lambda m: bool(m.rope_interleave), _set(), _set(rope_interleave=True)),
    "model.rope_scaling.kind='yarn'": (lambda m: m.rope_scaling.kind == "yarn", _set(), _set(
        rope_scaling__kind="yarn", rope_scaling__factor=4.0, rope_scaling__original_max_position_embeddings=8)),
    "model.rope_scaling.mscale_all_dim": (
        lambda m: m.rope_scaling.kind == "yarn" and bool(m.rope_scaling.mscale_all_dim),
        _set(rope_scaling__kind="yarn", rope_scaling__factor=4.0,
             rope_scaling__original_max_position_embeddings=8), _set(rope_scaling__mscale_all_dim=1.0)),
    "model.attention='mla'": (lambda m: m.attention == "mla", _set(), _set(attention="mla")),
    "model.mla.q_lora_rank": (lambda m: m.attention == "mla" and bool(m.mla.q_lora_rank), _set(attention="mla"),
                              _set(mla__q_lora_rank=8)),
    "model.attention_sinks": (lambda m: bool(m.attention_sinks), _set(), _set(attention_sinks=True)),
    "model.layer_types (sliding)": (lambda m: "sliding" in tuple(m.layer_types), _set(),
                                    _set(layer_types=("sliding", "full"), sliding_window=2)),
    "model.moe.router.bias": (lambda m: bool(m.moe.router.bias), _set(), _set(moe__router__bias=True)),
    "model.moe.expert_kind='gpt_oss'": (lambda m: m.moe.expert_kind == "gpt_oss", _set(),
                                        _set(moe__expert_kind="gpt_oss")),
}
# Features probed inside the attention kind the model uses (an MLA model needs them in its MLA).
IN_ATTENTION = ("model.rope_interleave", "model.rope_scaling.kind='yarn'", "model.rope_scaling.mscale_all_dim")


def _trace(m: ml_collections.ConfigDict) -> str:
    return _trace_json(m.to_json())


@functools.cache
def _trace_json(config_json: str) -> str:
    from moejax import model as moejax_model

    m = ml_collections.ConfigDict(json.loads(config_json))
    m.layer_types, m.dense_layers = tuple(m.layer_types), tuple(m.dense_layers)
    moejax_model.validate(m)
    module = moejax_model.Transformer(m)
    tokens = jnp.zeros((1, 6), jnp.int32)
    return str(jax.make_jaxpr(lambda: module.init_with_output(jax.random.key(0), tokens))())


@functools.cache
def probe(name: str, attention: str = "gqa") -> str | None:
    """None when the model implements the feature, else why it counts as missing."""
    _, setup, turn_on = FEATURES[name]
    off = _tiny(attention)
    setup(off)
    on = ml_collections.ConfigDict(off.to_dict())
    turn_on(on)
    reference = _trace(off)
    try:
        traced = _trace(on)
    except Exception as e:  # noqa: BLE001 - any refusal of the field means the feature is not there
        return f"the model refuses it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None if traced != reference else "the model ignores it (same parameters and computation without it)"


def missing(m: ml_collections.ConfigDict) -> dict[str, str]:
    """The features model config m uses that the moejax model does not implement: {config field: why}."""
    found = {}
    for name, (used, _, _) in FEATURES.items():
        if used(m):
            context = m.attention if name in IN_ATTENTION else "gqa"
            if context == "mla" and name != "model.attention='mla'" and probe("model.attention='mla'") is not None:
                continue  # reported as the MLA feature itself
            why = probe(name, context)
            if why is not None:
                found[name] = why
    return found


def require(m: ml_collections.ConfigDict, what: str) -> None:
    """Raises MissingFeatureError listing every feature m needs that the model lacks."""
    gaps = missing(m)
    if gaps:
        listed = "; ".join(f"{name}: {why}" for name, why in gaps.items())
        raise MissingFeatureError(f"{what} needs model features moejax does not implement yet: {listed}")
