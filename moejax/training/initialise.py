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
* ``run`` (``init_from='run:<dir>[@<step>]'``): the params and moe_state of a moejax run directory's newest
  checkpoint (or that of step): a run of ``python -m moejax.main``, or a model ``python -m moejax.posthoc prune|merge
  --out`` wrote. A fresh optimizer state, step 0. ``resolve`` makes the run's model that directory's config.json
  model (``RUN_FIELDS`` kept), and ``data.tokenizer`` 'bytes' becomes the source's tokenizer (its tokenizer.json as
  'hf:<dir>', or bytes); a tokenizer set in the config must be that same tokenizer (``check_tokenizers``).

The teacher of a distillation run (``distill.teacher``, moejax/training/objectives.py) is named the same way
(``'run:<dir>[@<step>]'`` or ``'hf:<dir>'``): ``load_teacher`` builds its model (its source's model section with
the run's ``RUN_FIELDS``) and reads its variables into the run's parameter shardings; they are an argument of the
train step, never trained (no optimizer state) and never saved in the run's checkpoints.

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
import numpy as np

from moejax import checks, hf, loading, model, parallel, upcycle
from moejax.adapters import lora
from moejax.configs import base
from moejax.data import tokenizers
from moejax.moe import expert_map
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


INIT_SOURCES: dict[str, Callable[[InitContext], Start]] = {"fresh": fresh, "upcycle": upcycled, "hf": from_hf,
                                                           "run": from_run}


def source_name(config: ml_collections.ConfigDict) -> str:
    if config.init_from:
        return init_source(config).kind
    return "upcycle" if config.upcycle.enabled else "fresh"


# ----------------------------------------------------------------------------------------------- sources

SOURCES_ALLOWED = ("'hf:<dir>', a transformers checkpoint directory (config.json with a model_type, and "
                   "*.safetensors), or 'run:<dir>[@<step>]', a moejax run directory (config.json and checkpoints/: a "
                   "run of python -m moejax.main or a model python -m moejax.posthoc --out wrote; its newest "
                   "checkpoint, or that of <step>)")
INIT_FROM_ALLOWED = "'' (the model's own initialisation) or " + SOURCES_ALLOWED
TEACHER_ALLOWED = "'' (no distillation) or " + SOURCES_ALLOWED
# model fields that keep the run config's values under init_from (configs/base.py FIELD_ROLES 'compute'), relative
# to config.model. A distillation teacher is computed with them too.
RUN_FIELDS = tuple(path.removeprefix("model.") for path in base.fields_with("compute"))


@dataclasses.dataclass(frozen=True)
class Source:
    """A model a config field names: 'hf:<dir>' (kind 'hf') or 'run:<dir>[@<step>]' (kind 'run'; step None: the
    newest checkpoint)."""

    field: str
    value: str
    kind: str
    path: pathlib.Path
    step: int | None = None

    def fail(self, why: str) -> None:
        checks.fail(self.field, self.value, why)


def parse_source(field: str, value: Any, allowed: str) -> Source | None:
    """The model config field ``field`` names ('' -> None); ConfigError naming the field, the value and what is
    allowed when it is not a readable transformers checkpoint directory or moejax run directory (with that step)."""
    if value == "":
        return None
    if isinstance(value, str) and value.startswith("hf:") and value[3:]:
        directory = pathlib.Path(value[3:]).expanduser()
        if not hf.is_hf_dir(directory):
            checks.fail(field, value, f"{directory} is not a transformers checkpoint directory; allowed: {allowed}")
        return Source(field, value, "hf", directory)
    if isinstance(value, str) and value.startswith("run:") and value[4:]:
        path, step = _run_path(field, value)
        if not (path / "config.json").is_file():
            checks.fail(field, value, f"{path} is not a moejax run directory: it has no config.json; allowed: "
                                      f"{allowed}")
        steps = checkpoint.checkpoint_steps(path)
        if not steps:
            checks.fail(field, value, f"{path} has no checkpoint (nothing in {path / 'checkpoints'}); allowed: "
                                      f"{allowed}")
        if step is not None and step not in steps:
            checks.fail(field, value, f"{path} has no checkpoint at step {step}: it has steps {steps}")
        return Source(field, value, "run", path, step)
    hint = ""
    if isinstance(value, str) and value:
        path = pathlib.Path(value).expanduser()
        if checkpoint.checkpoint_steps(path) and (path / "config.json").is_file():
            hint = f"; {path} is a moejax run directory: did you mean 'run:{value}'?"
        elif hf.is_hf_dir(path):
            hint = f"; {path} is a transformers checkpoint directory: did you mean 'hf:{value}'?"
    checks.fail(field, value, f"allowed: {allowed}{hint}")


def _run_path(field: str, value: str) -> tuple[pathlib.Path, int | None]:
    """(directory, step or None) of 'run:<dir>[@<step>]'."""
    rest = value[4:]
    head, at, tail = rest.rpartition("@")
    if at and head and tail.isdigit():
        return pathlib.Path(head).expanduser(), int(tail)
    if at and not pathlib.Path(rest).expanduser().exists():
        checks.fail(field, value, f"'@{tail}' is not a checkpoint step: write 'run:<dir>@<step>' with an integer "
                                  f"step, or 'run:<dir>' for the newest checkpoint")
    return pathlib.Path(rest).expanduser(), None


def init_source(config: ml_collections.ConfigDict) -> Source | None:
    """The source init_from names, None for ''; ConfigError naming the field, the value and what is allowed."""
    source = parse_source("init_from", config.init_from, INIT_FROM_ALLOWED)
    if source is not None and config.upcycle.enabled:
        source.fail("cannot be combined with upcycle.enabled=True (both name the first weights)")
    return source


def hf_dir(config: ml_collections.ConfigDict) -> pathlib.Path | None:
    """The checkpoint directory of init_from='hf:<dir>', None otherwise; ConfigError as ``init_source``."""
    source = init_source(config)
    return source.path if source is not None and source.kind == "hf" else None


def source_config(source: Source) -> ml_collections.ConfigDict:
    """The whole config of a source: a transformers directory's (hf.read_config: its model, base defaults
    elsewhere) or a run directory's config.json over the base defaults (moejax.loading.config_from_json)."""
    if source.kind == "hf":
        try:
            return hf.read_config(source.path)
        except (hf.HFConfigError, hf.CheckpointError) as e:
            source.fail(f"its config.json does not convert to a moejax model: {e}")
    file = source.path / "config.json"
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        source.fail(f"cannot read {file}: {e}")
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        source.fail(f"{file} is not a moejax config (a JSON object with a model section)")
    return loading.config_from_json(saved)


def source_model(source: Source, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The source's model section with config's RUN_FIELDS (how the model is computed, not what it computes)."""
    released = source_config(source).model
    for field in RUN_FIELDS:
        *parents, name = field.split(".")
        origin, target = config.model, released
        for part in parents:
            origin, target = origin[part], target[part]
        target[name] = origin[name]
    return released


def source_tokenizer(source: Source) -> tokenizers.Tokenizer | None:
    """The tokenizer a source's model was trained with: its directory's tokenizer.json; for a run directory without
    one, its config's (bytes; ConfigError when that names another tokenizer); None for a transformers directory
    without tokenizer.json."""
    if (source.path / "tokenizer.json").is_file():
        try:
            return tokenizers.from_spec(f"hf:{source.path}")
        except ValueError as e:
            source.fail(f"its tokenizer cannot be read: {e}")
    if source.kind == "hf":
        return None
    try:
        return tokenizers.for_workdir(source.path)
    except ValueError as e:
        source.fail(str(e))


# Configs resolve() returned, by id: resolving one of them again returns it as it is, so a command that passes its
# config through several entry points (report_finished, run, train_and_evaluate) reads <dir>/config.json once and
# prints its warnings once.
_RESOLVED: weakref.WeakValueDictionary[int, ml_collections.ConfigDict] = weakref.WeakValueDictionary()


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config a run trains: config itself without init_from; with init_from='hf:<dir>' or 'run:<dir>[@<step>]',
    a copy whose model is the source's (RUN_FIELDS kept from config) and whose data.tokenizer 'bytes' became the
    source's tokenizer ('hf:<dir>'; a run directory without tokenizer.json keeps bytes). A config this function
    returned is returned unchanged."""
    source = init_source(config)
    if source is None or _RESOLVED.get(id(config)) is config:
        return config
    released = source_model(source, config)
    if lora.spec(config.model) is not None:  # the run's adapters on the source's model (else the source's own)
        released.lora = copy.deepcopy(config.model.lora)
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.model = released
        if source.kind == "run":
            if resolved.data.tokenizer == "bytes":
                tokenizer = source_tokenizer(source)
                resolved.data.tokenizer = "bytes" if tokenizer.spec == "bytes" else f"hf:{source.path}"
        elif resolved.data.tokenizer == "bytes":
            directory = source.path
            if not (directory / "tokenizer.json").is_file():
                checks.fail("init_from", config.init_from, f"{directory} has no tokenizer.json; set data.tokenizer "
                                                           f"to the model's tokenizer ('hf:<dir or tokenizer.json>')")
            resolved.data.tokenizer = f"hf:{config.init_from[3:]}"
    _RESOLVED[id(resolved)] = resolved
    return resolved


def _same_tokenizer(a: tokenizers.Tokenizer, b: tokenizers.Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids: both bytes, or the same tokenizer.json bytes and eos."""
    if a.fingerprint is None or b.fingerprint is None:
        return a.fingerprint is None and b.fingerprint is None
    return all(a.fingerprint[key] == b.fingerprint[key] for key in ("sha256", "vocab_size", "eos_id"))


def check_tokenizers(config: ml_collections.ConfigDict) -> None:
    """Refuses (ConfigError naming the field, its value and both tokenizers) a run whose tokenizer
    (``tokenizers.for_config``: call it once the corpus is open, it builds a 'bpe:' tokenizer) is not the one of its
    init_from='run:<dir>' source or of its distillation teacher."""
    start, teacher = init_source(config), teacher_source(config)
    sources = ([(start, "init_from's")] if start is not None and start.kind == "run" else []) + (
        [(teacher, "the teacher's")] if teacher is not None else [])
    if not sources:
        return
    own = tokenizers.for_config(config)
    for source, whose in sources:
        theirs = source_tokenizer(source)
        if theirs is not None and not _same_tokenizer(own, theirs):
            source.fail(f"{whose} tokenizer ({_described(theirs)}, from {source.path}) is not the run's "
                        f"data.tokenizer={config.data.tokenizer!r} ({_described(own)}): they must share the "
                        f"tokenizer")


def _described(tokenizer: tokenizers.Tokenizer) -> str:
    if tokenizer.fingerprint is None:
        return "bytes, vocabulary 256"
    return (f"{tokenizer.spec}, vocabulary {tokenizer.vocab_size}, eos id {tokenizer.eos_id}, tokenizer.json sha256 "
            f"{tokenizer.fingerprint['sha256'][:12]}")


# ----------------------------------------------------------------------------------------------- distillation teacher


def teacher_source(config: ml_collections.ConfigDict) -> Source | None:
    """The teacher distill.teacher names, None for '' (no distillation); ConfigError as ``parse_source``."""
    return parse_source("distill.teacher", config.distill.teacher, TEACHER_ALLOWED)


def teacher_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The teacher's model section (its source's, with config's RUN_FIELDS), None without distillation. ConfigError
    when its vocabulary is not the student's (the KL compares next-token distributions over the same ids)."""
    source = teacher_source(config)
    if source is None:
        return None
    teacher = source_model(source, config)
    if teacher.vocab_size != config.model.vocab_size:
        source.fail(f"the teacher's model.vocab_size={teacher.vocab_size} is not the student's "
                    f"model.vocab_size={config.model.vocab_size}: the teacher and the student must share the "
                    f"vocabulary (the KL compares their next-token distributions over the same token ids)")
    return teacher


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
