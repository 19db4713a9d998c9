"""The dense released families (llama, mistral, qwen2, qwen3, olmo2, phi3) beyond the golden logits and round trips
that tests/hf/test_hf.py runs on every case: cached decoding against the goldens' greedy tokens (post-norm blocks,
sliding windows, LongRoPE and Llama 3.1's rotary scaling under a KV cache); a sharded load of Phi-3's fused tensors
on 8 devices; the config mapping's defaults and refusals; which family a dense moejax model saves as; and a
``python -m moejax.main`` fine-tune (in process) of 2 steps from a golden fixture."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

import moejax
from moejax import generate, hf, model, parallel
from moejax.hf import io
from moejax.training import loop
from tests.helpers_hf import flat, golden_dir, release_with_tokenizer


def logits_of(config, variables, tokens, mesh=None) -> np.ndarray:
    return np.asarray(jax.jit(model.Transformer(config.model, mesh).apply)(variables, jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("case", ["olmo2_a", "phi3_a", "llama_b", "qwen2_a"])
def test_cached_decoding_gives_the_golden_greedy_tokens(case):
    directory = golden_dir(case)
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory)
    prompt = golden["prompt"]
    got = generate.generate(config, variables, prompt, max_new_tokens=golden["greedy"].shape[1])
    np.testing.assert_array_equal(got[:, prompt.shape[1]:], golden["greedy"])


def test_phi3_fused_tensors_load_sharded_and_split_as_stored(monkeypatch):
    """phi3_a on 8 devices (data 2 x fsdp 2 x tensor 2): the logits of the unsharded load; q, k and v are the row
    blocks of qkv_proj and gate / up the halves of gate_up_proj, as transformers' Phi-3 splits them."""
    directory = golden_dir("phi3_a")
    tokens = np.tile(np.load(directory / "golden.npz")["tokens"], (2, 1))
    config, variables = hf.load(directory)
    reference = logits_of(config, variables, tokens)
    ckpt = io.Checkpoint(directory)
    qkv = np.asarray(ckpt.array("model.layers.1.self_attn.qkv_proj.weight"))
    gate_up = np.asarray(ckpt.array("model.layers.1.mlp.gate_up_proj.weight"))
    attn, ffn = variables["params"]["layers_1"]["attn"], variables["params"]["layers_1"]["ffn"]
    heads, kv, dh = config.model.num_heads, config.model.num_kv_heads, 8
    np.testing.assert_array_equal(np.asarray(attn["q"]["kernel"]).reshape(32, -1), qkv[:heads * dh].T)
    np.testing.assert_array_equal(np.asarray(attn["v"]["kernel"]).reshape(32, -1), qkv[(heads + kv) * dh:].T)
    np.testing.assert_array_equal(np.asarray(ffn["wi_1"]), gate_up[48:].T)

    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = parallel.make_mesh(config)
    config, sharded = hf.load(directory, mesh=mesh)
    q = sharded["params"]["layers_0"]["attn"]["q"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(16, 2, 8)}  # fsdp over D, tensor over the heads
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), parallel.batch_sharding(mesh))
    np.testing.assert_allclose(logits_of(config, sharded, batch, mesh), reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- config mapping


def golden_config(case: str) -> dict:
    return json.loads((golden_dir(case) / "config.json").read_text())


def test_config_defaults_of_transformers_are_read():
    raw = golden_config("qwen3_a")
    del raw["head_dim"]  # Qwen3Config's default head_dim is 128, not hidden_size // heads
    assert hf.read_config(raw).model.head_dim == 128
    raw = golden_config("mistral_a")
    del raw["sliding_window"]  # MistralConfig's default window 4096 on every layer
    m = hf.read_config(raw).model
    assert (m.sliding_window, set(m.layer_types)) == (4096, {"sliding"})
    raw = golden_config("qwen2_a")  # the hub's fields: layers from max_window_layers on slide
    raw.pop("layer_types")
    raw.update(num_hidden_layers=4, max_window_layers=3)
    assert hf.read_config(raw).model.layer_types == ("full", "full", "full", "sliding")
    raw["use_sliding_window"] = False
    assert hf.read_config(raw).model.layer_types == ()
    m = hf.read_config(golden_config("olmo2_a")).model
    assert (m.norm_position, m.qk_norm_scope, m.moe_every) == ("post", "proj", 0)
    m = hf.read_config(golden_config("llama_b")).model
    assert (m.rope_scaling.kind, m.rope_scaling.factor, m.rope_scaling.high_freq_factor) == ("llama3", 4.0, 4.0)
    m = hf.read_config(golden_config("phi3_a")).model  # LongRoPE's attention factor from the context ratio
    assert m.partial_rotary_factor == 0.5
    assert m.rope_scaling.short_mscale == m.rope_scaling.long_mscale == pytest.approx(
        np.sqrt(1 + np.log(64 / 16) / np.log(16)))


@pytest.mark.parametrize("case, change, match", [
    ("llama_a", {"mlp_bias": True}, r"llama config field mlp_bias=True cannot be represented in moejax: moejax's "
                                    r"dense GLU has no biases"),
    ("llama_a", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     r"llama config field rope_scaling=.*'dynamic'.*rotary scalings in moejax: llama3, linear, yarn, longrope"),
    ("llama_a", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}},
     r"rope_scaling=.* a 'llama3' scaling needs low_freq_factor"),
    ("olmo2_a", {"head_dim": 16}, r"olmo2 config field head_dim=16 cannot be represented"),
    ("phi3_a", {"rope_parameters": {"rope_type": "llama3", "factor": 2.0}}, r"phi3's rotary scalings in moejax: "
                                                                             r"longrope"),
    ("qwen2_a", {"layer_types": ["full_attention", "chunked_attention"]}, r"layer_types=.* each 'full_attention' or "
                                                                           r"'sliding_attention'"),
])
def test_unrepresentable_fields_are_named(case, change, match):
    raw = golden_config(case)
    raw.update(change)
    with pytest.raises(hf.HFConfigError, match=match):
        hf.read_config(raw)


def dense_variables(config):
    shapes = jax.eval_shape(model.Transformer(config.model).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(0)
    return {"params": jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes["params"])}


@pytest.mark.parametrize("fields, family", [
    ({}, "llama"),
    ({"layer_types": ("sliding", "sliding"), "sliding_window": 3}, "mistral"),
    ({"layer_types": ("full", "sliding"), "sliding_window": 3, "qkv_bias": True}, "qwen2"),
    ({"qk_norm": True}, "qwen3"),
    ({"norm_position": "post", "qk_norm": True, "qk_norm_scope": "proj"}, "olmo2"),
    ({"partial_rotary_factor": 0.5}, "phi3"),
])
def test_a_dense_moejax_model_saves_as_the_family_that_expresses_it(fields, family, tmp_path):
    config = base.get_config()
    config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, vocab_size=64,
                        moe_every=0, **fields)
    variables = dense_variables(config)
    out = hf.save(config, variables, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    config2, variables2 = hf.load(out)
    tokens = np.arange(10)[None] % 64
    np.testing.assert_allclose(logits_of(config2, variables2, tokens), logits_of(config, variables, tokens), atol=1e-5)


def test_saving_refuses_what_a_dense_family_cannot_express(tmp_path):
    config, variables = hf.load(golden_dir("olmo2_a"))
    with pytest.raises(hf.HFConfigError, match=r"model\.norm_position='post' cannot be saved as llama: llama has no "
                                               r"such option"):
        hf.save(config, variables, tmp_path / "a", model_type="llama")
    with pytest.raises(hf.HFConfigError, match=r"model\.norm_position='post' cannot be saved as olmoe"):
        hf.save(config, variables, tmp_path / "b", model_type="olmoe")
    config, variables = hf.load(golden_dir("mixtral_a"))
    with pytest.raises(hf.HFConfigError, match=r"model\.moe_every=1 cannot be saved as llama: llama is dense: it has "
                                               r"no MoE layers"):
        hf.save(config, variables, tmp_path / "c", model_type="llama")


# ----------------------------------------------------------------------------------------------- fine-tuning


def test_main_fine_tunes_a_dense_release_from_its_golden_fixture(stdlib_corpus, tmp_path):
    """init_from='hf:<olmo2_a with a tokenizer>': 2 steps in process; the step-0 evaluation is the release's own
    model (its loss finite, logged before any step), and the trained weights differ from the release's."""
    directory = release_with_tokenizer("olmo2_a", tmp_path / "release", stdlib_corpus)
    config = base.get_config()
    config.init_from = f"hf:{directory}"
    config.data.update(name=f"text:{stdlib_corpus}/*.py", dir=str(stdlib_corpus.parent / "cache"), eval_batches=1)
    config.train.update(steps=2, batch_size=8, seq_len=16, warmup_steps=1, log_every=1, eval_every=0)
    config.checkpoint.every_steps = 2
    workdir = tmp_path / "run"
    loop.run(config, workdir)
    trained_config, trained = moejax.load(workdir)
    assert trained_config.model.norm_position == "post" and trained_config.data.tokenizer == f"hf:{directory}"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2]
    released = flat(hf.load(directory)[1])
    now = flat(trained)
    assert released.keys() == {k for k in now if k.startswith("params/")} | {
        k for k in released if k.startswith("moe_state/")}
    assert any(not np.array_equal(now[k], v) for k, v in released.items())
