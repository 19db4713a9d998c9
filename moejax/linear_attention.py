"""Linear-attention layers: the Gated DeltaNet (Yang, Kautz and Hatamizadeh, arXiv 2412.06464) of Qwen3-Next, the
layer kind 'linear' of ``model.layer_types`` (moejax/attention.py's ``LAYER_KINDS``), sized by the
``model.linear_attention`` section (cfg = ``config.model``, la = cfg.linear_attention).

With nk key heads of width dk, nv = r * nk value heads of width dv, C = 2 * nk * dk + nv * dv channels:

    x [B, S, D] -> in_proj_qkvz: per key head g, q_g [dk], k_g [dk], v [r * dv], z [r * dv] (value heads g*r..g*r+r-1)
                -> in_proj_ba:   per key head g, b [r], a [r]
    (q, k, v) [B, S, C] -> a causal depthwise convolution over the last la.conv_kernel positions, then SiLU
    beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias)                     (per value head, float32)
    q, k L2-normalised (eps 1e-6), q scaled by dk^-0.5; value head h reads key head h // r; per head, in float32:
        S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T q_t       (S [dk, dv])
    o -> RMSNorm over dv (its own scale, eps model.norm_eps) times SiLU(z) -> out_proj -> [B, S, D]

Parameter tree (under ``layers_{i}/attn``):

    in_proj_qkvz/kernel [D, nk, 2 dk + 2 r dv]   in_proj_ba/kernel [D, nk, 2 r]   conv1d/kernel [K, C]
    dt_bias [nv]   A_log [nv]   norm/scale [dv]   out_proj/kernel [nv, dv, D]

The recurrence runs as a ``lax.scan`` over chunks of la.chunk_size positions (``chunked_gated_delta_rule``, the
chunked form transformers also runs) or, with chunk_size 0 and for single decoded tokens, over positions
(``gated_delta_rule``, the form the delta rule is defined in). Decoding (moejax/
generate.py) keeps the layer's state in the 'cache' collection instead of keys and values: ``conv_state`` [B, K-1, C]
(the convolution's last inputs) and ``recurrent_state`` [B, nv, dk, dv] float32, the same size whatever the context.
A call continues both from its tokens; left-padding slots (before ``cache.start``) enter as zeros, which leave a
zero state as it was, so a padded row computes what it computes alone. A state cannot be rolled back to an earlier
slot (``rewind_problem``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import checks, kv_cache, parallel
from moejax.adapters import lora

L2_EPS = 1e-6  # the L2 norm of queries and keys (the FLA kernels' and transformers' epsilon)
STATE_NAMES = kv_cache.FIXED_STATE  # the layer's arrays in the 'cache' collection

parallel.PARAM_AXES.update({
    ("in_proj_qkvz", "kernel"): ("embed", "kv_heads", None),
    ("in_proj_ba", "kernel"): ("embed", "kv_heads", None),
    ("conv1d", "kernel"): (None, None),
    ("dt_bias",): (None,),
    ("A_log",): (None,),
    ("out_proj", "kernel"): ("heads", "head_dim", "embed"),
})


def validate(cfg: ml_collections.ConfigDict) -> None:
    """The ``model.linear_attention`` section, when some layer is 'linear'."""
    la = cfg.linear_attention
    for field in ("num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim", "conv_kernel"):
        checks.positive_int(f"model.linear_attention.{field}", la[field])
    checks.positive_int("model.linear_attention.chunk_size", la.get("chunk_size", 64), minimum=0)
    if cfg.scan_layers:
        checks.fail("model.scan_layers", cfg.scan_layers, "'linear' layers are not scanned: set scan_layers=False")
    if la.num_value_heads % la.num_key_heads:
        checks.fail("model.linear_attention.num_value_heads", la.num_value_heads,
                    f"must be a multiple of model.linear_attention.num_key_heads={la.num_key_heads}")


def has_linear_layers(cfg: ml_collections.ConfigDict) -> bool:
    return "linear" in tuple(cfg.layer_types)


def rewind_problem(cfg: ml_collections.ConfigDict, section: str = "model") -> None:
    """ConfigError (naming ``<section>.layer_types``) for a decoding that takes cached tokens back (speculative
    decoding) on a model with linear-attention layers, whose recurrent state cannot return to an earlier slot."""
    if has_linear_layers(cfg):
        checks.fail(f"{section}.layer_types", tuple(cfg.layer_types), "speculative decoding rolls its caches back "
                    "to earlier slots, and a 'linear' layer's recurrent state cannot be rolled back: decode this "
                    "model with moejax.generate")


def l2norm(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
                     state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule, one position at a time: q, k [B, S, nk, dk], v [B, S, nv, dv], g, beta [B, S, nv],
    state [B, nv, dk, dv] (None: zeros) -> (o [B, S, nv, dv] float32, the final state). q and k are L2-normalised
    here and q scaled by dk^-0.5; value head h reads key head h // (nv / nk)."""
    repeat = v.shape[2] // k.shape[2]
    f32 = jnp.float32
    q, k = (jnp.repeat(l2norm(t.astype(f32)), repeat, axis=2) for t in (q, k))
    q = q * f32(q.shape[-1] ** -0.5)
    if state is None:
        state = jnp.zeros((v.shape[0], v.shape[2], k.shape[-1], v.shape[-1]), f32)

    def step(s, inputs):
        q_t, k_t, v_t, g_t, beta_t = inputs
        s = s * jnp.exp(g_t)[..., None, None]
        remembered = jnp.sum(s * k_t[..., None], axis=-2)
        delta = (v_t - remembered) * beta_t[..., None]
        s = s + k_t[..., None] * delta[..., None, :]
        return s, jnp.sum(s * q_t[..., None], axis=-2)

    time_major = [jnp.moveaxis(t.astype(f32), 1, 0) for t in (q, k, v, g, beta)]
    state, out = jax.lax.scan(step, state.astype(f32), time_major)
    return jnp.moveaxis(out, 0, 1), state


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """log A with A uniform in [0.01, 16] (transformers' initialisation: the decay rates exp(A_log))."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 0.01, 16.0))


def unit_lower_inverse(strict: jax.Array) -> jax.Array:
    """(I + L)^-1 of a strictly lower-triangular L [..., C, C]: the sum of (-L)^i for i < C (L is nilpotent), as the
    product (I - L)(I + L^2)(I + L^4)... of ceil(log2 C) factors, all matrix products (XLA's batched triangular
    solve, and its gradient, are slow on CPU)."""
    size = strict.shape[-1]
    power = -strict
    inverse = jnp.eye(size, dtype=strict.dtype) + power
    for _ in range(max(size - 1, 1).bit_length() - 1):
        power = power @ power
        inverse = inverse + inverse @ power
    return inverse


def chunked_gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
                             state: jax.Array | None = None, chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """``gated_delta_rule`` computed chunk by chunk (the chunked form of the Gated DeltaNet paper and transformers'
    torch_chunk_gated_delta_rule): within a chunk of C positions the delta-rule updates are folded by the inverse of
    a unit lower-triangular matrix (the UT transform; ``unit_lower_inverse``) into matrix products, and only the
    state passes from chunk to chunk (a ``lax.scan`` over S / C chunks instead of S positions). Same arguments and
    results; the sequence is padded to whole chunks with positions that change neither the state nor the outputs
    kept."""
    repeat = v.shape[2] // k.shape[2]
    f32 = jnp.float32
    q, k = (jnp.repeat(l2norm(t.astype(f32)), repeat, axis=2) for t in (q, k))
    q = q * f32(q.shape[-1] ** -0.5)
    batch, seq, heads, dv = v.shape
    dk = k.shape[-1]
    if state is None:
        state = jnp.zeros((batch, heads, dk, dv), f32)
    chunk = min(chunk, seq)  # a shorter sequence is one chunk, unpadded
    pad = -seq % chunk
    n = (seq + pad) // chunk

    def chunks(t: jax.Array) -> jax.Array:  # [B, S, H, ...] -> [B, H, N, C, ...]
        t = jnp.pad(t.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        t = t.reshape(batch, n, chunk, heads, *t.shape[3:])
        return jnp.moveaxis(t, 3, 1)

    q, k, v, g, beta = (chunks(t) for t in (q, k, v, g, beta))
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    decay = jnp.cumsum(g, axis=-1)  # [B, H, N, C]: log of the decay from the chunk's start
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    pairwise = jnp.exp(jnp.where(lower, decay[..., :, None] - decay[..., None, :], -jnp.inf))
    system = jnp.where(lower & ~jnp.eye(chunk, dtype=bool), (k_beta @ jnp.swapaxes(k, -1, -2)) * pairwise, 0.0)
    inverse = unit_lower_inverse(system)
    new_values, k_cumdecay = inverse @ v_beta, inverse @ (k_beta * jnp.exp(decay)[..., None])
    intra = (q @ jnp.swapaxes(k, -1, -2)) * pairwise
    q = q * jnp.exp(decay)[..., None]
    k = k * jnp.exp(decay[..., -1:] - decay)[..., None]
    chunk_decay = jnp.exp(decay[..., -1])[..., None, None]

    def step(s, inputs):
        u, w, q_i, k_i, attn, d = inputs
        v_new = u - w @ s
        out = q_i @ s + attn @ v_new
        return s * d + jnp.swapaxes(k_i, -1, -2) @ v_new, out

    inputs = [jnp.moveaxis(t, 2, 0) for t in (new_values, k_cumdecay, q, k, intra, chunk_decay)]
    state, out = jax.lax.scan(step, state.astype(f32), inputs)  # out [N, B, H, C, dv]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, n * chunk, dv)[:, :, :seq]
    return jnp.moveaxis(out, 1, 2), state


class DepthwiseConv(nn.Module):
    """A causal depthwise convolution over positions: x [B, S, C] with the K-1 inputs before it ``before`` [B, K-1,
    C] -> out[t, c] = sum_j kernel[j, c] * [before; x][t + j, c]."""

    size: int
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, before: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (self.size, x.shape[-1]), self.param_dtype)
        full = jnp.concatenate([before.astype(x.dtype), x], axis=1)
        seq = x.shape[1]
        return sum(full[:, j:j + seq] * kernel[j].astype(x.dtype) for j in range(self.size))


class GatedRMSNorm(nn.Module):
    """scale * RMSNorm(o) * SiLU(z) over the last axis, o normalised in float32 (transformers' Qwen3NextRMSNormGated;
    the scale multiplies the normalised values cast back to the compute dtype)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, o: jax.Array, z: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (o.shape[-1],), jnp.float32)
        o32 = o.astype(jnp.float32)
        normed = (o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
        return (scale * normed * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype)


class GatedDeltaNet(nn.Module):
    """The Gated DeltaNet layer (module docstring). Built like the attention modules (attention.LAYER_KINDS):
    (cfg, dtype, kernel_init, window); the window is unused."""

    cfg: ml_collections.ConfigDict
    dtype: Any
    kernel_init: nn.initializers.Initializer
    window: int = 0

    validate = staticmethod(validate)

    @nn.compact
    def __call__(self, x: jax.Array, cache: kv_cache.Cache | None = None) -> jax.Array:
        cfg, la = self.cfg, self.cfg.linear_attention
        nk, nv, dk, dv = la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim
        r = nv // nk
        batch, seq = x.shape[:2]
        param_dtype = jnp.dtype(cfg.param_dtype)
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=param_dtype, kernel_init=self.kernel_init,
                     lora=lora.spec(cfg))
        if cache is not None:  # left padding enters as zeros: a zero state stays zero
            real = cache.index + jnp.arange(seq, dtype=jnp.int32)[None, :] >= cache.start[:, None]
            x = jnp.where(real[..., None], x, jnp.zeros((), x.dtype))
        qkvz = lora.DenseGeneral((nk, 2 * dk + 2 * r * dv), name="in_proj_qkvz", **dense)(x)
        ba = lora.DenseGeneral((nk, 2 * r), name="in_proj_ba", **dense)(x)
        q, k = qkvz[..., :dk], qkvz[..., dk:2 * dk]
        v, z = qkvz[..., 2 * dk:2 * dk + r * dv], qkvz[..., 2 * dk + r * dv:]
        b, a = ba[..., :r].reshape(batch, seq, nv), ba[..., r:].reshape(batch, seq, nv)
        mixed = jnp.concatenate([t.reshape(batch, seq, -1) for t in (q, k, v)], axis=-1)
        channels = mixed.shape[-1]
        if cache is None:
            before, recurrent = jnp.zeros((batch, la.conv_kernel - 1, channels), mixed.dtype), None
        else:
            conv_var = self.variable(kv_cache.COLLECTION, "conv_state", jnp.zeros,
                                     (batch, la.conv_kernel - 1, channels), mixed.dtype)
            state_var = self.variable(kv_cache.COLLECTION, "recurrent_state", jnp.zeros, (batch, nv, dk, dv),
                                      jnp.float32)
            before, recurrent = conv_var.value, state_var.value
            conv_var.value = jnp.concatenate([before, mixed], axis=1)[:, seq:]
        conv = DepthwiseConv(la.conv_kernel, param_dtype, nn.initializers.normal(la.conv_kernel ** -0.5),
                             name="conv1d")
        mixed = jax.nn.silu(conv(mixed, before))
        key_width = nk * dk
        q = mixed[..., :key_width].reshape(batch, seq, nk, dk)
        k = mixed[..., key_width:2 * key_width].reshape(batch, seq, nk, dk)
        v = mixed[..., 2 * key_width:].reshape(batch, seq, nv, dv)
        dt_bias = self.param("dt_bias", nn.initializers.ones, (nv,), jnp.float32)
        a_log = self.param("A_log", _a_log_init, (nv,), jnp.float32)
        beta = jax.nn.sigmoid(b)
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias)
        chunk = la.get("chunk_size", 64)
        if chunk and seq > 1:  # as transformers: chunks for a sequence, the recurrence for one decoded token
            out, final = chunked_gated_delta_rule(q, k, v, g, beta, recurrent, chunk)
        else:
            out, final = gated_delta_rule(q, k, v, g, beta, recurrent)
        if cache is not None:
            state_var.value = final
        out = GatedRMSNorm(cfg.norm_eps, self.dtype, name="norm")(out.astype(self.dtype), z.reshape(batch, seq, nv, dv))
        return lora.DenseGeneral(cfg.d_model, axis=(-2, -1), name="out_proj", **dense)(out)
