"""Checks of a run's config before anything runs, and of a workdir's config against it.

Each part of the code validates its own section (model, MoE layer and routers, optimizer, objective, upcycling,
expert parallelism); ``validate`` calls them all and checks the rest. Errors are ``checks.ConfigError`` naming the
field, the value and what is allowed.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import ml_collections
from flax import traverse_util

from moejax import checks, data, model, upcycle
from moejax.configs import base
from moejax.data import mixing
from moejax.moe import expert_parallel
from moejax.parallel import TOKEN_AXES, mesh_shape
from moejax.quant import qat
from moejax.training import initialise, objectives, optim, staging
from moejax.training.checkpoint import WorkdirError

# Fields that may differ between a workdir's config.json and the config resuming it (configs/base.py FIELD_ROLES).
MAY_DIFFER = base.fields_with("resume")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the whole config; raises ConfigError naming the field, value and what is allowed."""
    checks.positive_int("seed", config.seed, minimum=0)
    initialise.init_source(config)
    model.validate(config.model)

    d = config.data
    try:
        data.parse_name(d.name)
    except ValueError:
        checks.fail("data.name", d.name, f"allowed: {data.NAMES_ALLOWED}")
    _check_vocab(config)
    if not (isinstance(d.val_fraction, (int, float)) and 0 < d.val_fraction < 1):
        checks.fail("data.val_fraction", d.val_fraction, "must be a number in (0, 1)")
    checks.positive_int("data.eval_batches", d.eval_batches)

    t = config.train
    for field in ("steps", "batch_size", "seq_len", "log_every"):
        checks.positive_int(f"train.{field}", t[field])
    checks.positive_int("train.eval_every", t.eval_every, minimum=0)
    optim.validate(t)
    objectives.validate(config)
    qat.validate(config)
    initialise.teacher_model(config)  # a readable teacher of the student's vocabulary, or none
    upcycle.validate(config)
    staging.validate(config)
    mixing.validate(config)
    checks.positive_int("checkpoint.every_steps", config.checkpoint.every_steps, minimum=0)
    checks.positive_int("checkpoint.keep", config.checkpoint.keep)

    sizes = mesh_shape(config)
    data_parallel = math.prod(sizes[axis] for axis in TOKEN_AXES)
    if t.batch_size % data_parallel:
        checks.fail("train.batch_size", t.batch_size,
                    f"must be a multiple of the data-parallel device count {data_parallel} "
                    f"(mesh.data * mesh.fsdp * mesh.expert = {' * '.join(str(sizes[a]) for a in TOKEN_AXES)})")
    expert_parallel.validate(config)
    if t.batch_size % jax.process_count():
        checks.fail("train.batch_size", t.batch_size, f"must be a multiple of the process count "
                                                       f"{jax.process_count()}")


def _check_vocab(config: ml_collections.ConfigDict) -> None:
    """model.vocab_size against data.tokenizer's vocabulary (larger is fine: released models pad their embeddings)."""
    spec = config.data.tokenizer
    try:
        size = data.tokenizers.vocab_size_of(spec)
    except ValueError as e:  # the message names data.tokenizer, its value and what is allowed
        raise checks.ConfigError(str(e)) from e
    if config.model.vocab_size < size:
        checks.fail("model.vocab_size", config.model.vocab_size,
                    f"must be >= {size}, the vocabulary size of data.tokenizer={spec!r} (larger is allowed: "
                    f"released models pad their embeddings)")


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{'train.steps': 1000, ...}: the config as JSON values, nested fields joined by '.'."""
    tree = json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else config
    return {".".join(path): value for path, value in traverse_util.flatten_dict(tree).items()}


def check_workdir_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Refuses a workdir whose config.json differs from config in a field outside MAY_DIFFER. A field the
    workdir's config does not have (added to moejax since that run) is accepted at its default value."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old, new = flat_config(json.loads(path.read_text())), flat_config(config)
    defaults = flat_config(base.get_config())
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>")
                       and k not in MAY_DIFFER and not (k not in old and k in defaults and new[k] == defaults[k]))
    if differing:
        lines = "\n".join(f"  {k}: {old.get(k, '<absent>')!r} in the workdir, {new.get(k, '<absent>')!r} now"
                          for k in differing)
        raise WorkdirError(
            f"workdir {workdir} holds a run with a different config:\n{lines}\n"
            f"To keep that run, use a new --workdir; to start over, delete {workdir}. "
            f"(Only {', '.join(MAY_DIFFER)} may differ when resuming.)")
