"""LoRA adapters (Hu et al., arXiv 2106.09685) on the weights that rules over parameter paths pick.

A weight W [in..., out...] that ``model.lora.targets`` picks (a regex, ``re.search``, over its path such as
``layers_0/attn/q/kernel``) gets two parameters beside it in the same module, ``<name>_lora_a`` A [in..., r] and
``<name>_lora_b`` B [r, out...], and its product x W becomes x W + scaling * (dropout(x) A) B, with scaling
alpha / r (alpha / sqrt(r) with rslora, arXiv 2312.03732). A starts as PEFT's: kaiming-uniform (U(-1/sqrt(fan_in),
1/sqrt(fan_in)), torch's ``kaiming_uniform_(a=sqrt(5))`` of nn.Linear) or gaussian (N(0, 1/r^2)); B starts at zero,
so an adapted model computes what its base computes until it trains.

What can be adapted (``ADAPTABLE``): the attention projections (q, k, v, o and the latent ones of MLA), the dense
and shared-expert GLUs (wi_0, wi_1, wo), the routers, the shared-expert gate, the LM head, and the routed experts'
matrices (``experts/wi_0``, ...; not their biases). Routed experts get one adapter per expert, stacked on the expert
axis (``experts/wi_0_lora_a`` [E, D, r], ``experts/wi_0_lora_b`` [E, r, F]: sharded with the experts), or one adapter
every expert adds (``lora.experts='shared'``: ``experts/wi_0_shared_lora_a`` [D, r], ...). Either way the adapter runs
inside the grouped matmul on the routed slots only (moejax/adapters/expert_lora.py ``AdaptedExperts``: x W_e +
scaling * (x A_e) B_e per row of expert e), never on every expert for every token.

Dropout on the adapter's input draws its masks from the 'dropout' rng stream, else from the 'routing' stream that
every training forward pass carries (moejax/training/objectives.py); evaluation and decoding pass neither, so they
run without dropout. Routed-expert adapters draw one mask per routed slot and adapted matrix, which the slot's row
carries through the grouped matmul (moejax/adapters/expert_lora.py ``slot_dropout``; one device only).

The base weights stay frozen in training: the optimizer holds state for the adapters only (``trainable``,
moejax/training/optim.py), and the train step stops the gradient of every other parameter.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import checks, moe, parallel
from moejax.adapters import mixture as mixture_lib
from moejax.moe import experts as moe_experts

INITS = ("kaiming_uniform", "gaussian")
EXPERT_MODES = ("per_expert", "shared")
DROPOUT_STREAMS = ("dropout", "routing")  # the first one a forward pass carries draws the dropout masks
A_SUFFIX, B_SUFFIX, SHARED = "_lora_a", "_lora_b", "_shared"

# The weights adapters can adapt: parameter path suffix -> how many of its leading axes are input axes (the rest
# are output axes). The routed experts' matrices (experts/<name> for name in their kind's ``matrices``) come on top.
ADAPTABLE: dict[tuple[str, ...], int] = {
    **{(p, "kernel"): 1 for p in ("q", "k", "v", "q_a", "q_b", "kv_a", "kv_b")},
    ("o", "kernel"): 2,  # [H, Dh, D]
    ("wi_0",): 1, ("wi_1",): 1, ("wo",): 1,  # dense GLU and fused shared experts
    (moe.ROUTER, "kernel"): 1,  # also Chain-of-Experts' router_{c}
    (moe.SHARED_GATE, "kernel"): 1,
    ("lm_head", "kernel"): 1,
}


# ----------------------------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A ``model.lora`` section that names targets, as the modules read it (frozen, hashable)."""

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 8.0
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming_uniform"
    experts: str = "per_expert"
    mixture: mixture_lib.MixtureSpec | None = None  # LoRA experts and a router per picked weight (mixture.py)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def picks(self, path: Sequence[str]) -> bool:
        """Whether some rule picks the weight at path (module path + parameter name)."""
        joined = "/".join(str(p) for p in path)
        return any(rule.search(joined) for rule in _compiled(self.targets))


@functools.lru_cache(maxsize=64)
def _compiled(targets: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(t) for t in targets)


def spec(model_cfg: ml_collections.ConfigDict) -> LoraSpec | None:
    """The LoraSpec of a ``model`` section, None when it has no ``lora`` section or no targets."""
    lora = model_cfg.get("lora")
    if lora is None or not lora.targets:
        return None
    return LoraSpec(tuple(lora.targets), int(lora.rank), float(lora.alpha), bool(lora.rslora), float(lora.dropout),
                    str(lora.init), str(lora.experts), mixture_lib.spec(lora))


def without_adapters(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a ``model`` section with no adapter targets (the base model)."""
    import copy

    base = copy.deepcopy(model_cfg)
    if base.get("lora") is not None:
        base.lora.targets = ()
    return base


# ----------------------------------------------------------------------------------------------- validation


def validate_fields(model_cfg: ml_collections.ConfigDict) -> None:
    """The ``model.lora`` fields on their own (ConfigError naming the field, its value and what is allowed)."""
    lora = model_cfg.get("lora")
    if lora is None:
        return
    targets = lora.targets
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
        checks.fail("model.lora.targets", targets, "must be a tuple of regexes over parameter paths (re.search), "
                                                   "e.g. ('attn/(q|v)/kernel', 'experts/wi_'); () for no adapters")
    for i, rule in enumerate(targets):
        if not isinstance(rule, str) or not rule:
            checks.fail(f"model.lora.targets[{i}]", rule, "must be a non-empty regex string")
        try:
            re.compile(rule)
        except re.error as e:
            checks.fail(f"model.lora.targets[{i}]", rule, f"is not a regular expression ({e})")
    checks.positive_int("model.lora.rank", lora.rank)
    checks.number("model.lora.alpha", lora.alpha, strict=True)
    if not isinstance(lora.rslora, bool):
        checks.fail("model.lora.rslora", lora.rslora, "must be True or False")
    if not (isinstance(lora.dropout, (int, float)) and not isinstance(lora.dropout, bool) and
            0 <= lora.dropout < 1):
        checks.fail("model.lora.dropout", lora.dropout, "must be a number in [0, 1)")
    checks.choice("model.lora.init", lora.init, INITS)
    checks.choice("model.lora.experts", lora.experts, EXPERT_MODES)
    mixture_lib.validate(model_cfg)


def adaptable_paths(params: Any, model_cfg: ml_collections.ConfigDict) -> list[str]:
    """The paths ('/'-joined, as the rules see them) of the weights of a (base) params tree adapters can adapt."""
    kind = moe_experts.EXPERT_KINDS.get(model_cfg.moe.expert_kind, moe_experts.GLUExperts)
    out = []
    for keys in _leaf_paths(params):
        if is_adapter(keys):
            continue
        if _routed_matrix(keys, kind) or _adaptable_suffix(keys) is not None:
            out.append("/".join(keys))
    return out


def validate_targets(model_cfg: ml_collections.ConfigDict, adaptable: Sequence[str]) -> None:
    """Every rule of ``model.lora.targets`` picks some weight of ``adaptable`` (the base model's
    ``adaptable_paths``), and the weights they pick fit the other fields. ConfigError naming the field otherwise."""
    lora = spec(model_cfg)
    if lora is None:
        return
    for i, rule in enumerate(lora.targets):
        if not any(re.search(rule, path) for path in adaptable):
            shown = ", ".join(adaptable[:8]) + (f", ... ({len(adaptable)} in all)" if len(adaptable) > 8 else "")
            checks.fail(f"model.lora.targets[{i}]", rule,
                        f"picks no weight adapters can adapt (matrices of the attention, dense and shared GLUs, "
                        f"routers, shared-expert gate, routed experts, LM head); this model's are: {shown}")
    picked = [path for path in adaptable if lora.picks(path.split("/"))]
    routed = [p for p in picked if p.split("/")[-2] == moe.EXPERTS]
    if routed and len(model_cfg.moe.expert_placement):
        checks.fail("model.lora.targets", tuple(lora.targets), f"picks routed experts (e.g. {routed[0]}) of a model "
                    f"with model.moe.expert_placement, whose replicas would train apart: unplace the experts first")
    if routed and lora.mixture is not None:
        checks.fail("model.lora.targets", tuple(lora.targets), f"picks routed experts (e.g. {routed[0]}) while "
                    f"model.lora.mixture gives each picked weight LoRA experts: pick dense weights only")
    routers = [p for p in picked if moe.is_router(p.split("/")[-2])]
    if routers and model_cfg.moe.router.frozen:
        checks.fail("model.lora.targets", tuple(lora.targets), f"picks a router ({routers[0]}) while "
                                                               f"model.moe.router.frozen=True keeps routers frozen")


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, Mapping):
        return [p for key, value in tree.items() for p in _leaf_paths(value, (*prefix, str(key)))]
    return [prefix]


def _adaptable_suffix(keys: Sequence[str]) -> int | None:
    """The number of input axes of an adaptable dense weight at keys, None when it is not one."""
    keys = tuple(moe.ROUTER if moe.is_router(k) else k for k in keys)
    if len(keys) >= 2 and keys[-2] == moe.EXPERTS:
        return None
    for suffix in sorted(ADAPTABLE, key=len, reverse=True):
        if keys[-len(suffix):] == suffix:
            return ADAPTABLE[suffix]
    return None


def _routed_matrix(keys: Sequence[str], kind: Any) -> bool:
    return len(keys) >= 2 and keys[-2] == moe.EXPERTS and keys[-1] in kind.matrices


# ----------------------------------------------------------------------------------------------- parameters


def is_adapter(keys: Sequence[Any]) -> bool:
    """Whether the parameter at path keys (strings or jax key entries) is an adapter's A or B."""
    last = keys[-1] if keys else ""
    name = str(getattr(last, "key", getattr(last, "name", last)))
    return name.endswith((A_SUFFIX, B_SUFFIX, mixture_lib.ROUTER_SUFFIX))


def adapter_names(name: str, shared: bool = False) -> tuple[str, str]:
    """The names of weight ``name``'s A and B (routed experts' shared adapters carry ``_shared``)."""
    stem = name + (SHARED if shared else "")
    return stem + A_SUFFIX, stem + B_SUFFIX


def base_name(adapter: str) -> tuple[str, bool, str]:
    """(the adapted weight's name, shared across experts, 'a' | 'b') of an adapter parameter's name."""
    which = "a" if adapter.endswith(A_SUFFIX) else "b"
    stem = adapter[: -len(A_SUFFIX)]
    shared = stem.endswith(SHARED)
    return (stem[: -len(SHARED)] if shared else stem), shared, which


def trainable(params: Any) -> Any:
    """A tree like params: True for the adapters, False for the rest (the frozen base)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_adapter(path), params)


def split(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the base parameters, the adapters) of a params tree, as two nested dicts."""
    base, adapters = {}, {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            b, a = split(value)
            if b:
                base[key] = b
            if a:
                adapters[key] = a
        elif is_adapter((key,)):
            adapters[key] = value
        else:
            base[key] = value
    return base, adapters


def join(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
    """base with adapters added (nested dicts)."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = join(out.get(key, {}), value) if isinstance(value, Mapping) else value
    return out


def a_init(lora: LoraSpec, fan_in: int) -> nn.initializers.Initializer:
    """A's initialiser: PEFT's kaiming-uniform (bound 1/sqrt(fan_in)) or gaussian (std 1/r)."""
    if lora.init == "gaussian":
        return nn.initializers.normal(1.0 / lora.rank)
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _contract(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """x's last n axes against w's first n."""
    return jnp.tensordot(x, w, axes=n)


def dropped(module: nn.Module, lora: LoraSpec, x: jax.Array) -> jax.Array:
    """x with the adapter's dropout applied when the forward pass carries one of DROPOUT_STREAMS."""
    if not lora.dropout or module.is_initializing():
        return x
    stream = next((s for s in DROPOUT_STREAMS if module.has_rng(s)), None)
    if stream is None:
        return x
    keep = jax.random.bernoulli(module.make_rng(stream), 1.0 - lora.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)


def adapter_term(module: nn.Module, lora: LoraSpec | None, name: str, x: jax.Array, kernel_shape: Sequence[int],
                 n_in: int, dtype: Any, param_dtype: Any) -> jax.Array | None:
    """scaling * (dropout(x) A) B for the weight ``name`` [in..., out...] (n_in input axes) of module, declaring A
    and B in module; None when no rule picks module.path/name. x [..., in...] -> [..., out...] in dtype."""
    if lora is None or not lora.picks((*module.path, name)):
        return None
    if lora.mixture is not None:
        return mixture_lib.term(module, lora.mixture, rank=lora.rank, alpha=lora.alpha, rslora=lora.rslora,
                                dropout=lora.dropout,
                                name=name, x=x, kernel_shape=kernel_shape, n_in=n_in, dtype=dtype,
                                param_dtype=param_dtype, a_init=functools.partial(a_init, lora))
    in_shape, out_shape = tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])
    a_name, b_name = adapter_names(name)
    a = module.param(a_name, a_init(lora, math.prod(in_shape)), (*in_shape, lora.rank), param_dtype)
    b = module.param(b_name, nn.initializers.zeros, (lora.rank, *out_shape), param_dtype)
    x = dropped(module, lora, x.astype(dtype))
    h = _contract(x, jnp.asarray(a, dtype), n_in)
    return lora.scaling * _contract(h, jnp.asarray(b, dtype), 1)


def effective_kernel(params: Mapping[str, Any], name: str, lora: LoraSpec | None) -> jax.Array:
    """W + scaling * A B of weight ``name`` in a module's params (W when it has no adapter): for code that reads a
    kernel itself (the absorbed decoding of latent attention)."""
    w = jnp.asarray(params[name])
    a_name, b_name = adapter_names(name)
    if lora is None or a_name not in params:
        return w
    a, b = jnp.asarray(params[a_name], w.dtype), jnp.asarray(params[b_name], w.dtype)
    return w + lora.scaling * _contract(a, b, 1)


class DenseGeneral(nn.DenseGeneral):
    """nn.DenseGeneral (contracting the trailing input axes) plus the LoRA term of its kernel when ``lora`` picks
    it."""

    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        out = super().__call__(inputs)
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        n_in = len(axes)
        if sorted(a % inputs.ndim for a in axes) != list(range(inputs.ndim - n_in, inputs.ndim)):
            raise ValueError(f"adapters contract the trailing input axes; got axis={self.axis}")
        term = adapter_term(self, self.lora, "kernel", inputs, (*inputs.shape[-n_in:], *features), n_in,
                            self.dtype or out.dtype, self.param_dtype)
        return out if term is None else out + term.astype(out.dtype)


class Dense(nn.Dense):
    """nn.Dense plus the LoRA term of its kernel when ``lora`` picks it."""

    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        out = super().__call__(inputs)
        term = adapter_term(self, self.lora, "kernel", inputs, (inputs.shape[-1], self.features), 1,
                            self.dtype or out.dtype, self.param_dtype)
        return out if term is None else out + term.astype(out.dtype)


# ----------------------------------------------------------------------------------------------- logical axes


def _adapter_axes(axes: tuple, n_in: int) -> tuple[tuple, tuple]:
    return (*axes[:n_in], None), (None, *axes[n_in:])


def _register_axes() -> None:
    """Adds the adapters' logical axis names to moejax.parallel.PARAM_AXES: A keeps its weight's input axes and B its
    output axes (so they shard as their weight does), the rank axis is whole."""
    table = parallel.PARAM_AXES
    for suffix, n_in in ADAPTABLE.items():
        a_axes, b_axes = _adapter_axes(table[suffix], n_in)
        for adapter, axes in zip(adapter_names(suffix[-1]), (a_axes, b_axes), strict=True):
            table.setdefault((*suffix[:-1], adapter), axes)
        stem = suffix[-1] + mixture_lib.STEM  # mixtures: A [E, in..., r], B [E, r, out...], router [in..., E]
        for adapter, axes in zip(adapter_names(stem), (a_axes, b_axes), strict=True):
            table.setdefault((*suffix[:-1], adapter), (None, *axes))
        table.setdefault((*suffix[:-1], suffix[-1] + mixture_lib.ROUTER_SUFFIX), (*a_axes[:-1], None))
    for kind in moe_experts.EXPERT_KINDS.values():
        for name in kind.matrices:
            lead, d_in, d_out = kind.param_axes[name]
            a_name, b_name = adapter_names(name)
            table.setdefault((moe.EXPERTS, a_name), (lead, d_in, None))
            table.setdefault((moe.EXPERTS, b_name), (lead, None, d_out))
            a_name, b_name = adapter_names(name, shared=True)
            table.setdefault((moe.EXPERTS, a_name), (d_in, None))
            table.setdefault((moe.EXPERTS, b_name), (None, d_out))


_register_axes()
