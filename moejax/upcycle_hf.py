"""Sparse upcycling from a released dense model: ``init_from='upcycle:hf:<dir>'`` starts an MoE run from the dense
transformers checkpoint in <dir> (a family of moejax.hf with no MoE layer: llama, mistral, qwen2, qwen3, olmo2,
phi3), by the recipes of moejax/upcycle.py (coarse copies, fine-grained slices, router init, the shared expert).

The run's model is the checkpoint's (its config.json, as ``init_from='hf:<dir>'`` reads it, with the run's
``compute`` fields) with the run's MoE layout: ``model.moe_every``, ``first_dense_layers``, ``dense_layers`` and the
``model.moe`` section come from the run's config, except ``moe.expert_ffn``, which is the checkpoint's FFN width /
``upcycle.granularity``, and ``moe.activation``, the dense FFN's. ``upcycle.granularity`` and
``upcycle.router_init`` choose the recipe; ``upcycle.enabled`` stays False (it names moejax's own dense stage).
Every other parameter (embeddings, attention, norms, head, the FFNs of layers left dense) is copied, so where the
recipe promises it (whole copies with renormalised top-k weights; one whole copy's slices under zero routers with
top_k = m and routed_scaling_factor = m) the upcycled model's logits at step 0 are the released model's.
"""
from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import ml_collections

from moejax import checks, upcycle
from moejax.layout import moe_layers

PREFIX = "upcycle:hf:"
ALLOWED = ("'upcycle:hf:<dir>', a dense transformers checkpoint directory upcycled into the run's MoE layout "
           "(upcycle.granularity, upcycle.router_init)")


def named(value: Any) -> bool:
    """Whether an init_from value names an upcycling source."""
    return isinstance(value, str) and value.startswith(PREFIX)


def moe_model(dense: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
              directory: pathlib.Path) -> ml_collections.ConfigDict:
    """The model section of the run that upcycles ``dense`` (the checkpoint's model section, the run's compute fields
    in it) into config's MoE layout. ConfigError naming the field and value: a source with MoE layers, a
    granularity that does not divide its FFN, a layout upcycle.validate refuses."""
    value = config.init_from
    if moe_layers(dense):
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
        checks.fail("init_from", value, f"{directory} holds a {model_type} model with MoE layers "
                                        f"{moe_layers(dense)}: upcycling starts from a dense model (one of the "
                                        f"dense released families: llama, mistral, qwen2, qwen3, olmo2, phi3)")
    granularity = config.upcycle.granularity
    checks.positive_int("upcycle.granularity", granularity)
    if dense.ffn_dim % granularity:
        checks.fail("upcycle.granularity", granularity, f"must divide the FFN width {dense.ffn_dim} of the dense "
                                                        f"model in {directory} (each expert is one of m slices)")
    run = config.model
    m = copy.deepcopy(dense)
    m.moe = copy.deepcopy(run.moe)
    m.moe.update(expert_ffn=dense.ffn_dim // granularity, activation=dense.moe.activation)
    m.update(moe_every=run.moe_every, first_dense_layers=run.first_dense_layers, dense_layers=tuple(run.dense_layers))
    probe = copy.deepcopy(config)  # moejax/upcycle.py's checks of the layout against the dense FFN
    with probe.unlocked():
        probe.model = m
        probe.upcycle.update(enabled=True, dense_checkpoint=str(directory))
    upcycle.validate(probe)
    return m


def start(ctx: Any, directory: pathlib.Path) -> tuple[Any, str]:
    """(the first train state, its message) of an upcycling run: the checkpoint in directory read on the host
    (moejax.hf.load) and mapped by upcycle.upcycle_params onto the run's fresh MoE initialisation (its routers,
    the shared-expert gate), then placed with the run's shardings. ctx: moejax.training.initialise.InitContext."""
    import jax

    from moejax import hf

    config = ctx.config
    _, variables = hf.load(directory, dtype=config.model.param_dtype)
    new = jax.device_get(ctx.fresh())
    try:
        params = upcycle.upcycle_params(jax.device_get(variables["params"]), new.params, config)
    except (KeyError, ValueError) as e:
        checks.fail("init_from", config.init_from, f"the dense checkpoint does not fit the upcycled model: {e}")
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    moe = config.model.moe
    return ctx.place(params, new.moe_state), (
        f"initialised a new run in {ctx.workdir}, upcycled from the {model_type} checkpoint in {directory} "
        f"(granularity {config.upcycle.granularity}, {moe.num_experts} experts of width {moe.expert_ffn}, "
        f"top-{moe.top_k}, {moe.num_shared} shared, router {config.upcycle.router_init}; "
        f"data.tokenizer={config.data.tokenizer!r})")
