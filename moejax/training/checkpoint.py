"""Orbax checkpoints of a run: ``workdir/checkpoints/<step>/`` holds 'state' (step, params, optimizer, MoE state) and
'meta' (JSON: the data-iterator state of every process, checksums of the state's arrays, the config).

Saving is synchronous and atomic (orbax writes a temporary directory and renames it). Restoring takes the newest
checkpoint that restores and matches its checksums; each newer one that fails is reported in one console line (its
step, the reason and the step used instead) and deleted. What orbax, TensorStore and asyncio log while reading
checkpoints (absl warnings, "Task exception was never retrieved", "Event loop is closed" from reads still in flight
when a read failed) goes to ``workdir/restore.log`` (created only when there is something to write) instead of the
console. ``load_checkpoint`` reads a run's checkpoint as numpy on any devices, quietly; ``save_variables`` writes a
model (config and variables, no optimizer state) as a workdir that ``moejax.load`` opens.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moejax.console import say


class WorkdirError(RuntimeError):
    """The workdir holds something this run cannot continue from."""


class WorkdirPathError(WorkdirError):
    """The workdir's path cannot hold a run: it is a file, or it cannot be created."""


@jax.jit
def checksums(tree: Any) -> jax.Array:
    """uint32 [leaves]: per leaf, sum_i bits_i * w_i mod 2**32 with distinct odd weights w_i (any one bit flip
    changes it; integer sums do not depend on the reduction order, so the sharding does not matter)."""
    def checksum(x):
        uint = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32).reshape(-1)
        weights = (jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1) * jnp.uint32(0x9E3779B1)
        return jnp.sum(bits * weights, dtype=jnp.uint32)

    return jnp.stack([checksum(x) for x in jax.tree.leaves(tree)])


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# Loggers that report on checkpoint reads: orbax and TensorStore (through absl logging) and asyncio (tasks of a
# failed read that nobody awaited).
_READ_LOGGERS = ("absl", "asyncio", "orbax", "tensorstore")
# After a failed read, TensorStore still completes the reads in flight and calls back into orbax's closed event
# loop, each printing a RuntimeError traceback straight to file descriptor 2 within a few milliseconds.
_SETTLE_SECONDS = 0.2


def restore_log_path(workdir: pathlib.Path) -> pathlib.Path:
    """Where this process keeps what checkpoint reads logged: workdir/restore.log (process 0) or
    workdir/restore.process_<p>.log."""
    index = jax.process_index()
    return workdir / ("restore.log" if index == 0 else f"restore.process_{index}.log")


@contextlib.contextmanager
def quiet_reads(log_path: pathlib.Path | None = None):
    """Keeps the console free of what orbax, TensorStore and asyncio report while checkpoints are read: their log
    records, Python warnings, unraisable exceptions and anything written to file descriptor 2 go to a temporary file,
    appended to ``log_path`` at the end when not empty (dropped when log_path is None). Yields a function
    ``settle()`` to call after a failed read: it waits for the reads still in flight to report."""
    sys.stdout.flush()
    sys.stderr.flush()
    sink = tempfile.TemporaryFile("a+", encoding="utf-8", errors="replace")  # O_APPEND: fd 2 shares it
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved_loggers = []
    for name in _READ_LOGGERS:
        logger = logging.getLogger(name)
        saved_loggers.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    saved_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: sink.write("".join(traceback.format_exception(u.exc_type, u.exc_value,
                                                                                  u.exc_traceback)))
    saved_fd = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, category, filename, lineno, *_: sink.write(
                f"{filename}:{lineno}: {category.__name__}: {message}\n")
            yield lambda: time.sleep(_SETTLE_SECONDS)
            gc.collect()  # tasks of a failed read report "Task exception was never retrieved" when collected
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        sys.unraisablehook = saved_hook
        for logger, handlers, propagate in saved_loggers:
            logger.handlers, logger.propagate = handlers, propagate
        handler.flush()
        sink.seek(0)
        text = sink.read()
        sink.close()
        if text.strip() and log_path is not None:
            with contextlib.suppress(OSError), open(log_path, "a", encoding="utf-8") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} reading checkpoints\n{text}")


def _reason(error: BaseException) -> str:
    """One sentence on why a checkpoint failed to restore, from orbax's or TensorStore's long messages: the first
    line of the innermost cause (TensorStore's, which names the array), shortened."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = message.split(" See full TensorStore details")[0]
    message = re.sub(r' in OCDBT database at local file "[^"]*"', "", message)
    if isinstance(error, _ChecksumMismatch):
        return message
    message = message if len(message) <= 200 else message[:197] + "..."
    return f"reading it failed with {type(error).__name__}" + (f": {message}" if message else "")


class _ChecksumMismatch(ValueError):
    pass


def open_manager(workdir: pathlib.Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
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


def save_checkpoint(manager: ocp.CheckpointManager, state: Any, data_state: dict,
                    config: ml_collections.ConfigDict) -> None:
    """Saves synchronously; orbax writes into a temporary directory and renames it, so a kill leaves no partial step."""
    step = int(state.step)
    meta = {"step": step, "data": _all_process_states(data_state),
            "checksums": [int(c) for c in jax.device_get(checksums(state))],
            "config": json.loads(config.to_json())}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)
    manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, target: Any,
                       log_path: pathlib.Path | None = None) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores and matches its checksums, as (state, meta); None when there is none.

    target: the abstract state (jax.ShapeDtypeStruct leaves with shardings). Each newer checkpoint that fails is
    reported in one line (step, reason, the step used instead) and deleted, so that the run can save that step
    again. What orbax, TensorStore and asyncio log meanwhile goes to log_path (default: restore.log in the workdir,
    the parent of the checkpoints directory; see ``quiet_reads``).
    """
    directory = pathlib.Path(manager.directory)
    log_path = restore_log_path(directory.parent) if log_path is None else log_path
    steps = sorted(manager.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    restored = None
    with quiet_reads(log_path) as settle:
        for step in steps:
            mismatch = _layout_mismatch(directory / str(step) / "state", target)
            if mismatch:
                raise WorkdirError(
                    f"the checkpoint at step {step} in {directory} was saved with a different state layout "
                    f"than this code and config build ({mismatch}). Nothing was changed in the workdir. A run "
                    f"saved before moejax changed its state layout (e.g. frozen routers became an optimizer "
                    f"partition, which changes the optimizer state of SMoE-Dropout runs) cannot resume here: start "
                    f"it again in a new --workdir, or read its parameters with moejax.load.")
            try:
                result = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                       meta=ocp.args.JsonRestore()))
                state, meta = result["state"], result["meta"]
                if [int(c) for c in jax.device_get(checksums(state))] != meta["checksums"]:
                    raise _ChecksumMismatch("its arrays do not match the checksums saved with them")
            except Exception as e:  # orbax and tensorstore raise many kinds; each means unusable
                logging.getLogger("absl").warning("checkpoint at step %d is unusable", step, exc_info=e)
                settle()
                failures.append((step, _reason(e)))
                continue
            restored = state, meta
            break
    details = f"details in {log_path}" if log_path is not None and log_path.exists() else "no details were logged"
    if restored is None:
        if not steps:
            return None
        reasons = "; ".join(f"step {step}: {reason}" for step, reason in failures)
        raise WorkdirError(f"no checkpoint in {directory} can be restored ({reasons}; {details}). Delete "
                           f"{directory.parent} to start over, or move it away to keep it.")
    used = int(restored[1]["step"])
    for step, reason in failures:
        manager.delete(step)
        say(f"WARNING: checkpoint at step {step} in {directory} is unusable ({reason}); falling back to step "
            f"{used}, the newest good one, and deleted step {step} ({details})")
    return restored


def _paths(tree: Any) -> set[str]:
    """The leaf paths of a tree as 'a/b/c' (dataclass fields, dict keys and sequence indices alike)."""
    def name(key: Any) -> str:
        return str(next(getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)))

    return {"/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _layout_mismatch(state_dir: pathlib.Path, target: Any) -> str:
    """'' when the saved state's tree has target's leaf paths; else which paths differ (a few of them). A
    checkpoint whose metadata cannot be read is not judged here (restoring it reports it as unreadable)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(state_dir)
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            return ""
        saved = _paths(tree)
    except Exception:  # noqa: BLE001 - unreadable metadata is the corrupt-checkpoint path's to report
        return ""
    finally:
        handler.close()
    if not saved:
        return ""
    wanted = _paths(target)
    missing, extra = sorted(wanted - saved), sorted(saved - wanted)
    if not missing and not extra:
        return ""
    parts = [f"{len(missing)} arrays missing from it, e.g. {', '.join(missing[:3])}"] if missing else []
    parts += [f"{len(extra)} arrays it has that are not expected, e.g. {', '.join(extra[:3])}"] if extra else []
    return "; ".join(parts)


def checkpoint_steps(workdir: str | pathlib.Path) -> list[int]:
    """The steps of a workdir's finished checkpoints, oldest first (no orbax manager, nothing logged)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "state").is_dir() and (p / "meta").is_dir())


def load_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> tuple[dict, dict]:
    """(state, meta) of a run's checkpoint (the newest by default): state as nested dicts of numpy arrays with
    'step', 'params', 'opt_state' and 'moe_state', read on any devices (for analysis and tests). Logs nothing.
    Raises WorkdirError when the workdir has no checkpoint, or not the one asked for."""
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    steps = checkpoint_steps(workdir)
    if not steps:
        raise WorkdirError(f"no checkpoint in {directory}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise WorkdirError(f"no checkpoint at step {step} in {directory}; it has steps {steps}")
    handler, meta_handler = ocp.PyTreeCheckpointHandler(), ocp.JsonCheckpointHandler()
    try:
        with quiet_reads() as settle:
            try:
                tree = handler.metadata(directory / str(step) / "state").tree
                as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
                state = handler.restore(directory / str(step) / "state",
                                        args=ocp.args.PyTreeRestore(restore_args=as_numpy))
                meta = meta_handler.restore(directory / str(step) / "meta")
            except Exception as e:  # orbax and tensorstore raise many kinds; each means unreadable
                settle()
                raise WorkdirError(f"the checkpoint at step {step} in {directory} cannot be read: {_reason(e)}") from e
    finally:
        handler.close()
        meta_handler.close()
    return state, meta


def save_variables(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, variables: Mapping[str, Any],
                   step: int = 0) -> pathlib.Path:
    """Writes (config, variables) as a moejax workdir that ``moejax.load(workdir)`` opens: ``config.json`` (the
    whole config) and one orbax checkpoint ``checkpoints/<step>`` written by ``save_checkpoint`` whose
    state holds ``step``, ``params`` and ``moe_state`` (no optimizer state: it is a model, not a run to resume;
    continue training it through ``moejax.hf.save`` and ``init_from='hf:<dir>'``). Refuses a directory that
    already holds a config.json or checkpoints. Returns the workdir."""
    from moejax.training.step import TrainState

    workdir = pathlib.Path(workdir)
    if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
        raise FileExistsError(f"{workdir} already holds a moejax workdir (config.json or checkpoints/); choose a new "
                              f"directory")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True))
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=jax.tree.map(jnp.asarray, variables["params"]),
                       opt_state=None, moe_state=jax.tree.map(jnp.asarray, variables.get("moe_state") or {}))
    manager = open_manager(workdir, keep=1)
    try:
        save_checkpoint(manager, state, {}, config)
    finally:
        manager.close()
    return workdir
