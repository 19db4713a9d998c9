"""Attention variants and rotary embeddings of the decoder (``config.model`` = cfg): grouped-query attention
(``Attention``, cfg.attention='gqa') and DeepSeek's Multi-head Latent Attention (``MLAttention``, 'mla'), the causal
attention core they share (sliding window, chunks, attention sinks), the norms (RMSNorm; LayerNorm for
``model.norm``), and the rotary embedding (moejax/rotary.py, its names re-exported here) on every head dim or on the
first ``partial_rotary_factor`` of them.

Parameter trees (under ``layers_{i}/attn``; Dh = cfg.head_dim or d_model // num_heads, KV = num_kv_heads or H):

    'gqa':  q/kernel [D, H, Dh], k/kernel [D, KV, Dh], v/kernel [D, KV, Dh], o/kernel [H, Dh, D]
            {q,k,v}/bias [H, Dh] / [KV, Dh]     (qkv_bias)      o/bias [D]  (o_bias)
            q_norm/scale [Dh], k_norm/scale [Dh]                (qk_norm, qk_norm_scope='head')
            q_norm/scale [H * Dh], k_norm/scale [KV * Dh]       (qk_norm, qk_norm_scope='proj')
            (no parameters with qk_norm_scope='l2': Llama 4's norm without a scale, after the rotary embedding)
            sinks [H] float32                                   (attention_sinks)
    'mla':  q/kernel [D, H, Dn + Dr]                            (mla.q_lora_rank = 0)
            q_a/kernel [D, rq], q_a_norm/scale [rq], q_b/kernel [rq, H, Dn + Dr]   (q_lora_rank = rq > 0)
            kv_a/kernel [D, rkv + Dr], kv_a_norm/scale [rkv], kv_b/kernel [rkv, H, Dn + Dv], o/kernel [H, Dv, D]
            o/bias [D] (o_bias), sinks [H] (attention_sinks)
            with Dn, Dr, Dv, rq, rkv = mla.qk_nope_head_dim, qk_rope_head_dim, v_head_dim, q_lora_rank, kv_lora_rank
            (mla.lora_scaling: queries times sqrt(D / rq), c_kv times sqrt(D / rkv); LongCat-Flash)
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import checks, kv_cache, linear_attention
from moejax.adapters import lora
from moejax.rotary import (  # noqa: F401  (attention.rope, attention.yarn_parameters, ... as before)
    ROPE_SCALINGS,
    apply_rope,
    default_inv_freq,
    longrope_parameters,
    rope,
    rope_parameters,
    rotary,
    validate_scaling,
    yarn_get_mscale,
    yarn_parameters,
)

ATTENTION_KINDS = ("gqa", "mla")
# Token-mixing layers other than softmax attention, by their model.layer_types entry: a module class built
# like the attention modules, (cfg, dtype, kernel_init, window, name=...), with a validate(cfg) of its
# config section. A new kind is its class and one line here.
LAYER_KINDS = {"linear": linear_attention.GatedDeltaNet}  # Gated DeltaNet (Qwen3-Next)
LAYER_TYPES = ("full", "sliding", "chunked", *LAYER_KINDS)
QK_NORM_SCOPES = ("head", "proj", "l2")
NORM_KINDS = ("rms", "layernorm", "rms_offset")
MLA_NORM_EPS = 1e-6  # the latent RMSNorms' epsilon (the released DeepSeek-V2/V3 code fixes it, whatever rms_norm_eps)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks the attention fields of the ``model`` section (errors name the field, its value and what is allowed)."""
    for field in ("qkv_bias", "o_bias", "qk_norm", "attention_sinks", "rope_interleave", "lm_head_bias"):
        if not isinstance(cfg[field], bool):
            checks.fail(f"model.{field}", cfg[field], "must be True or False")
    checks.choice("model.attention", cfg.attention, ATTENTION_KINDS)
    checks.choice("model.qk_norm_scope", cfg.qk_norm_scope, QK_NORM_SCOPES)
    checks.choice("model.norm", cfg.norm, NORM_KINDS)
    gate = cfg.get("attention_gate", False)
    if not isinstance(gate, bool) or (gate and cfg.attention == "mla"):
        checks.fail("model.attention_gate", gate, "must be True or False, and False with model.attention='mla'")
    for kind, layer in LAYER_KINDS.items():
        if kind in tuple(cfg.layer_types):
            layer.validate(cfg)
    if cfg.lm_head_bias and cfg.tie_embeddings:
        checks.fail("model.lm_head_bias", cfg.lm_head_bias, "the output head tied to the embedding has no bias: "
                                                            "set model.tie_embeddings=False")
    checks.positive_int("model.head_dim", cfg.head_dim, minimum=0)
    checks.number("model.clip_qkv", cfg.clip_qkv)
    factor = cfg.partial_rotary_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        checks.fail("model.partial_rotary_factor", factor, "must be a number in (0, 1]")
    validate_scaling(cfg.rope_scaling)
    _validate_positions(cfg)
    if cfg.attention == "mla":
        _validate_mla(cfg)
    else:
        if not cfg.head_dim and cfg.d_model % cfg.num_heads:
            checks.fail("model.num_heads", cfg.num_heads, f"must divide model.d_model={cfg.d_model} (or set "
                                                          "model.head_dim)")
        if head_dim(cfg) % 2:
            checks.fail("model.head_dim", cfg.head_dim, f"the head width {head_dim(cfg)} must be even for the "
                                                        "rotary embedding")
        if rotary_dims(cfg) < 2 or rotary_dims(cfg) % 2:
            checks.fail("model.partial_rotary_factor", factor, f"int(head width {head_dim(cfg)} * {factor}) = "
                                                               f"{rotary_dims(cfg)} rotary dims must be even and >= 2")
    if cfg.rope_scaling.kind == "longrope":
        pairs = (cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else rotary_dims(cfg)) // 2
        for field in ("short_factor", "long_factor"):
            value = cfg.rope_scaling[field]
            if not isinstance(value, (tuple, list)) or len(value) != pairs or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
                checks.fail(f"model.rope_scaling.{field}", value, f"must be {pairs} positive numbers (one per "
                                                                  f"rotary pair)")


def _validate_positions(cfg: ml_collections.ConfigDict) -> None:
    """attention_chunk_size, nope_layers and the attention temperature of the NoPE layers (Llama 4)."""
    checks.positive_int("model.attention_chunk_size", cfg.get("attention_chunk_size", 0), minimum=0)
    nope = cfg.get("nope_layers", ())
    if not isinstance(nope, (tuple, list)) or len(set(nope)) != len(nope) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.num_layers for i in nope):
        checks.fail("model.nope_layers", nope, f"must be distinct layer indices in [0, model.num_layers="
                                               f"{cfg.num_layers})")
    checks.number("model.attn_temperature_scale", cfg.get("attn_temperature_scale", 0.0))
    checks.positive_int("model.attn_temperature_floor", cfg.get("attn_temperature_floor", 8192))
    if cfg.attention != "mla":
        return
    why = "not an option with model.attention='mla' (DeepSeek's latent attention)"
    if nope:
        checks.fail("model.nope_layers", tuple(nope), f"{why}: must be ()")
    if "chunked" in cfg.layer_types:
        checks.fail("model.layer_types", tuple(cfg.layer_types), f"{why}: no 'chunked' layers")


def _validate_mla(cfg: ml_collections.ConfigDict) -> None:
    mla = cfg.mla
    checks.positive_int("model.mla.q_lora_rank", mla.q_lora_rank, minimum=0)
    for field in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        checks.positive_int(f"model.mla.{field}", mla[field])
    checks.positive_int("model.mla.qk_rope_head_dim", mla.qk_rope_head_dim, minimum=2)
    if mla.qk_rope_head_dim % 2:
        checks.fail("model.mla.qk_rope_head_dim", mla.qk_rope_head_dim, "must be even (rotary pairs)")
    scaling = mla.get("lora_scaling", False)
    if not isinstance(scaling, bool) or (scaling and not mla.q_lora_rank):
        checks.fail("model.mla.lora_scaling", scaling, "must be True or False; True scales the queries by "
                                                       "sqrt(d_model / q_lora_rank): needs model.mla.q_lora_rank > 0")
    why = "not an option with model.attention='mla' (DeepSeek's latent attention)"
    for field, off in (("qkv_bias", False), ("qk_norm", False), ("clip_qkv", 0.0), ("head_dim", 0),
                       ("partial_rotary_factor", 1.0)):
        if cfg[field] != off:
            checks.fail(f"model.{field}", cfg[field], f"{why}: must be {off!r}")
    if cfg.num_kv_heads not in (0, cfg.num_heads):
        checks.fail("model.num_kv_heads", cfg.num_kv_heads, f"{why}: every head has its own keys and values, so "
                    f"it must be 0 or model.num_heads={cfg.num_heads}")


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, in float32. ``offset`` (model.norm='rms_offset', Qwen3-Next):
    the scale is stored as its offset from 1 (initialised to zeros), x / rms(x) * (1 + scale)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale if self.offset else scale)).astype(self.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32 (torch's nn.LayerNorm: the biased
    variance; PhiMoE's norms)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * scale + bias).astype(self.dtype)


def norm(cfg: ml_collections.ConfigDict, dtype: Any, name: str) -> nn.Module:
    """The norm of ``model.norm`` ('rms': RMSNorm with a scale; 'layernorm': LayerNorm with a scale and a bias)
    before attention, before the FFN and on the final output; eps ``model.norm_eps``."""
    if cfg.norm == "rms_offset":
        return RMSNorm(cfg.norm_eps, dtype, True, name=name)
    cls = LayerNorm if cfg.norm == "layernorm" else RMSNorm
    return cls(cfg.norm_eps, dtype, name=name)


def qk_rms_norm(cfg: ml_collections.ConfigDict, dtype: Any, name: str) -> nn.Module:
    """The RMSNorm of queries or keys (qk_norm): its scale an offset from 1 with model.norm='rms_offset'."""
    return RMSNorm(cfg.norm_eps, dtype, cfg.norm == "rms_offset", name=name)


# ----------------------------------------------------------------------------------------------- rotary


def rotary_dims(cfg: ml_collections.ConfigDict) -> int:
    """The dims of each grouped-query head that the rotary embedding turns: int(Dh * partial_rotary_factor)."""
    return int(head_dim(cfg) * cfg.partial_rotary_factor)


def rope_heads(cfg: ml_collections.ConfigDict, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """``rope`` on the first ``rotary_dims`` dims of each head of x [B, S, N, Dh] (half layout within them, as
    transformers' GLM-4.5); the other dims pass unrotated."""
    dims = rotary_dims(cfg)
    if dims == x.shape[-1]:
        return rope(cfg, x, positions)
    return jnp.concatenate([rope(cfg, x[..., :dims], positions), x[..., dims:]], axis=-1)


# ----------------------------------------------------------------------------------------------- core


def attention_weights(q: jax.Array, k: jax.Array, *, scale: float | None = None, window: int = 0,
                      sinks: jax.Array | None = None, chunk: int = 0) -> jax.Array:
    """The causal softmax weights ``attend`` applies to the values: q [B, T, N, Dk], k [B, T, K, Dk] -> [B, K, G, T,
    S] float32 (query head n = k * G + g, G = N / K; key position s). With sinks [N] the sink logit joins each row's
    softmax and its column is dropped after it; chunk > 0 keeps each query to the keys of its own chunk."""
    batch, seq, heads, dk = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    scale = dk ** -0.5 if scale is None else scale
    qg = q.reshape(batch, seq, kv_heads, groups, dk)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    i, j = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
    visible = j <= i
    if window:
        visible = visible & (i - j < window)
    if chunk:
        visible = visible & (i // chunk == j // chunk)
    logits = jnp.where(visible, logits, -0.7 * jnp.finfo(jnp.float32).max)
    if sinks is None:
        return jax.nn.softmax(logits, axis=-1)
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv_heads, groups, 1, 1), (*logits.shape[:-1], 1))
    return jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None, window: int = 0,
           sinks: jax.Array | None = None, chunk: int = 0) -> jax.Array:
    """Causal attention: q [B, T, N, Dk], k [B, T, K, Dk], v [B, T, K, Dv] -> [B, T, N, Dv]; head n reads key/value
    head n // (N / K).

    scale: the logits' multiplier (None: Dk^-0.5). window > 0: a query at position i sees the keys at j with
    i - j < window (sliding-window layers). sinks [N]: one learned logit per head that joins the softmax's
    denominator (its column is dropped after the softmax; GPT-OSS). chunk > 0: a query at position i sees the keys
    at j with i // chunk == j // chunk (chunked layers, Llama 4).
    """
    if sinks is None and not chunk and q.shape[-1] == v.shape[-1]:
        local = (window - 1, 0) if window else None
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local)
    batch, seq, heads, _ = q.shape
    probs = attention_weights(q, k, scale=scale, window=window, sinks=sinks, chunk=chunk)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(batch, seq, heads, v.shape[-1])


def _sinks(module: nn.Module, cfg: ml_collections.ConfigDict) -> jax.Array | None:
    if not cfg.attention_sinks:
        return None
    return module.param("sinks", nn.initializers.zeros, (cfg.num_heads,), jnp.float32)


# ----------------------------------------------------------------------------------------------- GQA


def head_dim(cfg: ml_collections.ConfigDict) -> int:
    """Dh of grouped-query attention: cfg.head_dim, or d_model // num_heads when it is 0."""
    return cfg.head_dim or cfg.d_model // cfg.num_heads


def l2_norm(x: jax.Array, eps: float) -> jax.Array:
    """Llama 4's query/key norm (qk_norm_scope='l2'): x * rsqrt(mean(x^2) + eps) over each head's dims in float32,
    no scale."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def temperature(cfg: ml_collections.ConfigDict, q: jax.Array, positions: jax.Array | None) -> jax.Array:
    """Llama 4's attention temperature of the NoPE layers: the queries q [B, S, N, Dh] at position p (positions [B, S],
    default 0..S-1) times 1 + attn_temperature_scale * log(1 + floor((p + 1) / attn_temperature_floor))."""
    pos = jnp.arange(q.shape[1], dtype=jnp.float32)[None] if positions is None else positions.astype(jnp.float32)
    scale = jnp.log1p(jnp.floor((pos + 1.0) / jnp.float32(cfg.attn_temperature_floor)))
    scale = scale * jnp.float32(cfg.attn_temperature_scale) + 1.0
    return (q * scale[:, :, None, None]).astype(q.dtype)


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings; grouped-query when num_kv_heads < num_heads. Optional: biases
    on the q/k/v and output projections, RMSNorm of queries and keys per head or over the whole projection,
    clamping of q/k/v, a rotary embedding on part of each head (``partial_rotary_factor``), attention sinks, a
    sliding window (``window``), chunks (``chunk``), no rotary embedding (``use_rope`` False: a NoPE layer, whose
    queries get the attention temperature of ``model.attn_temperature_scale``)."""

    cfg: ml_collections.ConfigDict
    dtype: Any
    kernel_init: nn.initializers.Initializer
    window: int = 0  # > 0: a sliding-window layer
    chunk: int = 0  # > 0: a chunked layer (model.attention_chunk_size)
    use_rope: bool = True  # False: a NoPE layer (model.nope_layers)

    @nn.compact
    def __call__(self, x: jax.Array, cache: kv_cache.Cache | None = None) -> jax.Array:
        """x [B, S, D] -> [B, S, D]; with ``cache``, the tokens are written into the layer's KV cache and attend
        over it (moejax/kv_cache.py)."""
        cfg = self.cfg
        dh = head_dim(cfg)
        kv_heads = cfg.num_kv_heads or cfg.num_heads
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                     kernel_init=self.kernel_init, lora=lora.spec(cfg))
        qkv = dict(dense, use_bias=cfg.qkv_bias)
        gated = cfg.get("attention_gate", False)  # Qwen3-Next: each head's q projection also gives its output gate
        q = lora.DenseGeneral((cfg.num_heads, 2 * dh if gated else dh), name="q", **qkv)(x)
        q, gate = (q[..., :dh], q[..., dh:]) if gated else (q, None)
        k = lora.DenseGeneral((kv_heads, dh), name="k", **qkv)(x)
        v = lora.DenseGeneral((kv_heads, dh), name="v", **qkv)(x)
        if cfg.qk_norm and cfg.qk_norm_scope == "proj":  # OLMoE: over the whole projection, then split into heads
            q = qk_rms_norm(cfg, self.dtype, "q_norm")(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = qk_rms_norm(cfg, self.dtype, "k_norm")(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        if cfg.clip_qkv > 0:
            q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        if cfg.qk_norm and cfg.qk_norm_scope == "head":
            q = qk_rms_norm(cfg, self.dtype, "q_norm")(q)
            k = qk_rms_norm(cfg, self.dtype, "k_norm")(k)
        positions = None if cache is None else cache.positions(x.shape[1])
        if self.use_rope:
            q, k = rope_heads(cfg, q, positions), rope_heads(cfg, k, positions)
            if cfg.qk_norm and cfg.qk_norm_scope == "l2":  # Llama 4: after the rotary embedding, rotary layers only
                q, k = l2_norm(q, cfg.norm_eps), l2_norm(k, cfg.norm_eps)
        elif cfg.get("attn_temperature_scale", 0.0):
            q = temperature(cfg, q, positions)
        if cache is None:
            out = attend(q, k, v, window=self.window, sinks=_sinks(self, cfg), chunk=self.chunk)
        else:  # a chunked layer keeps a ring of one chunk: no query reads a key of an earlier chunk
            ring = self.window or self.chunk
            k, slots = kv_cache.Slots(ring, name="cached_key")(k, cache)
            v, _ = kv_cache.Slots(ring, name="cached_value")(v, cache)
            out = kv_cache.attend(q, k, v, cache.visible(x.shape[1], self.window, slots, chunk=self.chunk),
                                  sinks=_sinks(self, cfg))
        if gate is not None:
            out = out * jax.nn.sigmoid(gate)
        return lora.DenseGeneral(cfg.d_model, axis=(-2, -1), name="o", **dict(dense, use_bias=cfg.o_bias))(out)


# ----------------------------------------------------------------------------------------------- MLA


def mla_lora_scales(cfg: ml_collections.ConfigDict) -> tuple[float, float]:
    """(query, latent) scales: sqrt(D / rq), sqrt(D / rkv) with ``mla.lora_scaling`` (LongCat-Flash), else 1, 1."""
    mla = cfg.mla
    on = mla.get("lora_scaling", False)
    return ((cfg.d_model / mla.q_lora_rank) ** 0.5, (cfg.d_model / mla.kv_lora_rank) ** 0.5) if on else (1.0, 1.0)


def mla_softmax_scale(cfg: ml_collections.ConfigDict) -> float:
    """(Dn + Dr)^-0.5, times mscale(factor, mscale_all_dim)^2 with YaRN and mscale_all_dim > 0 (DeepSeek)."""
    scale = (cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs.kind == "yarn" and rs.mscale_all_dim:
        scale = scale * yarn_get_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    """DeepSeek's Multi-head Latent Attention (causal). Queries come through an optional low-rank bottleneck; keys
    and values are expanded from a normalised latent c_kv [B, S, rkv] and share one rotary key k_rot [B, S, Dr]
    across heads. ``latent`` gives (c_kv, k_rot), what a KV cache would hold; ``expand`` maps them to per-head keys
    and values; ``queries`` gives the per-head queries. The rotary embedding acts on the last Dr dims of each query
    and on k_rot only."""

    cfg: ml_collections.ConfigDict
    dtype: Any
    kernel_init: nn.initializers.Initializer
    window: int = 0  # > 0: a sliding-window layer

    def setup(self) -> None:
        cfg, mla = self.cfg, self.cfg.mla
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                     kernel_init=self.kernel_init, lora=lora.spec(cfg))
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank:
            self.q_a = lora.DenseGeneral(mla.q_lora_rank, **dense)
            self.q_a_norm = RMSNorm(MLA_NORM_EPS, self.dtype)
            self.q_b = lora.DenseGeneral((cfg.num_heads, qk), **dense)
        else:
            self.q = lora.DenseGeneral((cfg.num_heads, qk), **dense)
        self.kv_a = lora.DenseGeneral(mla.kv_lora_rank + mla.qk_rope_head_dim, **dense)
        self.kv_a_norm = RMSNorm(MLA_NORM_EPS, self.dtype)
        self.kv_b = lora.DenseGeneral((cfg.num_heads, mla.qk_nope_head_dim + mla.v_head_dim), **dense)
        self.o = lora.DenseGeneral(cfg.d_model, axis=(-2, -1), **dict(dense, use_bias=cfg.o_bias))
        self.cached_c_kv, self.cached_k_rot = kv_cache.Slots(self.window), kv_cache.Slots(self.window)  # decoding
        if cfg.attention_sinks:
            self.sinks = self.param("sinks", nn.initializers.zeros, (cfg.num_heads,), jnp.float32)

    def queries(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """x [B, S, D] -> q [B, S, H, Dn + Dr], the last Dr dims rotated (at ``positions`` [B, S], default
        0..S-1)."""
        mla = self.cfg.mla
        q = self.q_b(self.q_a_norm(self.q_a(x))) if mla.q_lora_rank else self.q(x)
        q = q * jnp.asarray(mla_lora_scales(self.cfg)[0], q.dtype)  # 1 without mla.lora_scaling
        q_nope, q_rot = q[..., :mla.qk_nope_head_dim], q[..., mla.qk_nope_head_dim:]
        return jnp.concatenate([q_nope, rope(self.cfg, q_rot, positions)], axis=-1)

    def latent(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B, S, D] -> (c_kv [B, S, rkv] normalised (times sqrt(D / rkv) with lora_scaling), k_rot [B, S, Dr]
        rotated)."""
        mla = self.cfg.mla
        compressed = self.kv_a(x)
        c_kv, k_rot = compressed[..., :mla.kv_lora_rank], compressed[..., mla.kv_lora_rank:]
        c_kv = self.kv_a_norm(c_kv)
        c_kv = c_kv * jnp.asarray(mla_lora_scales(self.cfg)[1], c_kv.dtype)  # 1 without mla.lora_scaling
        return c_kv, rope(self.cfg, k_rot[:, :, None, :], positions)[:, :, 0, :]

    def expand(self, c_kv: jax.Array, k_rot: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(c_kv [B, S, rkv], k_rot [B, S, Dr]) -> (k [B, S, H, Dn + Dr], v [B, S, H, Dv])."""
        mla = self.cfg.mla
        kv = self.kv_b(c_kv)
        k_nope, v = kv[..., :mla.qk_nope_head_dim], kv[..., mla.qk_nope_head_dim:]
        k_rot = jnp.broadcast_to(k_rot[:, :, None, :], (*k_nope.shape[:-1], k_rot.shape[-1])).astype(k_nope.dtype)
        return jnp.concatenate([k_nope, k_rot], axis=-1), v

    def __call__(self, x: jax.Array, cache: kv_cache.Cache | None = None) -> jax.Array:
        """x [B, S, D] -> [B, S, D]; with ``cache``, the latent (c_kv, k_rot) is written into the layer's cache and
        the queries attend over it in latent space (kv_cache.attend_latent)."""
        sinks = self.sinks if self.cfg.attention_sinks else None
        scale = mla_softmax_scale(self.cfg)
        if cache is None:
            q = self.queries(x)
            k, v = self.expand(*self.latent(x))
            return self.o(attend(q, k, v, scale=scale, window=self.window, sinks=sinks))
        positions = cache.positions(x.shape[1])
        c_kv, k_rot = self.latent(x, positions)
        (c_kv, slots), (k_rot, _) = self.cached_c_kv(c_kv, cache), self.cached_k_rot(k_rot, cache)
        if self.is_initializing():  # kv_b's kernel exists once kv_b has run
            self.expand(c_kv, k_rot)
        kv_b = lora.effective_kernel(self.variables["params"]["kv_b"], "kernel", lora.spec(self.cfg)).astype(self.dtype)
        out = kv_cache.attend_latent(self.queries(x, positions), c_kv, k_rot, kv_b,
                                     cache.visible(x.shape[1], self.window, slots),
                                     nope_dim=self.cfg.mla.qk_nope_head_dim,
                                     scale=scale, sinks=sinks)
        return self.o(out)


def make(cfg: ml_collections.ConfigDict, dtype: Any, kernel_init: nn.initializers.Initializer, window: int = 0,
         name: str = "attn", chunk: int = 0, use_rope: bool = True, kind: str = "full") -> nn.Module:
    """The attention module of ``cfg.attention`` (chunked and NoPE layers are grouped-query: validate)."""
    if kind in LAYER_KINDS:  # not softmax attention (the linear-attention layers)
        return LAYER_KINDS[kind](cfg, dtype, kernel_init, window, name=name)
    if cfg.attention == "mla":
        return MLAttention(cfg, dtype, kernel_init, window, name=name)
    return Attention(cfg, dtype, kernel_init, window, chunk, use_rope, name=name)
