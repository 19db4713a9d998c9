"""What the dense released families (llama, mistral, qwen2, qwen3, olmo2, phi3) share: a model with no MoE layer
(``model.moe_every=0``) and a GLU of ``intermediate_size`` in every layer, the rotary scalings transformers' rotary
embedding gives every one of them ('llama3', 'linear', 'yarn', 'longrope'), and the per-layer sliding windows
(``sliding_window`` on every layer, or Qwen's ``use_sliding_window`` / ``max_window_layers`` / ``layer_types``).
Not a family itself: the family modules import it."""
from __future__ import annotations

import math
from typing import Any

import ml_collections

from moejax.hf import config
from moejax.hf.config import HFConfig, Saving
from moejax.layout import moe_layers

SCALED_KINDS = ("llama3", "linear", "longrope")  # read here; 'yarn' by config.read_rope


def read_dense(hf: HFConfig, m: ml_collections.ConfigDict, eps_default: float, theta_default: float = 10000.0,
               rope_kinds: tuple[str, ...] = ("llama3", "linear", "yarn", "longrope")) -> None:
    """The fields every dense family reads: config.read_common, grouped-query attention with its rotary embedding
    (the scalings ``rope_kinds``), no MoE layer, the GLU width."""
    config.read_common(hf, m, eps_default)
    scaled = _take_scaling(hf, theta_default, rope_kinds)
    config.read_gqa(hf, m, theta_default)
    if scaled is not None:
        _read_scaling(hf, m, scaled)
    m.moe_every = 0
    m.ffn_dim = hf.need("intermediate_size")


def write_dense(m: ml_collections.ConfigDict, s: Saving, architecture: str,
                rope_kinds: tuple[str, ...] = ("llama3", "linear", "yarn", "longrope")) -> dict[str, Any]:
    """config.json's common fields of a dense model (after Saving checks naming what the family cannot express)."""
    name = s.model_type
    s.need("moe_every", not moe_layers(m), f"{name} is dense: it has no MoE layers (set model.moe_every=0)")
    s.need("mtp_depth", not m.get("mtp_depth", 0), f"{name} has no multi-token-prediction modules")
    s.need("rope_scaling.kind", m.rope_scaling.kind in ("none", *rope_kinds),
           f"{name}'s rotary scalings in moejax: {', '.join(('none', *rope_kinds))}")
    common = m.copy_and_resolve_references()  # write_common writes 'none' and 'yarn'; the others are written here
    if m.rope_scaling.kind != "yarn":
        common.rope_scaling.kind = "none"
    out = config.write_common(common, s, architecture)
    config.write_gqa(m, s, out)
    rs = m.rope_scaling
    if rs.kind in ("llama3", "linear"):
        out["rope_scaling"] = {"rope_type": rs.kind, "factor": rs.factor}
        if rs.kind == "llama3":
            out["rope_scaling"].update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                                       original_max_position_embeddings=rs.original_max_position_embeddings)
            out["max_position_embeddings"] = int(math.ceil(rs.factor * rs.original_max_position_embeddings))
    elif rs.kind == "longrope":
        s.need("rope_scaling.long_mscale", rs.short_mscale == rs.long_mscale,
               f"{name}'s LongRoPE scales cos and sin by one attention factor for short and long sequences "
               f"(short_mscale={rs.short_mscale})")
        out["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(rs.short_factor),
                               "long_factor": list(rs.long_factor), "attention_factor": rs.short_mscale,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
        out["max_position_embeddings"] = max(out["max_position_embeddings"], rs.original_max_position_embeddings + 1)
    out["intermediate_size"] = m.ffn_dim
    return out


def _take_scaling(hf: HFConfig, theta_default: float, kinds: tuple[str, ...]) -> dict[str, Any] | None:
    """The parameters of a 'llama3' / 'linear' / 'longrope' rotary scaling (``rope_scaling`` first, as transformers
    reads it, else ``rope_parameters``), taken out of the HFConfig being read so that config.read_gqa sees the
    default embedding at the same theta. A scaling not in ``kinds`` is refused."""
    params = hf.raw.get("rope_scaling") or hf.raw.get("rope_parameters")
    if not isinstance(params, dict):
        return None
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", *kinds):
        hf.refuse("rope_scaling", params, f"{hf.model_type}'s rotary scalings in moejax: {', '.join(kinds)}")
    if kind not in SCALED_KINDS:
        return None
    params = dict(params, rope_type=kind)
    params.pop("type", None)
    theta = params.pop("rope_theta", None) or hf.raw.get("rope_theta") or theta_default
    hf.raw["rope_scaling"] = None
    hf.raw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    for key in ("partial_rotary_factor",):  # read by the family before (phi3) or refused by read_gqa
        if key in params:
            hf.raw["rope_parameters"][key] = params.pop(key)
    return params


def _read_scaling(hf: HFConfig, m: ml_collections.ConfigDict, params: dict[str, Any]) -> None:
    kind = params.pop("rope_type")
    # transformers gives a top-level original_max_position_embeddings (Phi-3's) priority over the one inside
    original = (hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                or hf.get("max_position_embeddings"))
    factor = params.get("factor")
    if kind == "linear":
        m.rope_scaling.update(kind="linear", factor=float(factor))
        return
    if kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                hf.refuse("rope_scaling", params, f"a 'llama3' scaling needs {key}")
        m.rope_scaling.update(kind="llama3", factor=float(factor), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(original))
        return
    for key in ("short_factor", "long_factor"):  # 'longrope', as transformers' _compute_longrope_parameters
        if not params.get(key):
            hf.refuse("rope_scaling", params, f"a 'longrope' scaling needs {key}")
    if factor is None:
        factor = hf.get("max_position_embeddings") / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    m.rope_scaling.update(kind="longrope", short_factor=tuple(float(v) for v in params["short_factor"]),
                          long_factor=tuple(float(v) for v in params["long_factor"]),
                          short_mscale=float(attention_factor), long_mscale=float(attention_factor),
                          original_max_position_embeddings=int(original))


def read_windows(hf: HFConfig, m: ml_collections.ConfigDict, window: int | None, kinds: list[str] | None) -> None:
    """Per-layer attention kinds from transformers' ``layer_types`` ('full_attention' | 'sliding_attention'; None:
    every layer sliding when ``window`` is set) and the window (None: no sliding layer)."""
    if kinds is None:
        kinds = ["sliding_attention" if window else "full_attention"] * m.num_layers
    if len(kinds) != m.num_layers or any(k not in ("full_attention", "sliding_attention") for k in kinds):
        hf.refuse("layer_types", kinds, f"must be {m.num_layers} entries, each 'full_attention' or "
                                        f"'sliding_attention'")
    if "sliding_attention" in kinds:
        if not window:
            hf.refuse("sliding_window", window, "sliding_attention layers need a window")
        m.layer_types = tuple("sliding" if k == "sliding_attention" else "full" for k in kinds)
        m.sliding_window = int(window)


def write_windows(m: ml_collections.ConfigDict) -> tuple[int | None, list[str]]:
    """(sliding_window, layer_types) of config.json for the model's attention kinds."""
    kinds = [("sliding_attention" if t == "sliding" else "full_attention") for t in m.layer_types] or \
        ["full_attention"] * m.num_layers
    return (m.sliding_window if "sliding_attention" in kinds else None), kinds
