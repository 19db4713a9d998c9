"""Rotary-embedding scalings that only change the frequencies (``model.rope_scaling.kind``): Llama 3.1's
frequency-band scaling ('llama3') and position interpolation ('linear'). moejax/attention.py holds the default
embedding, YaRN and LongRoPE, and calls these for the other kinds.

Both follow transformers' ``_compute_llama3_parameters`` / ``_compute_linear_scaling_rope_parameters``
(modeling_rope_utils.py): the default frequencies theta^(-2i/dim) in float32, then scaled; neither scales cos and sin.
"""
import math

import ml_collections
import numpy as np

from moejax import checks

KINDS = ("llama3", "linear")


def validate(rs: ml_collections.ConfigDict) -> None:
    """The fields of ``model.rope_scaling`` its kind (one of KINDS) reads."""
    checks.number("model.rope_scaling.factor", rs.factor, minimum=1.0)
    if rs.kind != "llama3":
        return
    checks.positive_int("model.rope_scaling.original_max_position_embeddings", rs.original_max_position_embeddings)
    checks.number("model.rope_scaling.low_freq_factor", rs.low_freq_factor, strict=True)
    checks.number("model.rope_scaling.high_freq_factor", rs.high_freq_factor, strict=True)
    if rs.high_freq_factor < rs.low_freq_factor:  # equal: no smooth band (Llama 4 Scout's release)
        checks.fail("model.rope_scaling.high_freq_factor", rs.high_freq_factor,
                    f"must be at least model.rope_scaling.low_freq_factor={rs.low_freq_factor}")


def _default(dim: int, theta: float) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)


def inv_freq(dim: int, theta: float, rs: ml_collections.ConfigDict) -> np.ndarray:
    """The rotary frequencies [dim // 2] float32 of ``dim`` rotary dims under rs (``model.rope_scaling``)."""
    base = _default(dim, theta)
    factor = np.float32(rs.factor)
    if rs.kind == "linear":
        return (base / factor).astype(np.float32)
    if rs.kind != "llama3":
        raise ValueError(f"model.rope_scaling.kind={rs.kind!r} is not one of {KINDS}")
    old = rs.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = np.float32(2 * math.pi) / base
    scaled = np.where(wavelen > low_wavelen, base / factor, base)
    with np.errstate(divide="ignore", invalid="ignore"):  # equal band factors: no medium band reads it
        smooth = (np.float32(old) / wavelen - np.float32(rs.low_freq_factor)) / np.float32(
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
