"""Device mesh, logical axis names and the sharding rules that map them to mesh axes.

Mesh axes are ``data, fsdp, expert, tensor`` (``config.mesh``; one of them may be -1 to fill the devices). The batch
is split over ``data``, ``fsdp`` and ``expert`` together (``TOKEN_AXES``); inside the MoE layer the ``expert`` axis
also splits the routed experts, so each device holds E / mesh.expert of them.

Every parameter has logical axis names (``param_logical_axes``, by its path in the tree); ``RULES`` is the one
table mapping logical names to mesh axes. Changing a sharding strategy means editing that table.

The expert-parallel MoE layer itself lives in moejax/moe/expert_parallel.py.
"""
import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import checks, moe
from moejax.moe import experts as moe_experts

MESH_AXES = ("data", "fsdp", "expert", "tensor")
TOKEN_AXES = ("data", "fsdp", "expert")  # the batch (and the MoE layer's tokens) is split over these

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
    "latent": None,  # the low-rank widths of latent attention (mla.q_lora_rank, kv_lora_rank + qk_rope_head_dim)
    "layers": None,  # the stacked axis of scanned layers
}

# parameter path suffix -> logical axis names (the leading 'layers' axis of scanned layers is added on top)
PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("scale",): ("norm",),  # RMSNorm scales (also the per-head q_norm / k_norm)
    # LayerNorm biases (model.norm='layernorm'), the multi-token-prediction modules' norms included
    **{(name, "bias"): ("norm",) for name in ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "final_norm",
                                              "enorm", "hnorm", "norm")},
    ("lm_head", "bias"): ("vocab",),  # model.lm_head_bias
    ("q", "kernel"): ("embed", "heads", "head_dim"),
    ("k", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("v", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("o", "kernel"): ("heads", "head_dim", "embed"),
    ("q", "bias"): ("heads", "head_dim"),  # qkv_bias / o_bias
    ("k", "bias"): ("kv_heads", "head_dim"),
    ("v", "bias"): ("kv_heads", "head_dim"),
    ("o", "bias"): ("embed",),
    ("sinks",): ("heads",),  # attention sinks
    ("q_a", "kernel"): ("embed", "latent"),  # latent attention (model.attention='mla')
    ("q_b", "kernel"): ("latent", "heads", "head_dim"),
    ("kv_a", "kernel"): ("embed", "latent"),
    ("kv_b", "kernel"): ("latent", "heads", "head_dim"),
    ("eh_proj", "kernel"): (None, "embed"),  # multi-token prediction: [embedding; hidden] -> hidden
    # the routed experts' parameters ('experts/<name>') come from their kind's param_axes (moejax/moe/experts.py)
    ("wi_0",): ("embed", "mlp"),  # dense GLU and fused shared experts
    ("wi_1",): ("embed", "mlp"),
    ("wo",): ("mlp", "embed"),
    (moe.ROUTER, "kernel"): ("embed", "router"),  # also Chain-of-Experts' router_{c}
    (moe.ROUTER, "bias"): ("router",),  # router.bias
    (moe.SHARED_GATE, "kernel"): ("embed", None),
    (moe.ROUTER_BIAS,): ("router",),
    (moe.IDENTITY_BIAS,): ("router",),  # model.moe.num_identity_experts
    **{(moe.EXPERTS, name): axes
       for kind in moe_experts.EXPERT_KINDS.values() for name, axes in kind.param_axes.items()},
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


# ----------------------------------------------------------------------------------------------- parameters


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def param_logical_axes(params: Any) -> Any:
    """The logical axis names of every parameter (a tree of tuples like params); raises on an unknown parameter.

    Parameters stacked by nn.scan over layers (one dimension more than their names) get a leading 'layers' axis.
    """

    def names(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        keys = tuple(moe.ROUTER if moe.is_router(k) else k for k in keys)
        for suffix in sorted(PARAM_AXES, key=len, reverse=True):
            if keys[-len(suffix):] == suffix:
                axes = PARAM_AXES[suffix]
                break
        else:
            raise ValueError(f"parameter {'/'.join(keys)} has no logical axis names: add its path suffix to "
                             f"moejax.parallel.PARAM_AXES")
        if len(leaf.shape) == len(axes) + 1:  # stacked by nn.scan over layers
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
