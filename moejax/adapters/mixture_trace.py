"""Routing traces of mixtures of LoRA experts: the routing each adapted weight sows (moejax/adapters/mixture.py,
``<name>_lora_routing``) as a ``moejax.posthoc.Trace``, so that the post-hoc analyses (expert frequency, gate mass,
load imbalance, router entropy, co-activation, nPMI, locality: moejax/posthoc/analysis.py, locality.py) run on the LoRA
experts as on a MoE layer's routed experts.

    trace = mixture_trace.record(config, variables, batches, "wo")   # the routers of every layer's adapted 'wo'
    analysis.gate_mass(trace)                                        # [L, E]

One trace covers one adapted weight name across the layers that adapt it (its ``layers``: the model layer indices,
in order). Layers with fewer experts (MoLA's ``per_layer``) keep their ids; ``num_experts`` is the largest count and
``scores`` is None unless every layer has it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from moejax.adapters import mixture
from moejax.posthoc.trace import Trace


def routing_records(moe_aux: Mapping[str, Any], name: str) -> dict[tuple[str, ...], tuple[np.ndarray, ...]]:
    """{module path: (experts [T, k], weights [T, k], probs [T, E])} of the adapted weight ``name`` in a forward
    pass's 'moe_aux' collection (calls of one module concatenated over tokens)."""
    found: dict[tuple[str, ...], tuple[np.ndarray, ...]] = {}

    def visit(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key in sorted(node):
            if key == name + mixture.ROUTING_SUFFIX:
                calls = [tuple(np.asarray(a) for a in call) for call in node[key]]
                found[path] = tuple(np.concatenate(parts) for parts in zip(*calls, strict=True))
            elif isinstance(node[key], Mapping):
                visit(node[key], (*path, key))

    visit(moe_aux, ())
    return found


def from_aux(moe_auxes: Sequence[Mapping[str, Any]], token_ids: np.ndarray, name: str,
             metadata: Mapping[str, Any] | None = None) -> Trace:
    """The trace of ``name``'s LoRA-expert routers over the forward passes ``moe_auxes`` (one per batch, their
    tokens in order: ``token_ids`` [N])."""
    per_batch = [routing_records(aux, name) for aux in moe_auxes]
    paths = sorted(per_batch[0], key=lambda p: (mixture.layer_index(p) is None, mixture.layer_index(p) or 0, p))
    if not paths:
        raise ValueError(f"no LoRA-expert routing of {name!r} in the forward pass: is it adapted with "
                         f"model.lora.mixture?")
    experts, weights, probs = ([np.concatenate([batch[p][i] for batch in per_batch]) for p in paths]
                               for i in range(3))
    num_experts = max(p.shape[-1] for p in probs)
    same = all(p.shape[-1] == num_experts for p in probs)
    layers = [-1 if mixture.layer_index(p) is None else mixture.layer_index(p) for p in paths]
    return Trace(experts=np.stack(experts), weights=np.stack(weights), scores=np.stack(probs) if same else None,
                 token_ids=np.asarray(token_ids).reshape(-1), layers=layers,
                 num_experts=num_experts, metadata={"adapted_weight": name, "paths": ["/".join(p) for p in paths],
                                                    **(metadata or {})})


def record(config: Any, variables: Mapping[str, Any], batches: Iterable[np.ndarray], name: str) -> Trace:
    """The trace of ``name``'s LoRA-expert routers of a model (config: a whole config or its ``model`` section) over
    input batches [B, S] (evaluation mode)."""
    import jax

    from moejax import model as model_lib

    model_cfg = config.model if "model" in config else config
    module = model_lib.Transformer(model_cfg)
    apply = jax.jit(lambda v, tokens: module.apply(v, tokens, mutable=["moe_aux"])[1]["moe_aux"])
    usable = {k: variables[k] for k in ("params", "moe_state") if k in variables}
    auxes, tokens = [], []
    for batch in batches:
        auxes.append(jax.device_get(apply(usable, np.asarray(batch))))
        tokens.append(np.asarray(batch).reshape(-1))
    return from_aux(auxes, np.concatenate(tokens), name)
