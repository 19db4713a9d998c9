"""Weight formats against numpy references written from their definitions, and against the dequantisers that read
DeepSeek-V3's FP8 and GPT-OSS's MXFP4 checkpoints (moejax/hf/quant.py)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moejax.hf import quant as hf_quant
from moejax.quant import formats


def _weights(shape, seed=0):
    return np.random.default_rng(seed).normal(0.0, 0.5, shape).astype(np.float32)


def _int_reference(w, bits, group):
    """Symmetric int<bits>: for every output column and group of inputs, scale = amax / (2^(bits-1) - 1)."""
    qmax = 2 ** (bits - 1) - 1
    out = np.empty_like(w)
    b, k, n = w.shape
    group = group or k
    for i in range(b):
        for col in range(n):
            for start in range(0, k, group):
                values = w[i, start:start + group, col]
                amax = np.abs(values).max()
                scale = np.float32(amax / np.float32(qmax)) if amax > 0 else np.float32(1)
                out[i, start:start + group, col] = np.clip(np.round(values / scale), -qmax, qmax) * scale
    return out


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 16), (3, 12), (2, 0)])
def test_int_formats_match_a_loop_over_groups(bits, group):
    w = _weights((2, 40, 6))  # 40 inputs: groups of 12 leave a partial last group
    w[0, :, 1] = 0.0  # an all-zero channel gets scale 1 and stays zero
    fmt = formats.int_format(bits, group)
    grid, scales = formats.quantize(w, fmt)
    assert np.array_equal(formats.dequantize(grid, scales, fmt), _int_reference(w, bits, group))
    assert np.abs(grid).max() <= 2 ** (bits - 1) - 1 and np.array_equal(grid, np.round(grid))
    assert scales.shape == (2, -(-40 // group) if group else 1, 6)


def test_fp8_block_scales_are_deepseek_v3s():
    """FP8 E4M3 with 128x128 block scales: the values moejax.hf.quant.quantize_fp8 gives a [out, in] weight, stored
    in DeepSeek-V3's layout that moejax.hf.quant.dequantize_fp8 reads back exactly (partial blocks included)."""
    w = _weights((2, 200, 150))  # [B, K, N]: partial blocks on both axes
    fmt = formats.parse("fp8")
    grid, scales = formats.quantize(w, fmt)
    ours = formats.dequantize(grid, scales, fmt)
    codes, scale_inv = hf_quant.quantize_fp8(w.swapaxes(1, 2))  # the release layout [out, in]
    assert np.array_equal(scale_inv, formats.pack(grid, scales, fmt)["scale_inv"])
    assert np.array_equal(ours.swapaxes(1, 2), hf_quant.dequantize_fp8(codes, scale_inv, (128, 128)))
    packed = formats.pack(grid, scales, fmt)
    read = hf_quant.dequantize_fp8(packed["weight"].view(ml_dtypes.float8_e4m3fn), packed["scale_inv"], (128, 128))
    assert np.array_equal(read.swapaxes(1, 2), ours)
    assert np.abs(grid).max() <= 448


def test_fp8_rectangular_blocks_follow_the_tile():
    w = _weights((1, 20, 12))
    fmt = formats.parse("fp8/8x4")
    grid, scales = formats.quantize(w, fmt)
    assert scales.shape == (1, 3, 3)
    for i in range(3):
        for j in range(3):
            tile = w[0, i * 8:(i + 1) * 8, j * 4:(j + 1) * 4]
            assert scales[0, i, j] == np.float32(np.abs(tile).max() / np.float32(448))
            expected = (tile / scales[0, i, j]).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            assert np.array_equal(grid[0, i * 8:(i + 1) * 8, j * 4:(j + 1) * 4], expected)


def test_mxfp4_is_gpt_osss_e2m1_with_e8m0_scales():
    """MXFP4: E2M1 values with a power-of-two (E8M0) scale per 32 inputs, in GPT-OSS's layout; against
    moejax.hf.quant's quantiser (random values: no exact ties, where the two round differently) and read back by its
    dequantiser exactly."""
    w = _weights((3, 64, 10))
    fmt = formats.parse("mxfp4")
    grid, scales = formats.quantize(w, fmt)
    ours = formats.dequantize(grid, scales, fmt)
    blocks, exponents = hf_quant.quantize_mxfp4(w)
    packed = formats.pack(grid, scales, fmt)
    assert np.array_equal(packed["scales"], exponents)
    # the same values (a small negative value is -0 here, the cast keeping its sign, and +0 there)
    assert np.array_equal(hf_quant.dequantize_mxfp4(blocks, exponents), ours)
    assert np.array_equal(hf_quant.dequantize_mxfp4(packed["blocks"], packed["scales"]), ours)
    assert set(np.unique(np.abs(grid))) <= set(hf_quant.FP4_VALUES[:8].tolist())
    # a definition check: each group's scale is the least power of two keeping its largest magnitude within 6
    amax = np.abs(w.reshape(3, 2, 32, 10)).max(2)
    assert np.all(amax / scales <= 6) and np.all(amax / scales > 3)


def test_mxfp4_ties_go_to_the_even_code_and_partial_groups_pad():
    w = np.zeros((1, 40, 1), np.float32)  # 40 inputs: a full group and a partial one of 8
    w[0, :6, 0] = [6.0, 0.75, 1.75, 2.5, 5.0, 0.25]  # scale 1; ties between grid points
    grid, scales = formats.quantize(w, formats.parse("mxfp4"))
    assert grid[0, :6, 0].tolist() == [6.0, 1.0, 2.0, 2.0, 4.0, 0.0] and scales[0, 0, 0] == 1.0
    packed = formats.pack(grid, scales, formats.parse("mxfp4"))
    assert packed["blocks"].shape == (1, 1, 2, 16)
    assert np.array_equal(hf_quant.dequantize_mxfp4(packed["blocks"], packed["scales"])[:, :40], grid)


@pytest.mark.parametrize("name", ["int8", "int4", "int4/g8", "int3/g5", "int2", "fp8", "fp8/4x2", "mxfp4", "ternary"])
def test_the_compact_form_dequantises_exactly(name):
    fmt = formats.parse(name)
    w = _weights((3, 21, 7), seed=1)  # odd sizes: nibble padding, partial tiles
    grid, scales = formats.quantize(w, fmt)
    arrays = formats.pack(grid, scales, fmt)
    back_grid, back_scales = formats.unpack(arrays, fmt, w.shape)
    assert np.array_equal(back_grid, grid) and np.array_equal(back_scales, scales)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        assert np.array_equal(formats.dequantize(back_grid, back_scales, fmt, dtype),
                              formats.fake_quantize(w, fmt, dtype))
    if fmt.kind == "int" and fmt.bits <= 4:
        assert arrays["packed"].nbytes == -(-w.size // 2)


@pytest.mark.parametrize("name", ["int8", "int4/g8", "fp8/8x4", "mxfp4", "ternary"])
def test_jax_and_numpy_round_alike(name):
    """The GPTQ loop and QAT round with jax.numpy (compiled), the transform with numpy: the same grid and scales,
    bit for bit, but for the ternary mean |w|, whose float32 sum XLA may order differently (a scale one unit in the
    last place off)."""
    fmt = formats.parse(name)
    w = _weights((2, 64, 16), seed=2)
    grid, scales = formats.quantize(w, fmt)
    grid_j, scales_j = jax.jit(lambda x: formats.quantize(x, fmt, xp=jnp))(jnp.asarray(w))
    if fmt.kind == "ternary":
        np.testing.assert_allclose(np.asarray(scales_j), scales, rtol=2e-7)
        assert np.mean(np.asarray(grid_j) != grid) < 1e-3
    else:
        assert np.array_equal(np.asarray(scales_j), scales) and np.array_equal(np.asarray(grid_j), grid)


def test_ternary_is_bitnet_absmean():
    w = _weights((3, 16, 8), seed=3)
    grid, scales = formats.quantize(w, formats.parse("ternary"))
    gamma = np.maximum(np.abs(w.astype(np.float64)).mean(axis=(1, 2)), 1e-5)
    np.testing.assert_allclose(scales[:, 0, 0], gamma, rtol=1e-6)
    np.testing.assert_array_equal(grid, np.clip(np.round(w / gamma[:, None, None]), -1, 1))
    assert set(np.unique(grid)) == {-1.0, 0.0, 1.0} and scales.shape == (3, 1, 1)


def test_bits_per_weight_counts_codes_and_scales():
    assert formats.parse("int4").bits_per_weight(64, 40) == 4 + 32 / 64
    assert formats.parse("int8/g32").bits_per_weight(64, 40) == 8 + 32 / 32
    assert formats.parse("int3").storage_bits == 4
    assert formats.parse("mxfp4").bits_per_weight(64, 40) == 4 + 8 / 32
    assert formats.parse("fp8").bits_per_weight(256, 256) == 8 + 32 / 128 ** 2


@pytest.mark.parametrize("value", ["int9", "int1", "int4/g0", "fp4", "fp8/0x128", "mxfp8", 4, None, ""])
def test_bad_formats_are_named(value):
    with pytest.raises(ValueError, match=r"rules\[2\].format=.* is not a weight format: allowed are int<b>"):
        formats.parse(value, "rules[2].format")
    assert formats.parse("none") is None and formats.parse("INT4/G32").name == "int4/g32"
