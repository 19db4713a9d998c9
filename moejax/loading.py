"""A trained run, ready to use: ``config, variables = moejax.load(workdir)``.

``config`` is the run's config (``workdir/config.json``) as an ``ml_collections.ConfigDict``; fields that an older
config.json lacks take their ``configs/base.py`` defaults. ``variables`` is ``{'params', 'moe_state'}`` of the
newest checkpoint (or of ``step``) as jax arrays on the default device, for
``model.Transformer(config.model).apply(variables, tokens)``. Loading prints and logs nothing.

A transformers checkpoint directory (config.json with a ``model_type`` and safetensors weights, no moejax
checkpoints) is opened through ``moejax.hf.load`` instead: its config and variables in the same form (``step``
must then be None; see moejax/hf/__init__.py for the families it reads).

``moejax.load`` (moejax/__init__.py) calls this module's ``load``.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from moejax.configs import base
from moejax.training import checkpoint
from moejax.training.checkpoint import WorkdirError


def load(path: str | pathlib.Path, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, variables) of the moejax workdir at path: its config and the checkpoint of ``step`` (default: the
    newest), or of the transformers checkpoint directory at path (moejax.hf.load). Raises WorkdirError when path
    has no config.json or no such checkpoint."""
    workdir = pathlib.Path(path)
    if not checkpoint.checkpoint_steps(workdir):
        from moejax import hf

        if hf.is_hf_dir(workdir):
            if step is not None:
                raise WorkdirError(f"{workdir} is a transformers checkpoint directory, which has no steps: call "
                                   f"moejax.load({str(workdir)!r}) without step")
            return hf.load(workdir)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise WorkdirError(f"{workdir} is not a moejax workdir: it has no config.json (python -m moejax.main writes "
                           f"it when a run starts)")
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise WorkdirError(f"cannot read {config_file}: {e}") from e
    config = config_from_json(saved)
    if not checkpoint.checkpoint_steps(workdir):
        raise WorkdirError(f"{workdir} has no checkpoint yet (nothing in {workdir / 'checkpoints'}); a run saves "
                           f"one every checkpoint.every_steps steps, at the end and when stopped by a signal")
    state, _ = checkpoint.load_checkpoint(workdir, step)
    from moejax.quant import compact  # a compact quantised workdir: codes and scales dequantised here

    variables = {"params": jax.tree.map(jnp.asarray, compact.expand(workdir, state["params"])),
                 "moe_state": jax.tree.map(jnp.asarray, state.get("moe_state") or {})}
    return config, variables


def config_from_json(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config.json's fields over configs/base.py's defaults (tuples where the default is a tuple)."""
    return ml_collections.ConfigDict(_merge(base.get_config().to_dict(), saved))


def _merge(default: Any, saved: Any) -> Any:
    if isinstance(default, dict) and isinstance(saved, dict):
        return {**default, **{key: _merge(default.get(key), value) for key, value in saved.items()}}
    if isinstance(default, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved
