"""moejax.hf's PhiMoE and GLM-4.5 families, and the model pieces they brought: LayerNorm, the output-head bias, the
SparseMixer router, LongRoPE and the partial rotary embedding.

The transformers golden cases of these families (phimoe_a/b, glm4_moe_a/b in tests/hf/golden/make_hf_goldens.py) are
checked by tests/hf/test_hf.py once their fixtures are written. Here, without torch: checkpoints in the hub layout
(config.json as transformers saves it, tensors under their hub names, random values) are loaded and compared with a
numpy forward pass transcribed from transformers' modeling_phimoe.py and modeling_glm4_moe.py (logits within 1e-4,
the same greedy tokens, cached decoding included); save -> load gives identical arrays, the same tensor names and the
same config; the new pieces against numpy transcriptions of the transformers functions they follow.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from moejax.configs import base

from moejax import attention, generate, hf, model, parallel
from moejax.hf import io
from moejax.moe import intervene, intervention, routers
from moejax.moe import layer as moe_layer
from tests.helpers_hf import flat

TOL = 1e-4
BATCH, SEQ, PROMPT, NEW = 2, 12, 4, 8


# ----------------------------------------------------------------------------------------------- numpy reference


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def linear(x, t, name, bias=True):
    out = x @ t[f"{name}.weight"].T
    return out + t[f"{name}.bias"] if bias and f"{name}.bias" in t else out


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def layer_norm(x, weight, bias, eps):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + eps) * weight + bias


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def sparsemixer_np(scores: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ``sparsemixer`` with training=False, line by line (float32 as there)."""
    scores = scores.astype(np.float32)
    eps2 = np.float32(2 * jitter_eps)
    threshold = scores.max(-1, keepdims=True)
    max_ind = scores.argmax(-1)[:, None]
    factor = np.maximum(np.abs(scores), threshold)
    mask = ((threshold - scores) / factor) > eps2
    masked_gates = softmax(np.where(mask, -np.inf, scores))
    multiplier = np.take_along_axis(masked_gates, max_ind, -1)
    masked_scores = scores.copy()
    np.put_along_axis(masked_scores, max_ind, -np.inf, -1)
    threshold = masked_scores.max(-1, keepdims=True)
    max_ind2 = masked_scores.argmax(-1)[:, None]
    factor = np.maximum(np.abs(scores), threshold)
    mask = ((threshold - scores) / factor) > eps2
    masked_gates_top2 = softmax(np.where(mask, -np.inf, masked_scores))
    multiplier2 = np.take_along_axis(masked_gates_top2, max_ind2, -1)
    return np.concatenate([multiplier, multiplier2], -1), np.concatenate([max_ind, max_ind2], -1)


def glm_router_np(logits, bias, raw):
    """transformers' Glm4MoeTopkRouter.forward after the linear map."""
    num_tokens, num_experts = logits.shape
    groups, top_k = raw.get("n_group", 1), raw["num_experts_per_tok"]
    scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores + bias
    group_scores = np.sort(choice.reshape(num_tokens, groups, -1), -1)[..., -2:].sum(-1)
    group_idx = np.argsort(-group_scores, -1, kind="stable")[:, :raw.get("topk_group", 1)]
    group_mask = np.zeros_like(group_scores)
    np.put_along_axis(group_mask, group_idx, 1, -1)
    score_mask = np.repeat(group_mask, num_experts // groups, axis=-1).astype(bool)
    choice = np.where(score_mask, choice, -np.inf)
    idx = np.argsort(-choice, -1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, idx, -1)
    if raw.get("norm_topk_prob", True):
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * raw.get("routed_scaling_factor", 1.0), idx


def rope_of(raw: dict, head_dim: int, seq: int, phimoe: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [S, R] of the families' rotary embeddings (PhimoeRotaryEmbedding, Glm4MoeRotaryEmbedding)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta") or raw.get("rope_theta") or (1e6 if phimoe else 10000.0)
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0 if phimoe else 0.5))
    dim = int(head_dim * partial)
    base_freq = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    scale = 1.0
    if kind == "longrope":  # PhimoeRotaryEmbedding.forward: rope_init_fn(config) without seq_len; mscale by length
        original = raw.get("original_max_position_embeddings") or params["original_max_position_embeddings"]
        assert seq <= original, "the reference covers LongRoPE's short regime (transformers 5 keeps it past it)"
        inv_freq = 1.0 / (np.asarray(params["short_factor"], np.float32) * base_freq)
        scale = params["short_mscale"]
    else:
        assert kind == "default"
        inv_freq = 1.0 / base_freq
    freqs = np.arange(seq)[:, None] * inv_freq[None].astype(np.float64)
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb) * scale, np.sin(emb) * scale


def attention_np(h, t, p, raw, cos, sin, window, qk_norm):
    batch, seq, _ = h.shape
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    dh = raw.get("head_dim") or raw["hidden_size"] // heads
    q = linear(h, t, f"{p}self_attn.q_proj").reshape(batch, seq, heads, dh)
    k = linear(h, t, f"{p}self_attn.k_proj").reshape(batch, seq, kv_heads, dh)
    v = linear(h, t, f"{p}self_attn.v_proj").reshape(batch, seq, kv_heads, dh)
    if qk_norm:
        q = rms_norm(q, t[f"{p}self_attn.q_norm.weight"], raw["rms_norm_eps"])
        k = rms_norm(k, t[f"{p}self_attn.k_norm.weight"], raw["rms_norm_eps"])
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    rot = cos.shape[-1]

    def embed(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return np.concatenate([x_rot * cos + rotate_half(x_rot) * sin, x_pass], -1)

    q, k = embed(q), embed(k)
    k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
    logits = q @ k.transpose(0, 1, 3, 2) * dh ** -0.5
    i, j = np.arange(seq)[:, None], np.arange(seq)[None]
    visible = (j <= i) & ((j > i - window) if window else True)
    probs = softmax(np.where(visible, logits, -np.inf))
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, heads * dh)
    return linear(out, t, f"{p}self_attn.o_proj")


def glu_np(x, t, prefix, names=("gate_proj", "up_proj", "down_proj")):
    gate, up, down = (t[f"{prefix}.{n}.weight"] for n in names)
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def moe_np(h, weights, idx, t, prefix, names):
    flat_h = h.reshape(-1, h.shape[-1])
    out = np.zeros_like(flat_h)
    for row in range(flat_h.shape[0]):
        for slot in range(idx.shape[1]):
            out[row] += weights[row, slot] * glu_np(flat_h[row], t, f"{prefix}.experts.{idx[row, slot]}", names)
    return out.reshape(h.shape)


def phimoe_np(raw: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
    """PhimoeForCausalLM.forward (eval) on numpy arrays of the hub tensors."""
    heads = raw["num_attention_heads"]
    dh = raw.get("head_dim") or raw["hidden_size"] // heads
    eps = raw.get("rms_norm_eps", 1e-5)
    cos, sin = rope_of(raw, dh, tokens.shape[1], phimoe=True)
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = layer_norm(x, t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"], eps)
        x = x + attention_np(h, t, p, raw, cos, sin, raw.get("sliding_window"), False)
        h = layer_norm(x, t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"], eps)
        logits = h.reshape(-1, h.shape[-1]) @ t[p + "block_sparse_moe.gate.weight"].T
        weights, idx = sparsemixer_np(logits, raw.get("router_jitter_noise", 0.01))
        x = x + moe_np(h, weights, idx, t, p + "block_sparse_moe", ("w1", "w3", "w2"))
    x = layer_norm(x, t["model.norm.weight"], t["model.norm.bias"], eps)
    return linear(x, t, "lm_head")


def glm4_moe_np(raw: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
    """Glm4MoeForCausalLM.forward on numpy arrays of the hub tensors."""
    heads = raw["num_attention_heads"]
    dh = raw.get("head_dim") or raw["hidden_size"] // heads
    eps = raw["rms_norm_eps"]
    cos, sin = rope_of(raw, dh, tokens.shape[1], phimoe=False)
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
        x = x + attention_np(h, t, p, raw, cos, sin, None, raw.get("use_qk_norm", False))
        h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        if i < raw.get("first_k_dense_replace", 1):
            x = x + glu_np(h, t, p + "mlp")
            continue
        logits = (h.reshape(-1, h.shape[-1]) @ t[p + "mlp.gate.weight"].T).astype(np.float32)
        weights, idx = glm_router_np(logits, t[p + "mlp.gate.e_score_correction_bias"], raw)
        x = x + moe_np(h, weights, idx, t, p + "mlp", ("gate_proj", "up_proj", "down_proj"))
        x = x + glu_np(h, t, p + "mlp.shared_experts")
    x = rms_norm(x, t["model.norm.weight"], eps)
    return linear(x, t, "lm_head")


def greedy_np(forward, raw, t, prompt, steps):
    ids = np.asarray(prompt)
    for _ in range(steps):
        ids = np.concatenate([ids, forward(raw, t, ids)[:, -1].argmax(-1)[:, None]], axis=1)
    return ids[:, prompt.shape[1]:]


# ----------------------------------------------------------------------------------------------- hub checkpoints


def hub_tensors(raw: dict, family: str, seed: int = 0, extra_layers: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under the hub names and shapes of a config.json (norm scales around 1, biases small,
    weights ~ fan_in^-1/2, as make_hf_goldens.build draws them)."""
    rng = np.random.default_rng(seed)
    d, heads = raw["hidden_size"], raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    dh = raw.get("head_dim") or d // heads
    vocab = raw["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
                                          "lm_head.weight": (vocab, d)}
    if family == "phimoe":
        shapes["model.norm.bias"] = (d,)
        if raw.get("lm_head_bias"):
            shapes["lm_head.bias"] = (vocab,)
    for i in range(raw["num_hidden_layers"] + extra_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       a + "q_proj.weight": (heads * dh, d), a + "k_proj.weight": (kv_heads * dh, d),
                       a + "v_proj.weight": (kv_heads * dh, d), a + "o_proj.weight": (d, heads * dh)})
        if raw.get("attention_bias"):
            shapes.update({p + "self_attn.q_proj.bias": (heads * dh,), p + "self_attn.k_proj.bias": (kv_heads * dh,),
                           p + "self_attn.v_proj.bias": (kv_heads * dh,)})
            if family == "phimoe":
                shapes[p + "self_attn.o_proj.bias"] = (d,)
        if family == "phimoe":
            f, experts = raw["intermediate_size"], raw["num_local_experts"]
            shapes.update({p + "input_layernorm.bias": (d,), p + "post_attention_layernorm.bias": (d,),
                           p + "block_sparse_moe.gate.weight": (experts, d)})
            for j in range(experts):
                e = f"{p}block_sparse_moe.experts.{j}."
                shapes.update({e + "w1.weight": (f, d), e + "w3.weight": (f, d), e + "w2.weight": (d, f)})
            continue
        if raw.get("use_qk_norm"):
            shapes.update({p + "self_attn.q_norm.weight": (dh,), p + "self_attn.k_norm.weight": (dh,)})
        if i < raw.get("first_k_dense_replace", 1):
            f = raw["intermediate_size"]
            shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                           p + "mlp.down_proj.weight": (d, f)})
            continue
        f, experts, shared = raw["moe_intermediate_size"], raw["n_routed_experts"], raw["n_shared_experts"]
        shapes.update({p + "mlp.gate.weight": (experts, d), p + "mlp.gate.e_score_correction_bias": (experts,)})
        for prefix, width in [*((f"{p}mlp.experts.{j}.", f) for j in range(experts)),
                              (f"{p}mlp.shared_experts.", f * shared)]:
            shapes.update({prefix + "gate_proj.weight": (width, d), prefix + "up_proj.weight": (width, d),
                           prefix + "down_proj.weight": (d, width)})
        if i >= raw["num_hidden_layers"]:  # a multi-token-prediction layer's own tensors
            shapes.update({p + "enorm.weight": (d,), p + "hnorm.weight": (d,), p + "eh_proj.weight": (d, 2 * d),
                           p + "shared_head.norm.weight": (d,)})
    tensors = {}
    for name, shape in sorted(shapes.items()):
        noise = rng.standard_normal(shape)
        if "norm" in name:
            value = 1.0 + 0.2 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = noise
        else:
            value = noise * shape[-1] ** -0.5
        tensors[name] = value.astype(np.float32)
    for i in range(raw["num_hidden_layers"], raw["num_hidden_layers"] + extra_layers):  # the MTP layers' copies
        tensors[f"model.layers.{i}.shared_head.head.weight"] = tensors["lm_head.weight"].copy()
        tensors[f"model.layers.{i}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
    return tensors


def write_checkpoint(directory: pathlib.Path, raw: dict, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    io.write_checkpoint(directory, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()],
                        hf.MAX_SHARD_BYTES)
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    return directory


COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              hidden_act="silu", initializer_range=0.02, max_position_embeddings=64, tie_word_embeddings=False,
              attention_dropout=0.0, torch_dtype="float32", use_cache=True)

# config.json files as the hub and transformers write them: the released layout (rope_theta and a legacy
# rope_scaling with 'type', Phi-3's top-level original_max_position_embeddings, fields transformers ignores) and
# transformers 5's (rope_parameters)
CASES = {
    "phimoe_hub": ("phimoe", dict(
        COMMON, architectures=["PhiMoEForCausalLM"], model_type="phimoe", intermediate_size=24, num_local_experts=4,
        num_experts_per_tok=2, rms_norm_eps=1e-5, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01,
        input_jitter_noise=0.01, hidden_dropout=0.0, router_aux_loss_coef=0.0, sliding_window=64, rope_theta=10000.0,
        original_max_position_embeddings=16, bos_token_id=1, eos_token_id=32000,
        auto_map={"AutoConfig": "configuration_phimoe.PhiMoEConfig"},
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.7, 2.5], "long_factor": [1.5, 3.0, 6.0, 9.0],
                      "short_mscale": 1.2, "long_mscale": 1.3, "original_max_position_embeddings": 16})),
    "phimoe_window": ("phimoe", dict(
        COMMON, architectures=["PhimoeForCausalLM"], model_type="phimoe", intermediate_size=16, num_local_experts=8,
        num_experts_per_tok=2, num_hidden_layers=3, rms_norm_eps=1e-5, attention_bias=False, lm_head_bias=False,
        router_jitter_noise=0.3, input_jitter_noise=0.0, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "glm4_moe_air": ("glm4_moe", dict(
        COMMON, architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", head_dim=16, intermediate_size=48,
        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
        topk_group=1, first_k_dense_replace=1, num_hidden_layers=3, norm_topk_prob=True, routed_scaling_factor=2.5,
        rms_norm_eps=1e-5, attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5, rope_theta=1000000,
        rope_scaling=None, num_nextn_predict_layers=1, pad_token_id=0, eos_token_id=[1, 2])),
    "glm4_moe_v5": ("glm4_moe", dict(
        COMMON, architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", intermediate_size=40,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2, n_group=1,
        topk_group=1, first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.0, rms_norm_eps=1e-6,
        attention_bias=False, use_qk_norm=True, num_mtp_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0})),
}
REFERENCE = {"phimoe": phimoe_np, "glm4_moe": glm4_moe_np}
MTP = {"glm4_moe_air": 1}  # checkpoint layers past num_hidden_layers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for name, (family, raw) in CASES.items():
        tensors = hub_tensors(raw, family, seed=len(out), extra_layers=MTP.get(name, 0))
        out[name] = (write_checkpoint(root / name, raw, tensors), tensors)
    return out


def tokens_of(vocab: int) -> np.ndarray:
    return np.random.RandomState(1234).randint(0, vocab, (BATCH, SEQ))


def logits_of(config, variables, tokens):
    return np.asarray(jax.jit(model.Transformer(config.model).apply)(variables, jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("name", CASES)
def test_logits_and_greedy_match_the_transformers_forward(name, checkpoints):
    family, raw = CASES[name]
    directory, tensors = checkpoints[name]
    config, variables = hf.load(directory)
    tokens = tokens_of(raw["vocab_size"])
    expected = REFERENCE[family](raw, {k: v.astype(np.float64) for k, v in tensors.items()}, tokens)
    diff = float(np.abs(logits_of(config, variables, tokens) - expected).max())
    assert diff <= TOL, f"{name}: max |logit diff| {diff}"
    prompt = tokens[:1, :PROMPT]
    want = greedy_np(REFERENCE[family], raw, {k: v.astype(np.float64) for k, v in tensors.items()}, prompt, NEW)
    got = generate.generate(config, variables, prompt, max_new_tokens=NEW)  # KV-cache decoding
    np.testing.assert_array_equal(got[:, PROMPT:], want)


@pytest.mark.parametrize("name", CASES)
def test_export_then_import_is_identical(name, checkpoints, tmp_path):
    family, raw = CASES[name]
    directory, tensors = checkpoints[name]
    config, variables = hf.load(directory)
    out = hf.save(config, variables, tmp_path / "out", model_type=family)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == family
    # without a name the newest family that expresses the model: q/k norms and a full rotary embedding make this
    # GLM-4.5 model a dots.llm1 one too (docs/families.md)
    inferred = hf.families.config_to_hf(config.model)["model_type"]
    assert inferred == ("dots1" if name == "glm4_moe_v5" else family), inferred
    assert set(io.Checkpoint(out).keys()) == set(tensors)  # the MTP layers of glm4_moe_air included
    config2, variables2 = hf.load(out)
    assert config2.model.to_dict() == config.model.to_dict()
    a, b = flat(variables), flat(variables2)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    ckpt = io.Checkpoint(out)
    for key in ckpt.keys():
        np.testing.assert_array_equal(np.asarray(ckpt.array(key)), tensors[key], err_msg=key)


@pytest.mark.parametrize("name", ["phimoe_window", "glm4_moe_air"])
def test_sharded_load_matches_unsharded(name, checkpoints):
    """On 8 devices with mesh expert=4 (and tensor=2 for the attention and the output head): the same logits."""
    directory = checkpoints[name][0]
    tokens = np.tile(tokens_of(CASES[name][1]["vocab_size"]), (2, 1))
    config, variables = hf.load(directory)
    reference = logits_of(config, variables, tokens)
    config.mesh.update(data=1, expert=4, tensor=2)
    mesh = parallel.make_mesh(config)
    config, sharded = hf.load(directory, mesh=mesh)
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), parallel.batch_sharding(mesh))
    logits = np.asarray(jax.jit(model.Transformer(config.model, mesh).apply)(sharded, batch))
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=0)


def test_phimoe_config_mapping():
    m = hf.read_config(CASES["phimoe_hub"][1]).model
    assert (m.norm, m.lm_head_bias, m.qkv_bias, m.o_bias, m.norm_eps) == ("layernorm", True, True, True, 1e-5)
    assert (m.moe.router.kind, m.moe.router.jitter_eps, m.moe.top_k, m.moe.num_experts) == ("sparsemixer", 0.01, 2, 4)
    assert m.layer_types == ("sliding",) * 2 and m.sliding_window == 64
    rs = m.rope_scaling
    assert (rs.kind, rs.short_factor, rs.long_factor, rs.short_mscale, rs.long_mscale,
            rs.original_max_position_embeddings) == ("longrope", (1.0, 1.1, 1.7, 2.5), (1.5, 3.0, 6.0, 9.0), 1.2, 1.3,
                                                     16)
    assert m.rope_theta == 10000.0 and (m.moe.balance_loss, m.moe.balance_coef) == ("switch", 0.0)
    window = hf.read_config(CASES["phimoe_window"][1]).model
    assert window.rope_scaling.kind == "none" and window.rope_theta == 500.0 and not window.lm_head_bias
    with pytest.raises(hf.HFConfigError, match="num_experts_per_tok=3 .* two experts"):
        hf.read_config({**CASES["phimoe_window"][1], "num_experts_per_tok": 3})
    with pytest.raises(hf.HFConfigError, match="rope_scaling=.*'yarn'.*short_mscale"):
        hf.read_config({**CASES["phimoe_window"][1], "rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                                                        "rope_theta": 1e4}})


def test_glm4_moe_config_mapping(capsys):
    m = hf.read_config(CASES["glm4_moe_air"][1]).model
    assert capsys.readouterr().err == ""  # every field is known
    assert (m.partial_rotary_factor, m.head_dim, m.qkv_bias, m.o_bias, m.qk_norm) == (0.5, 16, True, False, False)
    r = m.moe.router
    assert (r.kind, r.score, r.num_groups, r.topk_groups, r.group_score, r.group_mask_fill, r.norm_topk_prob,
            r.routed_scaling_factor) == ("topk", "sigmoid", 2, 1, "top2_sum", float("-inf"), True, 2.5)
    assert (m.first_dense_layers, m.moe.num_shared, m.moe.expert_ffn, m.ffn_dim) == (1, 1, 16, 48)
    v5 = hf.read_config(CASES["glm4_moe_v5"][1]).model
    assert (v5.partial_rotary_factor, v5.qk_norm, v5.qk_norm_scope, v5.rope_theta) == (1.0, True, "head", 500.0)
    # without the field, transformers' GLM-4.5 rotates half of each head
    raw = {k: v for k, v in CASES["glm4_moe_air"][1].items() if k != "partial_rotary_factor"}
    assert hf.read_config(raw).model.partial_rotary_factor == 0.5
    with pytest.raises(hf.HFConfigError, match="n_shared_experts=0"):
        hf.read_config({**raw, "n_shared_experts": 0})


def test_glm4_moe_mtp_layers_load(checkpoints):
    config, variables = hf.load(checkpoints["glm4_moe_air"][0])
    assert config.model.mtp_depth == 1 and "mtp_1" in variables["params"]


def test_other_families_refuse_the_new_options(checkpoints, tmp_path):
    config, variables = hf.load(checkpoints["phimoe_window"][0])
    with pytest.raises(hf.HFConfigError, match=r"model\.norm='layernorm' cannot be saved as mixtral"):
        hf.save(config, variables, tmp_path / "a", model_type="mixtral")
    config, variables = hf.load(checkpoints["glm4_moe_air"][0])
    with pytest.raises(hf.HFConfigError, match=r"model\.partial_rotary_factor=0\.5 cannot be saved as deepseek_v3"):
        hf.save(config, variables, tmp_path / "b", model_type="deepseek_v3")
    config.model.lm_head_bias = True
    with pytest.raises(hf.HFConfigError, match=r"model\.lm_head_bias=True cannot be saved as glm4_moe"):
        hf.families.config_to_hf(config.model, "glm4_moe")


def test_a_deepseek_v3_style_moejax_model_saves_as_glm4_moe(tmp_path):
    """configs/deepseek_v3.py's recipe on grouped-query attention (sigmoid router with groups masked at -inf and a
    learned selection bias, a shared expert, a first dense layer) is a GLM-4.5 model rotating whole heads."""
    from moejax.configs import deepseek_v3

    config = deepseek_v3.get_config()
    config.model.update(d_model=32, num_layers=2, num_heads=4, vocab_size=64, ffn_dim=48)
    config.model.moe.update(num_experts=16, expert_ffn=16)
    config.model.moe.router.group_mask_fill = float("-inf")
    variables = model.Transformer(config.model).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    state = jax.tree.map(lambda x: x + jnp.linspace(-0.1, 0.1, x.size).reshape(x.shape), variables["moe_state"])
    variables = {"params": variables["params"], "moe_state": state}
    out = hf.save(config, variables, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm4_moe"
    config2, variables2 = hf.load(out)
    tokens = np.arange(8)[None] % 64
    np.testing.assert_allclose(logits_of(config2, variables2, tokens), logits_of(config, variables, tokens),
                               atol=1e-5)


# ----------------------------------------------------------------------------------------------- the model pieces


def moe_section(**fields) -> ml_collections.ConfigDict:
    cfg = base.get_config().model.moe
    cfg.update(num_experts=8, top_k=2)
    cfg.router.update(kind="sparsemixer", **fields)
    return cfg


@pytest.mark.parametrize("jitter_eps", [0.01, 0.3, 0.0])
def test_sparsemixer_evaluation_routing_is_transformers(jitter_eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(256, 8)).astype(np.float32)
    logits[:32, 3] = logits[:32, 5] * (1 - 1.5 * jitter_eps)  # experts right at the threshold's edge
    logits[32:48] = -np.abs(logits[32:48])  # every logit negative
    route = routers.route(jnp.asarray(logits), moe_section(jitter_eps=jitter_eps))
    weights, experts = sparsemixer_np(logits, jitter_eps)
    np.testing.assert_array_equal(np.asarray(route.experts), experts)
    np.testing.assert_allclose(np.asarray(route.weights), weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(route.probs), softmax(logits), rtol=1e-6, atol=1e-7)
    if jitter_eps == 0.0:  # nothing but the selected expert (and exact ties: the first rows) in its softmax
        assert np.allclose(np.asarray(route.weights)[32:], 1.0)


def test_sparsemixer_training_samples_within_the_mask_with_the_midpoint_weights():
    cfg = moe_section(jitter_eps=0.3)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4096, 8)), jnp.float32)
    route = routers.route(logits, cfg, train=True, rng=jax.random.key(0))
    experts, weights = np.asarray(route.experts), np.asarray(route.weights)
    assert (experts[:, 0] != experts[:, 1]).all()
    evaluation = routers.route(logits, cfg)
    best = np.asarray(evaluation.experts)
    # the first slot samples among the experts within the threshold of the best one
    lg = np.asarray(logits)
    top = lg.max(-1, keepdims=True)
    inside = (top - lg) / np.maximum(np.abs(lg), top) <= 0.6
    assert inside[np.arange(len(lg)), experts[:, 0]].all()
    sampled_away = experts[:, 0] != best[:, 0]
    assert 0.05 < sampled_away.mean() < 0.95
    # weight = the masked softmax at the sampled expert, times 1 (the best one, or one draw in four) or 0.3333
    masked = np.where(inside, lg, -np.inf)
    gate = softmax(masked)[np.arange(len(lg)), experts[:, 0]]
    ratio = weights[:, 0] / gate
    assert np.allclose(ratio[~sampled_away], 1.0, atol=1e-6)
    third = np.isclose(ratio[sampled_away], 0.3333, atol=1e-6)
    assert np.allclose(ratio[sampled_away][~third], 1.0, atol=1e-6)
    assert 0.65 < third.mean() < 0.85  # kept at 1 with probability 1/4
    # the gradient is the masked softmax's own (the 1 / 0.3333 factor held out of it)
    grad = jax.grad(lambda z: routers.route(z, cfg, train=True, rng=jax.random.key(0)).weights[:, 0].sum())(logits)
    one_hot = np.eye(8)[experts[:, 0]]
    expected = gate[:, None] * (one_hot - softmax(masked))
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)


def test_sparsemixer_spec_interventions_and_validation():
    cfg = moe_section(jitter_eps=0.3)
    moe_layer.validate(cfg)
    spec = routers.spec("sparsemixer")
    assert spec.needs_rng and spec.ranks_by_score and not spec.ranks_in_training and not routers.renormalises(cfg)
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(64, 8)), jnp.float32)
    masked = routers.route(logits, cfg, bias=jnp.where(jnp.arange(8) < 3, -jnp.inf, 0.0))  # a mask's selection bias
    assert (np.asarray(masked.experts) >= 3).all()
    wide = cfg.copy_and_resolve_references()
    wide.top_k = 8  # the whole ranking, as rank interventions ask for it: the logits' order
    ranking = np.asarray(routers.route(logits, wide).experts)
    np.testing.assert_array_equal(ranking, np.argsort(-np.asarray(logits), -1, kind="stable"))
    m = tiny_model()
    m.moe.router.kind = "sparsemixer"
    iv = intervention.mask_experts(m, {0: [1]})
    intervene.check_router(iv, m.moe, train=False)
    with pytest.raises(intervention.InterventionError, match="samples each slot's expert"):
        intervene.check_router(iv, m.moe, train=True)
    cfg.router.jitter_eps = -0.1
    with pytest.raises(Exception, match="jitter_eps"):
        moe_layer.validate(cfg)


def layer_norm_case():
    x = np.random.default_rng(0).normal(1.0, 2.0, size=(3, 5, 16)).astype(np.float32)
    scale, bias = (np.random.default_rng(i).normal(size=16).astype(np.float32) for i in (1, 2))
    return x, scale, bias


def test_layer_norm_is_torchs():
    x, scale, bias = layer_norm_case()
    out = attention.LayerNorm(1e-5).apply({"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(np.asarray(out), layer_norm(x.astype(np.float64), scale, bias, 1e-5), atol=1e-5)


def tiny_model(**fields) -> ml_collections.ConfigDict:
    m = base.get_config().model
    m.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48)
    m.moe.update(num_experts=4, top_k=2, expert_ffn=16)
    m.update(fields)
    model.validate(m)
    return m


def test_layernorm_and_head_bias_parameters():
    m = tiny_model(norm="layernorm", lm_head_bias=True)
    params = model.Transformer(m).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert params["final_norm"]["bias"].shape == (32,) and params["layers_0"]["attn_norm"]["bias"].shape == (32,)
    assert params["lm_head"]["bias"].shape == (64,)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.5 if getattr(path[-1], "key", "") == "bias" else v, params)
    tokens = jnp.arange(6)[None]
    with_bias = model.Transformer(m).apply({"params": params}, tokens)
    params["lm_head"]["bias"] = params["lm_head"]["bias"] - 0.5
    np.testing.assert_allclose(np.asarray(with_bias - model.Transformer(m).apply({"params": params}, tokens)), 0.5,
                               atol=1e-5)
    with pytest.raises(Exception, match="model.lm_head_bias"):
        tiny_model(lm_head_bias=True, tie_embeddings=True)
    with pytest.raises(Exception, match="model.norm"):
        tiny_model(norm="batch")


def test_partial_rotary_turns_the_first_dims_of_each_head():
    m = tiny_model(partial_rotary_factor=0.25, head_dim=16)
    assert attention.rotary_dims(m) == 4
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 7, 2, 16)), jnp.float32)
    out = np.asarray(attention.rope_heads(m, x))
    np.testing.assert_array_equal(out[..., 4:], np.asarray(x)[..., 4:])
    inv_freq = 1.0 / (m.rope_theta ** (np.arange(0, 4, 2) / 4))
    emb = np.concatenate([np.arange(7)[:, None] * inv_freq] * 2, -1)[None, :, None]
    expected = np.asarray(x)[..., :4] * np.cos(emb) + rotate_half(np.asarray(x)[..., :4]) * np.sin(emb)
    np.testing.assert_allclose(out[..., :4], expected, atol=1e-5)
    with pytest.raises(Exception, match="partial_rotary_factor"):
        tiny_model(partial_rotary_factor=0.1)  # int(8 * 0.1) = 0 rotary dims


def test_longrope_switches_to_the_long_factors_past_the_original_length():
    """LongRoPE as Microsoft's Phi-3.5 code and transformers' longrope rule define it: short factors and mscale up to
    original_max_position_embeddings positions, long ones beyond, for the whole sequence."""
    short, long = (1.0, 1.5, 2.0, 4.0), (2.0, 3.0, 5.0, 8.0)
    m = tiny_model(rope_theta=100.0)
    m.rope_scaling.update(kind="longrope", short_factor=short, long_factor=long, short_mscale=1.1, long_mscale=1.4,
                          original_max_position_embeddings=6)
    model.validate(m)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 2, 8)), jnp.float32)

    def expected(seq, factors, mscale):
        inv_freq = 1.0 / (np.asarray(factors) * 100.0 ** (np.arange(0, 8, 2) / 8))
        emb = np.concatenate([np.arange(seq)[:, None] * inv_freq] * 2, -1)[None, :, None]
        xs = np.asarray(x)[:, :seq]
        return (xs * np.cos(emb) + rotate_half(xs) * np.sin(emb)) * mscale

    np.testing.assert_allclose(np.asarray(attention.rope(m, x[:, :6])), expected(6, short, 1.1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(attention.rope(m, x)), expected(8, long, 1.4), atol=1e-5)
    # with a cache, the positions' largest + 1 decides (a traced value)
    positions = jnp.arange(8)[None]
    np.testing.assert_allclose(np.asarray(jax.jit(lambda a, p: attention.rope(m, a, p))(x, positions)),
                               expected(8, long, 1.4), atol=1e-5)
    with pytest.raises(Exception, match="short_factor"):
        m.rope_scaling.short_factor = (1.0, 2.0)
        model.validate(m)
