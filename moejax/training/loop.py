"""The train/eval loop: ``train_and_evaluate(config, workdir)`` trains ``config`` and writes into ``workdir``;
``run`` adds the stages a config needs before it (the dense model of an upcycling run).

``train_and_evaluate`` reads top to bottom: validate the config, check the workdir, load the data, build the mesh,
take the first state (moejax/training/initialise.py: the newest good checkpoint, else a fresh, upcycled or
``init_from`` model) and the distillation teacher if any (its variables are an argument of the train step, never
saved; when either fails, what the run had created in the workdir is removed, so a run that never started leaves no
workdir behind), compile the train step, run it with periodic logging, evaluation and checkpoints, then write the
summary.

Workdir contents:

    config.json              the config of the run (written before training starts)
    tokenizer.json           with data.tokenizer other than bytes: the tokenizer, and tokenizer_config.json its eos
                             (moejax.data.tokenizers.for_workdir reads them)
    checkpoints/<step>/      orbax checkpoints (moejax/training/checkpoint.py)
    events.out.tfevents.*    TensorBoard scalars (tensorboardX; no TensorFlow): train/*, eval/*
    metrics.jsonl            one JSON object per log step ({"kind": "train", ...}) and evaluation ("eval")
    summary.json             the final evaluation, throughput and parameter counts (moejax/training/metrics.py)

Resuming: running the same command again restores the newest checkpoint in ``workdir/checkpoints`` and continues
bit-identically (the step's rng is ``fold_in(train_key, step)`` and the data-iterator state is checkpointed with
the step). A workdir whose ``config.json`` differs from the config is refused, except in the fields of
``config.MAY_DIFFER`` (moejax/training/config.py).

A finished run (summary.json of ``train.steps`` steps and the checkpoint of that step) is left untouched by
``report_finished``, which prints its summary (``python -m moejax.main`` calls it first); ``run`` evaluates it
again. On resume, metrics.jsonl keeps the records up to the checkpoint's step (each
(kind, step) once: a record written again replaces the old one) and the TensorBoard events past that step are
purged (tensorboardX ``purge_step``), so both show every step once.

Signals: SIGTERM or SIGINT (Ctrl-C) makes the loop save a checkpoint at the next step boundary (the step in progress
when it arrived, or the next one) and return; the run prints which signal, the saved step and the command to resume,
and ``python -m moejax.main`` exits 0. A second SIGINT aborts at once (KeyboardInterrupt), a second SIGTERM ends the
process (the default action); the newest checkpoint saved before stays. With several processes, each acts only
when all have agreed to stop, and they agree with an all-gather at log steps (``train.log_every``) and checkpoint
steps only (an all-gather at every step would cost a host round trip each): there a signal stops the run at the
next such step.

Faults: a non-finite loss or gradient norm (checked at every log step and before every save) or non-finite
parameters (checked before every save) raise ``DivergenceError`` and nothing is saved past the last good
checkpoint. An unreadable corpus raises ``DataError``; a workdir that is a file or cannot be created, or holds an
incompatible run, raises ``checkpoint.WorkdirError`` (``WorkdirPathError`` for the path itself).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import data, evaluate, model, upcycle
from moejax.cli import removed_on_failure
from moejax.console import duration, say
from moejax.data import tokenizers
from moejax.moe import expert_parallel
from moejax.parallel import batch_sharding, make_mesh, state_shardings
from moejax.quant import qat
from moejax.training import checkpoint, hooks, initialise, metrics, objectives, optim
from moejax.training.checkpoint import WorkdirPathError
from moejax.training.config import check_workdir_config, validate
from moejax.training.step import TrainState, train_step


class DataError(ValueError):
    """The corpus config.data names cannot be read, or is too small for the config."""


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, config_name: str | None = None,
        resume_command: str | None = None) -> dict[str, Any]:
    """Trains config in workdir after the stages it needs: an upcycling run without a given dense checkpoint first
    trains its dense model in <workdir>/dense (skipped once that run has a summary). Returns the summary, or
    {'preempted': True, 'step': s, 'signal': name} when a signal stopped a stage. A finished run is evaluated
    again (``report_finished`` is what leaves it untouched). resume_command: the command line that resumes the
    run, named when a signal stops it."""
    config = initialise.resolve(config)
    validate(config)
    workdir = pathlib.Path(workdir)
    dense_dir = upcycle.dense_workdir(config, workdir)
    if config.upcycle.enabled and not config.upcycle.dense_checkpoint and not (dense_dir / "summary.json").exists():
        say(f"upcycling: training the dense model ({config.upcycle.dense_steps} steps) in {dense_dir} first")
        result = train_and_evaluate(upcycle.dense_config(config), dense_dir,
                                    config_name=f"{config_name or workdir.name} (dense stage)",
                                    resume_command=resume_command)
        if result.get("preempted"):
            return result
    return train_and_evaluate(config, workdir, config_name=config_name, resume_command=resume_command)


def report_finished(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """When workdir holds a finished run of config (``finished_summary``), prints that and its summary and returns
    the summary, reading files only; None otherwise. Raises like ``run`` for an invalid config or a workdir of
    another config."""
    config = initialise.resolve(config)
    validate(config)
    workdir = pathlib.Path(workdir)
    check_workdir_config(config, workdir)
    finished = finished_summary(config, workdir)
    if finished is not None:
        say(f"{workdir} holds a finished run of this config ({config.train.steps} steps); nothing to do. "
            f"Its summary:")
        metrics.print_summary(finished, workdir / "summary.json")
        say("To train it longer, run again with a larger --config.train.steps; to start over, use a new --workdir.")
    return finished


def finished_summary(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any] | None:
    """workdir's summary.json when the run there finished training config: the summary is of config.train.steps
    steps and the checkpoint of that step is there. None otherwise (also for an unreadable summary.json)."""
    try:
        summary = json.loads((workdir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    steps = config.train.steps
    if not isinstance(summary, dict) or summary.get("steps") != steps:
        return None
    return summary if steps in checkpoint.checkpoint_steps(workdir) else None


def check_workdir_path(workdir: pathlib.Path) -> None:
    """Raises WorkdirPathError when workdir is a file or cannot be created; creates nothing. Remote paths
    ('gs://...') are left to the storage layer."""
    if "://" in str(workdir):
        return
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirPathError(f"--workdir {workdir} is a file, not a directory: pass the path of a directory (it is "
                           f"created when missing)")
    existing = next((p for p in [workdir, *workdir.absolute().parents] if p.exists()), None)
    if existing is None or existing == workdir:
        return
    if not existing.is_dir():
        raise WorkdirPathError(f"cannot create --workdir {workdir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirPathError(f"cannot create --workdir {workdir}: no permission to write in {existing}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       config_name: str | None = None, resume_command: str | None = None) -> dict[str, Any]:
    """Trains config (resuming from workdir's newest checkpoint), evaluates, writes summary.json and returns it.

    Returns {'preempted': True, 'step': s, 'signal': name} instead when SIGTERM or SIGINT stopped the run (after
    saving step s). resume_command: the command line that resumes the run, named when a signal stops it.
    """
    start_time = time.time()
    config = initialise.resolve(config)
    validate(config)
    workdir = pathlib.Path(workdir)
    check_workdir_path(workdir)
    check_workdir_config(config, workdir)
    fingerprint, train_iter, local_eval = _open_data(config)
    initialise.check_tokenizers(config)

    mesh = make_mesh(config)
    global_batch = _batch_placer(config, mesh)
    eval_data = EvalSet([global_batch(b) for b in local_eval], _bytes_per_token(config, local_eval))
    module = model.Transformer(config.model, mesh=mesh)
    tx = optim.make_optimizer(config)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    with removed_on_failure(workdir):  # a run without a first state (init_from unreadable, Ctrl-C) leaves nothing
        _write_config(config, workdir)
        manager = checkpoint.open_manager(workdir, config.checkpoint.keep)
        start, abstract_state, shardings = _first_state(config, workdir, module, tx, mesh, manager, init_key)
        teacher = initialise.load_teacher(config, mesh)
    state, start_step = start.state, int(start.state.step)
    if start.data_state is not None:
        train_iter.set_state(start.data_state)
    say(start.message)
    if teacher is not None:
        say(teacher.message)
    counts = model.param_counts(abstract_state.params, config.model)
    for note in expert_parallel.placement_notes(config):
        say(f"note: {note}")
    num_layers = len(model.moe_layers(config.model))
    say(f"parameters: {counts['total']:,} total, {counts['activated']:,} activated per token; "
        f"{num_layers} MoE layers; mesh {dict(mesh.shape)}")

    replicated = NamedSharding(mesh, P())
    empty_train = jax.device_put(metrics.metrics_collection(True, num_layers, config.model.moe.num_experts,
                                                            distill=teacher is not None,
                                                            mtp_depth=config.model.get("mtp_depth", 0)).empty(),
                                 replicated)
    objective = objectives.from_config(config, module, train_key, None if teacher is None else teacher.module)
    step = functools.partial(train_step, objective=objective, tx=tx, hooks=hooks.from_config(config))
    in_shardings = (shardings, replicated, batch_sharding(mesh))
    if teacher is None:
        step_fn, step_args = jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, replicated, replicated),
                                     donate_argnums=0), ()
    else:  # the teacher's variables: an argument of every step, so they are neither constants nor state
        step_fn = jax.jit(lambda s, m, b, t: step(s, m, b, teacher=t), in_shardings=(*in_shardings, teacher.shardings),
                          out_shardings=(shardings, replicated, replicated), donate_argnums=0)
        step_args = (teacher.variables,)
    evaluator = evaluate.Evaluator(config, mesh=mesh, shardings=(
        {"params": shardings.params, "moe_state": shardings.moe_state}, replicated, batch_sharding(mesh)))
    if objective.quantise is not None:  # QAT: validation on the weights the training forward uses
        qat.validate(config, abstract_state.params)
        evaluator = qat.QuantisedEvaluator(evaluator, objective.quantise, shardings.params)

    writer = metrics.MetricWriter(workdir, start_step)
    progress = metrics.Progress(config, start_step)
    try:
        if start.evaluate_first:
            scalars = _evaluate(evaluator, state, eval_data)
            writer.write("eval", start_step, scalars)
            say(f"eval at step {start_step} (before training): loss {scalars['loss']:.4f}")
        state, stopped, compile_seconds = _train(config, workdir, state, step_fn, evaluator, train_iter,
                                                 global_batch, eval_data, empty_train, writer,
                                                 progress, manager, resume_command, step_args)
        if stopped is not None:
            return {"preempted": True, "step": stopped[0], "signal": stopped[1]}
        scalars = _evaluate(evaluator, state, eval_data)
        writer.write("eval", config.train.steps, scalars)
        result = metrics.summary(scalars, progress, start_time, compile_seconds, counts, fingerprint, config,
                                 workdir, config_name)
        if jax.process_index() == 0:
            (workdir / "summary.json").write_text(json.dumps(result, indent=2))
        metrics.print_summary(result, workdir / "summary.json")
        return result
    finally:
        writer.close()
        manager.close()


class _StopRequest:
    """SIGTERM and SIGINT while the loop runs: the first asks the loop to save a checkpoint and return at the next
    step boundary; after it, a second SIGINT raises KeyboardInterrupt and a second SIGTERM ends the process (the
    default actions). Handlers are installed from the main thread only; the previous ones come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name: str | None = None  # the signal that asked to stop
        self.at_step: int | None = None  # the steps the loop had run when it arrived
        self.steps = 0  # kept current by the loop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.name, self.at_step = signal.Signals(signum).name, self.steps
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def is_set(self) -> bool:
        return self.name is not None


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, state: TrainState, step_fn: Any,
           evaluator: evaluate.Evaluator, train_iter: Any, global_batch: Any, eval_data: EvalSet, empty_train: Any,
           writer: Any,
           progress: metrics.Progress, manager: Any, resume_command: str | None = None,
           step_args: tuple = ()) -> tuple[TrainState, tuple[int, str] | None, float]:
    """The steps from state.step to train.steps with logging, evaluation and checkpoints. Returns the state,
    (the step saved, the signal's name) when a signal stopped the run (None when it finished) and the compile
    seconds. step_args: the step's arguments after the batch (the distillation teacher's variables)."""
    total, start_step, compile_seconds = config.train.steps, int(state.step), 0.0
    if start_step >= total:
        return state, None, compile_seconds
    schedule = optim.learning_rate_schedule(config.train)
    with _StopRequest() as stop:
        stop.steps = start_step
        batch = global_batch(next(train_iter))
        say("compiling train step...")
        compile_start = time.perf_counter()
        step_fn = step_fn.lower(state, empty_train, batch, *step_args).compile()
        compile_seconds = time.perf_counter() - compile_start
        say(f"compiled train step in {compile_seconds:.1f}s")
        progress.restart_clock()
        train_metrics = empty_train
        every = config.checkpoint.every_steps
        for step in range(start_step, total):
            if step > start_step:
                batch = global_batch(next(train_iter))
            state, train_metrics, health = step_fn(state, train_metrics, batch, *step_args)
            done = stop.steps = step + 1
            progress.pending.append((done, health))
            log_now = done % config.train.log_every == 0 or done == total
            save_now = bool(every and done % every == 0) or done == total
            stopping = _stop_requested(stop, log_now or save_now)
            if log_now:
                progress.sync()
                scalars = {**metrics.computed(train_metrics), "learning_rate": float(schedule(step))}
                train_metrics = empty_train
                writer.write("train", done, scalars)
                rate = progress.rate()
                tokens = rate * config.train.batch_size * config.train.seq_len
                kd = f" | kd {scalars['kd_loss']:.4f}" if "kd_loss" in scalars else ""
                kd += "".join(f" | mtp_{name[9:]} {value:.4f}" for name, value in scalars.items()
                              if name.startswith("mtp_loss_"))
                say(f"step {done}/{total} | loss {scalars['loss']:.4f}{kd} | {rate:.2f} steps/s | "
                    f"{tokens:,.0f} tokens/s | ETA {duration((total - done) / max(rate, 1e-9))}")
            if config.train.eval_every and done % config.train.eval_every == 0 and done < total:
                progress.sync()
                scalars = _evaluate(evaluator, state, eval_data)
                writer.write("eval", done, scalars)
                say(f"eval at step {done}: loss {scalars['loss']:.4f} | {scalars['bits_per_byte']:.4f} bits/byte")
                progress.restart_clock()
            if save_now or stopping:
                progress.sync()
                if not bool(checkpoint.all_finite(state.params)):
                    progress.diverged(f"the parameters are not finite at step {done}")
                checkpoint.save_checkpoint(manager, state, train_iter.get_state(), config)
                progress.last_good_checkpoint = done
                progress.restart_clock()
            if stopping:
                name = stop.name or "a stop signal on another process"
                arrived = f" (it arrived at step {stop.at_step})" if stop.at_step is not None else ""
                say(f"{name} received: saved a checkpoint at step {done} in {workdir}{arrived}; run the same "
                    f"command to resume" + (f": {resume_command}" if resume_command else ""))
                return state, (done, stop.name or "signal"), compile_seconds
        return state, None, compile_seconds


def _open_data(config: ml_collections.ConfigDict) -> tuple[dict, Any, list]:
    """(corpus fingerprint, train iterator, this process's eval batches); DataError naming what is wrong."""
    index, count = jax.process_index(), jax.process_count()
    try:
        return (data.corpus_fingerprint(config), data.train_iterator(config, process_index=index, process_count=count),
                data.eval_batches(config, process_index=index, process_count=count))
    except (ValueError, ImportError) as e:  # data.py names the field, the value and what is allowed
        raise DataError(str(e)) from e


def _write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    if jax.process_index() == 0:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True))
            data.tokenizers.for_config(config).save(workdir)
        except OSError as e:
            raise WorkdirPathError(f"cannot write to --workdir {workdir}: {e}") from e


def _first_state(config: ml_collections.ConfigDict, workdir: pathlib.Path, module: model.Transformer, tx: Any,
                 mesh: Any, manager: Any, init_key: jax.Array) -> tuple[initialise.Start, TrainState, Any]:
    """(the first state as initialise.initial_state gives it, the abstract state, the state's shardings)."""

    def init(key):
        variables = module.init(key, jnp.zeros((1, config.train.seq_len), jnp.int32))
        return initialise.new_state(variables["params"], variables.get("moe_state", {}), tx)

    abstract_state = jax.eval_shape(init, init_key)
    shardings = state_shardings(abstract_state, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)
    ctx = initialise.InitContext(
        config, workdir, fresh=lambda: jax.jit(init, out_shardings=shardings)(init_key),
        place=jax.jit(lambda p, ms: initialise.new_state(p, ms, tx), out_shardings=shardings), mesh=mesh,
        abstract=abstract_state)
    return initialise.initial_state(ctx, manager, target), abstract_state, shardings


def _batch_placer(config: ml_collections.ConfigDict, mesh: Any) -> Any:
    """local rows [B / processes, S + 1] -> the global batch [B, S + 1] split over the mesh's token axes."""
    sharding = batch_sharding(mesh)
    shape = (config.train.batch_size, config.train.seq_len + 1)
    return lambda local: jax.make_array_from_process_local_data(sharding, local, shape)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """The validation batches (placed) and the text bytes per predicted token on them (1 with the byte
    tokenizer), which turns the loss per token into bits per byte."""

    batches: list[jax.Array]
    bytes_per_token: float


def _bytes_per_token(config: ml_collections.ConfigDict, local_eval: list[np.ndarray]) -> float:
    """Mean text bytes per target token of this process's validation batches under the run's tokenizer."""
    tokenizer = tokenizers.for_config(config)
    if tokenizer.spec == "bytes" or not local_eval:
        return 1.0
    table = evaluate.text_bytes_table(tokenizer, tokenizer.vocab_size)
    targets = np.concatenate([np.asarray(b)[:, 1:].ravel() for b in local_eval])
    return float(table[np.minimum(targets, len(table) - 1)].mean())


def _evaluate(evaluator: evaluate.Evaluator, state: TrainState, data_set: EvalSet) -> dict[str, float]:
    """The evaluator's mean metrics over the validation batches with 'bits_per_byte' (not its token and byte
    totals, which the run's summary and corpus fingerprint hold)."""
    result = evaluator({"params": state.params, "moe_state": state.moe_state}, data_set.batches,
                       bytes_per_token=data_set.bytes_per_token, with_load=False)
    return {key: value for key, value in result.items() if key not in ("perplexity", "tokens", "text_bytes")}


def _stop_requested(stop: _StopRequest, sync_point: bool) -> bool:
    """Whether to stop after this step: at every step with one process; with several, only at sync points (log and
    checkpoint steps), where the processes agree through an all-gather (any process's signal stops them all)."""
    if jax.process_count() == 1:
        return stop.is_set()
    return sync_point and bool(np.any(multihost_utils.process_allgather(np.array(stop.is_set()))))
