"""Weight-only quantised decoding (moejax/quant/decode.py, ``generate(..., quantise=)``): the weights dequantised from
int8 / packed int4 codes inside the step equal a numpy transcription of symmetric round-to-nearest; the tokens equal
generating with the fake-quantised model (16 experts: a decoding step's slots select a few, whose codes alone are
gathered and dequantised, moejax/moe/quantised.py), also on the 8 forced host devices with the codes and scales split
over mesh.expert; the parameters held are smaller; bad specs and meshes are named."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import cli, generate, model, parallel
from moejax.checks import ConfigError
from moejax.moe import quantised
from moejax.quant import decode, rules, transform


@pytest.fixture(scope="module")
def tiny():
    config = base.get_config()
    config.model.update(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
                        first_dense_layers=1)
    config.model.moe.update(num_experts=16, top_k=2, expert_ffn=16, num_shared=1, dispatch="dropless")
    variables = jax.jit(model.Transformer(config.model).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return config, variables


def rtn_reference(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Symmetric round to nearest of w [..., K, N]: per output channel and group of `group` inputs (K when 0),
    scale = amax / (2^(bits-1) - 1), codes round(w / scale) clipped, times the scale."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    k = w.shape[-2]
    g = group or k
    out = np.empty_like(w, np.float32)
    for lo in range(0, k, g):
        block = w[..., lo:lo + g, :].astype(np.float32)
        amax = np.abs(block).max(axis=-2, keepdims=True)
        scale = np.where(amax > 0, amax / qmax, np.float32(1)).astype(np.float32)
        out[..., lo:lo + g, :] = np.clip(np.round(block / scale), -qmax, qmax) * scale
    return out


@pytest.mark.parametrize("spec,bits,group", [("int8", 8, 0), ("int4/g8", 4, 8)])
def test_weights_dequantised_in_jax_equal_round_to_nearest(tiny, spec, bits, group):
    config, variables = tiny
    held = decode.quantise(config, variables, spec)
    experts = held["params"]["layers_1"]["ffn"]["experts"]["wi_0"]
    assert isinstance(experts, decode.QuantisedWeight)
    assert experts.codes.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert experts.codes.size == (16 * 32 * 16 if bits == 8 else 16 * 32 * 16 // 2)
    assert experts.stacked and experts.codes.shape[0] == 16  # split per expert: a step gathers its experts
    seen = jax.jit(decode.materialise)(held)["params"]  # every weight, the routed experts' too
    original = variables["params"]
    for path in (("layers_1", "ffn", "experts", "wi_0"), ("layers_1", "ffn", "shared", "wo"),
                 ("layers_0", "ffn", "wi_1"), ("layers_0", "attn", "q", "kernel")):
        a, b = original, seen
        for key in path:
            a, b = a[key], b[key]
        w = np.asarray(a)
        if path[-2] == "q":  # [D, H, Dh]: K = D, N = H * Dh
            expected = rtn_reference(w.reshape(w.shape[0], -1), bits, group).reshape(w.shape)
        else:
            expected = rtn_reference(w, bits, group)
        np.testing.assert_array_equal(np.asarray(b), expected, err_msg="/".join(path))
    for kept in (("layers_1", "ffn", "router", "kernel"), ("embed", "embedding"), ("lm_head", "kernel")):
        a, b = original, seen
        for key in kept:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


@pytest.mark.parametrize("spec,ratio", [("int8", 0.5), ("int4/g8", 0.45)])
def test_tokens_equal_the_fake_quantised_model_with_less_parameter_memory(tiny, spec, ratio):
    config, variables = tiny
    prompts = np.random.default_rng(0).integers(0, 61, (2, 5))
    tokens = generate.generate(config, variables, prompts, max_new_tokens=10, quantise=spec)
    numpy_params = jax.tree.map(np.asarray, variables["params"])
    fake, _ = transform.quantize(config, {**variables, "params": numpy_params},
                                 [rules.Rule(t, spec) for t in decode.DEFAULT_TARGETS])
    np.testing.assert_array_equal(tokens, generate.generate(config, transform.on_device(fake), prompts,
                                                            max_new_tokens=10))
    held = decode.quantise(config, variables, spec)
    assert decode.param_bytes(held) < ratio * decode.param_bytes(variables)
    assert decode.is_quantised(held) and not decode.is_quantised(variables)
    routed = decode.materialise(held, routed=False)["params"]["layers_1"]["ffn"]["experts"]
    # a decoding step's 2 tokens x top-2 slots gather at most 4 of the 16 experts; a prefill of 10 dequantises all
    assert quantised.gathers(tuple(routed.values()), 2 * 2, 16)
    assert not quantised.gathers(tuple(routed.values()), 2 * 5 * 2, 16)


def test_quantised_decoding_on_the_mesh_gives_one_devices_tokens(tiny):
    """data=4, expert=2: each device holds 8 experts' codes and scales and receives 4 routed slots per decoding
    step, so it gathers the selected ones inside shard_map."""
    config, variables = tiny
    config = config.copy_and_resolve_references()
    config.mesh.update(data=4, expert=2)
    prompts = np.random.default_rng(0).integers(0, 61, (2, 5))
    one = generate.generate(config, variables, prompts, max_new_tokens=10, quantise="int8")
    np.testing.assert_array_equal(generate.generate(config, variables, prompts, max_new_tokens=10, quantise="int8",
                                                    mesh=parallel.make_mesh(config)), one)
    config.mesh.update(data=1, expert=4, tensor=2)
    with pytest.raises(ConfigError, match=r"quantise='int8' is invalid: .*needs mesh.tensor=1 \(got 2\)"):
        generate.generate(config, variables, prompts, max_new_tokens=2, quantise="int8",
                          mesh=parallel.make_mesh(config))


def test_bad_specs_are_named(tiny):
    config, variables = tiny
    prompts = np.zeros((1, 3), np.int32)
    with pytest.raises(ConfigError, match=r"quantise='fp8' is invalid: allowed are int<b>"):
        generate.generate(config, variables, prompts, max_new_tokens=2, quantise="fp8")
    with pytest.raises(ValueError, match=r"quantise='int9' is not a weight-only decoding format"):
        decode.quantise(config, variables, "int9")
    with pytest.raises(ValueError, match=r"targets=\['lm_head', 'gates'\]: allowed are"):
        decode.quantise(config, variables, "int8", targets=("lm_head", "gates"))
    with pytest.raises(cli.UsageError, match=r"--quantise='int4/g0x': allowed are"):
        generate._parse(["--checkpoint", "nowhere", "--quantise", "int4/g0x"])
    with pytest.raises(cli.UsageError, match=r"--quantise='int8': quantised decoding does not combine"):
        generate._parse(["--checkpoint", "nowhere", "--quantise", "int8", "--draft", "other"])
