"""Expert placement for expert parallelism: from a routing trace, plan which experts each device holds and which hot
experts get replicas, then write the plan into a model (``model.moe.expert_placement``, moejax/moe/placement.py).

    from moejax.posthoc import placement, read_trace
    load = placement.expert_loads(config, read_trace("traces/run1"))          # [L, S] slots per stored expert
    phy2log, _, _ = placement.rebalance_experts(load, num_replicas=80, num_groups=1, num_nodes=1, num_gpus=8)
    config, variables = placement.place(config, variables, phy2log)            # 80 physical experts per layer
    placement.device_loads(load, phy2log, num_devices=8)                       # [L, 8] predicted slots per device

``rebalance_experts`` is DeepSeek's EPLB (github.com/deepseek-ai/EPLB, ``eplb.py``) ported to numpy: hierarchical
(groups of experts packed to nodes, replicas within nodes, physical experts packed to GPUs) when ``num_groups`` is
a multiple of ``num_nodes``, else global. ``replicate_experts`` gives each extra replica to the expert of highest load
per replica; ``balanced_packing`` puts items in decreasing load on the lightest pack that still has room. A replica
carries its expert's load divided by its replica count (the layer splits an expert's tokens evenly over its
replicas: moejax/moe/placement.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.core
import ml_collections
import numpy as np

from moejax import checks, moe
from moejax import model as model_lib
from moejax.moe import expert_map
from moejax.moe import placement as placement_lib
from moejax.posthoc import compress, importance
from moejax.posthoc.trace import Trace

# ------------------------------------------------------------------------------------------------------ EPLB


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """(pack_index [X, n], rank_in_pack [X, n]): n items per row into ``num_packs`` packs of n / num_packs items
    each, the items in decreasing weight (a stable sort) each onto the lightest pack with room (the lowest index on
    ties), as EPLB's ``balanced_packing``."""
    weight = np.asarray(weight, np.float64)
    rows, items = weight.shape
    if items % num_packs:
        raise ValueError(f"{items} items do not split into {num_packs} packs of equal size")
    per_pack = items // num_packs
    pack_index = np.full((rows, items), -1, np.int64)
    rank_in_pack = np.full((rows, items), -1, np.int64)
    if per_pack == 1:
        return np.tile(np.arange(items), (rows, 1)), np.zeros((rows, items), np.int64)
    for i in range(rows):
        loads, counts = np.zeros(num_packs), np.zeros(num_packs, np.int64)
        for item in np.argsort(-weight[i], kind="stable"):
            open_packs = np.flatnonzero(counts < per_pack)
            pack = int(open_packs[np.argmin(loads[open_packs])])
            pack_index[i, item], rank_in_pack[i, item] = pack, counts[pack]
            loads[pack] += weight[i, item]
            counts[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log [X, P], replica rank [X, P], replica count [X, n]): n logical experts to P >= n physical ones, each
    extra replica to the expert of highest weight per replica (the first on ties), as EPLB's
    ``replicate_experts``; this minimises the largest load per replica."""
    weight = np.asarray(weight, np.float64)
    rows, num_log = weight.shape
    if num_physical < num_log:
        raise ValueError(f"num_physical={num_physical} must be >= the {num_log} experts")
    phy2log = np.tile(np.arange(num_physical), (rows, 1))
    rank = np.zeros((rows, num_physical), np.int64)
    count = np.ones((rows, num_log), np.int64)
    every = np.arange(rows)
    for i in range(num_log, num_physical):
        chosen = np.argmax(weight / count, axis=-1)
        phy2log[:, i] = chosen
        rank[:, i] = count[every, chosen]
        count[every, chosen] += 1
    return phy2log, rank, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_layers, num_log = weight.shape
    group_size, groups_per_node = num_log // num_groups, num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[..., None]
                + np.arange(group_size)).reshape(num_layers, -1)
    mlog2log = _inverse(log2mlog)
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(-1, num_log // num_nodes)
    phy2mlog, phy_rank, mlog_count = replicate_experts(tokens_per_mlog, num_physical // num_nodes)
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlog_count, phy2mlog, -1)
    pack, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1)
                 + np.arange(0, num_log, num_log // num_nodes).reshape(1, -1, 1)).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, -1).reshape(num_layers, -1)
    log_count = np.take_along_axis(mlog_count.reshape(num_layers, -1), log2mlog, -1)
    return pphy2log, pphy_rank, log_count


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int = 1, num_nodes: int = 1,
                      num_gpus: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's ``rebalance_experts``: (phy2log [L, P], log2phy [L, n, R] (-1 padded), count [L, n]) for the loads
    ``weight`` [L, n]. The physical experts are in device order: GPU g holds slots g*P/G .. (g+1)*P/G - 1.
    Hierarchical when ``num_groups % num_nodes == 0``, else global (one group, one node)."""
    weight = np.asarray(weight, np.float64)
    if weight.ndim != 2:
        raise ValueError(f"weight must be [L, n] loads, got shape {weight.shape}")
    num_layers, num_log = weight.shape
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if num_replicas < num_log or num_replicas % num_gpus or num_gpus % num_nodes:
        raise ValueError(f"num_replicas={num_replicas} must be >= the {num_log} experts and a multiple of "
                         f"num_gpus={num_gpus}, itself a multiple of num_nodes={num_nodes}")
    if num_groups % num_nodes == 0 and num_log % num_groups == 0:
        phy2log, rank, count = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, count = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = int(count.max())
    log2phy = np.full((num_layers, num_log * width), -1, np.int64)
    np.put_along_axis(log2phy, phy2log * width + rank, np.broadcast_to(np.arange(num_replicas), phy2log.shape), 1)
    return phy2log, log2phy.reshape(num_layers, num_log, width), count


# ------------------------------------------------------------------------------------------------ model side


def expert_loads(config: ml_collections.ConfigDict, trace: Trace | np.ndarray) -> np.ndarray:
    """[L, S] routed slots per stored expert (the logical experts' counts summed through the expert map; S the
    widest layer's count, zeros past a layer's own), rows in the model's MoE layer order. ``trace``: a routing trace
    of the model, or its logical counts [L, E] (``importance.from_forward(..., 'frequency')``)."""
    counts = np.asarray(trace) if isinstance(trace, np.ndarray) else importance.from_trace(trace, "frequency",
                                                                                            config=config)
    layers = model_lib.moe_layers(config.model)
    width = max(expert_map.stored_count(config.model.moe, layer) for layer in layers)
    out = np.zeros((len(layers), width))
    for row, layer in enumerate(layers):
        ids = expert_map.row(config.model.moe, layer)
        live = ids >= 0
        np.add.at(out[row], ids[live], counts[row][live])
    return out


def device_loads(load: np.ndarray, phy2log: np.ndarray, num_devices: int) -> np.ndarray:
    """[L, D] the slots each device serves under a plan: every expert's load split evenly over its replicas, the
    physical slots split over the devices in order (``num_devices`` must divide P)."""
    load, phy2log = np.asarray(load, np.float64), np.asarray(phy2log, np.int64)
    num_layers, num_physical = phy2log.shape
    if num_physical % num_devices:
        raise ValueError(f"num_devices={num_devices} must divide the {num_physical} physical experts")
    replicas = np.stack([np.bincount(row, minlength=load.shape[1]) for row in phy2log])
    per_slot = np.take_along_axis(load / np.maximum(replicas, 1), phy2log, -1)
    return per_slot.reshape(num_layers, num_devices, -1).sum(-1)


def imbalance(per_device: np.ndarray) -> np.ndarray:
    """[L] max over mean load per device (1 = balanced)."""
    per_device = np.asarray(per_device, np.float64)
    return per_device.max(-1) / np.maximum(per_device.mean(-1), 1e-30)


def place(config: ml_collections.ConfigDict, variables: compress.Variables, phy2stored: Any
          ) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """(config with ``model.moe.expert_placement``, variables whose routed experts are the P physical slots, each
    a copy of the stored expert it holds). phy2stored: [L, P] (rows in the model's MoE layer order) or
    ``{layer: [P]}``. The model computes what it computed (replicas are copies)."""
    if placement_lib.has_placement(config.model.moe):
        config, variables = unplaced(config, variables)
    layers = model_lib.moe_layers(config.model)
    plan = dict(phy2stored) if isinstance(phy2stored, Mapping) else dict(zip(layers, np.asarray(phy2stored),
                                                                             strict=True))
    compress.check_layers(config, plan, "the placement")
    rows = [()] * config.model.num_layers
    for layer in layers:
        rows[layer] = tuple(int(v) for v in np.asarray(plan[layer]).reshape(-1))
    new_config = ml_collections.ConfigDict(config.to_dict())
    new_config.model.moe.expert_placement = tuple(rows)
    try:
        model_lib.validate(new_config.model)
    except checks.ConfigError as e:
        raise checks.ConfigError(f"the placement does not fit the model: {e}") from e
    return new_config, _gather(config, variables, {layer: np.asarray(rows[layer]) for layer in layers})


def unplaced(config: ml_collections.ConfigDict, variables: compress.Variables
             ) -> tuple[ml_collections.ConfigDict, compress.Variables]:
    """The same model without a placement: each stored expert's first replica (the inverse of ``place``)."""
    if not placement_lib.has_placement(config.model.moe):
        return config, variables
    firsts = {}
    for layer in model_lib.moe_layers(config.model):
        row = np.asarray(placement_lib.rows(config.model.moe)[layer])
        width = expert_map.stored_count(config.model.moe, None if config.model.scan_layers else layer)
        firsts[layer] = np.array([int(np.flatnonzero(row == s)[0]) if s <= row.max() else 0 for s in range(width)])
    new_config = ml_collections.ConfigDict(config.to_dict())
    new_config.model.moe.expert_placement = ()
    return new_config, _gather(config, variables, firsts)


def _gather(config: ml_collections.ConfigDict, variables: compress.Variables, index: Mapping[int, np.ndarray]
            ) -> compress.Variables:
    """variables with every MoE layer's routed experts gathered along the expert axis by ``index[layer]`` (scanned
    layers: per unit, every unit the same length)."""
    import functools
    import operator

    new = flax.core.unfreeze(variables)
    new.pop("moe_aux", None)
    sites = model_lib.moe_layer_paths(config.model)
    for path in {site.path for site in sites.values()}:
        on_path = sorted((layer for layer in index if sites[layer].path == path), key=lambda la: sites[la].unit or 0)
        target = functools.reduce(operator.getitem, path, new["params"])[moe.EXPERTS]
        for name, value in target.items():
            if sites[on_path[0]].unit is None:
                target[name] = compress._like(np.asarray(value)[index[on_path[0]]], value)
            else:
                target[name] = compress._like(np.stack([np.asarray(value)[sites[layer].unit][index[layer]]
                                                        for layer in on_path]), value)
    return new
