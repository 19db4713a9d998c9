"""Which weights a quantisation touches, and in which format: rules over the parameter paths.

The quantisable weights are the model's matrices (``matrices``), each in one target group:

=========== ================================================================================================
target      parameters
=========== ================================================================================================
attention   every attention projection kernel (``attn/{q,k,v,o}/kernel``; MLA's ``q_a, q_b, kv_a, kv_b``)
experts     the routed experts' matrices ``ffn/experts/{wi_0, wi_1, wo}`` (stacked [E, ...]; GPT-OSS's biases stay)
shared      the shared experts' fused GLU ``ffn/shared/{wi_0, wi_1, wo}``
router      the router kernels ``ffn/router/kernel`` (and Chain-of-Experts' ``router_{c}``)
dense       the dense layers' GLU ``ffn/{wi_0, wi_1, wo}``
lm_head     ``lm_head/kernel``
=========== ================================================================================================

Embeddings, norms, biases, attention sinks, the shared-expert gate and the router bias are never quantised.

A ``Rule`` names a target (or ``re:<regex>``, matched in full against the slash-joined parameter path, e.g.
``re:.*/attn/o/kernel``), a format (``moejax.quant.formats``; 'none' keeps the weights), optionally an activation
format (``act``: the matrix's inputs fake-quantised per token in the forward pass, moejax/quant/activation.py) and
optionally the model layers it covers. For every matrix, and every layer a scanned stack holds, the first rule that
matches decides (its weight and its activation format); a matrix no rule matches is kept. ``parse`` reads the
command line's ``TARGET=FORMAT[,ACT][@LAYERS];...``.

Every matrix is viewed as ``[B, K, N]`` (``Matrix.view``): B its leading stacked axes (the scanned layers' unit axis,
the expert axis), K its input width (the leading axes after those; two for the attention output projection
[H, Dh, D]), N its output width, so ``y = x @ W[b]`` and a per-channel scale belongs to one output.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from moejax import moe
from moejax.quant import formats

TARGETS = ("attention", "experts", "shared", "router", "dense", "lm_head")
GLU_MATRICES = ("wi_0", "wi_1", "wo")
ATTENTION_KERNELS = ("q", "k", "v", "o", "q_a", "q_b", "kv_a", "kv_b")
INPUT_AXES = {"o": 2}  # attention kernels whose input spans two axes ([H, Dh, D]); every other matrix has one


@dataclasses.dataclass(frozen=True)
class Matrix:
    """One quantisable parameter: its ``path`` in params, its ``target``, its ``shape``, how many leading axes
    stack it (``batch_ndim``), its input and output widths ``k``, ``n``, and per flat stacked index b (row-major over
    the stacked axes) the model ``layers[b]`` (-1: lm_head) and ``experts[b]`` (-1: not a routed expert)."""

    path: tuple[str, ...]
    target: str
    shape: tuple[int, ...]
    batch_ndim: int
    k: int
    n: int
    layers: tuple[int, ...]
    experts: tuple[int, ...]

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def batch(self) -> int:
        return math.prod(self.shape[:self.batch_ndim])

    def view(self, w: Any) -> Any:
        """The parameter as [B, K, N]."""
        return w.reshape(self.batch, self.k, self.n)


def target(keys: tuple[str, ...]) -> str | None:
    """The target group (``TARGETS``) of a parameter path inside params, or None for a weight never quantised."""
    leaf, parent = keys[-1], keys[-2] if len(keys) > 1 else ""
    if keys == ("lm_head", "kernel"):
        return "lm_head"
    if leaf == "kernel" and parent in ATTENTION_KERNELS and len(keys) > 2 and keys[-3] == "attn":
        return "attention"
    if leaf in GLU_MATRICES:
        if parent == moe.EXPERTS:
            return "experts"
        if parent == moe.SHARED:
            return "shared"
        if parent == "ffn":
            return "dense"
    if leaf == "kernel" and moe.is_router(parent):
        return "router"
    return None


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(_flatten(value, (*prefix, str(key))))
        else:
            out.append(((*prefix, str(key)), value))
    return out


def _block_layers(cfg: ml_collections.ConfigDict, keys: tuple[str, ...]) -> tuple[tuple[int, ...], bool]:
    """(the model layer of each stacked index of the block holding the parameter, whether the block is scanned)."""
    head = keys[0]
    if head.startswith("layers_"):
        return (int(head[len("layers_"):]),), False
    if head == "blocks":  # scanned: blocks/block_j, unit u holds layer first_dense_layers + u * width + j
        width = max(cfg.moe_every, 1)
        units = (cfg.num_layers - cfg.first_dense_layers) // width
        j = int(keys[1][len("block_"):])
        return tuple(cfg.first_dense_layers + u * width + j for u in range(units)), True
    return (-1,), False


def matrices(config: ml_collections.ConfigDict, params: Mapping[str, Any]) -> list[Matrix]:
    """Every quantisable matrix of a model's params (``config`` the whole config), in the params' order."""
    cfg = config.model
    out = []
    for keys, value in _flatten(params):
        group = target(keys)
        if group is None:
            continue
        layers, scanned = _block_layers(cfg, keys)
        shape = tuple(int(d) for d in np.shape(value))
        batch_ndim = int(scanned) + int(group == "experts")
        inputs = INPUT_AXES.get(keys[-2], 1) if group == "attention" else 1
        k = math.prod(shape[batch_ndim:batch_ndim + inputs])
        n = math.prod(shape[batch_ndim + inputs:])
        experts_per = shape[batch_ndim - 1] if group == "experts" else 1
        flat_layers = tuple(layer for layer in layers for _ in range(experts_per))
        flat_experts = tuple(e for _ in layers for e in range(experts_per)) if group == "experts" else \
            (-1,) * len(flat_layers)
        out.append(Matrix(keys, group, shape, batch_ndim, k, n, flat_layers, flat_experts))
    return out


# ------------------------------------------------------------------------------------------------ rules


ACT_HELP = ("a<b> (int<b>, b in 2..8, one scale per token), a<b>/g<G> (per token and group of G inputs), afp8 (E4M3, "
            "per token and 128 inputs), amxfp4 (E2M1 with an E8M0 scale per token and 32 inputs)")


def activation_format(text: Any, field: str = "act") -> formats.Format:
    """The activation format of ``ACT_HELP``'s names as a weight format of the inputs viewed as [1, K, T] (the K
    inputs of T tokens: a scale tile of gk inputs by one token). ValueError naming ``field``."""
    value = str(text).strip().lower() if isinstance(text, str) else ""
    name = {"afp8": f"fp8/{formats.FP8_BLOCK}x1", "amxfp4": "mxfp4"}.get(value)
    match = re.fullmatch(r"a(\d+)(/g\d+)?", value)
    if name is None and match:
        name = f"int{match.group(1)}{match.group(2) or ''}"
    try:
        if name is None:
            raise ValueError(value)
        fmt = formats.parse(name)
    except ValueError:
        raise ValueError(f"{field}={text!r} is not an activation format: allowed are {ACT_HELP}") from None
    return fmt


def activation_name(fmt: formats.Format | None) -> str:
    """``activation_format``'s name back (``ACT_HELP``), 'none' for None."""
    if fmt is None:
        return "none"
    return {"fp8": "afp8", "mxfp4": "amxfp4"}.get(fmt.kind) or "a" + fmt.name[len("int"):]


@dataclasses.dataclass(frozen=True)
class Rule:
    """``target``: one of TARGETS, or 're:<regex>' over the parameter path; ``format``: a format name
    (``formats.FORMAT_HELP``, 'none' keeps); ``layers``: the model layers it covers (None: every layer); ``act``:
    the activation format of the matrices' inputs (``ACT_HELP``; None: kept)."""

    target: str
    format: str
    layers: tuple[int, ...] | None = None
    act: str | None = None


def _check_rule(index: int, rule: Any) -> tuple[Any, formats.Format | None]:
    """(the compiled target: a TARGETS name or a regex, the format); ValueError naming rules[index] and its field."""
    field = f"rules[{index}]"
    if not isinstance(rule, Rule):
        raise ValueError(f"{field}={rule!r} is not a moejax.quant.Rule(target, format, layers)")
    target = rule.target
    if not isinstance(target, str) or not (target in TARGETS or target.startswith("re:")):
        raise ValueError(f"{field}.target={target!r} is invalid: allowed are {', '.join(TARGETS)} or re:<regex> "
                         f"(a regular expression matching whole parameter paths)")
    if target.startswith("re:"):
        try:
            target = re.compile(target[3:])
        except re.error as e:
            raise ValueError(f"{field}.target={rule.target!r} is not a regular expression: {e}") from e
    fmt = formats.parse(rule.format, f"{field}.format")
    if rule.act is not None:
        activation_format(rule.act, f"{field}.act")
    if rule.layers is not None and (not isinstance(rule.layers, (tuple, list)) or not rule.layers or any(
            isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in rule.layers)):
        raise ValueError(f"{field}.layers={rule.layers!r} is invalid: None (every layer) or a non-empty sequence of "
                         f"model layer indices >= 0")
    return target, fmt


def _matches(target: Any, matrix: Matrix) -> bool:
    return target == matrix.target if isinstance(target, str) else target.fullmatch(matrix.name) is not None


def _choices(config: ml_collections.ConfigDict, params: Mapping[str, Any], rules: Sequence[Rule]
             ) -> list[tuple[Matrix, list[int | None], list[formats.Format | None]]]:
    """Per quantisable matrix: (the Matrix, the deciding rule of each stacked index (None: no rule matches), the
    rules' formats); ValueError for a bad rule or one that matches no matrix."""
    checked = [_check_rule(i, rule) for i, rule in enumerate(rules)]
    found = matrices(config, params)
    out = []
    used = [False] * len(rules)
    for matrix in found:
        chosen: list[int | None] = []
        for layer in matrix.layers:
            pick = None
            for i, ((target, _), rule) in enumerate(zip(checked, rules, strict=True)):
                if _matches(target, matrix) and (rule.layers is None or layer in rule.layers):
                    used[i] = True
                    pick = i
                    break
            chosen.append(pick)
        out.append((matrix, chosen, [fmt for _, fmt in checked]))
    for i, rule in enumerate(rules):
        if not used[i]:
            layers = sorted({layer for m in found for layer in m.layers if layer >= 0})
            raise ValueError(f"rules[{i}]={rule!r} matches no quantisable matrix of this model (targets present: "
                             f"{', '.join(sorted({m.target for m in found}))}; model layers {layers}; a regex must "
                             f"match a whole path such as {found[0].name if found else 'layers_0/attn/q/kernel'})")
    return out


def assign(config: ml_collections.ConfigDict, params: Mapping[str, Any], rules: Sequence[Rule]
           ) -> dict[str, tuple[Matrix, list[formats.Format | None]]]:
    """``{matrix name: (Matrix, the format of each stacked index, None where kept)}`` for every matrix some rule
    quantises. ValueError naming the rule and field for a bad rule, a rule matching no quantisable matrix, or
    layers the model does not have."""
    out = {}
    for matrix, chosen, fmts in _choices(config, params, rules):
        picked = [None if i is None else fmts[i] for i in chosen]
        if any(fmt is not None for fmt in picked):
            out[matrix.name] = (matrix, picked)
    return out


def activations(config: ml_collections.ConfigDict, params: Mapping[str, Any], rules: Sequence[Rule]
                ) -> dict[str, tuple[Matrix, list[formats.Format | None]]]:
    """As ``assign`` for the rules' activation formats (``activation_format`` of ``Rule.act``): ``{matrix name:
    (Matrix, the activation format of each stacked index, None where the inputs are kept)}``."""
    out = {}
    for matrix, chosen, _ in _choices(config, params, rules):
        picked = [None if i is None or rules[i].act is None else activation_format(rules[i].act) for i in chosen]
        if any(fmt is not None for fmt in picked):
            out[matrix.name] = (matrix, picked)
    return out


def parse(text: str, field: str = "rules", activations: bool = False) -> list[Rule]:
    """Rules from ``TARGET=FORMAT[,ACT][@LAYERS];...`` (ACT an activation format, ``ACT_HELP``; LAYERS:
    comma-separated model layers or ranges a-b), e.g. ``experts=int4/g128;attention=int8,a8@0-3;router=none``.
    ``activations``: whether ACT is allowed (where the forward pass is run: quantisation-aware training,
    ``moejax.evaluate``; a checkpoint stores weights only). ValueError naming ``field``."""
    rules = []
    for i, item in enumerate(part.strip() for part in str(text).split(";")):
        if not item:
            continue
        target, sep, rest = item.rpartition("=")
        if not sep or not target:
            raise ValueError(f"{field}: {item!r} is not TARGET=FORMAT[,ACT][@LAYERS] (TARGET one of "
                             f"{', '.join(TARGETS)} or re:<regex>; FORMAT {formats.FORMAT_HELP}; ACT {ACT_HELP})")
        fmt, _, layer_text = rest.partition("@")
        fmt, comma, act = fmt.partition(",")
        if comma and not activations:
            raise ValueError(f"{field}: {item!r} quantises activations ({act.strip()!r}), which a stored model "
                             f"does not hold: activation formats are for quantisation-aware training "
                             f"(config.quant.rules) and python -m moejax.evaluate --quantise")
        layers = None
        if layer_text:
            try:
                layers = tuple(sorted({i for piece in layer_text.split(",") for i in _range(piece)}))
            except ValueError as e:
                raise ValueError(f"{field}: {item!r} has layers {layer_text!r}: expected comma-separated layer "
                                 f"indices or ranges a-b") from e
        rules.append(Rule(target.strip(), fmt.strip(), layers, act.strip() if comma else None))
    if not rules:
        raise ValueError(f"{field}={text!r} holds no rule: expected TARGET=FORMAT[,ACT][@LAYERS];...")
    for i, rule in enumerate(rules):
        _check_rule(i, rule)
    return rules


def _range(piece: str) -> range:
    low, dash, high = piece.strip().partition("-")
    low_i, high_i = int(low), int(high) if dash else int(low)
    if low_i < 0 or high_i < low_i:
        raise ValueError(piece)
    return range(low_i, high_i + 1)
