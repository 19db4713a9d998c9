"""Merging LoRA adapters into their base weights: W + scaling * A B for every adapted weight, the adapters dropped and
``model.lora.targets`` emptied, so that the merged model computes what the adapted one computes (up to float
rounding) with the base model's parameter tree: it saves as a release (``moejax.hf.save``), prunes, merges experts
and evaluates as any model.

    config, variables = moejax.adapters.merge(*moejax.load(workdir))
    python -m moejax.posthoc merge-adapter --checkpoint=WORKDIR --out=DIR [--format=moejax|hf]
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from moejax import moe
from moejax.adapters import lora


def delta(weight: Any, a: Any, b: Any, n_in: int, scaling: float, shared: bool = False) -> Any:
    """scaling * A B in the layout of weight [lead..., in..., out...] (float32): A [lead..., in..., r] and B [lead...,
    r, out...] with n_in input axes; ``shared``: A and B lack the expert axis (the first of weight's after A's lead
    axes), added by broadcasting."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    lead = a.ndim - 1 - n_in
    in_shape, rank = a.shape[lead:lead + n_in], a.shape[-1]
    out_shape = b.shape[lead + 1:]
    product = jnp.matmul(a.reshape(*a.shape[:lead], math.prod(in_shape), rank),
                         b.reshape(*b.shape[:lead], rank, math.prod(out_shape)))
    product = scaling * product.reshape(*a.shape[:lead], *in_shape, *out_shape)
    if shared:
        product = jnp.broadcast_to(jnp.expand_dims(product, lead), weight.shape)
    return product


def _merge_module(params: Mapping[str, Any], path: tuple[str, ...], spec: lora.LoraSpec) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out[key] = _merge_module(value, (*path, key), spec)
        elif not lora.is_adapter((key,)):
            out[key] = value
    for key in params:
        if not lora.is_adapter((key,)) or not key.endswith(lora.A_SUFFIX):
            continue
        name, shared, _ = lora.base_name(key)
        a_name, b_name = lora.adapter_names(name, shared)
        if name not in params or b_name not in params:
            raise ValueError(f"adapter {'/'.join((*path, key))} has no {b_name} or no weight {name} beside it")
        routed = bool(path) and path[-1] == moe.EXPERTS
        n_in = 1 if routed else lora._adaptable_suffix((*path, name))
        if n_in is None:
            raise ValueError(f"adapter {'/'.join((*path, key))}: {'/'.join((*path, name))} is not a weight adapters "
                             f"adapt")
        weight = params[name]
        merged = jnp.asarray(weight, jnp.float32) + delta(weight, params[a_name], params[b_name], n_in, spec.scaling,
                                                          shared)
        out[name] = merged.astype(jnp.asarray(weight).dtype)
    return out


def merge(config: ml_collections.ConfigDict, variables: Mapping[str, Any]
          ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, variables) with every adapter merged into its weight (computed in float32, stored in the weight's
    dtype) and ``model.lora.targets`` emptied. config: a whole config or its ``model`` section. A model without
    adapters comes back as it is (copies)."""
    new_config = copy.deepcopy(config)
    model_cfg = new_config.model if "model" in new_config else new_config
    spec = lora.spec(model_cfg)
    if spec is None:
        return new_config, dict(variables)
    if spec.mixture is not None:
        raise ValueError(f"model.lora.mixture={spec.mixture} routes each token to its own mix of LoRA experts, "
                         f"which no single weight computes: a mixture cannot be merged")
    params = _merge_module(variables["params"], (), spec)
    model_cfg.lora.targets = ()
    return new_config, {**variables, "params": params}
