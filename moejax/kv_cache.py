"""The key/value cache of autoregressive decoding (moejax/generate.py), as the attention modules use it.

A ``Cache`` record travels with the forward pass (``Transformer(...)(tokens, cache=Cache(...))``, applied with
``mutable=['cache']``). Every attention layer keeps its own arrays in the ``'cache'`` variable collection, of
``cache.length`` slots per row, created as zeros on the first (prefill) call (``Slots``, under
``layers_{i}/attn/<name>/slots``):

    'gqa':  cached_key [B, L, KV, Dh], cached_value [B, L, KV, Dh]   keys after their norm and rotary embedding
    'mla':  cached_c_kv [B, L, rkv], cached_k_rot [B, L, Dr]     MLA's compressed latent and its one shared rotary
                                                   key: the cache holds rkv + Dr values per token and layer, not the
                                                   2 * H * Dh of the expanded keys and values
    'linear': conv_state [B, K-1, C], recurrent_state [B, nv, dk, dv] float32   a linear-attention layer's state
                                                   (moejax/linear_attention.py, under layers_{i}/attn): a fixed
                                                   size whatever the context, continued by each call

A call writes its S tokens into slots ``index .. index + S - 1`` and attends over the whole cache. Rows may be
left-padded (ragged prompts): row b's real tokens start at slot ``start[b]``; slots before it are never read, and
a token in slot s sits at position ``s - start[b]`` for the rotary embedding. A query in slot i reads the key in
slot j iff ``start[b] <= j <= i`` and, in a sliding-window layer, ``i - j < window``; in a chunked layer (Llama 4)
iff also ``(i - start[b]) // chunk == (j - start[b]) // chunk`` (the chunks count from the row's first real token, as
transformers' chunked mask does); attention sinks join the softmax's denominator as in the full forward.

A sliding-window layer of window W < L keeps a ring of W arrays instead of L (``Cache.ring``): slot s lives in ring
entry ``s mod W``, which is all a later query can read. A call attends over the ring as it was before the call
followed by its own S new tokens (so a prefill longer than W still sees every key its queries need), then writes
its last min(S, W) tokens into the ring; a chunked layer keeps a ring of one chunk (W = chunk). ``Slots`` returns
the arrays it attends over with the slot each one holds (-1: empty), and ``Cache.visible`` masks by those slots, so
full and ring layers share one attention core.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

COLLECTION = "cache"
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# The arrays of the fixed-size state of a layer (linear attention: moejax/linear_attention.py), not per token
FIXED_STATE = ("conv_state", "recurrent_state")


@flax.struct.dataclass
class Cache:
    """Where this call's tokens go in the per-layer caches (see the module docstring); a pytree (length static).

    length: the slots per row (static: prompt length + new tokens). index: int32 scalar, the slot of the call's
    first token. start: int32 [B], each row's first real slot (0 without left padding)."""

    length: int = flax.struct.field(pytree_node=False)
    index: jax.Array = None
    start: jax.Array = None

    def positions(self, seq: int) -> jax.Array:
        """The rotary positions [B, S] of the call's S tokens."""
        return self.index + jnp.arange(seq, dtype=jnp.int32)[None, :] - self.start[:, None]

    def ring(self, window: int) -> int:
        """The ring size of a layer with this sliding window: W when 0 < W < length, else 0 (all L slots)."""
        return window if 0 < window < self.length else 0

    def visible(self, seq: int, window: int, slots: jax.Array, chunk: int = 0) -> jax.Array:
        """[B, S, K] bool: query t of the call (slot index + t) may read key k, which holds cache slot slots[k]
        (``Slots`` returns them; a negative slot is an empty ring entry). chunk > 0: only the keys of the query's
        chunk of its row's positions."""
        slot = self.index + jnp.arange(seq, dtype=jnp.int32)[:, None]
        j = slots[None, :]
        ok = (j <= slot)[None] & (j[None] >= self.start[:, None, None])  # start >= 0 also excludes empty entries
        if window:
            ok = ok & ((slot - j) < window)[None]
        if chunk:
            start = self.start[:, None, None]
            ok = ok & ((slot[None] - start) // chunk == (j[None] - start) // chunk)
        return ok


class Slots(nn.Module):
    """One cache array of a layer in the 'cache' collection under ``<name>/slots``: [B, L, ...], or [B, W, ...] for a
    sliding-window layer whose window W is below L (``Cache.ring``). A call writes its tokens new [B, S, ...] and
    returns (the arrays its queries may read [B, K, ...], the cache slot each holds [K] int32, -1: empty), for
    ``Cache.visible``. (A module of its own so that attention modules written with ``setup`` can own cache arrays
    whose shape is known only at the first call.)"""

    window: int = 0  # the layer's sliding window (0: full attention)

    @nn.compact
    def __call__(self, new: jax.Array, cache: Cache) -> tuple[jax.Array, jax.Array]:
        ring = cache.ring(self.window)
        rows, seq = new.shape[:2]
        var = self.variable(COLLECTION, "slots", jnp.zeros, (rows, ring or cache.length, *new.shape[2:]), new.dtype)
        new = new.astype(var.value.dtype)
        if not ring:
            start = (0, cache.index) + (0,) * (new.ndim - 2)
            var.value = jax.lax.dynamic_update_slice(var.value, new, start)
            return var.value, jnp.arange(cache.length, dtype=jnp.int32)
        before = var.value
        entry = jnp.arange(ring, dtype=jnp.int32)
        last = cache.index - 1  # the newest slot already in the ring; entry r holds the newest slot s <= last, s = r
        held = last - jnp.mod(last - entry, ring)  # (mod W), negative when that slot never existed
        keep = min(seq, ring)
        written = cache.index + seq - keep + jnp.arange(keep, dtype=jnp.int32)
        var.value = before.at[:, jnp.mod(written, ring)].set(new[:, seq - keep:])
        slots = jnp.concatenate([held, cache.index + jnp.arange(seq, dtype=jnp.int32)])
        return jnp.concatenate([before, new], axis=1), slots


def softmax(logits: jax.Array, visible: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """logits [B, K, G, S, L] float32 (head k * G + g), visible [B, S, L], sinks [K * G] or None -> probabilities."""
    logits = jnp.where(visible[:, None, None], logits, _MASKED)
    if sinks is None:
        return jax.nn.softmax(logits, axis=-1)
    batch, kv_heads, groups = logits.shape[:3]
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv_heads, groups, 1, 1), (*logits.shape[:-1], 1))
    return jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *, scale: float | None = None,
           sinks: jax.Array | None = None) -> jax.Array:
    """q [B, S, N, Dk] against the cache k [B, L, K, Dk], v [B, L, K, Dv] -> [B, S, N, Dv]; head n reads key/value
    head n // (N / K)."""
    batch, seq, heads, dk = q.shape
    kv_heads = k.shape[2]
    scale = dk ** -0.5 if scale is None else scale
    qg = q.reshape(batch, seq, kv_heads, heads // kv_heads, dk)
    logits = jnp.einsum("bskgd,blkd->bkgsl", qg, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    probs = softmax(logits, visible, sinks)
    out = jnp.einsum("bkgsl,blkd->bskgd", probs.astype(v.dtype), v)
    return out.reshape(batch, seq, heads, v.shape[-1])


def attend_latent(q: jax.Array, c_kv: jax.Array, k_rot: jax.Array, kv_b: jax.Array, visible: jax.Array, *,
                  nope_dim: int, scale: float, sinks: jax.Array | None = None) -> jax.Array:
    """MLA over its compressed cache, with the key and value up-projections absorbed into the query and the output
    (DeepSeek-V2, arXiv 2405.04434, section 2.1.3): q [B, S, H, Dn + Dr], c_kv [B, L, rkv], k_rot [B, L, Dr],
    kv_b [rkv, H, Dn + Dv] -> [B, S, H, Dv]. The per-head keys and values are never built: q_nope @ W_uk^T reads
    c_kv directly, and the probabilities' mix of c_kv goes through W_uv."""
    w_uk, w_uv = kv_b[..., :nope_dim], kv_b[..., nope_dim:]
    q_nope, q_rot = q[..., :nope_dim], q[..., nope_dim:]
    q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, w_uk, preferred_element_type=jnp.float32)
    logits = (jnp.einsum("bshr,blr->bhsl", q_latent, c_kv.astype(jnp.float32)) +
              jnp.einsum("bshd,bld->bhsl", q_rot, k_rot, preferred_element_type=jnp.float32)) * jnp.float32(scale)
    probs = softmax(logits[:, :, None], visible, sinks)[:, :, 0]
    mixed = jnp.einsum("bhsl,blr->bshr", probs, c_kv.astype(jnp.float32))
    return jnp.einsum("bshr,rhv->bshv", mixed, w_uv.astype(jnp.float32)).astype(q.dtype)


def bytes_per_token(cache_tree) -> int:
    """Cache bytes per token slot, summed over the layers: each array's bytes / (rows x its slots). A sliding
    layer's ring of W entries counts per entry, so this is the cost of one more token of context while it is
    within every window. The fixed-size state of linear-attention layers (FIXED_STATE) is left out."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache_tree):
        if getattr(path[-1], "key", None) in FIXED_STATE:
            continue
        scanned = any(getattr(key, "key", None) == "blocks" for key in path)  # stacked layers: [n, B, L, ...]
        rows, slots = (leaf.shape[1], leaf.shape[2]) if scanned else (leaf.shape[0], leaf.shape[1])
        total += int(leaf.size) * leaf.dtype.itemsize // (rows * slots)
    return total


def total_bytes(cache_tree) -> int:
    """The cache's bytes, every layer and row."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(cache_tree))


def decode_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``model`` section of config (a full config or its model section) as decoding runs it: dropless MoE
    dispatch, no rematerialisation."""
    cfg = ml_collections.ConfigDict((config.model if "model" in config else config).to_dict())
    cfg.remat = False
    cfg.moe.dispatch = "dropless"
    return cfg
