"""MC-SMoE's compress stage, one-shot: every routed expert's weight matrices become a low-rank part plus a
structured-sparse remainder (LoSparse, as the MC-SMoE authors apply it to the merged experts; arXiv 2310.01334,
UNITES-Lab/MC-SMoE ``pruning/losparse.py``).

For a matrix of the torch layout W [out, in] (moejax stores its transpose, [in, out]), with W = U diag(s) V^T:

    L = U_r diag(sqrt(s_r)),   R = diag(sqrt(s_r)) V_r^T,   S = W - L R          (``low_rank_decomposition``)
    keep the ceil(density * out) rows of S of highest mean |S| (``LoSparsePruner.structured_prune``, 'row', 'mean')
    W' = L R + S * mask

The authors prune S during distillation fine-tuning with PLATON (importance |S * grad S|, smoothed, on a cubic
schedule down to ``final_threshold``); here the importance is |S| and the pruning happens at once, before any
training (a departure: recover with ``python -m moejax.main`` and ``distill.teacher``). moejax keeps W' dense in
the expert weights, so the model computes exactly what the low-rank + sparse factors compute but stores no fewer
bytes; ``compress_experts`` reports the parameters the factored form would hold, r (in + out) + kept rows * in.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from moejax import model as model_lib
from moejax import moe
from moejax.moe import expert_map
from moejax.moe import experts as experts_lib
from moejax.posthoc import compress


def svd_factors(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(L [out, r], R [r, in]) of a matrix W [out, in] (the torch layout) with L R its best rank-r approximation:
    W = U diag(s) V^T, L = U_r diag(sqrt(s_r)), R = diag(sqrt(s_r)) V_r^T (float64; r capped at min(out, in))."""
    w = np.asarray(weight, np.float64)
    rank = min(int(rank), *w.shape)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * np.sqrt(s[:rank]), np.sqrt(s[:rank])[:, None] * vh[:rank]


def low_rank_plus_sparse(weight: np.ndarray, rank: int, density: float) -> tuple[np.ndarray, int]:
    """(W' [in, out], parameters of the factored form) for one matrix in moejax's layout [in, out]."""
    w = np.asarray(weight, np.float64).T  # the authors' [out, in]
    out_dim, in_dim = w.shape
    rank = min(int(rank), out_dim, in_dim)
    left, right = svd_factors(w, rank)
    low = left @ right
    sparse = w - low
    kept = math.ceil(density * out_dim)
    mask = np.zeros(out_dim, bool)
    if kept:
        mask[np.argsort(-np.abs(sparse).mean(axis=1), kind="stable")[:kept]] = True
    result = low + sparse * mask[:, None]
    return result.T.astype(np.asarray(weight).dtype), rank * (in_dim + out_dim) + kept * in_dim


def compress_experts(config: ml_collections.ConfigDict, variables: compress.Variables, rank: int = 32,
                     density: float = 0.1) -> tuple[ml_collections.ConfigDict, compress.Variables, dict[str, Any]]:
    """(config, variables with every stored routed expert's matrices replaced by ``low_rank_plus_sparse``, report).

    rank: the low-rank part's rank (the authors' ``low_rank_factor``, 32 in their scripts); density: the fraction of
    the remainder's rows kept (their ``final_threshold``, 0.10). Only the [E, in, out] matrices of the expert kind
    (the 'mlp' ones: wi_0, wi_1, wo) are compressed; biases stay. The router, the expert maps and everything else
    are unchanged. report: ``{'dense_params', 'factored_params', 'ratio'}`` over the stored routed experts."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank={rank!r}: must be an integer >= 1")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density={density!r}: must be in [0, 1]")
    expert = experts_lib.from_config(config.model.moe)
    matrices = [name for name, axes in expert.param_axes.items() if len(axes) == 3]
    dense = factored = 0
    bindings = {}
    for layer, (params, _) in model_lib.moe_layer_variables(config.model, variables).items():
        count_stored = expert_map.stored_count(config.model.moe, layer)  # scanned layers: without the padding
        stored = {name: np.array(value)[:count_stored] for name, value in params[moe.EXPERTS].items()}
        for name in matrices:
            for j in range(stored[name].shape[0]):
                stored[name][j], count = low_rank_plus_sparse(stored[name][j], rank, density)
                dense += stored[name][j].size
                factored += count
        bindings[layer] = compress.Binding(expert_map.row(config.model.moe, layer), stored)
    new_config, new_variables = compress.bind(config, variables, bindings)
    return new_config, new_variables, {"dense_params": dense, "factored_params": factored,
                                       "ratio": factored / dense if dense else float("nan")}
