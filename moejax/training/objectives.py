"""Training objectives: what the train step differentiates. An objective runs the model's forward pass (once or more)
and returns the value to minimise with a ``Report`` (the task loss to log, the weighted router losses, and the
'moe_aux' collection whose statistics feed the metrics and the post-update hooks).

* ``cross_entropy_loss``: next-token cross-entropy + the router losses.
* ``consistency_loss`` (THOR, arXiv 2110.04260): the batch runs twice with independent routing draws;
  CE_1 + CE_2 + coef * symmetric KL(p_1, p_2) + both passes' router losses; the reported loss is (CE_1 + CE_2) / 2.
* ``distillation_loss`` (MC-SMoE's recovery, arXiv 2310.01334): ce_weight * CE + weight * KL(p_T || q_T) + the
  router losses, p_T = softmax(teacher logits / T) and q_T = softmax(student logits / T) (``distillation_kl``); the
  teacher's logits come from its forward pass on the same inputs (eval mode, under stop_gradient); the reported loss
  is the CE, and ``Report.kd_loss`` the unweighted KL.

Adding an objective: a function ``loss(forward, targets, key) -> (value, Report)`` and a line in ``from_config``.
The router losses' coefficients (``model.moe.balance_coef``, ``device_balance_coef``, ``z_loss_coef``,
``entropy_loss_coef``) are applied here, to the unweighted losses the MoE layers record (moejax/moe/stats.py).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from moejax import checks, model
from moejax.adapters import mixture as lora_mixture
from moejax.moe import routers, stats
from moejax.quant import qat

Forward = Callable[[jax.Array], tuple[jax.Array, dict]]  # key -> (logits [B, S, V], 'moe_aux' collection)


@struct.dataclass
class Report:
    loss: jax.Array  # [] the task loss to log
    aux_loss: jax.Array  # [] the weighted router losses
    moe_aux: Any  # the 'moe_aux' collection of the (first) forward pass
    kd_loss: jax.Array | None = None  # [] distillation: the unweighted KL to the teacher (None without a teacher)
    mtp_loss: jax.Array | None = None  # [D] multi-token prediction: each depth's cross-entropy (None without MTP)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats. logits: [B, S, V]; targets: [B, S] int."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))


def router_losses(moe_aux: dict, moe_cfg: ml_collections.ConfigDict) -> jax.Array:
    """Sum over MoE layers of balance_coef * balance (+ device_balance_coef * device balance for 'deepseek'),
    then of z_loss_coef * z-loss, then of entropy_loss_coef * router entropy."""
    records = jax.tree.leaves(list(stats.collect(moe_aux).values()),
                              is_leaf=lambda x: isinstance(x, stats.RoutedStats))
    device = moe_cfg.balance_loss == "deepseek" and moe_cfg.device_balance_coef
    balance_coef = moe_cfg.balance_coef if moe_cfg.balance_loss != "none" else 0.0

    def balance(r):
        weighted = balance_coef * r.balance_loss
        return weighted + moe_cfg.device_balance_coef * r.device_balance_loss if device else weighted

    terms = ([balance(r) for r in records] + [moe_cfg.z_loss_coef * r.z_loss for r in records]
             + [moe_cfg.entropy_loss_coef * r.router_entropy for r in records])
    return sum((jnp.sum(t) for t in terms), jnp.zeros((), jnp.float32))


def consistency_kl(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
    """THOR's symmetric consistency loss 1/2 [KL(p_a || p_b) + KL(p_b || p_a)], averaged over positions (as the
    cross-entropy is). logits: [B, S, V]."""
    log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
    log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
    sym = jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=-1)  # KL(a||b) + KL(b||a)
    return 0.5 * jnp.mean(sym)


DISTILL_REDUCTIONS = ("token", "batchmean")


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                    reduction: str = "token", mask: jax.Array | None = None) -> jax.Array:
    """KL(p_T || q_T) per position, p_T = softmax(teacher_logits / T), q_T = softmax(student_logits / T), reduced:
    the authors' ``nn.KLDivLoss(reduction='batchmean')(log_softmax(student / T), softmax(teacher / T))`` (no T^2
    factor). reduction: 'token' (the mean over the positions mask keeps, as the cross-entropy is) or 'batchmean'
    (their sum divided by the batch size B, torch's 'batchmean' on [B, S, V]: S times 'token' without a mask).
    logits: [B, S, V]; mask: [B, S] (1 = the position counts), None for all positions."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    p = jnp.exp(log_p)
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)  # [B, S]; 0 log 0 = 0 as torch's kl_div
    weights = jnp.ones(kl.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    total = jnp.sum(kl * weights)
    if reduction == "batchmean":
        return total / kl.shape[0]
    return total / jnp.maximum(jnp.sum(weights), 1.0)


def mtp_cross_entropy(logits: jax.Array, targets: jax.Array, depth: int) -> jax.Array:
    """Multi-token prediction's loss at ``depth`` k (DeepSeek-V3, section 2.2): the logits at position i predict
    targets[i + k] (the token k + 1 after input i); the last k positions have none and are left out."""
    seq = targets.shape[1]
    if depth >= seq:
        return jnp.zeros((), jnp.float32)
    log_probs = jax.nn.log_softmax(logits[:, :seq - depth].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[:, depth:, None], axis=-1)[..., 0]
    return -picked.mean()


def cross_entropy_loss(forward: Forward, targets: jax.Array, key: jax.Array, *,
                       moe_cfg: ml_collections.ConfigDict) -> tuple[jax.Array, Report]:
    logits, moe_aux = forward(key)
    task, aux = cross_entropy(logits, targets), router_losses(moe_aux, moe_cfg)
    return task + aux, Report(task, aux, moe_aux)


def consistency_loss(forward: Forward, targets: jax.Array, key: jax.Array, *, moe_cfg: ml_collections.ConfigDict,
                     coef: float) -> tuple[jax.Array, Report]:
    logits, moe_aux = forward(key)
    logits_2, moe_aux_2 = forward(jax.random.fold_in(key, 1))
    task, task_2 = cross_entropy(logits, targets), cross_entropy(logits_2, targets)
    aux = router_losses(moe_aux, moe_cfg) + router_losses(moe_aux_2, moe_cfg)
    value = task + task_2 + coef * consistency_kl(logits, logits_2) + aux
    return value, Report((task + task_2) / 2, aux, moe_aux)


def distillation_loss(forward: Forward, targets: jax.Array, key: jax.Array, *, teacher_logits: jax.Array,
                      moe_cfg: ml_collections.ConfigDict, weight: float, temperature: float, ce_weight: float = 1.0,
                      reduction: str = "token") -> tuple[jax.Array, Report]:
    logits, moe_aux = forward(key)
    task, aux = cross_entropy(logits, targets), router_losses(moe_aux, moe_cfg)
    kd = distillation_kl(logits, teacher_logits, temperature, reduction)
    return ce_weight * task + weight * kd + aux, Report(task, aux, moe_aux, kd)


def validate(config: ml_collections.ConfigDict) -> None:
    t = config.train
    checks.number("train.consistency_coef", t.consistency_coef)
    d = config.distill
    checks.number("distill.weight", d.weight)
    checks.number("distill.ce_weight", d.ce_weight)
    checks.number("distill.temperature", d.temperature, strict=True)
    checks.choice("distill.reduction", d.reduction, DISTILL_REDUCTIONS)
    if d.teacher and t.consistency_coef:
        checks.fail("distill.teacher", d.teacher, f"distillation cannot be combined with THOR's consistency loss "
                                                  f"(train.consistency_coef={t.consistency_coef!r}): set one of them")
    kind = config.model.moe.router.kind
    if t.consistency_coef and not routers.spec(kind).needs_rng:
        random_kinds = sorted(k for k, s in routers.ROUTERS.items() if s.needs_rng)
        checks.fail("train.consistency_coef", t.consistency_coef,
                    f"the consistency loss compares two random routings: it needs a router kind in {random_kinds} "
                    f"(got model.moe.router.kind={kind!r}); 0 otherwise")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The train step's objective: ``objective(params, moe_state, batch, step) -> (value, Report)``.

    batch: [B, S + 1] tokens. The step's rng is ``fold_in(train_key, step)`` (split into the 'jitter' and 'routing'
    streams); routers with a schedule get progress = step / total_steps.
    """

    module: model.Transformer
    train_key: jax.Array
    total_steps: int
    loss: Callable[..., tuple[jax.Array, Report]]
    teacher: model.Transformer | None = None  # distillation: the teacher's module (its variables are an argument)
    quantise: Callable[[Any], Any] | None = None  # QAT: params -> fake-quantised params (moejax.quant.qat.Quantiser)

    def __call__(self, params: Any, moe_state: Any, batch: jax.Array, step: jax.Array,
                 teacher: Any = None) -> tuple[jax.Array, Report]:
        """teacher: the teacher's variables {'params', 'moe_state'} when the objective distills."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if self.quantise is not None:
            params = self.quantise(params)
        progress = step.astype(jnp.float32) / self.total_steps
        extra = {}
        if self.teacher is not None:
            if teacher is None:
                raise ValueError("this objective distills: pass the teacher's variables")
            extra["teacher_logits"] = jax.lax.stop_gradient(self.teacher.apply(teacher, inputs, train=False))

        depth = self.module.cfg.get("mtp_depth", 0)
        mtp_logits: list = []  # the first forward pass's multi-token-prediction logits, one [B, S, V] per depth

        def forward(key: jax.Array) -> tuple[jax.Array, dict]:
            jitter_key, routing_key = jax.random.split(key)
            with qat.activations(self.quantise, params):  # QAT's activation quantisers (none without them)
                logits, aux = self.module.apply({"params": params, "moe_state": moe_state}, inputs, train=True,
                                                progress=progress, mutable=["moe_aux", model.MTP_COLLECTION],
                                                rngs={"jitter": jitter_key, "routing": routing_key})
            if depth and not mtp_logits:
                mtp_logits.extend(aux[model.MTP_COLLECTION]["logits"])
            return logits, aux.get("moe_aux", {})

        value, report = self.loss(forward, targets, jax.random.fold_in(self.train_key, step), **extra)
        adapters = lora_mixture.weighted_losses(report.moe_aux, self.module.cfg)  # LoRA experts' balance losses
        value, report = value + adapters, report.replace(aux_loss=report.aux_loss + adapters)
        if not depth:
            return value, report
        per_depth = jnp.stack([mtp_cross_entropy(logits, targets, k) for k, logits in enumerate(mtp_logits, 1)])
        return value + self.module.cfg.mtp_loss_weight * per_depth.mean(), report.replace(mtp_loss=per_depth)


def from_config(config: ml_collections.ConfigDict, module: model.Transformer, train_key: jax.Array,
                teacher: model.Transformer | None = None) -> Objective:
    """The config's objective; with distill.teacher set, teacher is the teacher's module
    (moejax.training.initialise.load_teacher). With quant.rules set, the forward runs on fake-quantised weights."""
    return dataclasses.replace(_objective(config, module, train_key, teacher), quantise=qat.from_config(config))


def _objective(config: ml_collections.ConfigDict, module: model.Transformer, train_key: jax.Array,
               teacher: model.Transformer | None) -> Objective:
    moe_cfg = config.model.moe
    d = config.get("distill")
    if d is not None and d.teacher:
        if teacher is None:
            raise ValueError(f"distill.teacher={d.teacher!r}: from_config needs the teacher's module")
        loss = functools.partial(distillation_loss, moe_cfg=moe_cfg, weight=d.weight, temperature=d.temperature,
                                 ce_weight=d.ce_weight, reduction=d.reduction)
        return Objective(module, train_key, config.train.steps, loss, teacher)
    if config.train.consistency_coef:
        loss = functools.partial(consistency_loss, moe_cfg=moe_cfg, coef=config.train.consistency_coef)
    else:
        loss = functools.partial(cross_entropy_loss, moe_cfg=moe_cfg)
    return Objective(module, train_key, config.train.steps, loss)
