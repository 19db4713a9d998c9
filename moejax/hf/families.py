"""The released MoE families: how each one's config.json maps onto moejax's ``model`` config, and back.

``config_from_hf`` maps a transformers config.json (current ``rope_parameters`` or the hub's older ``rope_theta`` /
``rope_scaling`` fields) onto configs/base.py's defaults; ``config_to_hf`` writes the config.json of a moejax model
section as one family (or the first of SAVE_ORDER that can express it). Every field one side cannot represent
raises ``HFConfigError`` naming it; the fields that do not change the logits (token ids, cache flags, loss
coefficients of other trainers) are listed per family and skipped; a field nothing knows is reported. Each direction
has its module: config_read.py (``from_<family>``) and config_write.py (``to_<family>``); this one registers the
families. The tensor names and layouts of each family are in tables.py.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

from moejax.configs import base
from moejax.hf import config_read, config_write
from moejax.hf.config_read import HFConfig, HFConfigError
from moejax.hf.config_write import Saving

__all__ = ["FAMILIES", "SAVE_ORDER", "SUPPORTED", "Family", "HFConfig", "HFConfigError", "config_from_hf",
           "config_to_hf", "family"]


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    from_hf: Callable[[HFConfig, ml_collections.ConfigDict], None]
    to_hf: Callable[[ml_collections.ConfigDict, Saving], dict[str, Any]]
    # config.json fields that change nothing moejax computes at inference, with why
    ignored: frozenset[str] = frozenset()
    # checkpoint layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction modules) are skipped
    extra_layers_note: str | None = None


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", config_read.from_mixtral, config_write.to_mixtral),
    Family("qwen2_moe", config_read.from_qwen2_moe, config_write.to_qwen2_moe),
    Family("qwen3_moe", config_read.from_qwen3_moe, config_write.to_qwen3_moe),
    Family("olmoe", config_read.from_olmoe, config_write.to_olmoe),
    Family("deepseek_v2", config_read.from_deepseek_v2, config_write.to_deepseek_v2,
           frozenset({"ep_size", "seq_aux", "aux_loss_alpha", "n_group", "topk_group"})),
    Family("deepseek_v3", config_read.from_deepseek_v3, config_write.to_deepseek_v3,
           frozenset({"ep_size", "seq_aux", "aux_loss_alpha"}), extra_layers_note="multi-token-prediction layers"),
    Family("gpt_oss", config_read.from_gpt_oss, config_write.to_gpt_oss),
)}
SUPPORTED = tuple(FAMILIES)
# save infers the family from the model config in this order (the first that can express it)
SAVE_ORDER = ("gpt_oss", "deepseek_v3", "deepseek_v2", "olmoe", "qwen3_moe", "qwen2_moe", "mixtral")


def family(model_type: Any) -> Family:
    if model_type not in FAMILIES:
        raise HFConfigError(f"model_type {model_type!r} is not a family moejax reads; supported: "
                            f"{', '.join(SUPPORTED)}")
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
    """The config.json of a moejax model section, as ``model_type`` (default: the first family of SAVE_ORDER that
    can express it). Raises HFConfigError naming the field that the family cannot express."""
    if model_type is not None:
        return family(model_type).to_hf(m, Saving(m, model_type))
    reasons = []
    for name in SAVE_ORDER:
        try:
            return FAMILIES[name].to_hf(m, Saving(m, name))
        except HFConfigError as e:
            reasons.append(f"  {name}: {e}")
    raise HFConfigError("no released family can express this moejax model:\n" + "\n".join(reasons))
