"""The released families: a ``Family`` record per transformers ``model_type``, which each family's module in
moejax/hf/families/ registers; and the config mapping through them.

``config_from_hf`` maps a config.json onto configs/base.py's defaults with its family's ``from_hf``, then reports
the fields nothing read (less the family's ``ignored`` and config.GENERIC_IGNORED); ``config_to_hf`` writes a moejax
model section as one family, or as the first that can express it, trying the families newest first (in reverse
order of registration). Every field one side cannot represent raises ``HFConfigError`` naming it; so does a model
field of ``OPT_IN_FIELDS`` away from its default, for every family that does not list it in ``expresses``.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from moejax.configs import base
from moejax.hf.config import HFConfig, HFConfigError, Saving
from moejax.hf.rules import Rule

__all__ = ["FAMILIES", "Family", "config_from_hf", "config_to_hf", "family", "register"]


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    from_hf: Callable[[HFConfig, ml_collections.ConfigDict], None]  # config.json -> model section, in place
    to_hf: Callable[[ml_collections.ConfigDict, Saving], dict[str, Any]]  # model section -> config.json
    # tensor rules of the parameters inside layers_{i} (the top-level ones are rules.TOP_RULES in every family)
    layer_rules: Mapping[str, Rule]
    # config.json fields that change nothing moejax computes at inference
    ignored: frozenset[str] = frozenset()
    # checkpoint layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction modules) are skipped
    extra_layers_note: str | None = None
    # checkpoint tensors outside the layers that transformers skips too (ERNIE 4.5's mtp_* weights): the names
    # starting with one of these are skipped on load with a note naming them
    skipped_prefixes: tuple[str, ...] = ()
    # the OPT_IN_FIELDS whose non-default values this family's to_hf writes
    expresses: frozenset[str] = frozenset()


# Model fields that only some families express, with the value every other family has: a family must name such a
# field in Family.expresses to be given a model whose value differs (the others would drop it from their config.json
# and write a model transformers computes differently).
OPT_IN_FIELDS: dict[str, Any] = {"norm": "rms", "lm_head_bias": False, "partial_rotary_factor": 1.0,
                                 "attention_gate": False,
                                 "norm_position": "pre", "mtp_depth": 0, "moe_shortcut": False,
                                 "mla.lora_scaling": False, "moe.num_identity_experts": 0,
                                 "nope_layers": (), "attention_chunk_size": 0, "attn_temperature_scale": 0.0,
                                 "moe.scale_expert_input": False}


def _field(m: ml_collections.ConfigDict, field: str, default: Any) -> Any:
    """A (dotted) model field's value; ``default`` where the section lacks it (configs older than the field)."""
    *sections, name = field.split(".")
    for section in sections:
        m = m[section]
    return m.get(name, default)


def _check_opt_in(fam: Family, m: ml_collections.ConfigDict, s: Saving) -> None:
    for field, default in OPT_IN_FIELDS.items():
        if field not in fam.expresses:
            s.need(field, _field(m, field, default) == default, f"{fam.model_type} has no such option (only "
                                                                f"{default!r})")


FAMILIES: dict[str, Family] = {}  # by model_type, in order of registration


def register(fam: Family) -> Family:
    """Adds a family; refuses a model_type registered already."""
    if fam.model_type in FAMILIES:
        raise ValueError(f"a family of model_type {fam.model_type!r} is registered already")
    FAMILIES[fam.model_type] = fam
    return fam


def family(model_type: Any) -> Family:
    if model_type not in FAMILIES:
        raise HFConfigError(f"model_type {model_type!r} is not a family moejax reads; supported: "
                            f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(raw: dict[str, Any]) -> tuple[ml_collections.ConfigDict, HFConfig]:
    """The moejax config (configs/base.py's defaults, ``model`` from config.json) of a transformers config.json, and
    the read config (its ``unused()`` fields are the ones nothing mapped)."""
    fam = family(raw.get("model_type"))
    hf = HFConfig(raw, fam.model_type)
    config = base.get_config()
    fam.from_hf(hf, config.model)
    unused = hf.unused(fam.ignored)
    if unused:
        print(f"moejax.hf: {fam.model_type} config.json fields the conversion does not know, ignored (they are "
              f"not among the fields transformers' {fam.model_type} model reads): {', '.join(unused)}",
              file=sys.stderr)
    return config, hf


def config_to_hf(m: ml_collections.ConfigDict, model_type: str | None = None) -> dict[str, Any]:
    """The config.json of a moejax model section, as ``model_type`` (default: the first family, newest first, that
    can express it). Raises HFConfigError naming the field that the family cannot express."""
    if model_type is not None:
        fam = family(model_type)
        _check_opt_in(fam, m, Saving(m, model_type))
        return fam.to_hf(m, Saving(m, model_type))
    reasons = []
    for fam in reversed(FAMILIES.values()):
        try:
            _check_opt_in(fam, m, Saving(m, fam.model_type))
            return fam.to_hf(m, Saving(m, fam.model_type))
        except HFConfigError as e:
            reasons.append(f"  {fam.model_type}: {e}")
    raise HFConfigError("no released family can express this moejax model:\n" + "\n".join(reasons))
