"""Rotary position embeddings (``config.model`` = cfg): the default frequencies, YaRN's frequency interpolation with
its attention factor, LongRoPE's short / long factors and the scalings of moejax/rope_kinds.py ('llama3', 'linear'),
chosen by ``model.rope_scaling.kind``; the rotation itself in the half or interleaved layout. moejax/attention.py
applies them to each head (``rope_heads``: on the first ``partial_rotary_factor`` of its dims) and re-exports these
names."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checks, rope_kinds

ROPE_SCALINGS = ("none", "yarn", "longrope", *rope_kinds.KINDS)


def validate_scaling(rs: ml_collections.ConfigDict) -> None:
    """Checks ``model.rope_scaling`` (errors name the field, its value and what is allowed)."""
    checks.choice("model.rope_scaling.kind", rs.kind, ROPE_SCALINGS)
    if rs.kind == "longrope":
        _validate_longrope(rs)
    if rs.kind in rope_kinds.KINDS:
        rope_kinds.validate(rs)
    if rs.kind != "yarn":
        return
    checks.number("model.rope_scaling.factor", rs.factor, minimum=1.0)
    checks.positive_int("model.rope_scaling.original_max_position_embeddings", rs.original_max_position_embeddings)
    for field in ("beta_fast", "beta_slow"):
        checks.number(f"model.rope_scaling.{field}", rs[field], strict=True)
    for field in ("mscale", "mscale_all_dim"):
        checks.number(f"model.rope_scaling.{field}", rs[field])
    if not isinstance(rs.truncate, bool):
        checks.fail("model.rope_scaling.truncate", rs.truncate, "must be True or False")


def _validate_longrope(rs: ml_collections.ConfigDict) -> None:
    checks.positive_int("model.rope_scaling.original_max_position_embeddings", rs.original_max_position_embeddings)
    for field in ("short_mscale", "long_mscale"):
        checks.number(f"model.rope_scaling.{field}", rs[field], strict=True)


def default_inv_freq(theta: float, dim: int) -> jax.Array:
    """The rotary frequencies theta^(-2i/dim), i < dim/2: [dim // 2] float32."""
    half = dim // 2
    return theta ** (-jnp.arange(half, dtype=jnp.float32) / half)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(dim: int, theta: float, rs: ml_collections.ConfigDict) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al., 2023) for ``dim`` rotary dims: (inv_freq [dim // 2] float32, attention factor).

    The frequencies interpolate between the original ones (extrapolation, fast dimensions) and the ones divided by
    rs.factor (interpolation, slow dimensions) along a linear ramp over the correction range of dimensions that
    turn between beta_fast and beta_slow times within original_max_position_embeddings (rounded outwards to whole
    dimensions with rs.truncate). The attention factor multiplies cos and sin: mscale(factor, rs.mscale) /
    mscale(factor, rs.mscale_all_dim) when both are non-zero, else mscale(factor). rs: ``model.rope_scaling``.
    """
    factor, base = rs.factor, theta
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, rs.mscale) / yarn_get_mscale(factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def longrope_parameters(dim: int, theta: float, rs: ml_collections.ConfigDict, length: int | jax.Array | None = None
                        ) -> tuple[jax.Array | np.ndarray, float | jax.Array]:
    """LongRoPE (Phi-3.5) for ``dim`` rotary dims: (inv_freq [dim // 2], attention factor). inv_freq_i =
    1 / (f_i * theta^(2i / dim)) and the factor multiplying cos and sin is an mscale: f and the mscale are
    ``short_factor`` / ``short_mscale`` while ``length`` (the largest position + 1; a traced scalar when decoding with
    a cache; None: short) is at most ``original_max_position_embeddings``, else ``long_factor`` / ``long_mscale``.
    rs: ``model.rope_scaling``."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(theta) ** exponents

    def pick(which: str) -> tuple[np.ndarray, float]:
        factors = np.asarray(rs[f"{which}_factor"], np.float32)
        return (np.float32(1.0) / (factors * base)).astype(np.float32), float(rs[f"{which}_mscale"])

    short, long = pick("short"), pick("long")
    if length is None or isinstance(length, int):
        return long if length is not None and length > rs.original_max_position_embeddings else short
    beyond = length > rs.original_max_position_embeddings
    return (jnp.where(beyond, jnp.asarray(long[0]), jnp.asarray(short[0])),
            jnp.where(beyond, jnp.float32(long[1]), jnp.float32(short[1])))


def rope_parameters(cfg: ml_collections.ConfigDict, dim: int, length: int | jax.Array | None = None
                    ) -> tuple[jax.Array | np.ndarray, float | jax.Array]:
    """(inv_freq [dim // 2], attention factor) of ``model.rope_scaling`` for ``dim`` rotary dims; ``length`` (the
    sequence's largest position + 1) picks LongRoPE's short or long factors."""
    if cfg.rope_scaling.kind == "yarn":
        return yarn_parameters(dim, cfg.rope_theta, cfg.rope_scaling)
    if cfg.rope_scaling.kind == "longrope":
        return longrope_parameters(dim, cfg.rope_theta, cfg.rope_scaling, length)
    if cfg.rope_scaling.kind in rope_kinds.KINDS:  # 'llama3', 'linear' (moejax/rope_kinds.py)
        return rope_kinds.inv_freq(dim, cfg.rope_theta, cfg.rope_scaling), 1.0
    return default_inv_freq(cfg.rope_theta, dim), 1.0


def apply_rope(x: jax.Array, inv_freq: jax.Array | np.ndarray, attention_factor: float | jax.Array = 1.0,
               interleave: bool = False, positions: jax.Array | None = None) -> jax.Array:
    """Rotary embedding of x [B, S, N, R] (R = 2 * len(inv_freq)) at ``positions`` [S] or [B, S] (default 0..S-1).

    Half layout (interleave False): dims (i, i + R/2) form the pairs rotated by inv_freq[i]. Interleaved layout:
    dims (2i, 2i + 1) form them; the output is then in the half layout (the pairs' first members, then their
    second members), as in the released DeepSeek-V3 code: queries and keys get the same permutation, which leaves
    their dot products unchanged. cos and sin are multiplied by attention_factor (YaRN).
    """
    seq, half = x.shape[1], x.shape[-1] // 2
    pos = jnp.arange(seq, dtype=jnp.float32) if positions is None else positions.astype(jnp.float32)
    angles = jnp.atleast_2d(pos)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [1 or B, S, R/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    if not (isinstance(attention_factor, (int, float)) and attention_factor == 1.0):
        sin, cos = sin * attention_factor, cos * attention_factor
    if interleave:
        x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
    else:
        x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (half-split form) of x: [B, S, N, H] at positions 0..S-1."""
    return apply_rope(x, default_inv_freq(theta, x.shape[-1]))


def rope(cfg: ml_collections.ConfigDict, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """x [B, S, N, R] rotated as the config says (layout ``rope_interleave``, scaling ``rope_scaling``), at
    ``positions`` [B, S] (default 0..S-1)."""
    if cfg.rope_scaling.kind == "none" and not cfg.rope_interleave and positions is None:
        return rotary(x, cfg.rope_theta)
    length = x.shape[1] if positions is None else jnp.max(positions) + 1
    inv_freq, factor = rope_parameters(cfg, x.shape[-1], length)
    return apply_rope(x, inv_freq, factor, interleave=cfg.rope_interleave, positions=positions)
