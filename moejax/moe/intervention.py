"""Routing interventions: one record, passed to the forward, that changes the routing of chosen MoE layers and
experts without editing the model or its parameters (expert silencing and steering, SCMoE's weak routing). This
module holds the record and its constructors; ``intervene.py`` holds how the MoE layer applies it to a router's
``Routing`` (``check_router``, ``selection_bias``, ``apply``).

``Intervention`` is a pytree (a jit argument): its array fields have one row per model layer (``[L, E]`` or
``[L]`` with L = ``model.num_layers``, dense layers included: their rows are never read), so that the MoE layer
indexes them by its model layer index, a traced int32 scalar under ``nn.scan``. Its static fields (part of the
treedef, a change recompiles) say which operations are in use and where the scale applies.

    mask   [L, E] bool     the expert is never selected
    force  [L, E] bool     the expert is always selected (takes a slot; its weight from the real router scores)
    scale  [L, E] float32  its combine weight is multiplied by the factor (>= 0): reinforce (> 1), dampen (< 1)
    top_k  [L] int32       0: unchanged; 1 <= k' <= model.moe.top_k: the k' best-ranked slots are kept
    rank   [L] int32       0: off; 1 <= r <= model.moe.num_experts (and <= the layer's top_k when it has one):
                           only the expert the router ranks r-th, a rank past model.moe.top_k included (SCMoE's
                           weak routing), with the weight ``rank_weight`` says
    scale_after_norm (static, default True): the scale multiplies the final combine weight (after the router's
                     renormalisation); False: it multiplies the weight before the renormalisation, which then
                     restores the router's total (a no-op for a lone selected expert)
    rank_weight (static, default None): the rank-r expert's weight: 'score' its router probability
                     (``Routing.probs``: the softmax over every expert, or the sigmoid score; not renormalised, not
                     times routed_scaling_factor), 'one' weight 1; None: the authors' choice for the router
                     (``rank_weight_for``: 'one' where it renormalises, ``RouterSpec.renormalises``, else 'score')
    ops (static): the operations in use, a subset of OPS (set by the constructors; the layer applies only these)

Where the MoE layer (moejax/moe/layer.py) applies them, per routed pass (every Chain-of-Experts pass alike):

1. selection (``selection_bias``): mask adds -inf and force +inf to the expert's selection-only bias
   (``RouterContext.bias``), so every router that ranks experts by ``scores + bias`` never / always selects it, while
   the weights still come from the router's real scores (a masked expert's softmax probability stays in the other
   experts' denominator when the router does not renormalise: see the table below).
2. post-step on the router's ``Routing`` (``apply``), in this order: slots of a masked expert become null (id E,
   weight 0; only possible when fewer than k unmasked candidates remain, e.g. under group limits); slots ranked
   past the layer's top_k become null; rank keeps the rank-r expert alone (``rank_weight``) in slot r-1, or,
   for r past the router's top_k, in slot 0 (the others null); the scale (before the
   renormalisation when ``scale_after_norm`` is False); routers that renormalise their weights
   (``RouterSpec.renormalises``) have the kept weights rescaled to the router's own total (sum over the slots
   before the intervention: routed_scaling_factor, or 1), not on rank layers; the scale (when
   ``scale_after_norm``).

Slots are ranked by the router's selection score (scores + selection bias, so a forced expert ranks first); each
router that ranks returns its slots in that order. Ranks 1..top_k are the router's own slots; a rank r past top_k is
the (r - top_k)-th expert outside them in the ranking of the router's own function run with top_k = every expert
(its logits, the selection-only bias ``apply`` is given, else the intervention's mask and force alone: a learned
selection bias, aux-loss-free balancing, then orders only ranks 1..top_k), masked experts skipped. A rank the router
would not fill (past top_p's nucleus, past SMoE-Dropout's eval_top_k) routes the token to no expert; group-limited
routing ranks only the experts of its router.topk_groups kept groups.

SCMoE (Shi et al., 2024, arXiv 2405.14507; DavidFanzz/SCMoE ``modeling_models/Mixtral/modeling_mixtral.py`` and
``modeling_models/deepseek-moe/modeling_deepseek.py``) sorts the softmax over every expert, keeps position
``routed_tok`` and renormalises where the router does (Mixtral always, DeepSeekMoE with norm_topk_prob): weight 1
where the router renormalises, the raw probability where it does not; its Mixtral example takes rank 3 with top-2.

What applies is a fact of the router kind's ``RouterSpec`` (moejax/moe/routers.py), never its name:
``ranks_by_score`` (every operation; False: only 'scale', the others raise with the spec's ``unranked`` reason),
``ranks_in_training`` (False: only 'scale' in training), ``renormalises`` (the rescaling in step 2) and
``group_limited`` (forced experts may span at most ``router.topk_groups`` groups). The registered kinds:

| kind          | mask / force                        | scale | top_k, rank     | renormalises           |
|---------------|-------------------------------------|-------|-----------------|------------------------|
| topk          | selection score -/+inf (1)          | yes   | yes             | norm_topk_prob, or     |
|               |                                     |       |                 | softmax after top-k    |
| top_p         | candidates re-ordered: masked never,| yes   | yes             | no (raw probabilities) |
|               | forced first (always kept)          |       |                 |                        |
| adamoe        | real experts only (nulls are not)   | yes   | yes             | yes (over real experts)|
| smoe_dropout  | on its top-k(t) selection           | yes   | yes             | yes (softmax of kept)  |
| expert_choice | evaluation (token choice) only (2)  | yes   | evaluation only | no                     |
| hash          | raises: expert from the token id    | yes   | raises          | -                      |
| thor          | raises: random / all experts        | yes   | raises          | -                      |

(1) group-limited routing: a forced expert's group scores +inf and is kept; a masked expert drops out of its
group's score. (2) in training experts choose tokens (no per-token ranking): only scale applies.

A masked expert equals a router column at -inf (a pruned expert) for routers that renormalise; for those that do
not (softmax before top-k, sigmoid without norm_topk_prob, top_p), the other experts keep their weights (their
probabilities are not re-spread over the unmasked experts).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from moejax import layout
from moejax.moe import routers

OPS = ("mask", "force", "scale", "top_k", "rank")
SELECTION_OPS = ("mask", "force")


class InterventionError(ValueError):
    """An intervention field holds a value the model cannot run with."""


def fail(field: str, value: Any, allowed: str) -> None:
    raise InterventionError(f"intervention field {field}={value!r} is invalid: {allowed}")


def _model_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``model`` section of a whole config, or cfg itself when it is one."""
    return cfg.model if "model" in cfg and "num_layers" not in cfg else cfg


@struct.dataclass
class Intervention:
    """Routing interventions for every layer of a model (see the module docstring for the exact semantics).
    Build with ``Intervention.none`` / ``Intervention.create`` or the helpers (``mask_experts``, ``scale_experts``,
    ``force_experts``, ``limit_top_k``, ``rank_only``) and combine with ``a.merge(b)`` or ``a | b``."""

    mask: jax.Array   # [L, E] bool
    force: jax.Array  # [L, E] bool
    scale: jax.Array  # [L, E] float32
    top_k: jax.Array  # [L] int32, 0 = unchanged
    rank: jax.Array   # [L] int32, 0 = off
    scale_after_norm: bool = struct.field(pytree_node=False, default=True)
    rank_weight: str | None = struct.field(pytree_node=False, default=None)
    ops: tuple[str, ...] = struct.field(pytree_node=False, default=OPS)

    @property
    def num_layers(self) -> int:
        return self.mask.shape[0]

    @property
    def num_experts(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def none(cls, cfg: ml_collections.ConfigDict, *, scale_after_norm: bool = True) -> Intervention:
        """The identity for a model (``cfg``: the ``model`` section or a whole config): no operation in use."""
        cfg = _model_section(cfg)
        num_layers, num_experts = cfg.num_layers, cfg.moe.num_experts
        return cls(mask=jnp.zeros((num_layers, num_experts), bool), force=jnp.zeros((num_layers, num_experts), bool),
                   scale=jnp.ones((num_layers, num_experts), jnp.float32),
                   top_k=jnp.zeros((num_layers,), jnp.int32), rank=jnp.zeros((num_layers,), jnp.int32),
                   scale_after_norm=scale_after_norm, ops=())

    @classmethod
    def create(cls, cfg: ml_collections.ConfigDict, *, mask: Any = None, force: Any = None, scale: Any = None,
               top_k: Any = None, rank: Any = None, scale_after_norm: bool = True,
               rank_weight: str | None = None) -> Intervention:
        """An intervention from whole arrays (mask/force [L, E] bool, scale [L, E], top_k/rank [L] int; None:
        unused), checked against the model config (shapes, ranges; ``check``). The fields given are the ``ops``.
        ``rank_weight``: 'score', 'one' or None (the authors' choice for the router; see the module docstring)."""
        cfg = _model_section(cfg)
        base = cls.none(cfg, scale_after_norm=scale_after_norm).replace(rank_weight=rank_weight)
        given = {"mask": mask, "force": force, "scale": scale, "top_k": top_k, "rank": rank}
        fields = {}
        for name, value in given.items():
            if value is None:
                continue
            want = getattr(base, name)
            array = np.asarray(value)
            if array.shape != want.shape:
                dims = f"model.num_layers={cfg.num_layers}" + (
                    f", model.moe.num_experts={cfg.moe.num_experts}" if want.ndim == 2 else "")
                fail(f"{name}.shape", array.shape, f"must be {want.shape} ({dims})")
            if name in ("mask", "force") and array.dtype != bool:
                fail(f"{name}.dtype", str(array.dtype), "must be bool")
            if name in ("top_k", "rank") and not np.issubdtype(array.dtype, np.integer):
                fail(f"{name}.dtype", str(array.dtype), "must be an integer type")
            fields[name] = jnp.asarray(array, want.dtype)
        ops = tuple(op for op in OPS if given[op] is not None)
        iv = base.replace(ops=ops, **fields)
        iv.check(cfg)
        return iv

    def merge(self, other: Intervention) -> Intervention:
        """Both interventions at once: masks and forces united, scales multiplied, the smaller of two top_k
        limits; two different ranks on a layer, two rank_weight values with both ranking, or two scale_after_norm
        flags with both scaling, raise."""
        if self.mask.shape != other.mask.shape:
            fail("mask.shape", other.mask.shape, f"merging needs equal shapes (got {self.mask.shape} and "
                                                 f"{other.mask.shape})")
        after = self.scale_after_norm
        if "scale" in self.ops and "scale" in other.ops and self.scale_after_norm != other.scale_after_norm:
            fail("scale_after_norm", other.scale_after_norm, "merging two scalings needs the same scale_after_norm")
        if "scale" in other.ops and "scale" not in self.ops:
            after = other.scale_after_norm
        rank_weight = self.rank_weight if "rank" in self.ops else other.rank_weight
        if "rank" in self.ops and "rank" in other.ops and self.rank_weight != other.rank_weight:
            fail("rank_weight", other.rank_weight, f"merging two rank routings needs the same rank_weight (got "
                                                   f"{self.rank_weight!r} and {other.rank_weight!r})")
        ranks = np.asarray(self.rank), np.asarray(other.rank)
        clash = (ranks[0] > 0) & (ranks[1] > 0) & (ranks[0] != ranks[1])
        if clash.any():
            layer = int(np.argmax(clash))
            fail(f"rank[{layer}]", int(ranks[1][layer]), f"the other intervention ranks layer {layer} at "
                                                          f"{int(ranks[0][layer])}")
        limits = np.asarray(self.top_k), np.asarray(other.top_k)
        top_k = np.where(limits[0] == 0, limits[1], np.where(limits[1] == 0, limits[0], np.minimum(*limits)))
        ops = tuple(op for op in OPS if op in self.ops or op in other.ops)
        merged = Intervention(mask=self.mask | other.mask, force=self.force | other.force,
                              scale=self.scale * other.scale, top_k=jnp.asarray(top_k, jnp.int32),
                              rank=jnp.asarray(np.maximum(*ranks), jnp.int32), scale_after_norm=after,
                              rank_weight=rank_weight, ops=ops)
        merged._check_values(None)
        return merged

    __or__ = merge

    def check(self, cfg: ml_collections.ConfigDict) -> None:
        """Raises InterventionError naming the field and value: shapes and dtypes against the model config
        (``model`` section or whole config) always; the values too when they are concrete (not traced)."""
        cfg = _model_section(cfg)
        want = (cfg.num_layers, cfg.moe.num_experts)
        for name in ("mask", "force", "scale"):
            if tuple(getattr(self, name).shape) != want:
                fail(f"{name}.shape", tuple(getattr(self, name).shape),
                     f"must be (model.num_layers={want[0]}, model.moe.num_experts={want[1]})")
        for name in ("top_k", "rank"):
            if tuple(getattr(self, name).shape) != want[:1]:
                fail(f"{name}.shape", tuple(getattr(self, name).shape), f"must be (model.num_layers={want[0]},)")
        if not isinstance(self.scale_after_norm, bool):
            fail("scale_after_norm", self.scale_after_norm, "must be True or False")
        _check_rank_weight(self.rank_weight)
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            fail("ops", self.ops, f"allowed operations are {OPS}")
        self._check_values(cfg)

    def _check_values(self, cfg: ml_collections.ConfigDict | None) -> None:
        """The value checks (skipped for traced fields); cfg None: those not needing the config."""
        leaves = (self.mask, self.force, self.scale, self.top_k, self.rank)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return
        mask, force, scale, top_k, rank = (np.asarray(x) for x in leaves)
        neutral = {"mask": ~mask.any(), "force": ~force.any(), "scale": (scale == 1).all(), "top_k": ~top_k.any(),
                   "rank": ~rank.any()}
        for op, ok in neutral.items():
            if op not in self.ops and not ok:
                fail("ops", self.ops, f"field {op!r} differs from its neutral value but is not in ops: build "
                                      f"interventions with the constructors, or add {op!r} to ops")
        if not np.isfinite(scale).all() or (scale < 0).any():
            layer, expert = np.argwhere(~np.isfinite(scale) | (scale < 0))[0]
            fail(f"scale[{layer}, {expert}]", float(scale[layer, expert]), "must be a finite number >= 0")
        both = mask & force
        if both.any():
            layer, expert = np.argwhere(both)[0]
            fail(f"force[{layer}, {expert}]", True, "the expert is also masked on that layer")
        beyond = (top_k > 0) & (rank > top_k)
        if beyond.any():
            layer = int(np.argmax(beyond))
            fail(f"rank[{layer}]", int(rank[layer]), f"layer {layer} keeps only its top_k={int(top_k[layer])} "
                                                     "best-ranked slots")
        if cfg is None:
            return
        k = cfg.moe.top_k
        bad = (top_k < 0) | (top_k > k)
        if bad.any():
            layer = int(np.argmax(bad))
            fail(f"top_k[{layer}]", int(top_k[layer]), f"must be 0 (off) or in [1, model.moe.top_k={k}]")
        ranked, allowed = max_rank(cfg)
        bad = (rank < 0) | (rank > ranked)
        if bad.any():
            layer = int(np.argmax(bad))
            fail(f"rank[{layer}]", int(rank[layer]), f"must be 0 (off) or in [1, {allowed}]")
        width = cfg.moe.num_experts + cfg.moe.num_null_experts
        router = cfg.moe.router
        if routers.spec(router.kind).group_limited and router.num_groups > 1:
            groups = force.reshape(force.shape[0], router.num_groups, -1).any(-1).sum(-1)
            if (groups > router.topk_groups).any():
                layer = int(np.argmax(groups > router.topk_groups))
                fail(f"force[{layer}]", np.flatnonzero(force[layer]).tolist(),
                     f"forces experts of {int(groups[layer])} groups; model.moe.router.topk_groups="
                     f"{router.topk_groups} are kept")
        for layer in range(mask.shape[0]):
            slots = int(top_k[layer]) or k
            if int(force[layer].sum()) > slots:
                fail(f"force[{layer}]", np.flatnonzero(force[layer]).tolist(),
                     f"forces more experts than the layer's {slots} slots")
            need = max(slots, int(rank[layer]))
            if width - int(mask[layer].sum()) < need:
                fail(f"mask[{layer}]", np.flatnonzero(mask[layer]).tolist(),
                     f"leaves fewer than the layer's {need} experts ({slots} slots" +
                     (f", rank {int(rank[layer])})" if int(rank[layer]) > slots else ")"))


RANK_WEIGHTS = ("score", "one")


def _check_rank_weight(weight: Any) -> None:
    if weight is not None and weight not in RANK_WEIGHTS:
        fail("rank_weight", weight, f"allowed values are {RANK_WEIGHTS} or None (the authors' choice for the router)")


def rank_weight_for(cfg: ml_collections.ConfigDict, weight: str | None = None) -> str:
    """The rank-r expert's weight on a model (``cfg``: a whole config, its ``model`` or ``model.moe`` section):
    ``weight`` when given, else SCMoE's choice for the router: 'one' where it renormalises its selected weights
    (Mixtral's softmax after top-k, norm_topk_prob), 'score' (its probability) where it does not (DeepSeekMoE)."""
    _check_rank_weight(weight)
    if weight is not None:
        return weight
    moe_cfg = cfg if "router" in cfg else _model_section(cfg).moe
    return "one" if routers.renormalises(moe_cfg) else "score"


def max_rank(cfg: ml_collections.ConfigDict) -> tuple[int, str]:
    """(the highest rank a rank intervention may name, the bound in words) for a model (whole config or ``model``
    section): model.moe.num_experts, or the experts of the kept groups under group-limited routing."""
    moe_cfg = _model_section(cfg).moe
    router = moe_cfg.router
    if routers.spec(router.kind).group_limited and router.num_groups > 1:
        kept = router.topk_groups * (moe_cfg.num_experts // router.num_groups)
        return kept, (f"model.moe.router.topk_groups * model.moe.num_experts / model.moe.router.num_groups = {kept} "
                      "(the experts of the kept groups)")
    return moe_cfg.num_experts, f"model.moe.num_experts={moe_cfg.num_experts}"


# ------------------------------------------------------------------ constructors by layer


def _moe_layer_index(cfg: ml_collections.ConfigDict, layer: Any, field: str) -> int:
    layers = layout.moe_layers(cfg)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in layers:
        fail(field, layer, f"must be the index of an MoE layer of the model: {layers}")
    return int(layer)


def _expert_index(cfg: ml_collections.ConfigDict, expert: Any, field: str) -> int:
    num_experts = cfg.moe.num_experts
    if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)) or not 0 <= expert < num_experts:
        fail(field, expert, f"must be an expert index in [0, model.moe.num_experts={num_experts})")
    return int(expert)


def _per_expert(cfg: ml_collections.ConfigDict, experts: Mapping[int, Iterable[int]], name: str) -> np.ndarray:
    cfg = _model_section(cfg)
    out = np.zeros((cfg.num_layers, cfg.moe.num_experts), bool)
    for layer, ids in dict(experts).items():
        layer = _moe_layer_index(cfg, layer, f"{name} layer")
        for e in ([ids] if isinstance(ids, (int, np.integer)) else ids):
            out[layer, _expert_index(cfg, e, f"{name}[{layer}] expert")] = True
    return out


def mask_experts(cfg: ml_collections.ConfigDict, experts: Mapping[int, Iterable[int]]) -> Intervention:
    """{MoE layer index: [expert ids]}: those experts are never selected on those layers."""
    return Intervention.create(cfg, mask=_per_expert(cfg, experts, "mask"))


def force_experts(cfg: ml_collections.ConfigDict, experts: Mapping[int, Iterable[int]]) -> Intervention:
    """{MoE layer index: [expert ids]}: those experts are selected by every token on those layers (each takes a
    slot; its weight is the router's real one)."""
    return Intervention.create(cfg, force=_per_expert(cfg, experts, "force"))


def scale_experts(cfg: ml_collections.ConfigDict, factors: Mapping[int, Mapping[int, float]], *,
                  after_norm: bool = True) -> Intervention:
    """{MoE layer index: {expert id: factor >= 0}}: the expert's combine weight times the factor, after the
    router's renormalisation (``after_norm``) or before it."""
    model = _model_section(cfg)
    scale = np.ones((model.num_layers, model.moe.num_experts), np.float32)
    for layer, row in dict(factors).items():
        layer = _moe_layer_index(model, layer, "scale layer")
        if not isinstance(row, Mapping):
            fail(f"scale[{layer}]", row, "must be a mapping {expert id: factor}")
        for e, factor in row.items():
            scale[layer, _expert_index(model, e, f"scale[{layer}] expert")] *= factor
    return Intervention.create(model, scale=scale, scale_after_norm=after_norm)


def limit_top_k(cfg: ml_collections.ConfigDict, top_k: Mapping[int, int] | int) -> Intervention:
    """{MoE layer index: k'} (an int: every MoE layer): those layers keep their k' best-ranked slots,
    1 <= k' <= model.moe.top_k, renormalised as the router renormalises."""
    model = _model_section(cfg)
    limits = dict.fromkeys(layout.moe_layers(model), top_k) if isinstance(top_k, (int, np.integer)) else dict(top_k)
    row = np.zeros((model.num_layers,), np.int32)
    for layer, k in limits.items():
        layer = _moe_layer_index(model, layer, "top_k layer")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= model.moe.top_k:
            fail(f"top_k[{layer}]", k, f"must be an integer in [1, model.moe.top_k={model.moe.top_k}]")
        row[layer] = k
    return Intervention.create(model, top_k=row)


def rank_only(cfg: ml_collections.ConfigDict, rank: int, layers: Iterable[int] | None = None, *,
              weight: str | None = None) -> Intervention:
    """Each token goes only to the expert it ranks ``rank``-th (1 = the best; up to model.moe.num_experts, past
    top_k too), on ``layers`` (None: every MoE layer): SCMoE's weak routing (arXiv 2405.14507). ``weight``: 'score'
    (the expert's router probability), 'one', or None: the authors' choice for the model's router
    (``rank_weight_for``: 'one' where the router renormalises, else 'score')."""
    model = _model_section(cfg)
    ranked, allowed = max_rank(model)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= ranked:
        fail("rank", rank, f"must be an integer in [1, {allowed}]")
    _check_rank_weight(weight)
    row = np.zeros((model.num_layers,), np.int32)
    for layer in (layout.moe_layers(model) if layers is None else layers):
        row[_moe_layer_index(model, layer, "rank layer")] = rank
    return Intervention.create(model, rank=row, rank_weight=weight)


# ------------------------------------------------------------------ applied by the MoE layer
