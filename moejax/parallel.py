"""Device mesh, parameter sharding by logical axis names, and the expert-parallel MoE layer inside ``jax.shard_map``.

Mesh axes are ``data, fsdp, expert, tensor`` (``config.mesh``; one of them may be -1 to fill the devices). The batch
is split over ``data``, ``fsdp`` and ``expert`` together (``TOKEN_AXES``); inside the MoE layer the ``expert`` axis
also splits the routed experts, so each device holds E / mesh.expert of them.

Every parameter has logical axis names (``param_logical_axes``, by its path in the tree); ``RULES`` is the one
table mapping logical names to mesh axes. Changing a sharding strategy means editing that table.

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
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import checks, dispatch, experts, vma
from moejax.routing import Routing

MESH_AXES = ("data", "fsdp", "expert", "tensor")
TOKEN_AXES = ("data", "fsdp", "expert")  # the batch (and the MoE layer's tokens) is split over these
EP_MODES = ("a2a", "ring", "ragged_a2a")

# logical axis name -> mesh axis (or axes); None replicates. The one place a sharding strategy is written down.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": TOKEN_AXES,
    "expert": "expert",  # routed experts' leading axis
    "embed": "fsdp",  # the model width of every weight matrix: FSDP
    "mlp": "tensor",  # FFN / expert hidden width
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "norm": None,
    "router": None,  # router logits' expert axis: every device routes its own tokens over all experts
    "layers": None,  # the stacked axis of scanned layers
}

# parameter path suffix -> logical axis names (the leading 'layers' axis of scanned layers is added on top)
PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("scale",): ("norm",),  # RMSNorm scales (also the per-head q_norm / k_norm)
    ("q", "kernel"): ("embed", "heads", "head_dim"),
    ("k", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("v", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("o", "kernel"): ("heads", "head_dim", "embed"),
    ("experts", "wi_0"): ("expert", "embed", "mlp"),
    ("experts", "wi_1"): ("expert", "embed", "mlp"),
    ("experts", "wo"): ("expert", "mlp", "embed"),
    ("wi_0",): ("embed", "mlp"),  # dense GLU and fused shared experts
    ("wi_1",): ("embed", "mlp"),
    ("wo",): ("mlp", "embed"),
    ("router", "kernel"): ("embed", "router"),
    ("shared_gate", "kernel"): ("embed", None),
    ("router_bias",): ("router",),
}


# ----------------------------------------------------------------------------------------------- mesh


def mesh_shape(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Axis sizes of config.mesh with the -1 axis filled; raises ConfigError when they do not fit the devices."""
    device_count = jax.device_count()
    sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size != -1:
            checks.positive_int(f"mesh.{axis}", size)
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        checks.fail(f"mesh.{fill[1]}", -1, f"at most one mesh axis may be -1, and mesh.{fill[0]} already is")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if device_count % fixed:
            checks.fail("mesh", sizes, f"the fixed axis sizes (product {fixed}) must divide the "
                                       f"{device_count} devices so that -1 can fill the rest")
        sizes[fill[0]] = device_count // fixed
    elif fixed != device_count:
        checks.fail("mesh", sizes, f"the product of the axis sizes ({fixed}) must equal the device count "
                                   f"{device_count} (set one axis to -1 to fill)")
    return sizes


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    sizes = mesh_shape(config)
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


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


def uneven_notes(config: ml_collections.ConfigDict) -> list[str]:
    """Human-readable notes on dimensions that do not divide the mesh axes they would be sharded over."""
    sizes, moe = mesh_shape(config), config.model.moe
    notes = []
    if config.model.moe_every > 0 and moe.num_experts % sizes["expert"]:
        padded = -(-moe.num_experts // sizes["expert"]) * sizes["expert"]
        notes.append(f"model.moe.num_experts={moe.num_experts} is not a multiple of mesh.expert={sizes['expert']}: "
                     f"the layer pads the experts to {padded} (never routed to) and the stored expert weights stay "
                     f"unsplit over 'expert'")
    return notes


# ----------------------------------------------------------------------------------------------- parameters


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def param_logical_axes(params: Any) -> Any:
    """The logical axis names of every parameter (a tree of tuples like params); raises on an unknown parameter.

    Parameters under 'blocks' (nn.scan over layers) get a leading 'layers' axis.
    """

    def names(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        keys = tuple(re.sub(r"^router_\d+$", "router", k) for k in keys)  # Chain-of-Experts' routers router_{c}
        for suffix in sorted(PARAM_AXES, key=len, reverse=True):
            if keys[-len(suffix):] == suffix:
                axes = PARAM_AXES[suffix]
                break
        else:
            raise ValueError(f"parameter {'/'.join(keys)} has no logical axis names: add its path suffix to "
                             f"moejax.parallel.PARAM_AXES")
        if "blocks" in keys:
            axes = ("layers", *axes)
        if len(axes) != len(leaf.shape):
            raise ValueError(f"parameter {'/'.join(keys)} of shape {leaf.shape} got logical axes {axes}")
        return axes

    return jax.tree_util.tree_map_with_path(names, params)


def logical_to_spec(axes: Sequence[str | None], rules: dict | None = None) -> P:
    """PartitionSpec of logical axes under ``rules`` (default RULES); a mesh axis is used once at most."""
    rules = RULES if rules is None else rules
    used, spec = set(), []
    for name in axes:
        mesh_axes = rules.get(name) if name else None
        flat = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        flat = tuple(a for a in flat if a not in used)
        used.update(flat)
        spec.append(None if not flat else flat[0] if len(flat) == 1 else flat)
    return P(*spec)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """spec with the mesh axes of every dimension they do not divide dropped (that dimension stays unsplit)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        fitted.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return P(*fitted)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding of every parameter from its logical axes and RULES (unsplit where a size does not divide)."""
    return jax.tree.map(lambda axes, leaf: NamedSharding(mesh, fit_spec(logical_to_spec(axes), leaf.shape, mesh)),
                        param_logical_axes(params), params, is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings of a TrainState: parameters by their logical axes; every optimizer leaf that mirrors a parameter
    (same path suffix and shape, e.g. Adam's mu and nu) like that parameter; the rest replicated."""
    params_sh = param_shardings(abstract_state.params, mesh)
    by_path = {tuple(_key_name(k) for k in path): (leaf.shape, sh) for (path, leaf), sh in zip(
        jax.tree_util.tree_leaves_with_path(abstract_state.params), jax.tree.leaves(params_sh), strict=True)}
    replicated = NamedSharding(mesh, P())

    def opt_sharding(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match and match[0] == leaf.shape:
                return match[1]
        return replicated

    return type(abstract_state)(
        step=replicated, params=params_sh,
        opt_state=jax.tree_util.tree_map_with_path(opt_sharding, abstract_state.opt_state),
        moe_state=jax.tree.map(lambda _: replicated, abstract_state.moe_state))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [B, S + 1]: rows split over the token axes."""
    return NamedSharding(mesh, P(TOKEN_AXES))


def bytes_per_device(tree: Any) -> int:
    """Bytes of a tree of (sharded) arrays held by one device (the first addressable shard of each)."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------- expert parallelism


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
                   num_local: int, tile: int, backend: str, activation: str, kernel: str) -> jax.Array:
    """sum_j weights[n, j] * GLU_{expert_ids[n, j]}(rows[n]) over this device's experts (num_local = null)."""
    route = Routing(weights=weights, experts=expert_ids, probs=None, logits=None)
    plan = dispatch.dropless_plan(route, num_local, 1 if backend in experts.RAGGED_BACKENDS else tile)
    permute, unpermute_combine = dispatch.kernel_ops(kernel)
    buffer = permute(rows, plan.slot_row, plan.row_slot)
    buffer = experts.grouped_glu(buffer, expert_weights, plan, backend, activation)
    return unpermute_combine(buffer, weights, plan.slot_row, plan.row_slot)


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


def moe_ep(tokens: jax.Array, route: Routing, expert_weights: tuple, cfg: ml_collections.ConfigDict, mesh: Mesh,
           *, capacity: int | None, backend: str, compute_dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The routed-expert part of the MoE layer under shard_map: tokens [T, D] -> (out [T, D], dropped, overflow).

    tokens, route.weights and route.experts are split over TOKEN_AXES; expert weights [E, D, F] / [E, F, D] over
    'expert' (and the hidden width over 'tensor'). capacity: slots per expert over the whole batch (capacity
    mode), None for dropless. dropped and overflow are slot counts over the whole batch.
    """
    num_experts, top_k = cfg.num_experts, route.experts.shape[-1]  # slots per token (expert choice: E)
    ep = mesh.shape["expert"]
    num_local = -(-num_experts // ep)  # experts padded to a multiple of ep; the padding is never routed to
    shards = math.prod(mesh.shape[a] for a in TOKEN_AXES)
    tokens_local = tokens.shape[0] // shards
    tile = cfg.gmm_tile or dispatch.default_tile(tokens_local * top_k, num_local)
    rows = a2a_rows(tokens_local, top_k, num_experts, ep, cfg.ep_buffer_factor)
    mode = cfg.ep_mode
    local_fn = dict(num_local=num_local, tile=tile, backend=backend, activation=cfg.activation,
                    kernel=cfg.dispatch_kernel)

    def body(x, expert_ids, weights, wi_0, wi_1, wo):
        valid = expert_ids < num_experts
        if capacity is not None:
            keep = _keep_within_capacity(expert_ids, weights, num_experts, capacity, cfg.drop_policy, shards)
        else:
            keep = valid
        dropped = jnp.sum(valid & ~keep)
        expert_ids = jnp.where(keep, expert_ids, num_experts)
        me = jax.lax.axis_index("expert")
        local_weights = (wi_0, wi_1, wo)
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
            ones = vma.varying_like(jnp.ones((recv_ids.shape[0], 1), weights.dtype), recv_x, *local_weights)
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
    wi_spec, wo_spec = P("expert", None, "tensor"), P("expert", "tensor", None)
    # Interpreted Pallas kernels (CPU) evaluate their bodies op by op, which shard_map's varying-axes check rejects
    # (a block varies, a kernel constant does not); compiled kernels are opaque to it. So the check is off there.
    check_vma = not (cfg.dispatch_kernel == "pallas" and jax.default_backend() == "cpu")
    fn = jax.shard_map(body, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, wi_spec, wi_spec, wo_spec),
                       out_specs=(token_spec, P(), P()), check_vma=check_vma)
    pad = num_local * ep - num_experts
    wi_0, wi_1, wo = (jnp.pad(w, ((0, pad), (0, 0), (0, 0))) if pad else w for w in expert_weights)
    return fn(tokens.astype(compute_dtype), route.experts.astype(jnp.int32), route.weights, wi_0, wi_1, wo)


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
