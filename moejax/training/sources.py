"""The models a run's config names and the config a run trains. ``init_from`` names the first weights of a run
(``'hf:<dir>'``, a transformers checkpoint directory; ``'run:<dir>[@<step>]'``, a moejax run directory's newest
checkpoint or that of step) and ``distill.teacher`` the teacher of a distillation run, the same way:
``parse_source`` reads either into a ``Source`` (ConfigError naming the field, the value and what is allowed).

``resolve(config)`` makes the run's config the source's model: ``config.model`` from the source's config
(``source_config``: a transformers directory's config.json, or a run directory's) except ``RUN_FIELDS`` (how the
model is computed and trained, kept from the run's config), the run's ``model.lora`` when it names targets, and
``data.tokenizer`` 'bytes' (the default) the source's own tokenizer. ``check_tokenizers`` refuses a run whose
tokenizer is not that of its ``run:`` source or of its teacher.

Building the first state from a source is moejax/training/initialise.py.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import weakref
from typing import Any

import ml_collections

from moejax import checks, hf, loading, upcycle_hf
from moejax.adapters import lora
from moejax.configs import base
from moejax.data import tokenizers
from moejax.training import checkpoint

SOURCES_ALLOWED = ("'hf:<dir>', a transformers checkpoint directory (config.json with a model_type, and "
                   "*.safetensors), or 'run:<dir>[@<step>]', a moejax run directory (config.json and checkpoints/: a "
                   "run of python -m moejax.main or a model python -m moejax.posthoc --out wrote; its newest "
                   "checkpoint, or that of <step>)")
INIT_FROM_ALLOWED = "'' (the model's own initialisation) or " + SOURCES_ALLOWED + ", or " + upcycle_hf.ALLOWED
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
    upcycle: bool = False  # init_from='upcycle:hf:<dir>': the dense checkpoint upcycled (moejax/upcycle_hf.py)

    def fail(self, why: str) -> None:
        checks.fail(self.field, self.value, why)


def parse_source(field: str, value: Any, allowed: str) -> Source | None:
    """The model config field ``field`` names ('' -> None); ConfigError naming the field, the value and what is
    allowed when it is not a readable transformers checkpoint directory or moejax run directory (with that step)."""
    if value == "":
        return None
    if field == "init_from" and upcycle_hf.named(value):  # 'upcycle:hf:<dir>': read as 'hf:<dir>', then upcycled
        directory = pathlib.Path(value[len(upcycle_hf.PREFIX):]).expanduser()
        if not hf.is_hf_dir(directory):
            checks.fail(field, value, f"{directory} is not a transformers checkpoint directory; allowed: {allowed}")
        return Source(field, value, "hf", directory, upcycle=True)
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
    if source.upcycle:  # the release's model in the run's MoE layout
        released = upcycle_hf.moe_model(released, config, source.path)
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
            resolved.data.tokenizer = f"hf:{config.init_from.removeprefix('upcycle:')[3:]}"
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
