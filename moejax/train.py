"""The train/eval loop: ``train_and_evaluate(config, workdir)`` trains ``config`` and writes into ``workdir``.

The loop reads top to bottom in ``train_and_evaluate``: validate the config, check the workdir, load the data,
build the mesh, initialise the state sharded on it (or restore the newest good checkpoint), compile the train
step, run it with periodic logging, evaluation and checkpoints, then write the summary.

Workdir contents:

    config.json              the config of the run (written before training starts)
    checkpoints/<step>/      orbax checkpoints: 'state' (step, params, optimizer, MoE state) and 'meta' (JSON:
                             data-iterator state of every process, checksums of the state's arrays, config)
    events.out.tfevents.*    TensorBoard scalars (tensorboardX; no TensorFlow): train/*, eval/*
    metrics.jsonl            one JSON object per log step ({"kind": "train", ...}) and evaluation ("eval")
    summary.json             the final evaluation, throughput and parameter counts (see ``summary``)

Resuming: running the same command again restores the newest checkpoint in ``workdir/checkpoints`` and continues
bit-identically (the step's rng is ``fold_in(train_key, step)`` and the data-iterator state is checkpointed with
the step). A checkpoint that fails to restore, or whose arrays do not match the checksums saved beside them,
is reported, deleted, and the previous one is used. A workdir whose ``config.json`` differs from the config is
refused, except in the fields of ``MAY_DIFFER``: how long the run goes (a larger ``train.steps`` extends it; the
schedule then follows the new total), what it logs and saves, and where the corpus is cached.

Faults: SIGTERM makes the loop save a checkpoint at the current step and return; a non-finite loss or gradient
norm (checked at every log step and before every save) or non-finite parameters (checked before every save)
raise ``DivergenceError`` and nothing is saved past the last good checkpoint.

Optimizer: global-norm clipping (``train.grad_clip``; 0 disables it), AdamW with weight decay on every parameter
of rank >= 2 (not on norm scales), linear warm-up from 0 to ``train.learning_rate`` over ``train.warmup_steps``,
then ``train.schedule``.
"""
from __future__ import annotations

import json
import math
import pathlib
import signal
import threading
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX
from clu import metrics as clu_metrics
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import analysis, checks, data, model, parallel, routing, upcycle
from moejax.parallel import TOKEN_AXES, batch_sharding, make_mesh, mesh_shape, state_shardings

SCHEDULES = ("cosine", "step", "constant")
# Fields that may differ between a workdir's config.json and the config resuming it: how long the run goes, what it
# logs and saves, and where the corpus is cached (the data-iterator state checks it is the same corpus).
MAY_DIFFER = ("train.steps", "train.log_every", "train.eval_every", "checkpoint.every_steps", "checkpoint.keep",
              "data.dir", "data.tfds_dir")


class WorkdirError(RuntimeError):
    """The workdir holds something this run cannot continue from."""


class DivergenceError(FloatingPointError):
    """The loss, the gradient norm or the parameters became NaN or Inf."""


# ----------------------------------------------------------------------------------------------- config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the whole config before anything runs; raises ConfigError naming the field, value and what is allowed."""
    checks.positive_int("seed", config.seed, minimum=0)
    model.validate(config.model)
    if config.model.vocab_size < data.VOCAB_SIZE:
        checks.fail("model.vocab_size", config.model.vocab_size,
                    f"must be >= {data.VOCAB_SIZE}: the tokens are bytes 0..{data.VOCAB_SIZE - 1}")

    d = config.data
    try:
        data.parse_name(d.name)
    except ValueError:
        checks.fail("data.name", d.name, f"allowed: {data.NAMES_ALLOWED}")
    if not (isinstance(d.val_fraction, (int, float)) and 0 < d.val_fraction < 1):
        checks.fail("data.val_fraction", d.val_fraction, "must be a number in (0, 1)")
    checks.positive_int("data.eval_batches", d.eval_batches)

    t = config.train
    for field in ("steps", "batch_size", "seq_len", "log_every"):
        checks.positive_int(f"train.{field}", t[field])
    checks.positive_int("train.eval_every", t.eval_every, minimum=0)
    checks.number("train.learning_rate", t.learning_rate, strict=True)
    checks.positive_int("train.warmup_steps", t.warmup_steps, minimum=0)
    if t.warmup_steps > t.steps:
        checks.fail("train.warmup_steps", t.warmup_steps, f"must be <= train.steps={t.steps}")
    checks.choice("train.schedule", t.schedule, SCHEDULES)
    if not (isinstance(t.min_lr_ratio, (int, float)) and 0 <= t.min_lr_ratio <= 1):
        checks.fail("train.min_lr_ratio", t.min_lr_ratio, "must be a number in [0, 1]")
    checks.number("train.step_decay_factor", t.step_decay_factor, strict=True)
    at = list(t.step_decay_at)
    if not (all(isinstance(f, (int, float)) and 0 < f < 1 for f in at) and at == sorted(set(at))):
        checks.fail("train.step_decay_at", t.step_decay_at, "must be increasing fractions of train.steps in (0, 1)")
    checks.number("train.weight_decay", t.weight_decay)
    for field in ("b1", "b2"):
        if not (isinstance(t[field], (int, float)) and 0 <= t[field] < 1):
            checks.fail(f"train.{field}", t[field], "must be a number in [0, 1)")
    checks.number("train.grad_clip", t.grad_clip)
    checks.number("train.consistency_coef", t.consistency_coef)
    if t.consistency_coef and config.model.moe.router.kind not in routing.NEEDS_RNG:
        checks.fail("train.consistency_coef", t.consistency_coef,
                    f"the consistency loss compares two random routings: it needs a router kind in "
                    f"{sorted(routing.NEEDS_RNG)} (got model.moe.router.kind="
                    f"{config.model.moe.router.kind!r}); 0 otherwise")

    upcycle.validate(config)
    checks.positive_int("checkpoint.every_steps", config.checkpoint.every_steps, minimum=0)
    checks.positive_int("checkpoint.keep", config.checkpoint.keep)

    sizes = mesh_shape(config)
    data_parallel = math.prod(sizes[axis] for axis in TOKEN_AXES)
    if t.batch_size % data_parallel:
        checks.fail("train.batch_size", t.batch_size,
                    f"must be a multiple of the data-parallel device count {data_parallel} "
                    f"(mesh.data * mesh.fsdp * mesh.expert = {' * '.join(str(sizes[a]) for a in TOKEN_AXES)})")
    parallel.validate(config)
    if t.batch_size % jax.process_count():
        checks.fail("train.batch_size", t.batch_size, f"must be a multiple of the process count "
                                                       f"{jax.process_count()}")


def _flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{'train.steps': 1000, ...}: the config as JSON values, nested fields joined by '.'."""
    tree = json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else config
    return {".".join(path): value for path, value in traverse_util.flatten_dict(tree).items()}


def check_workdir_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Refuses a workdir whose config.json differs from config in a field outside MAY_DIFFER."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old, new = _flat_config(json.loads(path.read_text())), _flat_config(config)
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>")
                       and k not in MAY_DIFFER)
    if differing:
        lines = "\n".join(f"  {k}: {old.get(k, '<absent>')!r} in the workdir, {new.get(k, '<absent>')!r} now"
                          for k in differing)
        raise WorkdirError(
            f"workdir {workdir} holds a run with a different config:\n{lines}\n"
            f"To keep that run, use a new --workdir; to start over, delete {workdir}. "
            f"(Only {', '.join(MAY_DIFFER)} may differ when resuming.)")


# ----------------------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_steps, then cosine / step (DeepSeekMoE) / constant. ``t`` = config.train."""
    decay_steps = max(t.steps - t.warmup_steps, 1)
    if t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=t.min_lr_ratio)
    elif t.schedule == "step":  # x step_decay_factor at each fraction of all steps (warm-up included)
        boundaries: dict[int, float] = {}
        for fraction in t.step_decay_at:
            at = max(round(fraction * t.steps) - t.warmup_steps, 0)
            boundaries[at] = boundaries.get(at, 1.0) * t.step_decay_factor
        decay = optax.piecewise_constant_schedule(t.learning_rate, boundaries)
    else:
        decay = optax.constant_schedule(t.learning_rate)
    if not t.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    return optax.join_schedules([warmup, decay], [t.warmup_steps])


def is_router_param(path: tuple) -> bool:
    """Whether a parameter path is a router kernel (router, or Chain-of-Experts' router_{c})."""
    names = [str(getattr(key, "key", key)) for key in path]
    return any(name == "router" or name.startswith("router_") for name in names)


def make_optimizer(t: ml_collections.ConfigDict, frozen_router: bool = False) -> optax.GradientTransformation:
    """AdamW (weight decay on rank >= 2 parameters) after global-norm clipping. frozen_router: the routers get no
    gradient (moe.RouterKernel stops it) and no weight decay, so they stay at their initialisation."""

    def decayed(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, p: p.ndim >= 2 and not (frozen_router and is_router_param(path)), params)

    adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decayed)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw


# ----------------------------------------------------------------------------------------------- state, steps


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: updates applied so far
    params: Any
    opt_state: optax.OptState
    moe_state: Any  # the 'moe_state' collection: router_bias [E] per MoE layer (empty for dense models)


LAYER_STATS = ("max_over_mean_load", "maxvio", "drop_fraction", "experts_per_token")


def moe_layer_stats(moe_aux: Any, cfg: ml_collections.ConfigDict) -> dict[str, dict[str, jax.Array]]:
    """Per MoE layer, keyed 'layers_{i}' by depth, the LAYER_STATS: max_over_mean_load (max_e load / mean_e
    load), maxvio (the same minus 1, Loss-Free Balancing's MaxVio), drop_fraction and experts_per_token (routed
    experts per token; below top_k for dynamic routers). A layer called several times (Chain-of-Experts' passes)
    sums its loads and experts per token over the calls and averages its drop fraction.

    Each layer's entry also holds "load": its tokens_per_expert [E] (routed slots per expert).

    moe_aux: the 'moe_aux' collection of one forward pass; cfg: config.model. Scanned layers (stacked [U, ...]
    statistics under 'blocks/block_j') are split into their layers.
    """
    flat = traverse_util.flatten_dict(moe_aux)
    stats = {}
    for path, loads in flat.items():
        if path[-1] != "tokens_per_expert":
            continue
        load = jnp.sum(jnp.stack(loads), axis=0)  # [E] or [U, E]; summed over calls
        drop = jnp.mean(jnp.stack(flat[path[:-1] + ("drop_fraction",)]), axis=0)
        per_token = jnp.sum(jnp.stack(flat[path[:-1] + ("experts_per_token",)]), axis=0)
        ratio = jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
        if path[0] == "blocks":
            block = int(path[1].removeprefix("block_"))
            layers = [cfg.first_dense_layers + u * max(cfg.moe_every, 1) + block for u in range(load.shape[0])]
        else:
            layers, ratio, drop = [int(path[0].removeprefix("layers_"))], ratio[None], drop[None]
            per_token = per_token[None]
        load = load.reshape(-1, load.shape[-1])
        for i, layer in enumerate(layers):
            stats[f"layers_{layer}"] = {"max_over_mean_load": ratio[i], "maxvio": ratio[i] - 1.0,
                                        "drop_fraction": drop[i], "experts_per_token": per_token[i],
                                        "load": load[i]}
    return dict(sorted(stats.items(), key=lambda item: int(item[0].removeprefix("layers_"))))


def _stat_outputs(stats: dict[str, dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """The model outputs the metrics collection reads: '{layer}_{stat}' scalars and expert_load [L, E]."""
    outputs = {f"{layer}_{name}": values[name] for layer, values in stats.items() for name in LAYER_STATS}
    if stats:
        outputs["expert_load"] = jnp.stack([values["load"] for values in stats.values()])
    return outputs


def expert_load_metric(num_layers: int, num_experts: int) -> type[clu_metrics.Metric]:
    """A clu metric summing the routed slots per expert of every MoE layer ([L, E]) over steps; its value is each
    layer's load as fractions of its slots (rows sum to 1)."""

    @flax.struct.dataclass
    class ExpertLoad(clu_metrics.Metric):
        total: jax.Array

        @classmethod
        def empty(cls) -> ExpertLoad:
            return cls(total=jnp.zeros((num_layers, num_experts), jnp.float32))

        @classmethod
        def from_model_output(cls, *, expert_load: jax.Array, **_) -> ExpertLoad:
            return cls(total=expert_load.astype(jnp.float32))

        def merge(self, other: ExpertLoad) -> ExpertLoad:
            return type(self)(total=self.total + other.total)

        def compute(self) -> jax.Array:
            return self.total / jnp.maximum(self.total.sum(-1, keepdims=True), 1e-9)

    return ExpertLoad


def metrics_collection(layers: list[str], train: bool, num_experts: int | None = None) -> type[clu_metrics.Collection]:
    """clu metrics of the train step (loss, aux_loss, grad_norm, learning_rate) or of evaluation (loss), both
    with '{layer}_{stat}' for the LAYER_STATS of every MoE layer, averaged over steps/batches; the train step's
    also hold expert_load (per layer, the fraction of routed slots each of the num_experts experts got)."""
    names = ["loss"] + (["aux_loss", "grad_norm"] if train else [])
    names += [f"{layer}_{stat}" for layer in layers for stat in LAYER_STATS]
    fields = {name: clu_metrics.Average.from_output(name) for name in names}
    if train:
        fields["learning_rate"] = clu_metrics.LastValue.from_output("learning_rate")
        if layers:
            if num_experts is None:
                raise ValueError("metrics_collection(train=True) with MoE layers needs num_experts")
            fields["expert_load"] = expert_load_metric(len(layers), num_experts)
    return clu_metrics.Collection.create(**fields)


def consistency_kl(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
    """THOR's symmetric consistency loss 1/2 [KL(p_a || p_b) + KL(p_b || p_a)], averaged over positions (as the
    cross-entropy is). logits: [B, S, V]."""
    log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
    log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
    sym = jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=-1)  # KL(a||b) + KL(b||a)
    return 0.5 * jnp.mean(sym)


def train_step(state: TrainState, metrics: clu_metrics.Collection, batch: jax.Array, *, module: model.Transformer,
               tx: optax.GradientTransformation, schedule: optax.Schedule, train_key: jax.Array,
               bias_update_rate: float, total_steps: int | None = None,
               consistency_coef: float = 0.0) -> tuple[TrainState, clu_metrics.Collection, jax.Array]:
    """One update on batch [B, S + 1]: the new state, metrics merged with this step's, [loss, grad_norm].

    total_steps: the run's length, giving routers with a schedule their progress (step / total_steps).
    consistency_coef > 0 (THOR): the batch runs twice with independent 'routing' draws and the objective is
    CE_1 + CE_2 + consistency_coef * consistency_kl; the reported loss is then (CE_1 + CE_2) / 2.

    Metrics accumulate on device, inside the step: no eager op runs between steps (on XLA:CPU with many forced
    host devices, eager ops queued behind a step with collectives can starve it of threads).
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    step_key = jax.random.fold_in(train_key, state.step)
    progress = None if total_steps is None else state.step.astype(jnp.float32) / total_steps

    def forward(params, key):
        jitter_key, routing_key = jax.random.split(key)
        logits, aux = module.apply({"params": params, "moe_state": state.moe_state}, inputs, train=True,
                                   progress=progress, mutable=["moe_aux"],
                                   rngs={"jitter": jitter_key, "routing": routing_key})
        return logits, aux.get("moe_aux", {})

    def loss_fn(params):
        logits, moe_aux = forward(params, step_key)
        task, balance = model.cross_entropy(logits, targets), model.aux_loss(moe_aux)
        if not consistency_coef:
            return task + balance, (task, balance, moe_aux)
        logits_2, moe_aux_2 = forward(params, jax.random.fold_in(step_key, 1))
        task_2 = model.cross_entropy(logits_2, targets)
        balance = balance + model.aux_loss(moe_aux_2)
        objective = task + task_2 + consistency_coef * consistency_kl(logits, logits_2) + balance
        return objective, ((task + task_2) / 2, balance, moe_aux)

    grads, (loss, balance, moe_aux) = jax.grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    moe_state = state.moe_state
    if bias_update_rate > 0:
        moe_state = model.update_router_biases(moe_state, moe_aux, bias_update_rate)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state, moe_state=moe_state)
    step_metrics = type(metrics).single_from_model_output(
        loss=loss, aux_loss=balance, grad_norm=grad_norm, learning_rate=schedule(state.step),
        **_stat_outputs(moe_layer_stats(moe_aux, module.cfg)))
    return new_state, metrics.merge(step_metrics), jnp.stack([loss, grad_norm])


def eval_step(state: TrainState, metrics: clu_metrics.Collection, batch: jax.Array, *,
              module: model.Transformer) -> clu_metrics.Collection:
    """metrics merged with those of batch [B, S + 1], the MoE layers in eval mode (train=False)."""
    logits, aux = module.apply({"params": state.params, "moe_state": state.moe_state}, batch[:, :-1], train=False,
                               mutable=["moe_aux"])
    return metrics.merge(type(metrics).single_from_model_output(
        loss=model.cross_entropy(logits, batch[:, 1:]),
        **_stat_outputs(moe_layer_stats(aux.get("moe_aux", {}), module.cfg))))


@jax.jit
def _checksums(tree: Any) -> jax.Array:
    """uint32 [leaves]: per leaf, sum_i bits_i * w_i mod 2**32 with distinct odd weights w_i (any one bit flip
    changes it; integer sums do not depend on the reduction order, so the sharding does not matter)."""
    def checksum(x):
        uint = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32).reshape(-1)
        weights = (jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1) * jnp.uint32(0x9E3779B1)
        return jnp.sum(bits * weights, dtype=jnp.uint32)

    return jnp.stack([checksum(x) for x in jax.tree.leaves(tree)])


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ----------------------------------------------------------------------------------------------- checkpoints


def _manager(workdir: pathlib.Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=not read_only, read_only=read_only)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options, item_names=("state", "meta"))


def _all_process_states(local: dict) -> list[dict]:
    """The data-iterator states of all processes, in process order."""
    if jax.process_count() == 1:
        return [local]
    blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array(blob.size))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(b[:n])) for b, n in zip(blobs, sizes, strict=True)]


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_state: dict,
                    config: ml_collections.ConfigDict) -> None:
    """Saves synchronously; orbax writes into a temporary directory and renames it, so a kill leaves no partial step."""
    step = int(state.step)
    meta = {"step": step, "data": _all_process_states(data_state),
            "checksums": [int(c) for c in jax.device_get(_checksums(state))],
            "config": json.loads(config.to_json())}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)
    manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, target: Any) -> tuple[TrainState, dict] | None:
    """The newest checkpoint that restores and matches its checksums, as (state, meta); None when there is none.

    target: the abstract state (jax.ShapeDtypeStruct leaves with shardings). Newer checkpoints that fail are
    reported and deleted, so that the run can save those steps again.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
            state, meta = restored["state"], restored["meta"]
            if [int(c) for c in jax.device_get(_checksums(state))] != meta["checksums"]:
                raise ValueError("its arrays do not match the checksums saved with them")
        except Exception as e:  # orbax and tensorstore raise many kinds; each means unusable
            then = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint is left"
            _print(f"WARNING: checkpoint at step {step} in {manager.directory} is corrupt or unreadable "
                   f"({type(e).__name__}: {str(e)[:300]}); {then}")
            continue
        for bad in steps[:i]:
            manager.delete(bad)
            _print(f"deleted the corrupt checkpoint at step {bad}")
        return state, meta
    if steps:
        raise WorkdirError(f"no checkpoint in {manager.directory} can be restored (steps {steps}); "
                           f"delete {manager.directory.parent} to start over")
    return None


def load_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> tuple[dict, dict]:
    """(state, meta) of a run's checkpoint (the newest by default): state as nested dicts of numpy arrays with
    'step', 'params', 'opt_state' and 'moe_state', read on any devices (for analysis and tests)."""
    manager = _manager(pathlib.Path(workdir), keep=1, read_only=True)
    step = manager.latest_step() if step is None else step
    directory = manager.directory
    manager.close()
    if step is None:
        raise WorkdirError(f"no checkpoint in {directory}")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(directory / str(step) / "state").item_metadata
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(directory / str(step) / "state", args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(directory / str(step) / "meta")
    return state, meta


# ----------------------------------------------------------------------------------------------- logging


def _print(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricWriter:
    """Scalars to TensorBoard event files (tensorboardX, no TensorFlow) and metrics.jsonl; process 0 only."""

    def __init__(self, workdir: pathlib.Path, start_step: int):
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        self._jsonl = workdir / "metrics.jsonl"
        kept = []
        if self._jsonl.exists():  # drop records past the checkpoint we resume from (and a torn last line)
            for line in self._jsonl.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= start_step:
                    kept.append(line + "\n")
        self._jsonl.write_text("".join(kept))
        self._tensorboard = tensorboardX.SummaryWriter(logdir=str(workdir), flush_secs=30)

    def write(self, kind: str, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        with self._jsonl.open("a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **scalars}) + "\n")
        for name, value in scalars.items():
            if isinstance(value, dict):  # expert_load: one histogram-like scalar set per layer is too many; skip
                continue
            self._tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._enabled:
            self._tensorboard.close()


class Progress:
    """Host-side bookkeeping between syncs: non-finite checks, train time (steps only), steps/s and ETA."""

    def __init__(self, config: ml_collections.ConfigDict, start_step: int):
        self._config = config
        self.pending: list[tuple[int, jax.Array]] = []  # (step, [loss, grad_norm]) not yet checked
        self.last_good_checkpoint = start_step or None
        self.train_seconds, self.trained_steps = 0.0, 0
        self._interval_seconds, self._interval_steps = 0.0, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self._mark = time.perf_counter()

    def sync(self) -> None:
        """Waits for the pending steps; raises DivergenceError at the first non-finite loss or grad norm."""
        values = jax.device_get([health for _, health in self.pending])
        for (step, _), (loss, grad_norm) in zip(self.pending, values, strict=True):
            if not (np.isfinite(loss) and np.isfinite(grad_norm)):
                self.diverged(f"the loss is {loss} and the gradient norm {grad_norm} at step {step}")
        now = time.perf_counter()
        self.train_seconds += now - self._mark
        self._interval_seconds += now - self._mark
        self.trained_steps += len(self.pending)
        self._interval_steps += len(self.pending)
        self._mark, self.pending = now, []

    def diverged(self, what: str) -> None:
        t = self._config.train
        kept = (f"the last good checkpoint (step {self.last_good_checkpoint}) stays the newest"
                if self.last_good_checkpoint else "no checkpoint was saved")
        raise DivergenceError(
            f"training diverged: {what}; {kept}. Try a lower train.learning_rate (now {t.learning_rate}), a router "
            f"z-loss (model.moe.z_loss_coef, now {self._config.model.moe.z_loss_coef}; e.g. 1e-3) or a tighter "
            f"train.grad_clip (now {t.grad_clip}), in a new --workdir.")

    def rate(self) -> float:
        """Steps/s since the previous call; resets the interval."""
        rate = self._interval_steps / max(self._interval_seconds, 1e-9)
        self._interval_seconds, self._interval_steps = 0.0, 0
        return rate


# ----------------------------------------------------------------------------------------------- the loop


def computed(metrics: clu_metrics.Collection, layers: list[str]) -> dict[str, Any]:
    """The metrics' values, computed on the host: floats, and expert_load as {layer: [fraction per expert]}."""
    values = {}
    for name, value in jax.device_get(metrics).compute().items():
        if name == "expert_load":
            values[name] = {layer: [round(float(v), 6) for v in row] for layer, row in zip(layers, value, strict=True)}
        else:
            values[name] = float(value)
    return values


def evaluate(step_fn: Any, state: TrainState, empty: clu_metrics.Collection,
             batches: list[jax.Array]) -> dict[str, float]:
    """Mean metrics over the validation batches."""
    metrics = empty
    for batch in batches:
        metrics = step_fn(state, metrics, batch)
    return computed(metrics, [])


def summary(eval_metrics: dict[str, float], layers: list[str], progress: Progress, start_time: float,
            compile_seconds: float, counts: dict[str, int], fingerprint: dict, config: ml_collections.ConfigDict,
            workdir: pathlib.Path, config_name: str | None) -> dict[str, Any]:
    """The summary.json of a finished run."""
    loss = eval_metrics["loss"]
    tokens = progress.trained_steps * config.train.batch_size * config.train.seq_len
    return {
        "config": config_name or workdir.name,
        "workdir": str(workdir),
        "steps": config.train.steps,
        "val_loss": loss,  # nats per byte (byte-level tokens)
        "val_bits_per_byte": loss / math.log(2),
        "val_perplexity": math.exp(loss),
        "train_tokens_per_s": tokens / progress.train_seconds if progress.train_seconds else None,
        "train_tokens_per_s_note": "steps run by this invocation only; excludes compilation, evaluation and "
                                   "checkpointing",
        "trained_steps_this_invocation": progress.trained_steps,
        "compile_seconds": compile_seconds,
        "wall_seconds": time.time() - start_time,
        "mesh": mesh_shape(config),
        "params_total": counts["total"],
        "params_activated": counts["activated"],
        "moe_layers": {layer: {stat: eval_metrics[f"{layer}_{stat}"]
                               for stat in LAYER_STATS} for layer in layers},
        "moe_layers_note": "final evaluation, averaged over batches; max_over_mean_load = max_e load / mean_e load, "
                           "maxvio = that - 1, experts_per_token = routed experts per token",
        "maxvio_over_training": maxvio_over_training(workdir, layers),
        "maxvio_over_training_note": "per layer, the train MaxVio of each log interval (metrics.jsonl): first, "
                                     "last, mean and max over the run",
        "corpus": fingerprint,
    }


def maxvio_over_training(workdir: pathlib.Path, layers: list[str]) -> dict[str, dict[str, float]] | None:
    """{layer: {first, last, mean, max}} of the train MaxVio logged at every log step in workdir/metrics.jsonl
    (Loss-Free Balancing's Figure/Table MaxVio, over the whole run); None where this process has no metrics file."""
    path = workdir / "metrics.jsonl"
    if not layers or not path.exists():
        return None
    records = [r for r in analysis.read_metrics(workdir) if r.get("kind") == "train"]
    result = {}
    for layer in layers:
        values = [r[f"{layer}_maxvio"] for r in records if f"{layer}_maxvio" in r]
        if values:
            result[layer] = {"first": values[0], "last": values[-1], "mean": float(np.mean(values)),
                             "max": float(np.max(values))}
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       config_name: str | None = None) -> dict[str, Any]:
    """Trains config (resuming from workdir's newest checkpoint), evaluates, writes summary.json and returns it.

    Returns {'preempted': True, 'step': s} instead when SIGTERM stopped the run (after saving step s).
    """
    start_time = time.time()
    validate(config)
    workdir = pathlib.Path(workdir)
    check_workdir_config(config, workdir)
    process_index, process_count = jax.process_index(), jax.process_count()
    fingerprint = data.corpus_fingerprint(config)
    train_iter = data.train_iterator(config, process_index=process_index, process_count=process_count)
    if process_index == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True))

    mesh = make_mesh(config)
    batch_sh = batch_sharding(mesh)
    rows = config.train.batch_size

    def global_batch(local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(batch_sh, local, (rows, config.train.seq_len + 1))

    eval_data = [global_batch(b) for b in data.eval_batches(config, process_index=process_index,
                                                            process_count=process_count)]

    module = model.Transformer(config.model, mesh=mesh)
    tx = make_optimizer(config.train, frozen_router=config.model.moe.router.frozen)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))

    def init(key):
        variables = module.init(key, jnp.zeros((1, config.train.seq_len), jnp.int32))
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          moe_state=variables.get("moe_state", {})), variables.get("moe_aux", {})

    abstract_state, abstract_aux = jax.eval_shape(init, init_key)
    layers = list(jax.eval_shape(lambda aux: moe_layer_stats(aux, config.model), abstract_aux))
    shardings = state_shardings(abstract_state, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)
    manager = _manager(workdir, config.checkpoint.keep)
    restored = restore_checkpoint(manager, target)
    upcycled_from = None
    if restored is None and config.upcycle.enabled:
        upcycled_from = _upcycled_dense(config, workdir, config_name)
        if "preempted" in upcycled_from:
            return upcycled_from
        fresh = jax.device_get(jax.jit(lambda key: init(key)[0])(init_key))
        params = upcycle.upcycle_params(upcycled_from["params"], fresh.params, config)
        state = jax.jit(lambda p, ms: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                 moe_state=ms), out_shardings=shardings)(params, fresh.moe_state)
        _print(f"initialised a new run in {workdir}, upcycled from the dense checkpoint at step "
               f"{upcycled_from['step']} in {upcycled_from['workdir']} (granularity {config.upcycle.granularity}, "
               f"{config.model.moe.num_experts} experts, router {config.upcycle.router_init})")
    elif restored is None:
        state = jax.jit(lambda key: init(key)[0], out_shardings=shardings)(init_key)
        _print(f"initialised a new run in {workdir}")
    else:
        state, meta = restored
        train_iter.set_state(meta["data"][process_index])
        _print(f"resuming from the checkpoint at step {int(state.step)} in {workdir}")
    start_step = int(state.step)
    counts = model.param_counts(abstract_state.params, config.model)
    for note in parallel.uneven_notes(config):
        _print(f"note: {note}")
    _print(f"parameters: {counts['total']:,} total, {counts['activated']:,} activated per token; "
           f"{len(layers)} MoE layers; mesh {dict(mesh.shape)}")

    replicated = NamedSharding(mesh, P())
    num_experts = config.model.moe.num_experts
    empty_train_metrics = jax.device_put(metrics_collection(layers, True, num_experts).empty(), replicated)
    empty_eval_metrics = jax.device_put(metrics_collection(layers, train=False).empty(), replicated)
    train_fn = jax.jit(
        lambda s, m, b: train_step(s, m, b, module=module, tx=tx, schedule=learning_rate_schedule(config.train),
                                   train_key=train_key, bias_update_rate=config.model.moe.bias_update_rate,
                                   total_steps=config.train.steps, consistency_coef=config.train.consistency_coef),
        in_shardings=(shardings, replicated, batch_sh), out_shardings=(shardings, replicated, replicated),
        donate_argnums=0)
    eval_fn = jax.jit(lambda s, m, b: eval_step(s, m, b, module=module),
                      in_shardings=(shardings, replicated, batch_sh), out_shardings=replicated)

    writer = MetricWriter(workdir, start_step)
    progress = Progress(config, start_step)
    stop = threading.Event()
    handler_installed = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if handler_installed else None
    total, compile_seconds = config.train.steps, 0.0
    try:
        if upcycled_from is not None:  # the upcycled model before any MoE step, beside the dense model's last loss
            scalars = evaluate(eval_fn, state, empty_eval_metrics, eval_data)
            writer.write("eval", 0, scalars)
            dense_loss = upcycled_from["val_loss"]
            _print(f"eval at step 0 (upcycled, before training): loss {scalars['loss']:.4f}; the dense model ended at "
                   f"{'-' if dense_loss is None else f'{dense_loss:.4f}'}")
            progress.restart_clock()
        if start_step < total:
            batch = global_batch(next(train_iter))
            _print("compiling train step...")
            compile_start = time.perf_counter()
            train_fn = train_fn.lower(state, empty_train_metrics, batch).compile()
            compile_seconds = time.perf_counter() - compile_start
            _print(f"compiled train step in {compile_seconds:.1f}s")
            progress.restart_clock()
        train_metrics = empty_train_metrics
        for step in range(start_step, total):
            if step > start_step:
                batch = global_batch(next(train_iter))
            state, train_metrics, health = train_fn(state, train_metrics, batch)
            done = step + 1
            progress.pending.append((done, health))
            log_now = done % config.train.log_every == 0 or done == total
            stopping = _stop_requested(stop, log_now)

            if log_now:
                progress.sync()
                scalars = computed(train_metrics, layers)
                train_metrics = empty_train_metrics
                writer.write("train", done, scalars)
                rate = progress.rate()
                tokens = rate * config.train.batch_size * config.train.seq_len
                _print(f"step {done}/{total} | loss {scalars['loss']:.4f} | {rate:.2f} steps/s | "
                       f"{tokens:,.0f} tokens/s | ETA {_duration((total - done) / max(rate, 1e-9))}")
            if config.train.eval_every and done % config.train.eval_every == 0 and done < total:
                progress.sync()
                scalars = evaluate(eval_fn, state, empty_eval_metrics, eval_data)
                writer.write("eval", done, scalars)
                _print(f"eval at step {done}: loss {scalars['loss']:.4f} | "
                       f"{scalars['loss'] / math.log(2):.4f} bits/byte")
                progress.restart_clock()
            every = config.checkpoint.every_steps
            if (every and done % every == 0) or done == total or stopping:
                progress.sync()
                if not bool(_all_finite(state.params)):
                    progress.diverged(f"the parameters are not finite at step {done}")
                save_checkpoint(manager, state, train_iter.get_state(), config)
                progress.last_good_checkpoint = done
                progress.restart_clock()
            if stopping:
                _print(f"SIGTERM received: saved a checkpoint at step {done} in {workdir}; "
                       f"run the same command to resume")
                return {"preempted": True, "step": done}

        scalars = evaluate(eval_fn, state, empty_eval_metrics, eval_data)
        writer.write("eval", total, scalars)
        result = summary(scalars, layers, progress, start_time, compile_seconds, counts, fingerprint, config,
                         workdir, config_name)
        if process_index == 0:
            (workdir / "summary.json").write_text(json.dumps(result, indent=2))
        _print_summary(result)
        return result
    finally:
        writer.close()
        manager.close()
        if handler_installed:
            signal.signal(signal.SIGTERM, previous_handler)


def _upcycled_dense(config: ml_collections.ConfigDict, workdir: pathlib.Path, config_name: str | None) -> dict:
    """The dense checkpoint an upcycling run starts from: {'params', 'step', 'workdir', 'val_loss'}, training it
    first in <workdir>/dense when upcycle.dense_checkpoint is ''; {'preempted': True, ...} when SIGTERM stopped
    that dense stage."""
    given = config.upcycle.dense_checkpoint
    dense_dir = pathlib.Path(given) if given else workdir / "dense"
    if not given and not (dense_dir / "summary.json").exists():
        _print(f"upcycling: training the dense model ({config.upcycle.dense_steps} steps) in {dense_dir} first")
        result = train_and_evaluate(upcycle.dense_config(config), dense_dir,
                                    config_name=f"{config_name or workdir.name} (dense stage)")
        if result.get("preempted"):
            return result
    state, meta = load_checkpoint(dense_dir)
    summary_path = dense_dir / "summary.json"
    val_loss = json.loads(summary_path.read_text())["val_loss"] if summary_path.exists() else None
    return {"params": state["params"], "step": meta["step"], "workdir": str(dense_dir), "val_loss": val_loss}


def _stop_requested(stop: threading.Event, log_now: bool) -> bool:
    """Whether to stop after this step; with several processes they agree at log steps only."""
    if jax.process_count() == 1:
        return stop.is_set()
    return log_now and bool(np.any(multihost_utils.process_allgather(np.array(stop.is_set()))))


def _print_summary(result: dict[str, Any]) -> None:
    tokens_per_s = result["train_tokens_per_s"]
    _print(f"done: validation loss {result['val_loss']:.4f} nats/byte | {result['val_bits_per_byte']:.4f} bits/byte"
           f" | perplexity {result['val_perplexity']:.3f} | "
           f"{f'{tokens_per_s:,.0f}' if tokens_per_s else '-'} train tokens/s | "
           f"{result['params_total']:,} params ({result['params_activated']:,} activated)")
    over_training = result.get("maxvio_over_training") or {}
    for layer, stats in result["moe_layers"].items():
        history = over_training.get(layer)
        trend = (f" | train MaxVio {history['first']:.3f} -> {history['last']:.3f} (mean {history['mean']:.3f})"
                 if history else "")
        _print(f"  {layer}: max/mean expert load {stats['max_over_mean_load']:.3f} | "
               f"dropped {stats['drop_fraction']:.4f} | experts/token {stats['experts_per_token']:.2f}{trend}")
    _print(f"summary: {pathlib.Path(result['workdir']) / 'summary.json'}")
