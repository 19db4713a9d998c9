"""moejax/attention.py against numpy written from the formulas (loops over heads and positions): grouped-query
attention with biases, both qk-norm scopes and clamping, sliding windows and sinks, interleaved and half rotary
layouts, YaRN frequencies and attention factor, Multi-head Latent Attention; the parameter trees the checkpoint
converters rely on; the config checks; and one live check per family against transformers' own attention module."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import attention, checks, model
from tests import reference as ref

D, H, S = 32, 4, 10
MLA = {"mla.kv_lora_rank": 8, "mla.qk_nope_head_dim": 6, "mla.qk_rope_head_dim": 4, "mla.v_head_dim": 5}
YARN = {"rope_scaling.kind": "yarn", "rope_scaling.factor": 8.0, "rope_scaling.original_max_position_embeddings": 64}


def config(**fields):
    """A validated ``model`` section of width D with H heads; dotted keys reach nested fields."""
    cfg = base.get_config().model
    cfg.update(d_model=D, num_heads=H, num_layers=2, ffn_dim=16, vocab_size=64)
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    model.validate(cfg)
    return cfg


def random_params(module, x, seed=1):
    """The module's parameters with every leaf random (norm scales around 1), so that biases and sinks count."""
    params = module.init(jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, p):
        noise = rng.normal(size=p.shape)
        value = 1.0 + 0.2 * noise if path[-1].key == "scale" else (noise if path[-1].key == "sinks" else 0.3 * noise)
        return jnp.asarray(value, p.dtype)

    return jax.tree_util.tree_map_with_path(draw, params)


# ----------------------------------------------------------------------------------------------- numpy references


def np_rope(x, inv_freq, factor=1.0, interleave=False):
    """x [S, N, R] rotated pair by pair at positions 0..S-1; pairs (i, i + R/2), or (2i, 2i + 1) in place."""
    out = np.array(x, np.float64)
    half = x.shape[-1] // 2
    for p in range(x.shape[0]):
        for i in range(half):
            a, b = (2 * i, 2 * i + 1) if interleave else (i, i + half)
            c, s = math.cos(p * inv_freq[i]) * factor, math.sin(p * inv_freq[i]) * factor
            out[p, :, a], out[p, :, b] = x[p, :, a] * c - x[p, :, b] * s, x[p, :, b] * c + x[p, :, a] * s
    return out


def np_attend(q, k, v, scale, window=0, sinks=None):
    """q [T, N, Dk], k [T, K, Dk], v [T, K, Dv]: causal softmax attention per head and query position."""
    seq, heads = q.shape[:2]
    groups = heads // k.shape[1]
    out = np.zeros((seq, heads, v.shape[-1]))
    for n in range(heads):
        for i in range(seq):
            keys = [j for j in range(i + 1) if not window or i - j < window]
            scores = np.array([q[i, n] @ k[j, n // groups] * scale for j in keys])
            top = max(scores.max(), sinks[n]) if sinks is not None else scores.max()
            weights = np.exp(scores - top)
            denominator = weights.sum() + (math.exp(sinks[n] - top) if sinks is not None else 0.0)
            out[i, n] = sum(w * v[j, n // groups] for w, j in zip(weights / denominator, keys, strict=True))
    return out


def np_inv_freq(cfg, dim):
    if cfg.rope_scaling.kind == "yarn":
        return np_yarn(dim, cfg.rope_theta, cfg.rope_scaling)
    return cfg.rope_theta ** (-np.arange(0, dim, 2) / dim), 1.0


def np_yarn(dim, base_, rs):
    """YaRN from the formulas (float64): (inv_freq, attention factor)."""
    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rs.factor
    mscale = get_mscale(factor, rs.mscale) / get_mscale(factor, rs.mscale_all_dim) if rs.mscale and \
        rs.mscale_all_dim else get_mscale(factor)
    turns = [dim * math.log(rs.original_max_position_embeddings / (b * 2 * math.pi)) / (2 * math.log(base_))
             for b in (rs.beta_fast, rs.beta_slow)]
    low, high = (math.floor(turns[0]), math.ceil(turns[1])) if rs.truncate else turns
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    freqs = base_ ** (-np.arange(0, dim, 2) / dim)
    return freqs / factor * ramp + freqs * (1 - ramp), mscale


def np_gqa(p, x, cfg, window=0):
    """The GQA module on one sequence x [S, D]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    proj = {n: np.einsum("sd,dhk->shk", x, p[n]["kernel"]) + p[n].get("bias", 0.0) for n in "qkv"}
    q, k, v = proj["q"], proj["k"], proj["v"]
    if cfg.qk_norm and cfg.qk_norm_scope == "proj":
        q = ref.rms_norm(q.reshape(S, -1), p["q_norm"]["scale"], cfg.norm_eps).reshape(q.shape)
        k = ref.rms_norm(k.reshape(S, -1), p["k_norm"]["scale"], cfg.norm_eps).reshape(k.shape)
    if cfg.clip_qkv:
        q, k, v = (np.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    if cfg.qk_norm and cfg.qk_norm_scope == "head":
        q, k = ref.rms_norm(q, p["q_norm"]["scale"], cfg.norm_eps), ref.rms_norm(k, p["k_norm"]["scale"], cfg.norm_eps)
    inv_freq, factor = np_inv_freq(cfg, q.shape[-1])
    q, k = (np_rope(t, inv_freq, factor, cfg.rope_interleave) for t in (q, k))
    out = np_attend(q, k, v, q.shape[-1] ** -0.5, window, p.get("sinks"))
    return np.einsum("shk,hkd->sd", out, p["o"]["kernel"]) + p["o"].get("bias", 0.0)


def np_mla(p, x, cfg):
    """MLA on one sequence x [S, D]; an interleaved rotary layout rotates the pairs in place (DeepSeek-V2's form)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    m = cfg.mla
    if m.q_lora_rank:
        q = np.einsum("sr,rhk->shk", ref.rms_norm(x @ p["q_a"]["kernel"], p["q_a_norm"]["scale"]), p["q_b"]["kernel"])
    else:
        q = np.einsum("sd,dhk->shk", x, p["q"]["kernel"])
    latent = x @ p["kv_a"]["kernel"]
    c_kv, k_rot = ref.rms_norm(latent[:, :m.kv_lora_rank], p["kv_a_norm"]["scale"]), latent[:, m.kv_lora_rank:]
    inv_freq, factor = np_inv_freq(cfg, m.qk_rope_head_dim)
    q_rot = np_rope(q[..., m.qk_nope_head_dim:], inv_freq, factor, cfg.rope_interleave)
    k_rot = np_rope(k_rot[:, None, :], inv_freq, factor, cfg.rope_interleave)
    kv = np.einsum("sr,rhk->shk", c_kv, p["kv_b"]["kernel"])
    q = np.concatenate([q[..., :m.qk_nope_head_dim], q_rot], -1)
    k = np.concatenate([kv[..., :m.qk_nope_head_dim], np.repeat(k_rot, H, axis=1)], -1)
    scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    if cfg.rope_scaling.kind == "yarn" and cfg.rope_scaling.mscale_all_dim:
        scale *= (0.1 * cfg.rope_scaling.mscale_all_dim * math.log(cfg.rope_scaling.factor) + 1.0) ** 2
    out = np_attend(q, k, kv[..., m.qk_nope_head_dim:], scale, 0, p.get("sinks"))
    return np.einsum("shk,hkd->sd", out, p["o"]["kernel"])


# ----------------------------------------------------------------------------------------------- tests

GQA_CASES = {
    "biases-head_dim-gqa": (dict(qkv_bias=True, o_bias=True, head_dim=6, num_kv_heads=2), 0),
    "qk_norm-head-clip": (dict(qk_norm=True, clip_qkv=0.5), 0),
    "qk_norm-proj-clip-bias": (dict(qk_norm=True, qk_norm_scope="proj", clip_qkv=0.5, qkv_bias=True), 0),
    "sliding": (dict(num_kv_heads=2), 3),
    "sinks-sliding-yarn": (dict(attention_sinks=True, qkv_bias=True, o_bias=True, **YARN,
                                **{"rope_scaling.truncate": False}), 4),
    "sinks-full": (dict(attention_sinks=True, num_kv_heads=1), 0),
    "interleave-yarn-mscale": (dict(rope_interleave=True, **YARN, **{"rope_scaling.mscale_all_dim": 0.7}), 0),
}


@pytest.mark.parametrize("case", list(GQA_CASES))
def test_gqa_variants_match_numpy(case):
    fields, window = GQA_CASES[case]
    cfg = config(**fields)
    module = attention.Attention(cfg, jnp.float32, jax.nn.initializers.normal(0.3), window)
    x = jax.random.normal(jax.random.key(2), (2, S, D))
    params = random_params(module, x)
    got = module.apply({"params": params}, x)
    for b in range(2):
        np.testing.assert_allclose(got[b], np_gqa(params, np.asarray(x[b], np.float64), cfg, window), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("fields", [dict(MLA, **{"mla.q_lora_rank": 0}),
                                    dict(MLA, rope_interleave=True, **YARN,
                                         **{"mla.q_lora_rank": 7, "rope_scaling.mscale_all_dim": 1.0})],
                         ids=["full-q", "q_lora-interleave-yarn"])
def test_mla_matches_numpy(fields):
    cfg = config(attention="mla", **fields)
    module = attention.MLAttention(cfg, jnp.float32, jax.nn.initializers.normal(0.3))
    x = jax.random.normal(jax.random.key(3), (2, S, D))
    params = random_params(module, x)
    got = module.apply({"params": params}, x)
    for b in range(2):
        np.testing.assert_allclose(got[b], np_mla(params, np.asarray(x[b], np.float64), cfg), rtol=1e-4, atol=1e-4)
    c_kv, k_rot = module.apply({"params": params}, x, method="latent")  # what a KV cache keeps
    assert c_kv.shape == (2, S, cfg.mla.kv_lora_rank) and k_rot.shape == (2, S, cfg.mla.qk_rope_head_dim)


@pytest.mark.parametrize("window, sinks, dv", [(0, False, 6), (3, False, 6), (3, True, 6), (0, True, 5),
                                               (2, False, 5)])
def test_attention_core_masks_and_sinks(window, sinks, dv):
    """attend on both of its paths (jax's dot_product_attention; the explicit one for sinks or Dv != Dk)."""
    rng = np.random.default_rng(5)
    q, k = rng.normal(size=(1, S, 4, 6)), rng.normal(size=(1, S, 2, 6))
    v = rng.normal(size=(1, S, 2, dv))
    sink = rng.normal(size=4) * 2 if sinks else None
    got = attention.attend(*(jnp.asarray(t, jnp.float32) for t in (q, k, v)), window=window,
                           sinks=None if sink is None else jnp.asarray(sink, jnp.float32))
    np.testing.assert_allclose(got[0], np_attend(q[0], k[0], v[0], 6 ** -0.5, window, sink), rtol=1e-5, atol=1e-5)
    if window:  # the first key is outside the window of every query from position `window` on
        v2 = v.copy()
        v2[0, 0] += 10.0
        moved = attention.attend(*(jnp.asarray(t, jnp.float32) for t in (q, k, v2)), window=window)
        unmoved = attention.attend(*(jnp.asarray(t, jnp.float32) for t in (q, k, v)), window=window)
        np.testing.assert_array_equal(moved[0, window:], unmoved[0, window:])
        assert not np.allclose(moved[0, window - 1], unmoved[0, window - 1])


def test_interleaved_rope_is_the_half_rope_of_the_deinterleaved_input():
    x = np.random.default_rng(6).normal(size=(1, S, 3, 8)).astype(np.float32)
    inv_freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
    inter = attention.apply_rope(jnp.asarray(x), inv_freq, 1.3, interleave=True)
    np.testing.assert_allclose(inter, attention.apply_rope(jnp.asarray(x[..., perm]), inv_freq, 1.3), rtol=1e-6,
                               atol=1e-6)
    in_place = np_rope(x[0], inv_freq, 1.3, interleave=True)  # pairs rotated where they stand
    np.testing.assert_allclose(inter[0], in_place[..., perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attention.rotary(jnp.asarray(x), 10000.0)[0], np_rope(x[0], inv_freq), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("fields", [dict(), {"rope_scaling.truncate": False},
                                    {"rope_scaling.mscale": 0.5, "rope_scaling.mscale_all_dim": 1.0},
                                    {"rope_scaling.mscale": 0.0, "rope_scaling.mscale_all_dim": 1.0},
                                    {"rope_scaling.factor": 1.0, "rope_scaling.beta_fast": 4.0}])
def test_yarn_frequencies_and_attention_factor(fields):
    cfg = config(**{**YARN, **fields})
    for dim in (8, 64):
        inv_freq, factor = attention.yarn_parameters(dim, cfg.rope_theta, cfg.rope_scaling)
        want, want_factor = np_yarn(dim, cfg.rope_theta, cfg.rope_scaling)
        np.testing.assert_allclose(inv_freq, want, rtol=2e-6)
        assert factor == pytest.approx(want_factor, rel=1e-12)
    if cfg.rope_scaling.factor > 1:  # fast dims keep their frequency, slow dims are divided by the factor
        np.testing.assert_allclose(inv_freq[[0, -1]], [1.0, want[-1]], rtol=2e-6)
        assert inv_freq[-1] == pytest.approx(cfg.rope_theta ** (-62 / 64) / cfg.rope_scaling.factor, rel=1e-5)


def test_parameter_trees():
    """The names and shapes the checkpoint converters rely on."""
    x = jnp.zeros((1, 4, D))

    def shapes(cfg, cls=attention.Attention):
        tree = jax.eval_shape(lambda: cls(cfg, jnp.float32, jax.nn.initializers.normal(0.02)).init(
            jax.random.key(0), x))["params"]
        return {"/".join(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    assert shapes(config(qkv_bias=True, o_bias=True, head_dim=6, num_kv_heads=2, qk_norm=True, qk_norm_scope="proj",
                         attention_sinks=True)) == {
        "q/kernel": (D, H, 6), "q/bias": (H, 6), "k/kernel": (D, 2, 6), "k/bias": (2, 6), "v/kernel": (D, 2, 6),
        "v/bias": (2, 6), "o/kernel": (H, 6, D), "o/bias": (D,), "q_norm/scale": (H * 6,), "k_norm/scale": (2 * 6,),
        "sinks": (H,)}
    assert shapes(config(qk_norm=True))["q_norm/scale"] == (D // H,)
    assert shapes(config(attention="mla", **MLA, **{"mla.q_lora_rank": 7}), attention.MLAttention) == {
        "q_a/kernel": (D, 7), "q_a_norm/scale": (7,), "q_b/kernel": (7, H, 10), "kv_a/kernel": (D, 12),
        "kv_a_norm/scale": (8,), "kv_b/kernel": (8, H, 11), "o/kernel": (H, 5, D)}
    assert "q/kernel" in shapes(config(attention="mla", **MLA), attention.MLAttention)


def test_dense_layers_and_layer_types_shape_the_model():
    cfg = config(num_layers=4, dense_layers=(2,), layer_types=("sliding", "full", "sliding", "full"),
                 sliding_window=3)
    assert model.moe_layers(cfg) == [0, 1, 3]
    assert [model.attention_window(cfg, i) for i in range(4)] == [3, 0, 3, 0]
    tokens = jnp.arange(2 * S).reshape(2, S) % 64
    params = jax.eval_shape(lambda: model.Transformer(cfg).init(jax.random.key(0), tokens))["params"]
    assert "wi_0" in params["layers_2"]["ffn"] and "experts" in params["layers_3"]["ffn"]
    wide = config(num_layers=4, layer_types=("sliding",) * 4, sliding_window=S)  # a window as long as the input
    variables = model.Transformer(wide).init(jax.random.key(0), tokens)
    full = model.Transformer(config(num_layers=4)).apply(variables, tokens)
    np.testing.assert_allclose(model.Transformer(wide).apply(variables, tokens), full, rtol=1e-5, atol=1e-5)
    narrow = config(num_layers=4, layer_types=("sliding",) * 4, sliding_window=2)
    assert not np.allclose(model.Transformer(narrow).apply(variables, tokens), full, atol=1e-3)


@pytest.mark.parametrize("fields, match", [
    (dict(attention="mha"), r"model\.attention='mha'.*'gqa', 'mla'"),
    (dict(qk_norm_scope="layer"), r"model\.qk_norm_scope='layer'.*'head', 'proj'"),
    (dict(head_dim=5), r"model\.head_dim=5.*even"),
    (dict(clip_qkv=-1.0), r"model\.clip_qkv=-1\.0.*>= 0"),
    (dict(layer_types=("full",)), r"model\.layer_types=\('full',\).*num_layers=2"),
    (dict(layer_types=("full", "local")), r"model\.layer_types\[1\]='local'.*'full', 'sliding'"),
    (dict(layer_types=("full", "sliding")), r"model\.sliding_window=0.*>= 1"),
    (dict(dense_layers=(2,)), r"model\.dense_layers=\(2,\).*\[0, model\.num_layers=2\)"),
    (dict(dense_layers=(1, 1)), r"model\.dense_layers=\(1, 1\).*repeat"),
    (dict(scan_layers=True, dense_layers=(1,)), r"model\.dense_layers=\(1,\).*scan_layers"),
    (dict(scan_layers=True, layer_types=("full", "sliding"), sliding_window=2), r"model\.layer_types=.*scan"),
    ({"rope_scaling.kind": "ntk"}, r"model\.rope_scaling\.kind='ntk'.*'none', 'yarn'"),
    (dict(YARN, **{"rope_scaling.factor": 0.5}), r"model\.rope_scaling\.factor=0\.5.*>= 1"),
    (dict(YARN, **{"rope_scaling.beta_slow": 0.0}), r"model\.rope_scaling\.beta_slow=0\.0.*> 0"),
    (dict(MLA, attention="mla", **{"mla.qk_rope_head_dim": 3}), r"model\.mla\.qk_rope_head_dim=3.*even"),
    (dict(MLA, attention="mla", qkv_bias=True), r"model\.qkv_bias=True.*'mla'"),
    (dict(MLA, attention="mla", num_kv_heads=2), r"model\.num_kv_heads=2.*'mla'"),
    (dict(MLA, attention="mla", **{"mla.kv_lora_rank": 0}), r"model\.mla\.kv_lora_rank=0.*>= 1"),
])
def test_bad_attention_fields_are_named(fields, match):
    with pytest.raises(checks.ConfigError, match=match):
        config(**fields)


# ----------------------------------------------------------------------------------------------- transformers

HF_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
           "beta_fast": 32.0, "beta_slow": 1.0}


def hf_attention(family, hf_config, weights, x, window=0):
    """transformers' attention module of ``family`` (eager, HF's own causal / sliding mask functions) on x [B, S, D]
    with our weights as its state dict: (output, its rotary module)."""
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip(f"transformers.models.{family}.modeling_{family}")
    masking = pytest.importorskip("transformers.masking_utils")
    hf_config._attn_implementation = "eager"
    prefix = {"gpt_oss": "GptOss", "olmoe": "Olmoe", "deepseek_v3": "DeepseekV3"}[family]
    module = getattr(modeling, f"{prefix}Attention")(hf_config, 0)
    module.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in weights.items()}, strict=True)
    rotary = getattr(modeling, f"{prefix}RotaryEmbedding")(hf_config)
    allowed = masking.sliding_window_causal_mask_function(window) if window else masking.causal_mask_function
    zero, pos = torch.tensor(0), [torch.tensor(i) for i in range(S)]
    mask = torch.tensor([[0.0 if bool(allowed(zero, zero, i, j)) else torch.finfo(torch.float32).min for j in pos]
                         for i in pos])[None, None]
    with torch.no_grad():
        hidden = torch.tensor(np.asarray(x))
        out, _ = module(hidden_states=hidden, position_embeddings=rotary(hidden, torch.arange(S)[None]),
                        attention_mask=mask)
    return out.numpy(), rotary


def hf_linear(kernel, features_in):
    """Our kernel [in..., out...] as a torch Linear weight [out, in]."""
    return np.asarray(kernel).reshape(features_in, -1).T


def gqa_state_dict(p):
    d = {f"{n}_proj.weight": hf_linear(p[n]["kernel"], D) for n in "qkv"}
    d["o_proj.weight"] = hf_linear(p["o"]["kernel"], math.prod(p["o"]["kernel"].shape[:2]))
    d.update({f"{n}_proj.bias": np.asarray(p[n]["bias"]).reshape(-1) for n in "qkvo" if "bias" in p[n]})
    d.update({f"{n}.weight": p[n]["scale"] for n in ("q_norm", "k_norm") if n in p})
    if "sinks" in p:
        d["sinks"] = p["sinks"]
    return d


def run_ours(cfg, cls, window=0):
    module = cls(cfg, jnp.float32, jax.nn.initializers.normal(0.3), window)
    x = jax.random.normal(jax.random.key(4), (2, S, D))
    params = random_params(module, x)
    return x, params, np.asarray(module.apply({"params": params}, x))


def test_gpt_oss_attention_matches_transformers():
    """Sinks, a sliding layer (window 3), q/k/v/o biases, GQA, head_dim 8 and YaRN without truncation."""
    transformers = pytest.importorskip("transformers")
    cfg = config(num_kv_heads=2, head_dim=8, qkv_bias=True, o_bias=True, attention_sinks=True,
                 layer_types=("sliding", "full"), sliding_window=3, **YARN, **{"rope_scaling.truncate": False})
    x, params, ours = run_ours(cfg, attention.Attention, window=model.attention_window(cfg, 0))
    hf_config = transformers.GptOssConfig(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
        sliding_window=3, layer_types=["sliding_attention", "full_attention"], attention_bias=True,
        max_position_embeddings=512, rope_parameters=dict(HF_YARN, truncate=False))
    want, rotary = hf_attention("gpt_oss", hf_config, gqa_state_dict(params), x, window=3)
    inv_freq, factor = attention.yarn_parameters(8, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(rotary.attention_scaling, rel=1e-12)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)


def test_olmoe_attention_matches_transformers():
    """q/k RMSNorm over the whole projections, then clip_qkv, GQA."""
    transformers = pytest.importorskip("transformers")
    cfg = config(num_kv_heads=2, qk_norm=True, qk_norm_scope="proj", clip_qkv=0.5, norm_eps=1e-5)
    x, params, ours = run_ours(cfg, attention.Attention)
    hf_config = transformers.OlmoeConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=2, clip_qkv=0.5,
                                         num_hidden_layers=2, rms_norm_eps=1e-5)
    want, _ = hf_attention("olmoe", hf_config, gqa_state_dict(params), x)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)


def test_deepseek_v3_attention_matches_transformers():
    """MLA with a q bottleneck, interleaved rotary layout and YaRN with mscale_all_dim (softmax scale)."""
    transformers = pytest.importorskip("transformers")
    cfg = config(attention="mla", rope_interleave=True, **MLA, **YARN,
                 **{"mla.q_lora_rank": 7, "rope_scaling.mscale_all_dim": 1.0})
    x, params, ours = run_ours(cfg, attention.MLAttention)
    m = cfg.mla
    hf_config = transformers.DeepseekV3Config(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=7, kv_lora_rank=m.kv_lora_rank,
        qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
        rope_interleave=True, num_hidden_layers=2, max_position_embeddings=512,
        rope_parameters=dict(HF_YARN, mscale=1.0, mscale_all_dim=1.0))
    weights = {"q_a_proj.weight": hf_linear(params["q_a"]["kernel"], D),
               "q_a_layernorm.weight": params["q_a_norm"]["scale"],
               "q_b_proj.weight": hf_linear(params["q_b"]["kernel"], 7),
               "kv_a_proj_with_mqa.weight": hf_linear(params["kv_a"]["kernel"], D),
               "kv_a_layernorm.weight": params["kv_a_norm"]["scale"],
               "kv_b_proj.weight": hf_linear(params["kv_b"]["kernel"], m.kv_lora_rank),
               "o_proj.weight": hf_linear(params["o"]["kernel"], H * m.v_head_dim)}
    want, _ = hf_attention("deepseek_v3", hf_config, weights, x)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
