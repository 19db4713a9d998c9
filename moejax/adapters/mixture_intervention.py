"""Routing interventions on the routers of mixtures of LoRA experts (``model.lora.mixture``): the operations of
moejax/moe/intervention.py (mask, force, scale, top_k, rank), applied at evaluation to the LoRA-expert router of
chosen adapted weights, without editing the model or its parameters.

    ADDRESS = "layers_0/attn/q/kernel"                              # the adapted weight's params path
    iv = mixture_intervention.silence(config, {ADDRESS: [1]})       # {address: Intervention}
    iv = mixture_intervention.merge(iv, mixture_intervention.force(config, {"layers_1/ffn/wo": [2]}))
    logits = model.Transformer(config.model).apply({**variables, **mixture_intervention.variables(iv)}, tokens)

An address is the params path of an adapted weight that has LoRA experts (its router is ``<address>_moe_lora_router``;
``addresses(config)`` lists them with their expert counts; the same key, split at '/', as ``mixture.collect``'s).
Each router gets a one-layer ``Intervention`` over its E LoRA experts, and the adapted layer applies it as the MoE
layer applies one to its router (moejax/moe/intervene.py): mask and force as -/+inf on the selection, then masked
slots null, the scale, and the renormalisation where the router renormalises. The LoRA router is the registry's
'topk' with softmax scores, so:

- MoLA (``mixture.top_k`` = k > 0, renormalised): a silenced expert is never selected and the k best of the others
  share weight 1; a forced expert takes a slot for every token (weight: its softmax probability renormalised over
  the selected slots).
- LoRAMoE (``top_k`` = 0, every expert with its softmax weight, no renormalisation): a silenced expert's term is
  removed and the others keep their softmax weights (as a masked expert under a MoE router that does not
  renormalise); forcing changes nothing (every token already takes every expert); ``limit_top_k`` keeps the k
  most probable experts with their raw softmax weights.

The interventions reach the layers as the variable collection ``mixture.INTERVENTION`` ('lora_intervention'), so
no call signature changes; it is read at evaluation and in training alike. Not with ``model.scan_layers`` (the
collection would need a stacked layer axis): refused by name.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from moejax.adapters import mixture
from moejax.moe.intervention import Intervention, InterventionError


def _model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.model if "model" in config else config


def addresses(config: ml_collections.ConfigDict) -> dict[str, int]:
    """{address of an adapted weight with LoRA experts: its expert count} of a model (whole config or ``model``
    section), traced without allocating."""
    from moejax.hf.convert import abstract_variables

    m = _model(config)
    flat = jax.tree_util.tree_flatten_with_path(abstract_variables(m)["params"])[0]
    out = {}
    for path, leaf in flat:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[-1].endswith(mixture.ROUTER_SUFFIX):
            out["/".join([*keys[:-1], keys[-1][: -len(mixture.ROUTER_SUFFIX)]])] = int(leaf.shape[-1])
    return out


def _router_section(mix: mixture.MixtureSpec, num_experts: int) -> ml_collections.ConfigDict:
    """A one-layer ``model`` section whose ``moe`` is the LoRA router's (what Intervention checks against)."""
    moe = mix.router_config(num_experts)
    # LoRAMoE (top_k 0) takes every expert: a silenced one leaves its slot empty rather than handing it to another,
    # so Intervention's "fewer experts than slots" check must not count the silenced ones; E placeholder slots
    # (checks only: the layer's router has none) let any set be silenced
    moe.num_null_experts = 0 if mix.top_k else num_experts
    return ml_collections.ConfigDict(dict(num_layers=1, moe=moe))


def _count(config: ml_collections.ConfigDict, address: Any, known: Mapping[str, int] | None = None) -> int:
    m = _model(config)
    if m.get("lora") is None or mixture.spec(m.lora) is None:
        raise InterventionError("LoRA-expert interventions need a model with model.lora.mixture (num_experts or "
                                "per_layer set)")
    if m.scan_layers:
        raise InterventionError("LoRA-expert interventions need model.scan_layers=False (got True)")
    known = addresses(m) if known is None else known
    if address not in known:
        listed = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
        raise InterventionError(f"intervention address {address!r} is not an adapted weight with LoRA experts; "
                                f"this model's are: {listed} ({len(known)} in all)")
    return known[address]


def router_intervention(mix: mixture.MixtureSpec, num_experts: int, *, mask: Any = None, force: Any = None,
                        scale: Any = None, top_k: int | None = None, rank: int | None = None,
                        scale_after_norm: bool = True, rank_weight: str | None = None,
                        where: str = "the router") -> Intervention:
    """The one-layer Intervention on a LoRA router of ``num_experts`` experts (``mix``: the model's MixtureSpec):
    mask, force [E] bool, scale [E] (>= 0), top_k (1..the router's k, or E for LoRAMoE), rank (1..E); None:
    unused. ``where`` names the router in errors."""
    section = _router_section(mix, num_experts)

    def row(value: Any, name: str) -> np.ndarray | None:
        if value is None:
            return None
        array = np.asarray(value)
        if array.shape != (num_experts,):
            raise InterventionError(f"intervention field {name} of {where} has shape {array.shape}: it has "
                                    f"{num_experts} LoRA experts, so it must be ({num_experts},)")
        return array[None]

    try:
        return Intervention.create(section, mask=row(mask, "mask"), force=row(force, "force"),
                                   scale=row(scale, "scale"), top_k=None if top_k is None else np.asarray([top_k]),
                                   rank=None if rank is None else np.asarray([rank]),
                                   scale_after_norm=scale_after_norm, rank_weight=rank_weight)
    except InterventionError as e:
        raise InterventionError(f"{where} ({num_experts} LoRA experts, top_k {section.moe.top_k}; 'model.moe' "
                                f"below means this router): {e}") from e


def create(config: ml_collections.ConfigDict, address: str, *, _known: Mapping[str, int] | None = None,
           **fields: Any) -> dict[str, Intervention]:
    """{address: the Intervention} on the router of one adapted weight; fields: those of ``router_intervention``
    (mask, force, scale, top_k, rank, scale_after_norm, rank_weight). Raises InterventionError naming the address
    and the field."""
    num_experts = _count(config, address, _known)
    return {address: router_intervention(mixture.spec(_model(config).lora), num_experts,
                                         where=f"LoRA-expert router {address}", **fields)}


def _experts(config, chosen: Mapping[str, Iterable[int]], name: str) -> dict[str, Intervention]:
    known = addresses(config)
    out: dict[str, Intervention] = {}
    for address, ids in dict(chosen).items():
        num_experts = _count(config, address, known)
        flags = np.zeros((num_experts,), bool)
        for e in ([ids] if isinstance(ids, (int, np.integer)) else ids):
            if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < num_experts:
                raise InterventionError(f"intervention field {name}[{address!r}] expert {e!r} is invalid: must be "
                                        f"an expert index in [0, {num_experts})")
            flags[int(e)] = True
        out.update(create(config, address, _known=known, **{name: flags}))
    return out


def silence(config: ml_collections.ConfigDict, experts: Mapping[str, Iterable[int]]) -> dict[str, Intervention]:
    """{address: [expert ids]}: those LoRA experts are never selected (their terms removed)."""
    return _experts(config, experts, "mask")


def force(config: ml_collections.ConfigDict, experts: Mapping[str, Iterable[int]]) -> dict[str, Intervention]:
    """{address: [expert ids]}: every token selects those LoRA experts (each takes a slot, its weight the
    router's real one)."""
    return _experts(config, experts, "force")


def scale(config: ml_collections.ConfigDict, factors: Mapping[str, Mapping[int, float]], *,
          after_norm: bool = True) -> dict[str, Intervention]:
    """{address: {expert id: factor >= 0}}: the expert's gate times the factor, after the router's
    renormalisation (``after_norm``) or before it."""
    known = addresses(config)
    out: dict[str, Intervention] = {}
    for address, row in dict(factors).items():
        num_experts = _count(config, address, known)
        if not isinstance(row, Mapping):
            raise InterventionError(f"intervention field scale[{address!r}]={row!r} is invalid: must be a mapping "
                                    "{expert id: factor}")
        values = np.ones((num_experts,), np.float32)
        for e, factor in row.items():
            if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < num_experts:
                raise InterventionError(f"intervention field scale[{address!r}] expert {e!r} is invalid: must be "
                                        f"an expert index in [0, {num_experts})")
            values[int(e)] *= factor
        out.update(create(config, address, scale=values, scale_after_norm=after_norm, _known=known))
    return out


def merge(*interventions: Mapping[str, Intervention]) -> dict[str, Intervention]:
    """All of them at once; two on one address merge as ``Intervention.merge`` does."""
    out: dict[str, Intervention] = {}
    for part in interventions:
        for address, iv in part.items():
            out[address] = out[address].merge(iv) if address in out else iv
    return out


def variables(interventions: Mapping[str, Intervention]) -> dict[str, Any]:
    """{'lora_intervention': the interventions at their modules' paths}, to add to the variables of ``apply``."""
    tree: dict[str, Any] = {}
    for address, iv in interventions.items():
        *path, name = address.split("/")
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[name] = iv
    return {mixture.INTERVENTION: tree}
