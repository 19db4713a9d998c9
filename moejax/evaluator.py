"""The one evaluator: the loss, perplexity, bits per byte and per-MoE-layer statistics of a model config on
evaluation windows, compiled once per config (``Evaluator``), the ``--set`` overrides of how a model is computed
(``EVAL_FIELDS``, ``apply_set``) and the text bytes per token id (``text_bytes_table``). The training loop,
``python -m moejax.evaluate`` (moejax/evaluate.py, which re-exports these), steering, the post-hoc studies and the
quantisation metrics (moejax/quant/metrics.py) use it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checks, model
from moejax.configs import base
from moejax.quant import activation
from moejax.training import metrics as metrics_lib
from moejax.training.step import TrainState, eval_step


class Evaluator:
    """The one evaluator: the loss, bits per byte and per-MoE-layer statistics of one model config on batches
    [B, S + 1] (inputs [:, :-1], targets [:, 1:]), used by the training loop, ``python -m moejax.evaluate``,
    steering and the post-hoc studies.

    The eval step is built once per config (and compiled once per batch shape, by jax.jit's cache) and takes the
    variables and the routing intervention as arguments: evaluating other weights of the same model, or the same
    weights under many interventions, reuses one compiled program. ``overrides``: ``--set``-style assignments
    (``FIELD=VALUE``, FIELD one of EVAL_FIELDS) applied to a copy of config. ``bytes_table``: text bytes per token id
    (``text_bytes_table``; None: one byte per token), which turns nats per token into bits per byte.
    ``mesh``: the model's device mesh (expert parallelism) and ``shardings``: the (variables, metrics, batch)
    shardings on it with which the step is compiled (the training loop's); no intervention then. ``activations``:
    quantisation rules (``moejax.quant.Rule``) whose activation formats fake-quantise the inputs of their matrices in
    the forward pass (moejax/quant/activation.py; the weights are the variables as given)."""

    def __init__(self, config: ml_collections.ConfigDict, *, overrides: Iterable[str] = (),
                 bytes_table: np.ndarray | None = None, mesh: Any = None,
                 shardings: tuple[Any, Any, Any] | None = None, activations: Sequence[Any] = ()):
        overrides = list(overrides)
        if overrides:
            config = ml_collections.ConfigDict(config.to_dict())
            for assignment in overrides:
                apply_set(config, assignment)
        self.config, self.bytes_table = config, bytes_table
        cfg = config.model
        self.module = model.Transformer(cfg, mesh=mesh)
        self.empty = metrics_lib.metrics_collection(False, len(model.moe_layers(cfg)), cfg.moe.num_experts).empty()

        activations = list(activations)

        def step(variables: dict[str, Any], values: Any, batch: jax.Array, intervention: Any) -> Any:
            state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], opt_state=None,
                               moe_state=variables.get("moe_state", {}))
            with activation.context(config, variables["params"], activations):
                return eval_step(state, values, batch, module=self.module, intervention=intervention)

        def token_losses(variables: dict[str, Any], batch: jax.Array, intervention: Any) -> jax.Array:
            extra = {} if intervention is None else {"intervention": intervention}
            with activation.context(config, variables["params"], activations):
                logits = self.module.apply(variables, batch[:, :-1], train=False, **extra).astype(jnp.float32)
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(log_probs, batch[:, 1:, None], axis=-1)[..., 0]

        if shardings is None:
            self._step = jax.jit(step)
        else:
            variables_sharding, metrics_sharding, batch_sharding = shardings
            self._step = jax.jit(lambda v, m, b, iv: step(v, m, b, None),
                                 in_shardings=(variables_sharding, metrics_sharding, batch_sharding, None),
                                 out_shardings=metrics_sharding)
        self._token_losses = jax.jit(token_losses)

    def __call__(self, variables: dict[str, Any], batches: Iterable[Any], *, intervention: Any = None,
                 bytes_per_token: float | None = None, with_load: bool = True,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """'loss' (nats per token), 'perplexity', 'bits_per_byte', 'tokens', 'text_bytes' and per MoE layer
        'layers_{i}_{stat}' (moejax.moe.stats.LAYER_STATS), with 'expert_load' {'layers_{i}': fractions} when
        with_load. The text bytes come from the bytes table on the host batches, or from bytes_per_token (the mean
        over the batches, for batches that are not on this host). progress(tokens so far) after each batch."""
        variables = {key: variables[key] for key in ("params", "moe_state") if variables.get(key) is not None}
        variables.setdefault("moe_state", {})
        values, tokens, text_bytes = self.empty, 0, 0.0
        for batch in batches:
            values = self._step(variables, values, batch if isinstance(batch, jax.Array) else
                                jnp.asarray(batch, jnp.int32), intervention)
            count = math.prod(batch.shape) - batch.shape[0]
            tokens += count
            if bytes_per_token is None and self.bytes_table is not None:
                text_bytes += float(self.bytes_table[np.asarray(batch)[:, 1:]].sum())
            elif bytes_per_token is None:
                text_bytes += count
            if progress:
                progress(tokens)
        if not tokens:
            raise ValueError("evaluate: no batches (the data's validation split is empty)")
        if bytes_per_token is not None:
            text_bytes = bytes_per_token * tokens
        result = metrics_lib.computed(values, with_load=with_load)
        loss = result["loss"]
        result.update(perplexity=math.exp(min(loss, 700.0)), bits_per_byte=loss * tokens / (text_bytes * math.log(2)),
                      tokens=tokens, text_bytes=text_bytes)
        return result

    def token_losses(self, variables: dict[str, Any], batch: np.ndarray, intervention: Any = None) -> np.ndarray:
        """Cross-entropy in nats at every target position of batch [B, S + 1]: [B, S] float64."""
        variables = {key: variables[key] for key in ("params", "moe_state") if variables.get(key) is not None}
        return np.asarray(self._token_losses(variables, jnp.asarray(batch, jnp.int32), intervention), np.float64)


# Fields --set may change (configs/base.py FIELD_ROLES 'eval'): how the model computes, never what its weights are.
EVAL_FIELDS = base.fields_with("eval")


def apply_set(config: ml_collections.ConfigDict, assignment: str, *, validate: bool = True) -> None:
    """Applies one ``--set FIELD=VALUE`` to config (in place): FIELD one of EVAL_FIELDS, VALUE parsed as the field's
    type (a number for a float field or one that is None, 'None' to unset it). ConfigError naming the flag, the
    value and what is allowed, also (with validate) when the result fails the model's checks."""
    field, sep, text = assignment.partition("=")
    field, text = field.strip(), text.strip()
    if not sep or field not in EVAL_FIELDS:
        raise checks.ConfigError(f"--set={assignment!r}: must be FIELD=VALUE with FIELD one of "
                                 f"{', '.join(EVAL_FIELDS)}")
    *path, name = field.split(".")
    node = config
    for part in path:
        node = node[part]
    current = node[name]
    if text in ("None", "none") and current is not None:
        raise checks.ConfigError(f"--set={assignment!r}: {field} cannot be None")
    try:
        if text in ("None", "none"):
            value = None
        elif isinstance(current, bool):
            value = {"true": True, "false": False}[text.lower()]
        elif isinstance(current, int):
            value = int(text)
        elif isinstance(current, float) or current is None:
            value = float(text)
        else:
            value = text
    except (KeyError, ValueError):
        raise checks.ConfigError(f"--set={assignment!r}: {field} takes a {type(current).__name__}") from None
    node[name] = value
    if validate:
        model.validate(config.model)


def text_bytes_table(tokenizer: Any, vocab_size: int) -> np.ndarray | None:
    """Text bytes per token id [vocab_size] float64 (ids past the tokenizer's vocabulary: 0); None for the byte
    tokenizer (one byte per token)."""
    if tokenizer is None or tokenizer.spec == "bytes":
        return None
    return np.asarray([tokenizer.token_bytes(i) if i < tokenizer.vocab_size else 0 for i in range(vocab_size)],
                      np.float64)
