"""Where a run's first state comes from. The newest good checkpoint in the workdir always wins (resume); a run
without one starts from the source its config names (``INIT_SOURCES``):

* ``fresh``: the model's own initialisation;
* ``upcycle`` (``upcycle.enabled``): the MoE model built from a trained dense checkpoint (moejax/upcycle.py). Its
  dense stage is a run of its own, trained before this one by ``moejax.training.loop.run``.

A source is ``fn(ctx: InitContext) -> Start``; adding one is a function and a line in ``source_name``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from moejax import upcycle
from moejax.training import checkpoint
from moejax.training.checkpoint import WorkdirError
from moejax.training.step import TrainState


@dataclasses.dataclass(frozen=True)
class InitContext:
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    fresh: Callable[[], TrainState]  # a new initialisation, placed with the state's shardings
    place: Callable[[Any, Any], TrainState]  # (params, moe_state) -> a new state with them, placed


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


INIT_SOURCES: dict[str, Callable[[InitContext], Start]] = {"fresh": fresh, "upcycle": upcycled}


def source_name(config: ml_collections.ConfigDict) -> str:
    return "upcycle" if config.upcycle.enabled else "fresh"


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
