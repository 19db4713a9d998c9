"""What a forward pass computes inside each MoE layer, captured without changing the model's code, and the routing
trace recorded from it (``record``).

    from moejax.posthoc import capture
    for tokens, layers in capture.stream(config, variables, batches, lambda c: (c.tokens, c.layers)):
        ...                                            # numpy, one batch at a time
    capture.record(config, variables, batches, "traces/run1", with_scores=True, eos_id=0)

Per MoE layer (model layer index ``LayerCapture.layer``, the order of ``moejax.model.moe_layers``) and token of a
batch [B, S] (T = B * S tokens, row-major):

* ``h_before`` [T, D]: the residual stream entering the block's FFN part, x after ``x + attn(norm(x))``: the input
  of the block's ``ffn_norm`` (so no reconstruction: the exact array the model normalises);
* ``inputs``   [T, D]: the MoE layer's input, the ``ffn_norm`` output (model dtype). A post-norm block
  (``model.norm_position='post'``, OLMo 2 / FlexOlmo: x + post_ffn_norm(moe(x))) has no ``ffn_norm``: its MoE
  reads the stream itself, so ``inputs`` equals ``h_before`` and ``h_after`` is ``h_before + post_ffn_norm(output)``;
* ``logits``   [T, E + m] float32: the router logits, the ``RouterKernel`` output;
* ``routing``: ``moejax.moe.routers.route`` on those logits with the layer's ``moe_state`` router_bias (zeros when the
  variables have none), ``train=False`` and the input token ids where the router needs them: the function and
  arguments the layer itself uses at evaluation, so the selected experts and weights are the model's;
* ``output``   [T, D]: the MoE module's output (routed + shared experts);
* ``routed``   [T, D]: the routed experts' part of ``output``: the gate-weighted sum of the selected experts' outputs
  as the layer combines them (after any capacity drop; ``output`` minus the shared experts' contribution);
* ``shared``   [T, D] or None: the shared experts' output (the fused shared GLU's down-projection output, before
  Qwen2-MoE's sigmoid ``shared_gate``); None for a model without shared experts;
* ``h_after``  [T, D]: the block's output, ``h_before + output`` for the standard residual;
* ``params``, ``state``: the layer's MoE parameter tree and moe_state (the scan unit indexed away).

How: the forward runs under ``flax.linen.intercept_methods`` with an interceptor that sows those module inputs and
outputs into the ``moe_aux`` collection (under names starting with ``posthoc_``, which ``moejax.moe.stats.collect``
ignores). ``capture_intermediates`` would not do: ``nn.scan`` in moejax/model.py scans the collections 'params',
'moe_state', 'moe_aux' and the cache only, so with ``model.scan_layers`` the 'intermediates' of the scanned blocks
are dropped; 'moe_aux' is scanned, so its entries come back stacked on the unit axis [U, ...], which ``forward``
maps to model layers (``moejax.model.moe_layer_paths``). Chain-of-Experts layers (``model.moe.chain_iterations``
> 1: several routed passes whose inputs are not module outputs) are refused.

``stream`` jits the forward together with a caller's reduction ``fn(Capture) -> pytree`` and yields ``fn``'s result
per batch as numpy, so a corpus of any size passes through a bounded amount of memory and only what ``fn`` keeps
leaves the device. ``slot_outputs`` gives every routed (token, expert) pair's expert output, computed with the
layer's own dispatch and grouped-matmul code (``moejax.moe.dispatch``, ``experts.grouped_apply``) and weights.

On a device mesh (``mesh=`` of ``stream``, ``capture``, ``record`` and the importance and super-expert functions
built on them; ``moejax.parallel.make_mesh(config)``): the variables are placed as training places them (the routed
experts split over 'expert', ``place_variables``), each batch's rows over the token axes (``place_batch``), the MoE
layers run expert-parallel (``Transformer(cfg, mesh)``) and ``slot_outputs`` runs the same expert-parallel code, so
a model larger than one device can be captured; the results equal the one-device ones up to float rounding.

Batches are int token arrays [B, S]: the model's inputs. ``data.eval_batches`` windows are [B, S + 1] (inputs and
the next-token targets): pass ``b[:, :-1]``, as ``calibration_batches`` does.
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from moejax import console, moe
from moejax import model as model_lib
from moejax.moe import dispatch, expert_map, expert_parallel, experts, pipeline, placement, routers
from moejax.moe import layer as moe_layer
from moejax.posthoc.calibration import CALIBRATION_SEED, SPLITS, calibration_batches  # noqa: F401 (re-exported)
from moejax.posthoc.trace import TraceWriter

COLLECTION = "moe_aux"  # the collection the interceptor sows into (scanned by nn.scan, unlike 'intermediates')
PREFIX = "posthoc_"  # names of the sown entries: posthoc_h_before, posthoc_inputs, posthoc_logits, ...


@struct.dataclass
class LayerCapture:
    """One MoE layer on one batch (T = B * S tokens, row-major; see the module docstring)."""

    h_before: jax.Array  # [T, D] residual stream entering the FFN part (ffn_norm's input)
    inputs: jax.Array  # [T, D] MoE input (ffn_norm's output), model dtype
    logits: jax.Array  # [T, E + m] float32 router logits
    routing: routers.Routing  # the layer's routing at evaluation
    output: jax.Array  # [T, D] MoE output (routed + shared)
    h_after: jax.Array  # [T, D] block output
    params: Any  # the layer's MoE params {'router': ..., 'experts': ..., ...}
    state: Any  # the layer's moe_state ({'router_bias': [E]} or {})
    layer: int = struct.field(pytree_node=False, default=0)  # the model's layer index
    routed: jax.Array | None = None  # [T, D] the routed experts' combined output (gate weights applied)
    shared: jax.Array | None = None  # [T, D] the shared experts' output before any shared gate; None without them
    mesh: Any = struct.field(pytree_node=False, default=None)  # the forward's device mesh (None: one device)


@struct.dataclass
class Capture:
    """One batch: its tokens [B, S], the model's logits [B, S, V] and one ``LayerCapture`` per MoE layer (in the
    order of ``moejax.model.moe_layers``)."""

    tokens: jax.Array
    logits: jax.Array
    layers: tuple[LayerCapture, ...]


# ------------------------------------------------------------------------------------------------ the forward

def _interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "_routed" and isinstance(module, moe_layer.MoE):  # the routed experts' pass
        module.sow(COLLECTION, PREFIX + "routed", out)
    if context.method_name != "__call__":
        return out
    if isinstance(module, moe_layer.RouterKernel):
        module.sow(COLLECTION, PREFIX + "logits", out)
    elif isinstance(module, moe_layer.MoE):
        module.sow(COLLECTION, PREFIX + "output", out)
        if isinstance(module.parent, model_lib.Block) and _post_norm(module.parent.cfg):
            module.sow(COLLECTION, PREFIX + "h_before", args[0])  # no ffn_norm: the MoE reads the stream itself
            module.sow(COLLECTION, PREFIX + "inputs", args[0])
    elif module.name == moe.SHARED and isinstance(module.parent, moe_layer.MoE):
        module.sow(COLLECTION, PREFIX + "shared", out)
    elif isinstance(module, model_lib.Block) and module.use_moe:
        module.sow(COLLECTION, PREFIX + "h_after", out)
    elif module.name == "ffn_norm" and isinstance(module.parent, model_lib.Block) and module.parent.use_moe:
        module.sow(COLLECTION, PREFIX + "h_before", args[0])
        module.sow(COLLECTION, PREFIX + "inputs", out)
    return out


def _post_norm(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.get("norm_position", "pre") == "post"


def check_supported(config: ml_collections.ConfigDict) -> list[int]:
    """The model's MoE layers; ValueError for a dense model, NotImplementedError for Chain-of-Experts and for a
    shortcut-connected MoE."""
    cfg = config.model
    layers = model_lib.moe_layers(cfg)
    if not layers:
        raise ValueError("the model has no MoE layer (model.moe_every=0 or every layer dense): nothing to capture")
    if cfg.moe.chain_iterations > 1:
        raise NotImplementedError(f"model.moe.chain_iterations={cfg.moe.chain_iterations}: Chain-of-Experts routes "
                                  "each token several times per layer from inputs that are not module outputs; "
                                  "post-hoc capture supports one routed pass per layer")
    if cfg.get("moe_shortcut", False):
        raise NotImplementedError("model.moe_shortcut=True: a shortcut-connected MoE's output joins the stream after "
                                  "the next layer, so a MoE layer has no stream after it to capture (h_after)")
    return layers


def _subtree(tree: Mapping[str, Any], path: Sequence[str], what: str) -> Any:
    for key in path:
        if key not in tree:
            raise KeyError(f"the forward sowed no {what} at {'/'.join(path)}")
        tree = tree[key]
    return tree


def _route(config: ml_collections.ConfigDict, logits: jax.Array, state: Mapping[str, Any], token_ids: jax.Array,
           layer: int = 0, intervention: Any = None) -> routers.Routing:
    """The layer's evaluation routing of captured logits (the same arguments moejax/moe/layer.py gives it, and the
    same intervention steps: its selection bias before the router, its post-step after)."""
    cfg = config.model.moe
    spec = routers.spec(cfg.router.kind)
    bias = state.get(moe.ROUTER_BIAS)
    bias = jnp.zeros((cfg.num_experts,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    if intervention is not None:
        from moejax.moe import intervene

        bias = intervene.selection_bias(intervention, layer, bias)
    if expert_map.has_map(cfg):  # removed logical experts masked as the layer masks them
        logits, bias = expert_map.mask_removed(logits, bias, expert_map.layer_row(cfg, layer), cfg.num_experts)
    route = routers.route(logits, cfg, bias=bias, train=False, token_ids=token_ids if spec.needs_token_ids else None)
    if intervention is not None:
        route = intervene.apply(intervention, layer, route, cfg, bias=bias)
    return route


def forward(config: ml_collections.ConfigDict, variables: Mapping[str, Any], tokens: jax.Array,
            intervention: Any = None, mesh: Any = None) -> Capture:
    """The model on tokens [B, S] (evaluation mode) with every MoE layer's ``LayerCapture``. Traceable: ``stream``
    jits it. ``intervention``: a ``moejax.moe.intervention.Intervention`` given to the forward and applied to the
    captured routing the way the layer applies it (None: the model's own routing). ``mesh``: the model runs on this
    device mesh (``Transformer(cfg, mesh)``: the MoE layers expert-parallel; see ``stream``), None on one device."""
    check_supported(config)
    cfg = config.model
    tokens = jnp.asarray(tokens, jnp.int32)
    apply_vars = {key: variables[key] for key in ("params", "moe_state") if variables.get(key) is not None}
    extra = {} if intervention is None else {"intervention": intervention}
    with nn.intercept_methods(_interceptor):
        logits, collections = model_lib.Transformer(cfg, mesh=mesh).apply(apply_vars, tokens, mutable=[COLLECTION],
                                                                           **extra)
    sown = collections[COLLECTION]
    layer_vars = model_lib.moe_layer_variables(cfg, variables)
    ids = tokens.reshape(-1)
    captured = []
    for layer, (ffn_path, unit) in model_lib.moe_layer_paths(cfg).items():
        block = ffn_path[:-1]

        def take(path: Sequence[str], name: str, unit=unit) -> jax.Array:
            value = _subtree(sown, path, name)[PREFIX + name][0]
            value = value if unit is None else value[unit]
            return value.reshape(-1, value.shape[-1])

        params, state = layer_vars[layer]
        norm_path = ffn_path if _post_norm(cfg) else (*block, "ffn_norm")  # where the MoE input was sown
        router_logits = take((*ffn_path, moe.ROUTER), "logits")
        captured.append(LayerCapture(
            h_before=take(norm_path, "h_before"), inputs=take(norm_path, "inputs"),
            logits=router_logits, routing=_route(config, router_logits, state, ids, layer, intervention),
            output=take(ffn_path, "output"),
            h_after=take(block, "h_after"), params=params, state=state, layer=layer,
            routed=take(ffn_path, "routed"),
            shared=take((*ffn_path, moe.SHARED), "shared") if cfg.moe.num_shared > 0 else None,
            mesh=mesh if mesh is not None and mesh.size > 1 else None))
    return Capture(tokens=tokens, logits=logits, layers=tuple(captured))


def slot_outputs(config: ml_collections.ConfigDict, layer: LayerCapture) -> jax.Array:
    """[T, k, D]: the output of the expert in each routing slot on its token (before the gate weight), 0 for null
    slots. Computed as the layer computes it, in the model dtype, through a dropless dispatch plan and the
    configured grouped-matmul backend: every routed slot, also those a capacity-limited layer would drop. A layer
    captured on a mesh (``layer.mesh``) runs the layer's expert-parallel code instead (``_slot_outputs_on_mesh``),
    so the experts stay split over the mesh's 'expert' axis."""
    if layer.mesh is not None:
        return _slot_outputs_on_mesh(config, layer)
    cfg = config.model.moe
    dtype = jnp.dtype(config.model.dtype)
    expert = experts.from_config(cfg)
    weights = tuple(jnp.asarray(layer.params[moe.EXPERTS][name], dtype) for name in expert.param_names)
    route, num_stored = _stored_routing(config, layer)
    backend = experts.resolve_backend(cfg.gmm_backend)
    tile = pipeline.tile_for(backend, cfg.gmm_tile, route.experts.size, num_stored)
    plan = dispatch.dropless_plan(route, num_stored, tile)
    rows = dispatch.permute(layer.inputs.astype(dtype), plan.slot_row, plan.row_slot)
    rows = experts.grouped_apply(expert, rows, weights, plan, backend)
    return dispatch.append_zero_row(rows)[plan.slot_row]


def _stored_routing(config: ml_collections.ConfigDict, layer: LayerCapture) -> tuple[routers.Routing, int]:
    """The layer's routing with its slots' logical expert ids turned into the ids of the weights' expert axis
    (stored ids through the expert map, one per slot, nothing combined; physical slots through a placement), and
    that axis' length."""
    cfg = config.model.moe
    num_weights = layer.params[moe.EXPERTS][experts.from_config(cfg).param_names[0]].shape[0]
    num_stored = expert_map.stored_count(cfg, None if config.model.scan_layers else layer.layer)
    ids = layer.routing.experts
    if expert_map.has_map(cfg):
        ids = expert_map.stored_ids(ids, expert_map.layer_row(cfg, layer.layer), cfg.num_experts, num_stored)
    if placement.has_placement(cfg):  # replicas are copies: any replica gives the slot's output
        replicas, counts = placement.layer_tables(cfg, layer.layer, num_stored)
        ids = placement.to_physical(ids, replicas, counts, num_stored, num_weights)
    return layer.routing.replace(experts=ids), num_weights


def _slot_outputs_on_mesh(config: ml_collections.ConfigDict, layer: LayerCapture) -> jax.Array:
    """``slot_outputs`` on the capture's mesh: every slot a row of its own (row t * k + j: token t's input, slot
    j's expert, weight 1) through ``expert_parallel.moe_ep``, dropless, as the layer calls it (its weights in the
    model dtype, an output bias divided over the 'tensor' axis whose shards' outputs the layer sums)."""
    cfg, mesh = config.model.moe, layer.mesh
    dtype = jnp.dtype(config.model.dtype)
    expert = experts.from_config(cfg)
    weights = tuple(jnp.asarray(layer.params[moe.EXPERTS][name], dtype) for name in expert.param_names)
    tensor = mesh.shape.get("tensor", 1)
    if tensor > 1 and expert.after_contraction:
        weights = tuple(w / tensor if name in expert.after_contraction else w
                        for name, w in zip(expert.param_names, weights, strict=True))
    route, num_stored = _stored_routing(config, layer)
    num_tokens, k = route.experts.shape
    rows = jnp.repeat(layer.inputs.astype(dtype), k, axis=0)  # [T * k, D]
    single = routers.Routing(weights=jnp.ones((num_tokens * k, 1), jnp.float32),
                             experts=route.experts.reshape(-1, 1), probs=None, logits=None)
    out, _, _ = expert_parallel.moe_ep(rows, single, expert, weights, expert_map.with_num_experts(cfg, num_stored),
                                       mesh, capacity=None,
                                       backend=experts.resolve_backend(cfg.gmm_backend), compute_dtype=dtype)
    return out.astype(dtype).reshape(num_tokens, k, -1)


# ------------------------------------------------------------------------------------------------ on a mesh

def check_mesh(mesh: Any) -> None:
    """ValueError unless mesh is a ``jax.sharding.Mesh`` with the axes of ``moejax.parallel.MESH_AXES`` (as
    ``moejax.parallel.make_mesh(config)`` builds it from ``config.mesh``) over this process's devices."""
    from moejax import parallel

    if not isinstance(mesh, jax.sharding.Mesh) or tuple(mesh.axis_names) != parallel.MESH_AXES:
        raise ValueError(f"mesh={mesh!r}: post-hoc capture needs a jax Mesh with the axes {parallel.MESH_AXES} "
                         "(moejax.parallel.make_mesh(config))")
    if any(device.process_index != jax.process_index() for device in mesh.devices.flat):
        raise ValueError("mesh: post-hoc capture feeds the batches from this process; use a mesh of its own devices "
                         "(jax.local_devices())")


def place_variables(variables: Mapping[str, Any], mesh: Any) -> dict[str, Any]:
    """{'params', 'moe_state'} placed on mesh as training places them: every parameter by its logical axes and
    ``moejax.parallel.RULES`` (the routed experts split over 'expert', widths over 'fsdp' / 'tensor';
    ``parallel.param_shardings``), the moe_state replicated. Already placed variables stay where they are."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moejax import parallel

    check_mesh(mesh)
    placed = {"params": jax.device_put(variables["params"], parallel.param_shardings(variables["params"], mesh))}
    if variables.get("moe_state") is not None:
        placed["moe_state"] = jax.device_put(variables["moe_state"], NamedSharding(mesh, P()))
    return placed


def place_batch(tokens: np.ndarray, mesh: Any, index: int = 0) -> jax.Array:
    """Token ids [B, S] on mesh, rows split over the token axes (``moejax.parallel.batch_sharding``); ValueError
    naming batch ``index`` when B is not a multiple of their size."""
    from moejax import parallel

    shards = int(np.prod([mesh.shape[axis] for axis in parallel.TOKEN_AXES]))
    if tokens.shape[0] % shards:
        raise ValueError(f"batch {index}: {tokens.shape[0]} rows do not split over the mesh's token axes "
                         f"({' x '.join(f'{a}={mesh.shape[a]}' for a in parallel.TOKEN_AXES)} = {shards}): use a "
                         f"batch size that is a multiple of {shards}")
    return jax.device_put(tokens, parallel.batch_sharding(mesh))


def _without_params(capture: Capture) -> Capture:
    return capture.replace(layers=tuple(layer.replace(params=None, state=None) for layer in capture.layers))


def stream(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any],
           fn: Callable[[Capture], Any] | None = None, *, intervention: Any = None,
           progress: Callable[[int], None] | None = None, mesh: Any = None) -> Iterator[Any]:
    """Yields, per batch [B, S] of token ids, ``fn(capture)`` as numpy (default: the whole ``Capture`` without the
    layers' params and state). ``fn`` is traced with the forward under one ``jax.jit`` (compiled once per batch
    shape): reduce there what you keep. ``intervention``: see ``forward``. ``progress(tokens so far)`` is called
    after each batch.

    ``mesh`` (a ``moejax.parallel.make_mesh`` mesh of this process's devices): the model runs sharded as training
    runs it, for a model larger than one device: the variables placed by ``place_variables`` (the routed experts
    split over 'expert'), each batch's rows split over the token axes (B a multiple of data x fsdp x expert), the
    MoE layers expert-parallel (``Transformer(cfg, mesh)``) and ``slot_outputs`` through the same expert-parallel
    code; what ``fn`` returns comes back to the host whole. The results equal the one-device ones up to float
    rounding (the selected experts exactly, but for near-ties of the router scores)."""
    check_supported(config)
    reduce = _without_params if fn is None else fn
    step = jax.jit(lambda v, t, iv: reduce(forward(config, v, t, iv, mesh)))
    variables = {key: variables[key] for key in ("params", "moe_state") if variables.get(key) is not None}
    if mesh is not None:
        variables = place_variables(variables, mesh)
    done = 0
    for index, batch in enumerate(batches):
        tokens = np.asarray(batch)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"batch {index}: expected integer token ids [B, S] (the model's inputs), got "
                             f"{tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= config.model.vocab_size):
            raise ValueError(f"batch {index}: token ids must lie in [0, model.vocab_size={config.model.vocab_size}), "
                             f"got min {tokens.min()} and max {tokens.max()}")
        tokens = tokens.astype(np.int32)
        out = jax.device_get(step(variables, tokens if mesh is None else place_batch(tokens, mesh, index),
                                  intervention))
        done += tokens.size
        if progress is not None:
            progress(done)
        yield out


def capture(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any],
            callback: Callable[[int, Any], None], fn: Callable[[Capture], Any] | None = None, *,
            intervention: Any = None, progress: Callable[[int], None] | None = None, mesh: Any = None) -> int:
    """``stream`` with a callback: ``callback(batch index, fn(capture) as numpy)`` per batch; returns the number of
    batches."""
    count = 0
    for count, result in enumerate(stream(config, variables, batches, fn, intervention=intervention,
                                          progress=progress, mesh=mesh), start=1):
        callback(count - 1, result)
    return count


# ------------------------------------------------------------------------------------------------ the trace

def doc_starts(tokens: np.ndarray, eos_id: int | None, split_rows: bool, after_eos: bool = False) -> np.ndarray:
    """Positions in the flattened batch tokens [B, S] where a document starts: after every ``eos_id`` token (the
    eos ends its document, as the data pipeline appends it to each document), at every row start when
    ``split_rows`` (each row is a separate sequence for the model), and at position 0 when ``after_eos`` (the
    previous batch ended with an eos)."""
    rows, seq = tokens.shape
    flat = tokens.reshape(-1)
    starts = [np.arange(rows, dtype=np.int64) * seq] if split_rows else []
    if eos_id is not None:
        starts.append(np.flatnonzero(flat[:-1] == eos_id).astype(np.int64) + 1)
    if after_eos:
        starts.append(np.zeros(1, np.int64))
    return np.unique(np.concatenate(starts)) if starts else np.zeros(0, np.int64)


def slots_per_token(config: ml_collections.ConfigDict) -> int:
    """k: the routing slots per token of the model's router at evaluation (top_k; E for THOR's average)."""
    cfg = config.model.moe
    logits = jax.ShapeDtypeStruct((1, cfg.num_experts + cfg.num_null_experts), jnp.float32)
    shape = jax.eval_shape(lambda x: _route(config, x, {}, jnp.zeros((1,), jnp.int32)).experts, logits).shape
    return int(shape[-1])


def routing_arrays(config: ml_collections.ConfigDict, with_scores: bool = False) -> Callable[[Capture], dict]:
    """A ``stream`` reduction: {'tokens' [B, S], 'experts' [L, T, k] int32, 'weights' [L, T, k] float32, and with
    with_scores 'scores' [L, T, E] float32 (the router's probabilities of the E real experts)}."""
    num_experts = config.model.moe.num_experts

    def fn(capture: Capture) -> dict:
        out = {"tokens": capture.tokens, "experts": jnp.stack([layer.routing.experts for layer in capture.layers]),
               "weights": jnp.stack([layer.routing.weights.astype(jnp.float32) for layer in capture.layers])}
        if with_scores:
            out["scores"] = jnp.stack([layer.routing.probs[:, :num_experts].astype(jnp.float32)
                                       for layer in capture.layers])
        return out

    return fn


def record(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any],
           out: str | pathlib.Path, *, with_scores: bool = False, eos_id: int | None = None, split_rows: bool = True,
           metadata: Mapping[str, Any] | None = None, overwrite: bool = False, intervention: Any = None,
           progress: Callable[[int], None] | None = None, mesh: Any = None) -> pathlib.Path:
    """Writes the routing trace of the model over ``batches`` (token ids [B, S], the model's inputs) to the
    directory ``out`` (``moejax.posthoc.trace``'s format, streamed by ``TraceWriter``; ``read_trace(out)`` opens it).

    Per token (batch rows in order, row-major) and MoE layer: the selected experts and their gate weights as the
    model routes them at evaluation (``forward``), optionally (``with_scores``) the router's probabilities of the E
    real experts (AdaMoE's null-expert columns left out); the token ids; document starts: after each ``eos_id``
    token (the tokenizer's eos, ``moejax.data.SEPARATOR`` = 0 for bytes; None: no eos boundaries) and, with
    ``split_rows``, at every row start. ``intervention`` (``moejax.moe.intervention.Intervention``): the routing
    as the model routes under it (masked experts absent, forced ones present). Returns the trace directory (no
    batches: an empty trace). The writer is opened before the first batch runs, so an existing trace at ``out`` is
    refused (unless ``overwrite``) before any work. ``mesh``: the forward on a device mesh (``stream``)."""
    layers = check_supported(config)
    info = {"source": "moejax.posthoc.record", "router": config.model.moe.router.kind, "eos_id": eos_id,
            "split_rows": split_rows, **dict(metadata or {})}
    writer = TraceWriter(out, layers, config.model.moe.num_experts, slots_per_token(config), with_scores=with_scores,
                         metadata=info, overwrite=overwrite)
    ended_with_eos = False
    for arrays in stream(config, variables, batches, routing_arrays(config, with_scores), intervention=intervention,
                         progress=progress, mesh=mesh):
        tokens = np.asarray(arrays["tokens"])
        writer.append(arrays["experts"], arrays["weights"], tokens.reshape(-1), scores=arrays.get("scores"),
                      doc_starts=doc_starts(tokens, eos_id, split_rows, after_eos=ended_with_eos))
        ended_with_eos = eos_id is not None and tokens.size > 0 and int(tokens.reshape(-1)[-1]) == eos_id
    return writer.close()


progress_bar = console.progress_bar  # the post-hoc CLI's progress lines (moejax/console.py)
