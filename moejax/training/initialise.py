"""Where a run's first state comes from. The newest good checkpoint in the workdir always wins (resume); a run
without one starts from the source its config names (``INIT_SOURCES``):

* ``fresh``: the model's own initialisation;
* ``upcycle`` (``upcycle.enabled``): the MoE model built from a trained dense checkpoint (moejax/upcycle.py). Its
  dense stage is a run of its own, trained before this one by ``moejax.training.loop.run``;
* ``hf`` (``init_from='hf:<dir>'``): the weights of a transformers checkpoint (moejax.hf.load), placed with the
  run's shardings. ``resolve(config)`` first makes the run's config that checkpoint's model: ``config.model`` from
  its config.json except ``RUN_FIELDS`` (how the model is computed and trained, kept from the run's config), and
  ``data.tokenizer`` 'bytes' (the default) becomes 'hf:<dir>', the checkpoint's own tokenizer. A run whose
  ``model.lora`` names targets keeps its ``model.lora`` (LoRA fine-tuning of the release): the release's weights get
  freshly initialised adapters (``with_adapters``); so does a ``run`` source without adapters.
* ``upcycle_hf`` (``init_from='upcycle:hf:<dir>'``): the MoE model upcycled from a released dense checkpoint
  (moejax/upcycle_hf.py: the release's model in the run's MoE layout, moejax/upcycle.py's recipes);
* ``run`` (``init_from='run:<dir>[@<step>]'``): the params and moe_state of a moejax run directory's newest
  checkpoint (or that of step): a run of ``python -m moejax.main``, or a model ``python -m moejax.posthoc prune|merge
  --out`` wrote. A fresh optimizer state, step 0. ``resolve`` makes the run's model that directory's config.json
  model (``RUN_FIELDS`` kept), and ``data.tokenizer`` 'bytes' becomes the source's tokenizer (its tokenizer.json as
  'hf:<dir>', or bytes); a tokenizer set in the config must be that same tokenizer (``check_tokenizers``).

The teacher of a distillation run (``distill.teacher``, moejax/training/objectives.py) is named the same way
(``'run:<dir>[@<step>]'`` or ``'hf:<dir>'``): ``load_teacher`` builds its model (its source's model section with
the run's ``RUN_FIELDS``) and reads its variables into the run's parameter shardings; they are an argument of the
train step, never trained (no optimizer state) and never saved in the run's checkpoints.

A source is ``fn(ctx: InitContext) -> Start``; adding one is a function and a line in ``source_name``. Reading the
source a config names and the config it resolves to (``resolve``, ``init_source``, ``RUN_FIELDS``, ...) is
moejax/training/sources.py; its names are importable from here as before.
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
import numpy as np

from moejax import hf, model, parallel, upcycle, upcycle_hf
from moejax.adapters import lora
from moejax.moe import expert_map
from moejax.training import checkpoint
from moejax.training.checkpoint import WorkdirError
from moejax.training.sources import (  # noqa: F401  (initialise.resolve, initialise.RUN_FIELDS, ... as before)
    INIT_FROM_ALLOWED,
    RUN_FIELDS,
    SOURCES_ALLOWED,
    TEACHER_ALLOWED,
    Source,
    check_tokenizers,
    hf_dir,
    init_source,
    parse_source,
    resolve,
    source_config,
    source_model,
    source_tokenizer,
    teacher_model,
    teacher_source,
)
from moejax.training.step import TrainState


@dataclasses.dataclass(frozen=True)
class InitContext:
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    fresh: Callable[[], TrainState]  # a new initialisation, placed with the state's shardings
    place: Callable[[Any, Any], TrainState]  # (params, moe_state) -> a new state with them, placed
    mesh: Any = None  # the run's mesh (imported weights are read straight into their shardings on it)
    abstract: Any = None  # the abstract TrainState (shapes and dtypes) of fresh(); None: traced from fresh


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


def fresh_adapters(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The LoRA adapters of config's model at their initialisation (seed config.seed), without the base weights
    (their initialisers are never run: only the adapters leave the jitted init)."""
    module = model.Transformer(config.model)
    init = jax.jit(lambda key: lora.split(module.init(key, jnp.zeros((1, 1), jnp.int32))["params"])[1])
    return init(jax.random.key(config.seed))


def with_adapters(config: ml_collections.ConfigDict, params: Any) -> Any:
    """params of a base model (a release, a run without adapters) with config's fresh LoRA adapters added; params
    as they are when config has no adapters or params has them already."""
    if lora.spec(config.model) is None or lora.split(params)[1]:
        return params
    return lora.join(params, fresh_adapters(config))


def from_hf(ctx: InitContext) -> Start:
    directory = hf_dir(ctx.config)
    _, variables = hf.load(directory, mesh=ctx.mesh, dtype=ctx.config.model.param_dtype)
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    return Start(ctx.place(with_adapters(ctx.config, variables["params"]), variables["moe_state"]),
                 f"initialised a new run in {ctx.workdir} from the {model_type} checkpoint in {directory} "
                 f"(data.tokenizer={ctx.config.data.tokenizer!r})", evaluate_first=True)


def from_run(ctx: InitContext) -> Start:
    source = init_source(ctx.config)
    state, meta = checkpoint.load_checkpoint(source.path, source.step)
    target = ctx.abstract if ctx.abstract is not None else jax.eval_shape(ctx.fresh)
    what = f"the checkpoint at step {meta['step']} in {source.path}"
    saved, target_params = state["params"], target.params
    adding = lora.spec(ctx.config.model) is not None and not lora.split(saved)[1]
    if adding:  # a base model under the run's new adapters
        target_params = lora.split(target_params)[0]
    params = fitted(saved, target_params, what, "params")
    if adding:
        params = with_adapters(ctx.config, params)
    moe_state = fitted(state.get("moe_state") or {}, target.moe_state, what, "moe_state")
    return Start(ctx.place(params, moe_state),
                 f"initialised a new run in {ctx.workdir} from {what} ({experts(ctx.config.model)}, "
                 f"top-{ctx.config.model.moe.top_k}; data.tokenizer={ctx.config.data.tokenizer!r})",
                 evaluate_first=True)


def experts(model_cfg: ml_collections.ConfigDict) -> str:
    """'8 routed experts per MoE layer', with the stored experts of each MoE layer under an expert map."""
    described = f"{model_cfg.moe.num_experts} routed experts per MoE layer"
    if not expert_map.has_map(model_cfg.moe):
        return described
    return f"{described}, stored {[expert_map.stored_count(model_cfg.moe, i) for i in model.moe_layers(model_cfg)]}"


def upcycled_hf(ctx: InitContext) -> Start:
    """init_from='upcycle:hf:<dir>': the run's MoE upcycled from a released dense checkpoint (moejax/upcycle_hf.py)."""
    state, message = upcycle_hf.start(ctx, init_source(ctx.config).path)
    return Start(state, message, evaluate_first=True)


INIT_SOURCES: dict[str, Callable[[InitContext], Start]] = {"fresh": fresh, "upcycle": upcycled, "hf": from_hf,
                                                           "run": from_run, "upcycle_hf": upcycled_hf}


def source_name(config: ml_collections.ConfigDict) -> str:
    if config.init_from:
        source = init_source(config)
        return "upcycle_hf" if source.upcycle else source.kind
    return "upcycle" if config.upcycle.enabled else "fresh"


# ----------------------------------------------------------------------------------------------- distillation teacher


@dataclasses.dataclass(frozen=True)
class Teacher:
    module: model.Transformer
    variables: dict[str, Any]  # {'params', 'moe_state'}, placed with `shardings`
    shardings: dict[str, Any]
    message: str


def load_teacher(config: ml_collections.ConfigDict, mesh: Any) -> Teacher | None:
    """The distillation teacher of config (None without one): its module and its variables placed on mesh with the
    run's parameter shardings. Raises WorkdirError (checkpoint.py) for a run directory whose checkpoint cannot be
    read or does not fit its config, hf.CheckpointError for a transformers checkpoint that cannot be read."""
    source = teacher_source(config)
    if source is None:
        return None
    model_cfg = teacher_model(config)
    module = model.Transformer(model_cfg, mesh=mesh)
    abstract = hf.abstract_variables(model_cfg)
    shardings = {"params": parallel.param_shardings(abstract["params"], mesh),
                 "moe_state": jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                           abstract["moe_state"])}
    if source.kind == "hf":
        _, variables = hf.load(source.path, mesh=mesh, dtype=config.model.param_dtype)
        what = f"the {json.loads((source.path / 'config.json').read_text())['model_type']} checkpoint in {source.path}"
        variables = {"params": variables["params"], "moe_state": variables.get("moe_state") or {}}
        variables = {"params": fitted(variables["params"], abstract["params"], what, "params"),
                     "moe_state": fitted(variables["moe_state"], abstract["moe_state"], what, "moe_state")}
    else:
        state, meta = checkpoint.load_checkpoint(source.path, source.step)
        what = f"the checkpoint at step {meta['step']} in {source.path}"
        variables = {"params": fitted(state["params"], abstract["params"], what, "params"),
                     "moe_state": fitted(state.get("moe_state") or {}, abstract["moe_state"], what, "moe_state")}
    variables = jax.device_put(variables, shardings)
    d = config.distill
    return Teacher(module, variables, shardings,
                   f"distilling from {what} ({experts(model_cfg)}): "
                   f"{d.ce_weight:g} * CE + {d.weight:g} * KL(teacher || student) at temperature {d.temperature:g} "
                   f"({d.reduction} reduction)")


# ----------------------------------------------------------------------------------------------- arrays


def _path_name(path: tuple) -> str:
    return "/".join(str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k)) for k in path)


def fitted(saved: Any, target: Any, what: str, collection: str) -> Any:
    """saved (arrays of a checkpoint) as target's tree (abstract leaves) with target's dtypes; WorkdirError naming
    what, the collection and a few arrays that are missing, not expected or of another shape."""
    have = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    want = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    shapes = sorted(k for k in want.keys() & have.keys() if tuple(np.shape(have[k])) != tuple(want[k].shape))
    problems = ([f"{len(missing)} arrays missing from it, e.g. {', '.join(missing[:3])}"] if missing else []) + (
        [f"{len(extra)} arrays it has that the model does not, e.g. {', '.join(extra[:3])}"] if extra else []) + (
        [f"{len(shapes)} arrays of another shape, e.g. " + ", ".join(
            f"{k} {tuple(np.shape(have[k]))} (model {tuple(want[k].shape)})" for k in shapes[:3])] if shapes else [])
    if problems:
        raise WorkdirError(f"the {collection} of {what} do not fit the model of its config: {'; '.join(problems)}")
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: jnp.asarray(have[_path_name(p)], leaf.dtype) if isinstance(have[_path_name(p)], jax.Array)
        else np.asarray(have[_path_name(p)]).astype(leaf.dtype), target)


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
