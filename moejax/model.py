"""Decoder-only Transformer LM: embedding, pre-RMSNorm blocks of rotary causal attention (moejax/attention.py) and a
GLU FFN that is dense or MoE by layer pattern, final norm, LM head.

Parameter tree (``config.model`` = cfg):

    embed/embedding              [V, D]
    layers_{i}/attn_norm/scale   [D]                 (scan_layers: blocks/..., stacked on a leading axis; with
                                                     norm='layernorm' every norm also has a bias [D])
    layers_{i}/attn/...          cfg.attention 'gqa': {q,k,v}/kernel [D, H, Dh] / [D, KV, Dh], o/kernel [H, Dh, D],
                                 optional biases, q_norm / k_norm, sinks; 'mla': the latent projections (the
                                 trees are listed in moejax/attention.py)
    layers_{i}/ffn_norm/scale    [D]                 (norm_position='post': post_attn_norm / post_ffn_norm instead)
    layers_{i}/ffn/...           dense GLU {wi_0, wi_1, wo} or the MoE tree of moejax/moe/layer.py
    layers_{i}/dense_ffn/...     moe_shortcut: the MoE layer's own dense GLU {wi_0, wi_1, wo} (ffn_dim wide)
    final_norm/scale             [D]
    lm_head/kernel               [D, V]              (absent with tie_embeddings; lm_head/bias [V] with lm_head_bias)
    .../<weight>_lora_a, _lora_b                     LoRA adapters beside the weights model.lora picks
                                                     (moejax/adapters/lora.py)

Which layers are MoE and each layer's attention kind come from moejax/layout.py (re-exported here:
``model.moe_layers``, ``model.is_moe_layer``, ...); ``moe_layer_paths`` says where each MoE layer's variables live.
"""
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from moejax import attention, checks, kv_cache, moe
from moejax.adapters import lora
from moejax.attention import Attention, RMSNorm, rotary  # noqa: F401  (model.Attention, model.RMSNorm, ...)
from moejax.layout import (  # model.moe_layers, ...
    attention_chunk,
    attention_window,
    has_rope,
    is_moe_layer,
    layer_type,
    moe_layers,
)
from moejax.moe import expert_map, placement
from moejax.moe import layer as moe_layer
from moejax.moe.intervention import Intervention

NORM_POSITIONS = ("pre", "post")  # model.norm_position


class MoELayerPath(NamedTuple):
    """Where one MoE layer's variables live: ``path``, the keys of its 'ffn' module (the MoE tree of
    moejax/moe/layer.py) in every collection ('params', 'moe_state'), and ``unit``, its index on the leading axis
    [U, ...] of the scanned layers' stacked arrays (None: an unrolled layer)."""

    path: tuple[str, ...]
    unit: int | None


def moe_layer_paths(cfg: ml_collections.ConfigDict) -> dict[int, MoELayerPath]:
    """``{model layer: MoELayerPath}`` for every MoE layer (in ``moe_layers`` order) of a ``model`` section: unrolled
    layers are ``layers_{i}/ffn``; with ``scan_layers`` every MoE layer is ``blocks/block_0/ffn`` at unit
    ``(i - first_dense_layers) // moe_every`` (the first block of each scanned ``Unit``)."""
    if cfg.scan_layers:
        return {layer: MoELayerPath(("blocks", "block_0", "ffn"), (layer - cfg.first_dense_layers) //
                                    max(cfg.moe_every, 1)) for layer in moe_layers(cfg)}
    return {layer: MoELayerPath((f"layers_{layer}", "ffn"), None) for layer in moe_layers(cfg)}


def _subtree(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _map(fn, value) for key, value in tree.items()}
    return fn(tree)


def moe_layer_variables(cfg: ml_collections.ConfigDict, variables: Mapping[str, Any]
                        ) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
    """``{model layer: (params, moe_state)}`` of each MoE layer's 'ffn' module (``moe_layer_paths`` of the ``model``
    section cfg; the arrays as they are, the unit axis of scanned layers indexed away: e.g. experts/wo [E, F, D]);
    moe_state is {} when the variables have none. ValueError when the params lack a layer."""
    out = {}
    state = variables.get("moe_state") or {}
    for layer, (path, unit) in moe_layer_paths(cfg).items():
        try:
            params = _subtree(variables["params"], path)
        except KeyError as e:
            raise ValueError(f"the variables have no params/{'/'.join(path)} for MoE layer {layer}: do they belong to "
                             f"this config (model.scan_layers={cfg.scan_layers})?") from e
        try:
            layer_state = _subtree(state, path)
        except KeyError:
            layer_state = {}
        pick = (lambda x: x) if unit is None else (lambda x, u=unit: x[u])
        out[layer] = ({key: _map(pick, value) for key, value in params.items()},
                      {key: _map(pick, value) for key, value in layer_state.items()})
    return out


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks the ``model`` section (and its ``moe`` section when some layer is MoE)."""
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim"):
        checks.positive_int(f"model.{field}", cfg[field])
    checks.positive_int("model.num_kv_heads", cfg.num_kv_heads, minimum=0)
    checks.positive_int("model.first_dense_layers", cfg.first_dense_layers, minimum=0)
    checks.positive_int("model.moe_every", cfg.moe_every, minimum=0)
    if cfg.num_kv_heads and cfg.num_heads % cfg.num_kv_heads:
        checks.fail("model.num_kv_heads", cfg.num_kv_heads, f"must divide model.num_heads={cfg.num_heads}")
    for field in ("dtype", "param_dtype"):
        checks.choice(f"model.{field}", cfg[field], ["float32", "bfloat16"])
    checks.number("model.init_std", cfg.init_std, strict=True)
    checks.positive_int("model.mtp_depth", cfg.get("mtp_depth", 0), minimum=0)
    checks.number("model.mtp_loss_weight", cfg.get("mtp_loss_weight", 0.0))
    checks.number("model.rope_theta", cfg.rope_theta, strict=True)
    attention.validate(cfg)
    checks.choice("model.norm_position", cfg.get("norm_position", "pre"), NORM_POSITIONS)
    _validate_layer_lists(cfg)
    _validate_shortcut(cfg)
    if cfg.scan_layers and cfg.moe_every > 1 and (cfg.num_layers - cfg.first_dense_layers) % cfg.moe_every:
        checks.fail("model.scan_layers", cfg.scan_layers,
                    "scanning needs (num_layers - first_dense_layers) divisible by moe_every")
    if cfg.scan_layers and len(cfg.dense_layers):
        checks.fail("model.dense_layers", tuple(cfg.dense_layers), "must be empty with model.scan_layers=True "
                    "(scanned layers repeat one pattern); set scan_layers=False")
    if cfg.scan_layers and len(set(layer_type(cfg, i) for i in range(cfg.first_dense_layers, cfg.num_layers))) > 1:
        checks.fail("model.layer_types", tuple(cfg.layer_types), "scanned layers (those from first_dense_layers on) "
                    "must share one attention kind with model.scan_layers=True; set scan_layers=False")
    if moe_layers(cfg):
        moe_layer.validate(cfg.moe)
        expert_map.validate(cfg, moe_layers(cfg))
        placement.validate(cfg, moe_layers(cfg), {i: expert_map.stored_count(cfg.moe, i) for i in moe_layers(cfg)})
    lora.validate_fields(cfg)
    if lora.spec(cfg) is not None:  # every rule must pick a weight of the base model (traced, nothing allocated)
        base = lora.without_adapters(cfg)
        shapes = jax.eval_shape(lambda: Transformer(base).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        lora.validate_targets(cfg, lora.adaptable_paths(shapes["params"], cfg))


def _validate_layer_lists(cfg: ml_collections.ConfigDict) -> None:
    """layer_types (one 'full' | 'sliding' | 'chunked' per layer, or empty), sliding_window,
    attention_chunk_size, nope_layers and dense_layers."""
    if not isinstance(cfg.layer_types, (tuple, list)) or (cfg.layer_types and len(cfg.layer_types) != cfg.num_layers):
        checks.fail("model.layer_types", cfg.layer_types, f"must be empty or a sequence of model.num_layers="
                    f"{cfg.num_layers} entries, each one of {attention.LAYER_TYPES}")
    for i, kind in enumerate(cfg.layer_types):
        checks.choice(f"model.layer_types[{i}]", kind, attention.LAYER_TYPES)
    checks.positive_int("model.sliding_window", cfg.sliding_window, minimum=0)
    if "chunked" in cfg.layer_types and cfg.get("attention_chunk_size", 0) < 1:
        checks.fail("model.attention_chunk_size", cfg.get("attention_chunk_size", 0), "must be an integer >= 1 "
                    "when some model.layer_types entry is 'chunked'")
    if cfg.scan_layers and len(cfg.get("nope_layers", ())):
        checks.fail("model.nope_layers", tuple(cfg.nope_layers), "must be empty with model.scan_layers=True "
                    "(scanned layers repeat one pattern); set scan_layers=False")
    if "sliding" in cfg.layer_types and cfg.sliding_window < 1:
        checks.fail("model.sliding_window", cfg.sliding_window, "must be an integer >= 1 when some "
                                                                "model.layer_types entry is 'sliding'")
    dense = cfg.dense_layers
    if not isinstance(dense, (tuple, list)) or any(isinstance(i, bool) or not isinstance(i, int) or
                                                    not 0 <= i < cfg.num_layers for i in dense):
        checks.fail("model.dense_layers", dense, f"must be a sequence of layer indices in [0, model.num_layers="
                                                 f"{cfg.num_layers})")
    if len(set(dense)) != len(dense):
        checks.fail("model.dense_layers", dense, "must not repeat a layer index")


def _validate_shortcut(cfg: ml_collections.ConfigDict) -> None:
    """model.moe_shortcut: each MoE layer's output joins after the next layer, which must exist and be dense."""
    shortcut = cfg.get("moe_shortcut", False)
    if not isinstance(shortcut, bool):
        checks.fail("model.moe_shortcut", shortcut, "must be True or False")
    if not shortcut:
        return
    for i in moe_layers(cfg):
        if i + 1 >= cfg.num_layers or is_moe_layer(cfg, i + 1):
            checks.fail("model.moe_shortcut", shortcut, f"MoE layer {i}'s output joins after layer {i + 1}, which "
                        f"must be a dense layer (e.g. model.moe_every=2 and an even model.num_layers)")
    if cfg.get("mtp_depth", 0):
        checks.fail("model.mtp_depth", cfg.mtp_depth, "multi-token-prediction blocks have no shortcut-connected "
                                                      "layout: must be 0 with model.moe_shortcut=True")
    if moe_layers(cfg) and cfg.moe.chain_residual == "inner":
        checks.fail("model.moe.chain_residual", cfg.moe.chain_residual, "replaces the residual stream, which a "
                                                                        "shortcut-connected MoE joins later: use "
                                                                        "'outer' or 'inner_outer'")


def shortcut_starts(cfg: ml_collections.ConfigDict, layer: int) -> bool:
    """Whether layer i is a shortcut-connected MoE layer (model.moe_shortcut): its block returns (x, moe_out)."""
    return bool(cfg.get("moe_shortcut", False)) and is_moe_layer(cfg, layer)


class Block(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); the FFN is the MoE layer when ``use_moe``. With
    ``model.norm_position='post'``: x + post_attn_norm(attn(x)), then x + post_ffn_norm(ffn(x)) (OLMo 2).

    With ``model.moe_shortcut`` (ScMoE, arXiv 2404.05019; LongCat-Flash, arXiv 2509.01322) a MoE block adds its
    dense GLU ``dense_ffn`` instead and returns (x, the MoE's output on the same normalised input); the next block
    gets that output as ``shortcut`` and adds it after its own FFN: x + ffn(norm(x)) + shortcut."""

    cfg: ml_collections.ConfigDict
    use_moe: bool
    mesh: Mesh | None = None
    window: int = 0  # > 0: a sliding-window attention layer (model.attention_window)
    kind: str = "full"  # its model.layer_types entry (attention.LAYER_KINDS: a layer other than attention)
    chunk: int = 0  # > 0: a chunked attention layer (model.attention_chunk)
    use_rope: bool = True  # False: a NoPE layer (model.has_rope)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, token_ids: jax.Array | None = None,
                 progress: jax.Array | None = None, layer: int | jax.Array = 0,
                 cache: kv_cache.Cache | None = None, intervention: Intervention | None = None,
                 shortcut: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
        """layer: this block's index in the model (an int32 scalar under nn.scan), for the MoE statistics and the
        intervention's row. cache: decoding with a KV cache (moejax/kv_cache.py). intervention: routing
        interventions (moejax/moe/intervention.py). shortcut: the previous MoE block's output (moe_shortcut)."""
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.init_std)
        adapters = lora.spec(cfg)
        attn = attention.make(cfg, dtype, init, self.window, name="attn", kind=self.kind, chunk=self.chunk,
                              use_rope=self.use_rope)
        post = cfg.get("norm_position", "pre") == "post"  # OLMo 2: x + norm(f(x)) (model.norm_position)
        if post:
            x = x + attention.norm(cfg, dtype, "post_attn_norm")(attn(x, cache))
        else:
            x = x + attn(attention.norm(cfg, dtype, "attn_norm")(x), cache)
        h = x if post else attention.norm(cfg, dtype, "ffn_norm")(x)
        if self.use_moe:
            ffn = moe_layer.MoE(cfg.moe, dtype, param_dtype, init, self.mesh, adapters, name="ffn")
            routed = ffn(h, train=train, token_ids=token_ids, progress=progress, layer=layer,
                         intervention=intervention)
            if cfg.get("moe_shortcut", False):  # the MoE's output joins after the next block's FFN
                dense = moe_layer.GLU(cfg.ffn_dim, cfg.moe.activation, dtype, param_dtype, init, adapters,
                                      name="dense_ffn")(h)
                return x + (attention.norm(cfg, dtype, "post_ffn_norm")(dense) if post else dense), routed
            h = routed
            if cfg.moe.chain_residual == "inner":  # Chain-of-Experts as released: x_C replaces the stream
                return h
        else:
            h = moe_layer.GLU(cfg.ffn_dim, cfg.moe.activation, dtype, param_dtype, init, adapters, name="ffn")(h)
        x = x + (attention.norm(cfg, dtype, "post_ffn_norm")(h) if post else h)
        return x if shortcut is None else x + shortcut


class Unit(nn.Module):
    """The repeating group of ``moe_every`` blocks (one MoE, then dense) that nn.scan stacks. The carry holds the
    activations and the index of the unit's first layer."""

    cfg: ml_collections.ConfigDict
    mesh: Mesh | None = None
    window: int = 0  # every scanned layer has one attention kind (validate)
    chunk: int = 0

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], train: bool, token_ids: jax.Array,
                 progress: jax.Array | None, cache: kv_cache.Cache | None = None,
                 intervention: Intervention | None = None) -> tuple[tuple[jax.Array, jax.Array], None]:
        x, first_layer = carry
        width = max(self.cfg.moe_every, 1)
        pending = None  # moe_shortcut: block_0's MoE output, added by block_1 (validate: moe_every >= 2)
        for j in range(width):
            use_moe = self.cfg.moe_every > 0 and j == 0
            out = Block(self.cfg, use_moe=use_moe, mesh=self.mesh, window=self.window, chunk=self.chunk,
                        name=f"block_{j}")(
                x, train, token_ids, progress, first_layer + j, cache, intervention, pending)
            x, pending = out if use_moe and self.cfg.get("moe_shortcut", False) else (out, None)
        return (x, first_layer + width), None


MTP_COLLECTION = "mtp"  # training with model.mtp_depth > 0 sows each depth's logits [B, S, V] here
HIDDEN_COLLECTION = "hidden"  # the last block's output [B, S, D] (before the final norm), sown as 'last'


class MTPModule(nn.Module):
    """One multi-token-prediction module of DeepSeek-V3 (arXiv 2412.19437, section 2.2): h' = eh_proj([enorm(e);
    hnorm(h)]) of the embedding e of the token k positions ahead and the previous depth's hidden state h, then one
    transformer block (a MoE block when the model has MoE layers, its statistics under the layer index
    ``layer``). Returns (the block's output, the next depth's input; the same after the module's own final norm,
    which the model's output head reads)."""

    cfg: ml_collections.ConfigDict
    mesh: Mesh | None
    layer: int

    @nn.compact
    def __call__(self, hidden: jax.Array, embedded: jax.Array, token_ids: jax.Array, train: bool,
                 progress: jax.Array | None, cache: kv_cache.Cache | None = None) -> tuple[jax.Array, jax.Array]:
        """cache: decoding with the block's own KV cache (self-speculative drafting: moejax/speculative_mtp.py)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        joined = jnp.concatenate([attention.norm(cfg, dtype, "enorm")(embedded),
                                  attention.norm(cfg, dtype, "hnorm")(hidden)], axis=-1)
        x = nn.Dense(cfg.d_model, use_bias=False, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                     kernel_init=nn.initializers.normal(cfg.init_std), name="eh_proj")(joined)
        x = Block(cfg, use_moe=cfg.moe_every > 0, mesh=self.mesh, name="block")(x, train, token_ids, progress,
                                                                                   self.layer, cache)
        return x, attention.norm(cfg, dtype, "norm")(x)


class Transformer(nn.Module):
    """tokens [B, S] int32 -> logits [B, S, V] float32. ``cfg`` is the ``model`` config section.

    With a ``mesh`` of more than one device, the MoE layers run expert-parallel under shard_map
    (moejax/parallel.py); the inputs must then be split over its token axes (the train step's batch sharding).
    """

    cfg: ml_collections.ConfigDict
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False, progress: jax.Array | None = None,
                 cache: kv_cache.Cache | None = None, intervention: Intervention | None = None) -> jax.Array:
        """progress: the fraction of training done (a float32 scalar), for routers with a schedule. cache: decode
        with a KV cache (apply with mutable=['cache']; moejax/kv_cache.py, moejax/generate.py). intervention:
        routing interventions on the MoE layers (moejax/moe/intervention.py: rows indexed by the model layer,
        those of dense layers unused); None: the model's own routing."""
        cfg = self.cfg
        if intervention is not None:
            intervention.check(cfg)
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=nn.initializers.normal(cfg.init_std), name="embed")
        x = embed(tokens)
        block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
        if cfg.scan_layers:
            for i in range(cfg.first_dense_layers):
                x = block(cfg, use_moe=False, mesh=self.mesh, window=attention_window(cfg, i),
                          chunk=attention_chunk(cfg, i), use_rope=has_rope(cfg, i), name=f"layers_{i}")(
                    x, train, tokens, progress, i, cache, intervention)
            unit = nn.remat(Unit, static_argnums=(2,)) if cfg.remat else Unit
            units = (cfg.num_layers - cfg.first_dense_layers) // max(cfg.moe_every, 1)
            scanned = nn.scan(unit, variable_axes={"params": 0, "moe_state": 0, "moe_aux": 0, kv_cache.COLLECTION: 0},
                              split_rngs={"params": True, "jitter": True, "routing": True, "dropout": True},
                              in_axes=(nn.broadcast,) * 5, length=units)
            first = jnp.asarray(cfg.first_dense_layers, jnp.int32)
            window = attention_window(cfg, cfg.first_dense_layers) if units else 0
            chunk = attention_chunk(cfg, cfg.first_dense_layers) if units else 0
            (x, _), _ = scanned(cfg, self.mesh, window, chunk, name="blocks")((x, first), train, tokens, progress,
                                                                               cache, intervention)
        else:
            pending = None  # moe_shortcut: the previous MoE layer's output, added after the next layer's FFN
            for i in range(cfg.num_layers):
                out = block(cfg, use_moe=is_moe_layer(cfg, i), mesh=self.mesh, window=attention_window(cfg, i),
                            kind=layer_type(cfg, i),
                            chunk=attention_chunk(cfg, i), use_rope=has_rope(cfg, i),
                            name=f"layers_{i}")(x, train, tokens, progress, i, cache, intervention, pending)
                x, pending = out if shortcut_starts(cfg, i) else (out, None)
        hidden = x  # the last block's output: the first MTP module's input
        if not self.is_initializing():  # kept only when applied with mutable=[HIDDEN_COLLECTION]
            self.sow(HIDDEN_COLLECTION, "last", hidden)
        x = attention.norm(cfg, dtype, "final_norm")(x)
        if cfg.tie_embeddings:
            head = embed.attend
        else:
            head = lora.Dense(cfg.vocab_size, use_bias=cfg.lm_head_bias, dtype=dtype,
                              param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=nn.initializers.normal(cfg.init_std),
                              lora=lora.spec(cfg), name="lm_head")
        logits = head(x).astype(jnp.float32)
        if cfg.get("mtp_depth", 0) and (train or self.is_initializing()) and cache is None:
            for k in range(1, cfg.mtp_depth + 1):  # DeepSeek-V3's multi-token prediction (docs/methods.md)
                shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))  # the token k ahead of each position
                hidden, normed = MTPModule(cfg, self.mesh, cfg.num_layers + k - 1, name=f"mtp_{k}")(
                    hidden, embed(shifted), shifted, train, progress)
                self.sow(MTP_COLLECTION, "logits", head(normed).astype(jnp.float32))
        return logits


def param_counts(params: Any, cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Total parameters, and those activated per token (routed experts count k/E of their weights)."""
    total = sum(int(p.size) for p in jax.tree.leaves(params))
    routed = sum(int(p.size) for path, p in jax.tree_util.tree_leaves_with_path(params)
                 if any(getattr(key, "key", None) == moe.EXPERTS for key in path))
    inactive = routed * (cfg.moe.num_experts - cfg.moe.top_k) // cfg.moe.num_experts
    return {"total": total, "activated": total - inactive}
