"""Where a run's first state comes from. The newest good checkpoint in the workdir always wins (resume); a run
without one starts from the source its config names (``INIT_SOURCES``):

* ``fresh``: the model's own initialisation;
* ``upcycle`` (``upcycle.enabled``): the MoE model built from a trained dense checkpoint (moejax/upcycle.py). Its
  dense stage is a run of its own, trained before this one by ``moejax.training.loop.run``;
* ``hf`` (``init_from='hf:<dir>'``): the weights of a transformers checkpoint (moejax.hf.load), placed with the
  run's shardings. ``resolve(config)`` first makes the run's config that checkpoint's model: ``config.model`` from
  its config.json except ``RUN_FIELDS`` (how the model is computed and trained, kept from the run's config), and
  ``data.tokenizer`` 'bytes' (the default) becomes 'hf:<dir>', the checkpoint's own tokenizer.

A source is ``fn(ctx: InitContext) -> Start``; adding one is a function and a line in ``source_name``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from moejax import checks, hf, upcycle
from moejax.configs import base
from moejax.training import checkpoint
from moejax.training.checkpoint import WorkdirError
from moejax.training.step import TrainState


@dataclasses.dataclass(frozen=True)
class InitContext:
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    fresh: Callable[[], TrainState]  # a new initialisation, placed with the state's shardings
    place: Callable[[Any, Any], TrainState]  # (params, moe_state) -> a new state with them, placed
    mesh: Any = None  # the run's mesh (imported weights are read straight into their shardings on it)


@dataclasses.dataclass(frozen=True)
class Start:
    state: TrainState
    message: str
    data_state: dict | None = None  # the data-iterator state to continue from (resume only)
    evaluate_first: bool = False  # evaluate before the first step (upcycling: how much of the dense model survived)


def fresh(ctx: InitContext) -> Start:
    return Start(ctx.fresh(), f"initialised a new run in {ctx.workdir}")


def upcycled(ctx: InitContext) -> Start:
    config = ctx.config
    dense_dir = upcycle.dense_workdir(config, ctx.workdir)
    if not (dense_dir / "checkpoints").exists():
        raise WorkdirError(f"upcycling needs a trained dense checkpoint in {dense_dir}: train it first "
                           f"(python -m moejax.main trains the dense stage before the MoE run when "
                           f"upcycle.dense_checkpoint is '')")
    dense_state, meta = checkpoint.load_checkpoint(dense_dir)
    new = jax.device_get(ctx.fresh())
    params = upcycle.upcycle_params(dense_state["params"], new.params, config)
    summary_path = dense_dir / "summary.json"
    dense_loss = json.loads(summary_path.read_text())["val_loss"] if summary_path.exists() else None
    return Start(ctx.place(params, new.moe_state),
                 f"initialised a new run in {ctx.workdir}, upcycled from the dense checkpoint at step {meta['step']} "
                 f"in {dense_dir} (granularity {config.upcycle.granularity}, {config.model.moe.num_experts} experts, "
                 f"router {config.upcycle.router_init}); the dense model ended at validation loss "
                 f"{'-' if dense_loss is None else f'{dense_loss:.4f}'}",
                 evaluate_first=True)


def from_hf(ctx: InitContext) -> Start:
    directory = hf_dir(ctx.config)
    _, variables = hf.load(directory, mesh=ctx.mesh, dtype=ctx.config.model.param_dtype)
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    return Start(ctx.place(variables["params"], variables["moe_state"]),
                 f"initialised a new run in {ctx.workdir} from the {model_type} checkpoint in {directory} "
                 f"(data.tokenizer={ctx.config.data.tokenizer!r})", evaluate_first=True)


INIT_SOURCES: dict[str, Callable[[InitContext], Start]] = {"fresh": fresh, "upcycle": upcycled, "hf": from_hf}


def source_name(config: ml_collections.ConfigDict) -> str:
    return "hf" if config.init_from else "upcycle" if config.upcycle.enabled else "fresh"


# ----------------------------------------------------------------------------------------------- init_from

INIT_FROM_ALLOWED = ("'' (the model's own initialisation) or 'hf:<dir>', a transformers checkpoint directory "
                     "(config.json with a model_type, and *.safetensors)")
# model fields that keep the run config's values under init_from (configs/base.py FIELD_ROLES 'compute'), relative
# to config.model.
RUN_FIELDS = tuple(path.removeprefix("model.") for path in base.fields_with("compute"))


def hf_dir(config: ml_collections.ConfigDict) -> pathlib.Path | None:
    """The checkpoint directory of init_from='hf:<dir>', None for ''; ConfigError naming the field, the value and
    what is allowed."""
    value = config.init_from
    if value == "":
        return None
    if not (isinstance(value, str) and value.startswith("hf:") and value[3:]):
        checks.fail("init_from", value, f"allowed: {INIT_FROM_ALLOWED}")
    directory = pathlib.Path(value[3:]).expanduser()
    if not hf.is_hf_dir(directory):
        checks.fail("init_from", value, f"{directory} is not a transformers checkpoint directory; allowed: "
                                        f"{INIT_FROM_ALLOWED}")
    if config.upcycle.enabled:
        checks.fail("init_from", value, "cannot be combined with upcycle.enabled=True (both name the first weights)")
    return directory


# Configs resolve() returned, by id: resolving one of them again returns it as it is, so a command that passes its
# config through several entry points (report_finished, run, train_and_evaluate) reads <dir>/config.json once and
# prints its warnings once.
_RESOLVED: weakref.WeakValueDictionary[int, ml_collections.ConfigDict] = weakref.WeakValueDictionary()


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config a run trains: config itself without init_from; with init_from='hf:<dir>', a copy whose model is
    the checkpoint's (RUN_FIELDS kept from config) and whose data.tokenizer 'bytes' became 'hf:<dir>'. A config
    this function returned is returned unchanged."""
    directory = hf_dir(config)
    if directory is None or _RESOLVED.get(id(config)) is config:
        return config
    try:
        released = hf.read_config(directory).model
    except (hf.HFConfigError, hf.CheckpointError) as e:
        checks.fail("init_from", config.init_from, f"its config.json does not convert to a moejax model: {e}")
    for field in RUN_FIELDS:
        *parents, name = field.split(".")
        source, target = config.model, released
        for part in parents:
            source, target = source[part], target[part]
        target[name] = source[name]
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.model = released
        if resolved.data.tokenizer == "bytes":
            if not (directory / "tokenizer.json").is_file():
                checks.fail("init_from", config.init_from, f"{directory} has no tokenizer.json; set data.tokenizer "
                                                           f"to the model's tokenizer ('hf:<dir or tokenizer.json>')")
            resolved.data.tokenizer = f"hf:{config.init_from[3:]}"
    _RESOLVED[id(resolved)] = resolved
    return resolved


def initial_state(ctx: InitContext, manager: Any, target: Any) -> Start:
    """The newest good checkpoint of the workdir (target: the abstract state with shardings), else the config's
    source."""
    restored = checkpoint.restore_checkpoint(manager, target)
    if restored is not None:
        state, meta = restored
        return Start(state, f"resuming from the checkpoint at step {int(state.step)} in {ctx.workdir}",
                     data_state=meta["data"][jax.process_index()])
    return INIT_SOURCES[source_name(ctx.config)](ctx)


def new_state(params: Any, moe_state: Any, tx: Any) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), moe_state=moe_state)
