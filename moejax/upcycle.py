"""Sparse upcycling: an MoE model initialised from a trained dense checkpoint of the same architecture.

Sparse upcycling (Komatsuzaki et al., 2022, arXiv 2212.05055) starts every expert of an MoE layer as a copy of the
dense FFN it replaces and the router at random. Fine-grained upcycling (Innovator; docs/methods.md) first cuts
the dense FFN along its hidden units into ``granularity`` m slices of width F/m; expert e is slice e mod m of copy
e // m. A GLU is a sum over its hidden units, so the m slices of one copy with weight 1 each add up to the dense
FFN exactly. A shared expert, when the MoE config has one, takes the whole dense FFN (Innovator's shared expert is
the original general FFN), so ``num_shared * expert_ffn`` must equal the dense ``ffn_dim``.

Every other parameter (embeddings, attention, norms, the head, the FFNs of dense layers) is copied. The routers keep
their fresh initialisation (``upcycle.router_init='normal'``) or start at zero ('zeros': uniform scores, so that
top-k picks the lowest expert ids; with top_k = m and routed_scaling_factor = m the upcycled model computes exactly
the dense model's function).

Config section ``upcycle`` (configs/base.py): enabled, dense_checkpoint (the workdir of a finished dense run; '' trains
one first in <workdir>/dense for dense_steps steps), dense_steps, granularity, router_init.
"""
from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from moejax import checks, model, moe

ROUTER_INITS = ("normal", "zeros")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the ``upcycle`` section against the model it upcycles into; raises ConfigError naming the field."""
    up = config.upcycle
    if not isinstance(up.enabled, bool):
        checks.fail("upcycle.enabled", up.enabled, "must be True or False")
    if not up.enabled:
        return
    cfg, moe = config.model, config.model.moe
    checks.positive_int("upcycle.granularity", up.granularity)
    checks.choice("upcycle.router_init", up.router_init, ROUTER_INITS)
    if not up.dense_checkpoint:
        checks.positive_int("upcycle.dense_steps", up.dense_steps)
    if not any(model.is_moe_layer(cfg, i) for i in range(cfg.num_layers)):
        checks.fail("model.moe_every", cfg.moe_every, "upcycling needs MoE layers to upcycle into (moe_every >= 1)")
    if cfg.scan_layers:
        checks.fail("model.scan_layers", cfg.scan_layers, "upcycling maps per-layer parameters: use False")
    if moe.expert_ffn * up.granularity != cfg.ffn_dim:
        checks.fail("model.moe.expert_ffn", moe.expert_ffn,
                    f"must be model.ffn_dim / upcycle.granularity = {cfg.ffn_dim} / {up.granularity} (the dense FFN "
                    f"cut into {up.granularity} slices)")
    if moe.num_experts % up.granularity:
        checks.fail("model.moe.num_experts", moe.num_experts,
                    f"must be a multiple of upcycle.granularity={up.granularity} (whole copies of the sliced FFN)")
    if moe.num_shared and moe.num_shared * moe.expert_ffn != cfg.ffn_dim:
        checks.fail("model.moe.num_shared", moe.num_shared,
                    f"the shared expert takes the whole dense FFN: num_shared * expert_ffn must equal "
                    f"model.ffn_dim={cfg.ffn_dim}, or 0")


def dense_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The dense model an upcycling config starts from: the same config with every layer dense (FFN ffn_dim),
    trained for upcycle.dense_steps steps on data.name alone (no routing warm-up, no data.mix stages)."""
    dense = ml_collections.ConfigDict(config.to_dict())  # to_dict copies: the config itself stays as it is
    dense.model.moe_every = 0
    dense.upcycle.enabled = False
    dense.train.steps = config.upcycle.dense_steps
    dense.train.warmup_steps = min(config.train.warmup_steps, config.upcycle.dense_steps)
    dense.train.router_warmup_steps = 0  # the MoE run's stages (Innovator): the dense model trains plainly
    dense.data.mix, dense.data.mix_stages = (), ()
    return dense


def dense_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """The workdir of the dense run an upcycling run starts from: upcycle.dense_checkpoint, or <workdir>/dense
    (the dense stage that ``moejax.training.loop.run`` trains first)."""
    given = config.upcycle.dense_checkpoint
    return pathlib.Path(given) if given else pathlib.Path(workdir) / "dense"


def expert_slices(weight: np.ndarray, name: str, num_experts: int, granularity: int) -> np.ndarray:
    """The routed experts' stacked weight [E, ...] from one dense GLU weight: wi_0 / wi_1 [D, F] -> [E, D, F/m],
    wo [F, D] -> [E, F/m, D]; expert e gets hidden slice e mod m."""
    hidden_axis = 0 if name == "wo" else 1
    slices = np.split(np.asarray(weight), granularity, axis=hidden_axis)
    return np.stack([slices[e % granularity] for e in range(num_experts)])


def upcycle_params(dense_params: Any, moe_params: Any, config: ml_collections.ConfigDict) -> dict:
    """The MoE model's parameters built from the dense model's.

    dense_params: the dense model's parameter tree (arrays); moe_params: a fresh initialisation of the MoE model
    (gives the tree, the dtypes and the routers' random initialisation). Raises ValueError on a parameter with no
    dense counterpart.
    """
    up, moe_cfg = config.upcycle, config.model.moe
    dense = {path: np.asarray(v) for path, v in traverse_util.flatten_dict(dense_params).items()}
    result = {}
    for path, fresh in traverse_util.flatten_dict(moe_params).items():
        fresh = np.asarray(fresh)
        if path in dense and dense[path].shape == fresh.shape:
            value = dense[path]
        elif len(path) == 4 and path[1] == "ffn" and path[2] == moe.EXPERTS:
            value = expert_slices(dense[path[:2] + (path[3],)], path[3], moe_cfg.num_experts, up.granularity)
        elif len(path) == 4 and path[1] == "ffn" and path[2] == moe.SHARED:
            value = dense[path[:2] + (path[3],)]
        elif len(path) >= 2 and moe.is_router(path[-2]):
            value = np.zeros_like(fresh) if up.router_init == "zeros" else fresh
        elif len(path) >= 2 and path[-2] == moe.SHARED_GATE:
            value = fresh
        else:
            raise ValueError(f"parameter {'/'.join(path)} {fresh.shape} of the MoE model has no counterpart in the "
                             f"dense checkpoint")
        if value.shape != fresh.shape:
            raise ValueError(f"parameter {'/'.join(path)}: the dense checkpoint gives shape {value.shape}, the MoE "
                             f"model needs {fresh.shape}")
        result[path] = value.astype(fresh.dtype)
    return traverse_util.unflatten_dict(result)
