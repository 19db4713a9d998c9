"""Trained experts as low-rank adapters (rank-heterogeneous experts, FlexMoRE-style): an expert's matrix W [in, out]
becomes W_0 + s A B, the best rank-r approximation of its difference from a reference expert W_0 (the full expert it
sits beside) in the Frobenius norm (Eckart-Young: the truncated SVD of W - W_0; moejax/posthoc/lowrank.py
``svd_factors``). Each expert may keep its own rank; the factors load as a mixture's ``<name>_moe_lora_a`` /
``_moe_lora_b`` of that expert (moejax/adapters/mixture.py, ``model.lora.mixture.ranks``), s its alpha / r_e."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from moejax.posthoc import lowrank


def lowrank_adapter(weight: np.ndarray, reference: np.ndarray, rank: int, scaling: float = 1.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(A [in, r], B [r, out]) with reference + scaling * A B the best rank-r approximation of weight (both
    [in, out], moejax's layout); float64."""
    delta = np.asarray(weight, np.float64) - np.asarray(reference, np.float64)
    left, right = lowrank.svd_factors(delta.T, rank)  # torch layout [out, in]: delta.T = L R
    return right.T, left.T / scaling


def experts_as_adapters(experts: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray],
                        ranks: Sequence[int], scalings: Sequence[float]) -> dict[str, np.ndarray]:
    """A mixture's stacked factors of experts (each {matrix name: [in, out]}) beside the reference expert: for each
    matrix, ``<name>_moe_lora_a`` [E, in, max r] and ``<name>_moe_lora_b`` [E, max r, out], expert e's factors of
    rank ranks[e] (scaling scalings[e]) zero-padded to the largest rank."""
    if not (len(experts) == len(ranks) == len(scalings)):
        raise ValueError(f"experts_as_adapters: {len(experts)} experts, {len(ranks)} ranks and {len(scalings)} "
                         f"scalings: one of each per expert")
    top = max(ranks)
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        d_in, d_out = np.shape(ref)
        a = np.zeros((len(experts), d_in, top))
        b = np.zeros((len(experts), top, d_out))
        for e, (expert, rank, scaling) in enumerate(zip(experts, ranks, scalings, strict=True)):
            fa, fb = lowrank_adapter(expert[name], ref, rank, scaling)
            a[e, :, :fa.shape[1]], b[e, :fb.shape[0]] = fa, fb
        out[f"{name}_moe_lora_a"], out[f"{name}_moe_lora_b"] = a, b
    return out
