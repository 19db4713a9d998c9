"""The expert-parallel MoE layer: the routed experts inside ``jax.shard_map`` over the device mesh.

Expert-parallel MoE (``moe_ep``), ``model.moe.ep_mode``:

* ``'a2a'``: each device sorts its routing slots by the device owning their expert into a send buffer of
  ``mesh.expert`` blocks of R rows, ``all_to_all`` exchanges the blocks, each device runs its local experts on what
  it received (the dropless tiled layout), and a second ``all_to_all`` brings the outputs back for the weighted
  combine. R is the worst case T_local * min(k, E_local) (exact, never drops) unless ``ep_buffer_factor`` > 0
  sizes it as ceil(ep_buffer_factor * T_local * k / mesh.expert); then the slots that do not fit are counted in
  the ``overflow_fraction`` metric (and in ``drop_fraction``) and add nothing, like dropped slots.
* ``'ring'``: ``all_gather`` the tokens over ``expert``, each device runs its local experts on all of them and
  ``psum_scatter`` returns the partial sums. No buffer to size, communication ~ mesh.expert x the tokens.
* ``'ragged_a2a'``: the a2a layout without padding, through ``jax.lax.ragged_all_to_all`` (TPU/GPU only).

When num_experts is not a multiple of mesh.expert (DeepSeekMoE's 63 routed experts on 4 devices), the layer pads
the expert weights with zero experts that the router never selects, and ``param_shardings`` leaves the stored
expert weights unsplit over 'expert' (every dimension a mesh axis does not divide stays unsplit).

Capacity mode keeps exactly the slots the single-device layer keeps: capacity C = ceil(cf * T * k / E) over the
global batch, and a slot's rank within its expert is global (``'position'``: the per-expert counts of the devices
before it in batch order are added to its local rank; ``'probs'``: the routing of the whole batch is gathered and
ranked). So the layer's output and gradients equal the single-device layer's on any mesh.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moejax import checks, vma
from moejax.moe import dispatch, experts, pipeline, quantised
from moejax.moe.routers import Routing
from moejax.parallel import TOKEN_AXES, mesh_shape

EP_MODES = ("a2a", "ring", "ragged_a2a")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the ep_mode and ep_buffer_factor, and that mesh.tensor divides the experts' hidden width."""
    sizes = mesh_shape(config)
    m, moe = config.model, config.model.moe
    checks.choice("model.moe.ep_mode", moe.ep_mode, EP_MODES)
    if moe.ep_mode == "ragged_a2a" and jax.default_backend() == "cpu" and sizes["expert"] > 1:
        checks.fail("model.moe.ep_mode", moe.ep_mode, "XLA:CPU has no ragged_all_to_all; on CPU use 'a2a' or 'ring' "
                                                      "('ragged_a2a' runs on TPU and GPU)")
    checks.number("model.moe.ep_buffer_factor", moe.ep_buffer_factor)
    if m.moe_every > 0 and moe.expert_ffn % sizes["tensor"]:
        checks.fail("mesh.tensor", sizes["tensor"], f"must divide model.moe.expert_ffn={moe.expert_ffn}: the "
                                                    "expert-parallel layer splits the experts' hidden width over it")


def placement_notes(config: ml_collections.ConfigDict) -> list[str]:
    """Human-readable notes on where the routed experts live: how many each device holds, and the padding when
    num_experts is not a multiple of mesh.expert."""
    sizes, moe = mesh_shape(config), config.model.moe
    notes = []
    if config.model.moe_every > 0 and sizes["expert"] > 1 and not moe.num_experts % sizes["expert"]:
        notes.append(f"expert parallelism: {moe.num_experts} routed experts over mesh.expert={sizes['expert']}, "
                     f"{moe.num_experts // sizes['expert']} per device ({moe.ep_mode})")
    if config.model.moe_every > 0 and moe.num_experts % sizes["expert"]:
        padded = -(-moe.num_experts // sizes["expert"]) * sizes["expert"]
        notes.append(f"model.moe.num_experts={moe.num_experts} is not a multiple of mesh.expert={sizes['expert']}: "
                     f"the layer pads the experts to {padded} (never routed to) and the stored expert weights stay "
                     f"unsplit over 'expert'")
    return notes




def _keep_within_capacity(expert_ids: jax.Array, weights: jax.Array, num_experts: int, cap: int,
                          drop_policy: str, num_shards: int) -> jax.Array:
    """Which local slots [T_l, k] the single-device capacity layer keeps, ranking over the whole batch of
    num_shards token shards."""
    shard = jax.lax.axis_index(TOKEN_AXES)
    valid = expert_ids < num_experts
    if drop_policy == "position":
        rank, counts = dispatch.slot_ranks(jnp.where(valid, expert_ids, num_experts).reshape(-1), num_experts)
        all_counts = jax.lax.all_gather(counts, TOKEN_AXES)  # [shards, E] in batch order
        before = jnp.sum(jnp.where(jnp.arange(num_shards)[:, None] < shard, all_counts, 0), axis=0)
        ids = jnp.where(valid, expert_ids, 0).reshape(-1)
        return valid & ((before[ids] + rank).reshape(expert_ids.shape) < cap)
    all_ids = jax.lax.all_gather(expert_ids, TOKEN_AXES, tiled=True)
    all_weights = jax.lax.all_gather(weights, TOKEN_AXES, tiled=True)
    route = Routing(weights=all_weights, experts=all_ids, probs=None, logits=None)
    plan = dispatch.capacity_plan(route, num_experts, cap, drop_policy)
    keep = plan.slot_row < plan.num_rows
    return jax.lax.dynamic_slice_in_dim(keep, shard * expert_ids.shape[0], expert_ids.shape[0])


def _local_experts(rows: jax.Array, expert_ids: jax.Array, weights: jax.Array, expert_weights: tuple,
                   num_local: int, **options) -> jax.Array:
    """sum_j weights[n, j] * expert_{expert_ids[n, j]}(rows[n]) over this device's experts (num_local = null)."""
    route = Routing(weights=weights, experts=expert_ids, probs=None, logits=None)
    out, _ = pipeline.routed_experts(rows, route, weights=expert_weights, num_experts=num_local, **options)
    return out


def a2a_rows(tokens_local: int, top_k: int, num_experts: int, expert_size: int, buffer_factor: float) -> int:
    """Rows R of each of the mesh.expert blocks of the a2a send buffer (see the module docstring)."""
    worst = tokens_local * min(top_k, -(-num_experts // expert_size))
    if buffer_factor > 0:
        return max(1, min(worst, math.ceil(buffer_factor * tokens_local * top_k / expert_size)))
    return worst


def a2a_bytes_per_step(tokens_local: int, top_k: int, num_experts: int, expert_size: int, d_model: int,
                       dtype_bytes: int, buffer_factor: float, train: bool = True) -> int:
    """Bytes one device sends through all_to_all per MoE layer and step by this module's layout: the dispatch and
    the combine exchange, each of mesh.expert blocks of R x d_model rows of which (mesh.expert - 1) leave the
    device; the backward pass repeats both. The expert ids (int32, R per block) travel with the dispatch."""
    rows = a2a_rows(tokens_local, top_k, num_experts, expert_size, buffer_factor)
    remote = (expert_size - 1) * rows
    per_pass = 2 * remote * d_model * dtype_bytes + remote * 4
    return per_pass * (2 if train else 1)


def moe_ep(tokens: jax.Array, route: Routing, expert: experts.GLUExperts, expert_weights: experts.Weights,
           cfg: ml_collections.ConfigDict, mesh: Mesh, *, capacity: int | None, backend: str,
           compute_dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The routed-expert part of the MoE layer under shard_map: tokens [T, D] -> (out [T, D], dropped, overflow).

    tokens, route.weights and route.experts are split over TOKEN_AXES; the expert weights [E, ...] over 'expert'
    (and their 'mlp' axis over 'tensor'). capacity: slots per expert over the whole batch (capacity mode), None
    for dropless. dropped and overflow are slot counts over the whole batch.
    """
    num_experts, top_k = cfg.num_experts, route.experts.shape[-1]  # slots per token (expert choice: E)
    ep = mesh.shape["expert"]
    num_local = -(-num_experts // ep)  # experts padded to a multiple of ep; the padding is never routed to
    shards = math.prod(mesh.shape[a] for a in TOKEN_AXES)
    tokens_local = tokens.shape[0] // shards
    tile = pipeline.tile_for(backend, cfg.gmm_tile, tokens_local * top_k, num_local)
    rows = a2a_rows(tokens_local, top_k, num_experts, ep, cfg.ep_buffer_factor)
    mode = cfg.ep_mode
    local_fn = dict(num_local=num_local, expert=expert, tile=tile, backend=backend, kernel=cfg.dispatch_kernel)

    def body(x, expert_ids, weights, *local_weights):
        valid = expert_ids < num_experts
        if capacity is not None:
            keep = _keep_within_capacity(expert_ids, weights, num_experts, capacity, cfg.drop_policy, shards)
        else:
            keep = valid
        dropped = jnp.sum(valid & ~keep)
        expert_ids = jnp.where(keep, expert_ids, num_experts)
        me = jax.lax.axis_index("expert")
        overflow = jnp.zeros((), jnp.int32)
        if mode == "ring" or ep == 1:
            xs = jax.lax.all_gather(x, "expert", tiled=True) if ep > 1 else x
            ids = jax.lax.all_gather(expert_ids, "expert", tiled=True) if ep > 1 else expert_ids
            ws = jax.lax.all_gather(weights, "expert", tiled=True) if ep > 1 else weights
            local = ids - me * num_local
            local = jnp.where((ids < num_experts) & (local >= 0) & (local < num_local), local, num_local)
            out = _local_experts(xs, local, ws, local_weights, **local_fn)
            out = jax.lax.psum(out, "tensor")
            if ep > 1:
                out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
        else:
            kept = expert_ids < num_experts
            dest = jnp.where(kept, expert_ids // num_local, ep)
            rank, send_counts = dispatch.slot_ranks(dest.reshape(-1), ep)
            rank = rank.reshape(dest.shape)
            fits = kept & (rank < rows)
            overflow = jnp.sum(kept & ~fits)
            send_row = jnp.where(fits, dest * rows + rank, ep * rows).astype(jnp.int32)
            row_slot = dispatch.row_slots(send_row, ep * rows)
            send_x = dispatch.permute(x, send_row, row_slot)  # [ep * R, D]
            local_ids = jnp.where(fits, expert_ids % num_local, num_local).reshape(-1)
            send_ids = jnp.concatenate([local_ids, jnp.array([num_local], jnp.int32)])[row_slot]
            if mode == "ragged_a2a":
                send_sizes = jnp.minimum(send_counts, rows)
                recv_sizes = jax.lax.all_to_all(send_sizes, "expert", 0, 0, tiled=True)
                recv_x, recv_ids = _ragged_exchange(send_x, send_ids, send_sizes, recv_sizes, rows, ep, num_local)
            else:
                recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
                recv_ids = jax.lax.all_to_all(send_ids, "expert", 0, 0, tiled=True)
            ones = vma.varying_like(jnp.ones((recv_ids.shape[0], 1), weights.dtype), recv_x,
                                   *jax.tree.leaves(local_weights))
            y = _local_experts(recv_x, recv_ids[:, None], ones, local_weights, **local_fn)
            y = jax.lax.psum(y, "tensor")
            if mode == "ragged_a2a":
                back = _ragged_return(y, send_sizes, recv_sizes, rows, ep)
            else:
                back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True)
            out = dispatch.unpermute_combine(back, weights, send_row, row_slot)
        totals = jax.lax.psum(jnp.stack([dropped, overflow]).astype(jnp.int32), TOKEN_AXES)
        return out, totals[0], totals[1]

    token_spec = P(TOKEN_AXES, None)
    inside = {"expert": "expert", "mlp": "tensor"}  # the weights' split inside the layer; other axes whole
    weight_specs = tuple(P(*(inside.get(a) for a in expert.param_axes[name])) for name in expert.param_names)
    # int codes and scales (quantised decoding, moejax/moe/quantised.py) split as the weight they stand for
    weight_specs = tuple(dataclasses.replace(w, codes=spec, scales=spec) if quantised.is_weight(w) else spec
                         for w, spec in zip(expert_weights, weight_specs, strict=True))
    # Interpreted Pallas kernels (CPU) evaluate their bodies op by op, which shard_map's varying-axes check rejects
    # (a block varies, a kernel constant does not); compiled kernels are opaque to it. So the check is off there.
    check_vma = not (cfg.dispatch_kernel == "pallas" and jax.default_backend() == "cpu")
    fn = jax.shard_map(body, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, *weight_specs),
                       out_specs=(token_spec, P(), P()), check_vma=check_vma)
    pad = num_local * ep - num_experts
    padded = (w if not pad else w.pad(pad) if quantised.is_weight(w) else
              jnp.pad(w, ((0, pad),) + ((0, 0),) * (w.ndim - 1)) for w in expert_weights)
    return fn(tokens.astype(compute_dtype), route.experts.astype(jnp.int32), route.weights, *padded)


def _ragged_exchange(send_x, send_ids, send_sizes, recv_sizes, rows, ep, num_local):
    """ragged_all_to_all of the a2a layout: block d's first send_sizes[d] rows go to device d, landing in its
    receive buffer at block (this device) -- the same layout the padded all_to_all produces."""
    me = jax.lax.axis_index("expert")
    starts = jnp.arange(ep, dtype=jnp.int32) * rows
    out_offsets = jnp.full((ep,), me * rows, jnp.int32)
    recv_x = jax.lax.ragged_all_to_all(send_x, jnp.zeros_like(send_x), starts, send_sizes, out_offsets,
                                       recv_sizes, axis_name="expert")
    recv_ids = jax.lax.ragged_all_to_all(send_ids, jnp.full_like(send_ids, num_local), starts, send_sizes,
                                         out_offsets, recv_sizes, axis_name="expert")
    return recv_x, recv_ids


def _ragged_return(y, send_sizes, recv_sizes, rows, ep):
    """The reverse exchange: block s of y (recv_sizes[s] valid rows) goes back into block (this device) of s."""
    me = jax.lax.axis_index("expert")
    starts = jnp.arange(ep, dtype=jnp.int32) * rows
    return jax.lax.ragged_all_to_all(y, jnp.zeros_like(y), starts, recv_sizes, jnp.full((ep,), me * rows, jnp.int32),
                                     send_sizes, axis_name="expert")
