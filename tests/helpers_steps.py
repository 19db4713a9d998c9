"""The train step outside the loop, built the way moejax/training/loop.py builds it: a fresh TrainState, the empty
metrics and the step with the config's objective and post-update hooks."""
import jax
import jax.numpy as jnp
import ml_collections

from moejax import model
from moejax.training import hooks, initialise, metrics, objectives, optim, step
from moejax.training.step import TrainState


def initial_state(config: ml_collections.ConfigDict, module: model.Transformer, tx=None, seq_len: int = 8,
                  key: jax.Array | None = None) -> TrainState:
    """A fresh TrainState of module (the config's optimizer unless tx is given)."""
    tx = optim.make_optimizer(config) if tx is None else tx
    key = jax.random.key(0) if key is None else key
    variables = module.init(key, jnp.zeros((1, seq_len), jnp.int32))
    return initialise.new_state(variables["params"], variables.get("moe_state", {}), tx)


def empty_metrics(config: ml_collections.ConfigDict, train: bool = True):
    """The metrics collection the loop accumulates into, empty."""
    num_layers = len(model.moe_layers(config.model))
    return metrics.metrics_collection(train, num_layers, config.model.moe.num_experts).empty()


def train_step(config: ml_collections.ConfigDict, module: model.Transformer, tx=None, train_key=None):
    """fn(state, metrics, batch) -> (state, metrics, [loss, grad_norm]): one update with the config's objective,
    optimizer (unless tx is given) and hooks."""
    tx = optim.make_optimizer(config) if tx is None else tx
    objective = objectives.from_config(config, module, jax.random.key(0) if train_key is None else train_key)
    return lambda s, m, b: step.train_step(s, m, b, objective=objective, tx=tx, hooks=hooks.from_config(config))
