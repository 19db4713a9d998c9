"""The jitted steps: ``train_step`` (objective, gradient, optimizer update, post-update hooks, metrics) and
``eval_step``. Metrics accumulate on device, inside the step: no eager op runs between steps (on XLA:CPU with many
forced host devices, eager ops queued behind a step with collectives can starve it of threads)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from moejax import model
from moejax.moe import stats
from moejax.training import hooks as hooks_lib
from moejax.training import objectives


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: updates applied so far
    params: Any
    opt_state: optax.OptState
    moe_state: Any  # the 'moe_state' collection: router_bias [E] per MoE layer (empty for dense models)


def layer_outputs(collected: dict[stats.ModulePath, stats.RoutedStats]) -> dict[str, Any]:
    """The model outputs the metrics collections read from a forward pass's ``stats.collect``: ``layer_stats`` (a
    RoutedStats stacked [L] in layer order), absent for a dense model."""
    per_layer = stats.by_layer({path: record for path, record in collected.items()
                                if not (path and str(path[0]).startswith("mtp_"))})  # the MTP modules' own
    return {} if per_layer is None else {"layer_stats": per_layer}


def train_step(state: TrainState, metrics: clu_metrics.Collection, batch: jax.Array, *,
               objective: objectives.Objective, tx: optax.GradientTransformation,
               hooks: Sequence[hooks_lib.Hook] = (), teacher: Any = None
               ) -> tuple[TrainState, clu_metrics.Collection, jax.Array]:
    """One update on batch [B, S + 1]: the new state, metrics merged with this step's, [loss, grad_norm].
    teacher: a distilling objective's teacher variables (an argument, not part of the state: never updated). A tx
    with ``trainable`` (optim.Partitioned: LoRA) gets zero gradients for the other parameters, whose backward pass
    is never computed."""
    extra = {} if teacher is None else {"teacher": teacher}
    trainable = getattr(tx, "trainable", None)

    def frozen(p: Any) -> Any:
        if trainable is None:
            return p
        return jax.tree.map(lambda keep, x: x if keep else jax.lax.stop_gradient(x), trainable(p), p)

    grads, report = jax.grad(lambda p: objective(frozen(p), state.moe_state, batch, state.step, **extra),
                             has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    collected = stats.collect(report.moe_aux)
    for hook in hooks:
        new_state = hook(new_state, collected)
    kd = {} if report.kd_loss is None else {"kd_loss": report.kd_loss}
    if report.mtp_loss is not None:
        kd.update({f"mtp_loss_{k}": value for k, value in enumerate(report.mtp_loss, 1)})
    step_metrics = type(metrics).single_from_model_output(loss=report.loss, aux_loss=report.aux_loss,
                                                          grad_norm=grad_norm, **kd, **layer_outputs(collected))
    return new_state, metrics.merge(step_metrics), jnp.stack([report.loss, grad_norm])


def eval_step(state: TrainState, metrics: clu_metrics.Collection, batch: jax.Array, *,
              module: model.Transformer, intervention: Any = None) -> clu_metrics.Collection:
    """metrics merged with those of batch [B, S + 1], the MoE layers in eval mode (train=False); intervention: a
    routing intervention record (moejax/moe/intervention.py) or None."""
    extra = {} if intervention is None else {"intervention": intervention}
    logits, aux = module.apply({"params": state.params, "moe_state": state.moe_state}, batch[:, :-1], train=False,
                               mutable=["moe_aux"], **extra)
    return metrics.merge(type(metrics).single_from_model_output(
        loss=objectives.cross_entropy(logits, batch[:, 1:]), **layer_outputs(stats.collect(aux.get("moe_aux", {})))))
