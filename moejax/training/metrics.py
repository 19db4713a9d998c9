"""Metrics of a run: the clu metric collections the jitted steps accumulate, their values on the host, the
TensorBoard + ``metrics.jsonl`` writer, host-side progress (throughput, ETA, divergence checks) and ``summary.json``.

Per MoE layer the metrics hold ``stats.LAYER_STATS`` (load balance, drops, experts per token, router entropy and
the unweighted router losses), averaged over steps, named ``layers_{i}_{stat}`` by the layer index each MoE layer
records, and ``layers_{i}_maxvio_global``: the MaxVio of the load summed over all the steps (or evaluation batches)
before the max is taken, Loss-Free Balancing's MaxVio_global (arXiv 2408.15664), where ``maxvio`` averages each
batch's MaxVio (its MaxVio_batch). Training also holds ``expert_load`` (per layer, each expert's share of the routed
slots).
"""
from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorboardX
from clu import metrics as clu_metrics

from moejax.console import say
from moejax.moe import stats
from moejax.parallel import mesh_shape


class DivergenceError(FloatingPointError):
    """The loss, the gradient norm or the parameters became NaN or Inf."""


def layer_metric(num_layers: int, num_experts: int) -> type[clu_metrics.Metric]:
    """A clu metric over the MoE layers' records (``layer_stats``, a RoutedStats stacked [L]): the mean of every
    LAYER_STATS value over steps, and the routed slots per expert summed over steps ([L, E])."""

    @flax.struct.dataclass
    class LayerStats(clu_metrics.Metric):
        layer: jax.Array  # [L] int32
        totals: jax.Array  # [L, len(LAYER_STATS)]
        count: jax.Array  # []
        load: jax.Array  # [L, E]

        @classmethod
        def empty(cls) -> LayerStats:
            return cls(layer=jnp.zeros((num_layers,), jnp.int32),
                       totals=jnp.zeros((num_layers, len(stats.LAYER_STATS)), jnp.float32),
                       count=jnp.zeros((), jnp.float32), load=jnp.zeros((num_layers, num_experts), jnp.float32))

        @classmethod
        def from_model_output(cls, *, layer_stats: stats.RoutedStats, **_) -> LayerStats:
            values = jnp.stack([getattr(layer_stats, name).astype(jnp.float32) for name in stats.LAYER_STATS], -1)
            return cls(layer=layer_stats.layer, totals=values, count=jnp.ones((), jnp.float32),
                       load=layer_stats.tokens_per_expert.astype(jnp.float32))

        def merge(self, other: LayerStats) -> LayerStats:
            return type(self)(layer=jnp.maximum(self.layer, other.layer), totals=self.totals + other.totals,
                              count=self.count + other.count, load=self.load + other.load)

        def compute(self) -> dict[str, jax.Array]:
            return {"layer": self.layer, "mean": self.totals / jnp.maximum(self.count, 1.0),
                    "load": self.load / jnp.maximum(self.load.sum(-1, keepdims=True), 1e-9)}

    return LayerStats


def metrics_collection(train: bool, num_layers: int = 0, num_experts: int = 0,
                       distill: bool = False, mtp_depth: int = 0) -> type[clu_metrics.Collection]:
    """clu metrics of the train step (loss, aux_loss, grad_norm; mtp_loss_k per multi-token-prediction depth; with
    distill also kd_loss, the unweighted KL to the
    teacher) or of evaluation (loss), with the MoE layers' ``layers`` metric when num_layers > 0."""
    names = ["loss"] + (["aux_loss", "grad_norm"] if train else []) + (["kd_loss"] if train and distill else [])
    names += [f"mtp_loss_{k}" for k in range(1, mtp_depth + 1)] if train else []
    fields: dict[str, Any] = {name: clu_metrics.Average.from_output(name) for name in names}
    if num_layers:
        fields["layers"] = layer_metric(num_layers, num_experts)
    return clu_metrics.Collection.create(**fields)


def computed(metrics: clu_metrics.Collection, with_load: bool = True) -> dict[str, Any]:
    """The metrics' values on the host: floats named '{name}' and 'layers_{i}_{stat}', and (with_load)
    'expert_load' as {'layers_{i}': [fraction per expert]}."""
    values: dict[str, Any] = {}
    for name, value in jax.device_get(metrics).compute().items():
        if name != "layers":
            values[name] = float(value)
            continue
        layers = [f"layers_{int(i)}" for i in value["layer"]]
        for layer, row in zip(layers, value["mean"], strict=True):
            values.update({f"{layer}_{stat}": float(v) for stat, v in zip(stats.LAYER_STATS, row, strict=True)})
        for layer, share in zip(layers, np.asarray(value["load"], np.float64), strict=True):
            values[f"{layer}_maxvio_global"] = float(share.max() / max(share.mean(), 1e-12) - 1.0)
        if with_load:
            values["expert_load"] = {layer: [round(float(v), 6) for v in row]
                                     for layer, row in zip(layers, value["load"], strict=True)}
    return values


def layer_names(values: dict[str, Any]) -> list[str]:
    """The MoE layers ('layers_{i}') present in computed metrics, in layer order."""
    layers = {key.removesuffix("_maxvio") for key in values if key.startswith("layers_") and key.endswith("_maxvio")}
    return sorted(layers, key=lambda layer: int(layer.removeprefix("layers_")))


class MetricWriter:
    """Scalars to TensorBoard event files (tensorboardX, no TensorFlow) and metrics.jsonl; process 0 only.

    Resuming from start_step: metrics.jsonl keeps its records up to start_step (and drops a torn last line), and
    the new TensorBoard event file purges the earlier files' events past start_step (``purge_step``), so both hold
    what the resumed run writes once. A record written again for a (kind, step) already in metrics.jsonl (the final
    evaluation of a run resumed at its last step) replaces the old one there; TensorBoard keeps the event it has.
    """

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
                if isinstance(record, dict) and record.get("step", 0) <= start_step:
                    kept.append((line + "\n", _record_key(record)))
        self._jsonl.write_text("".join(line for line, _ in kept))
        self._written = {key for _, key in kept}
        self._in_tensorboard = set(self._written)
        resumed = any(workdir.glob("events.out.tfevents.*"))
        while any(workdir.glob(f"events.out.tfevents.{int(time.time())}.*")):
            time.sleep(0.05)  # tensorboardX names the file by the second and would overwrite one of this second
        self._tensorboard = tensorboardX.SummaryWriter(logdir=str(workdir), flush_secs=30,
                                                       purge_step=start_step + 1 if resumed else None)

    def write(self, kind: str, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        line = json.dumps({"kind": kind, "step": step, **scalars}) + "\n"
        if (kind, step) in self._written:  # rare: replace the old record
            kept = [old for old in self._jsonl.read_text().splitlines(keepends=True)
                    if _record_key(json.loads(old)) != (kind, step)]
            self._jsonl.write_text("".join(kept) + line)
        else:
            with self._jsonl.open("a") as f:
                f.write(line)
            self._written.add((kind, step))
        if (kind, step) in self._in_tensorboard:
            return
        for name, value in scalars.items():
            if isinstance(value, dict):  # expert_load: one histogram-like scalar set per layer is too many; skip
                continue
            self._tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._enabled:
            self._tensorboard.close()


def _record_key(record: dict) -> tuple[Any, Any]:
    return record.get("kind"), record.get("step")


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



def summary(eval_metrics: dict[str, float], progress: Progress, start_time: float,
            compile_seconds: float, counts: dict[str, int], fingerprint: dict, config: ml_collections.ConfigDict,
            workdir: pathlib.Path, config_name: str | None) -> dict[str, Any]:
    """The summary.json of a finished run."""
    loss, layers = eval_metrics["loss"], layer_names(eval_metrics)
    tokens = progress.trained_steps * config.train.batch_size * config.train.seq_len
    return {
        "config": config_name or workdir.name,
        "workdir": str(workdir),
        "steps": config.train.steps,
        "val_loss": loss,  # nats per token (per byte with the byte tokenizer)
        "val_bits_per_byte": eval_metrics.get("bits_per_byte", loss / math.log(2)),  # over the text's bytes
        "val_bits_per_token": loss / math.log(2),
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
                               for stat in (*stats.LAYER_STATS, "maxvio_global")} for layer in layers},
        "moe_layers_note": "final evaluation, averaged over batches; max_over_mean_load = max_e load / mean_e load, "
                           "maxvio = that - 1, experts_per_token = routed experts per token; the router losses "
                           "are unweighted; maxvio_global = the MaxVio of the load summed over all the batches",
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
    records = [r for r in read_metrics(workdir) if r.get("kind") == "train"]
    result = {}
    for layer in layers:
        values = [r[f"{layer}_maxvio"] for r in records if f"{layer}_maxvio" in r]
        if values:
            result[layer] = {"first": values[0], "last": values[-1], "mean": float(np.mean(values)),
                             "max": float(np.max(values))}
    return result


def print_summary(result: dict[str, Any], path: pathlib.Path | None = None) -> None:
    """The console lines of a summary (path: where it is; default its own 'workdir')."""
    tokens_per_s = result.get("train_tokens_per_s")
    say(f"done: validation loss {result['val_loss']:.4f} nats/token | {result['val_bits_per_byte']:.4f} bits/byte"
       f" | perplexity {result['val_perplexity']:.3f} | "
       f"{f'{tokens_per_s:,.0f}' if tokens_per_s else '-'} train tokens/s | "
       f"{result['params_total']:,} params ({result['params_activated']:,} activated)")
    over_training = result.get("maxvio_over_training") or {}
    for layer, values in (result.get("moe_layers") or {}).items():
        history = over_training.get(layer)
        trend = (f" | train MaxVio {history['first']:.3f} -> {history['last']:.3f} (mean {history['mean']:.3f})"
                 if history else "")
        say(f"  {layer}: max/mean expert load {values['max_over_mean_load']:.3f} | "
            f"dropped {values['drop_fraction']:.4f} | experts/token {values['experts_per_token']:.2f} | "
            f"router entropy {values['router_entropy']:.3f}{trend}")
    say(f"summary: {path or pathlib.Path(result['workdir']) / 'summary.json'}")


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of ``<workdir>/metrics.jsonl`` in file order; a torn last line (a run killed while writing) is
    skipped. Raises FileNotFoundError naming the file when it does not exist."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a moejax run directory?")
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
