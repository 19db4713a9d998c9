"""Dispatch -> compute -> combine: the routed experts on one device's tokens, shared by the single-device MoE layer
and by each device of the expert-parallel layer (moejax/moe/expert_parallel.py)."""
import jax
import jax.numpy as jnp

from moejax.moe import dispatch, experts, quantised
from moejax.moe.routers import Routing

KERNELS = ("jnp", "pallas")


def kernel_ops(kernel: str):
    """(permute, unpermute_combine) of ``model.moe.dispatch_kernel``: 'jnp' (moejax.moe.dispatch's gathers) or
    'pallas' (moejax.kernels.dispatch: Triton on GPU, Mosaic on TPU, interpreted on CPU). Same signatures, same
    results. With int expert weights (quantised decoding) 'pallas' also runs their grouped matmul in
    moejax/kernels/quant_gmm.py (moejax/moe/quantised.py)."""
    if kernel == "jnp":
        return dispatch.permute, dispatch.unpermute_combine
    if kernel != "pallas":
        raise ValueError(f"model.moe.dispatch_kernel must be one of {KERNELS}, got {kernel!r}")
    from moejax.kernels import dispatch as pallas_dispatch  # Pallas is imported by the models that use it only

    return pallas_dispatch.permute, pallas_dispatch.unpermute_combine


def tile_for(backend: str, gmm_tile: int, num_slots: int, num_experts: int) -> int:
    """Rows per tile of a dropless plan: 1 (the exact ragged layout) for the ragged backends; else ``gmm_tile`` or
    ``dispatch.default_tile``."""
    if backend in experts.RAGGED_BACKENDS:
        return 1
    return gmm_tile or dispatch.default_tile(num_slots, num_experts)


def routed_experts(tokens: jax.Array, route: Routing, expert: experts.GLUExperts, weights: experts.Weights, *,
                   num_experts: int, backend: str, kernel: str, tile: int, capacity: int | None = None,
                   drop_policy: str = "position", slot_inputs: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """y_t = sum_j route.weights[t, j] * expert_{route.experts[t, j]}(tokens[t]) -> (y [T, D], dropped []).

    Slots with an id >= num_experts are null. capacity: slots each expert keeps (``drop_policy`` decides which),
    None for dropless; dropped counts the slots over capacity. tile: rows per tile of a dropless plan
    (``tile_for``). backend: a resolved gmm backend; kernel: ``model.moe.dispatch_kernel``. slot_inputs: [T*k, M]
    columns each routed slot's row carries after its token (the dropout masks of routed-expert adapters,
    moejax/adapters/expert_lora.py); the expert keeps the rows' width and only the first D columns are combined.
    Expert weights held as int codes (``quantised.QuantisedWeight``, quantised decoding) take
    moejax/moe/quantised.py's path: only the experts the slots select are read and dequantised.
    """
    if quantised.any_quantised(weights):
        return quantised.routed_experts(routed_experts, tokens, route, expert, weights, num_experts=num_experts,
                                        backend=backend, kernel=kernel, tile=tile, capacity=capacity,
                                        drop_policy=drop_policy, slot_inputs=slot_inputs)
    if capacity is not None:
        plan = dispatch.capacity_plan(route, num_experts, capacity, drop_policy)
    else:
        plan = dispatch.dropless_plan(route, num_experts, tile)
    permute, unpermute_combine = kernel_ops(kernel)
    rows = permute(tokens, plan.slot_row, plan.row_slot)
    if slot_inputs is not None:
        extra = dispatch.append_zero_row(jax.lax.stop_gradient(slot_inputs))[plan.row_slot]
        rows = jnp.concatenate([rows, extra.astype(rows.dtype)], axis=-1)
    rows = experts.grouped_apply(expert, rows, weights, plan, backend)[:, :tokens.shape[-1]]
    return unpermute_combine(rows, route.weights, plan.slot_row, plan.row_slot), plan.dropped
