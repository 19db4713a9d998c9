"""The Pallas dequantising grouped matmul (moejax/kernels/quant_gmm.py): both lowerings interpreted on CPU against a
numpy product with the dequantised weights (int8 per output channel and per group, packed int4 per group), and
lowered for GPU (Triton) and TPU (Mosaic) through jax.export without the hardware."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import quant_gmm

T, M, K, N, E = 3, 5, 64, 32, 4


def weights(rng, bits: int, group: int):
    """(codes as the kernel takes them, scales [E, K / group, N], the dequantised weights [E, K, N] in numpy)."""
    q = 2 ** (bits - 1) - 1
    codes = rng.integers(-q, q + 1, size=(E, K, N))
    scales = rng.uniform(0.01, 0.1, size=(E, K // group, N)).astype(np.float32)
    dense = codes * np.repeat(scales, group, axis=1).astype(np.float64)
    if bits > 4:
        return codes.astype(np.int8), scales, dense
    nibbles = (codes & 0x0F).astype(np.uint8)  # two's complement; output c low, c + N / 2 high
    return (nibbles[..., :N // 2] | (nibbles[..., N // 2:] << 4)).astype(np.uint8), scales, dense


@pytest.mark.parametrize("impl", ["blocked", "tpu"])
@pytest.mark.parametrize("bits,group", [(8, K), (8, 16), (4, 32)])
def test_interpreted_kernel_matches_numpy(impl, bits, group):
    rng = np.random.default_rng(bits * group)
    codes, scales, dense = weights(rng, bits, group)
    tiles = rng.normal(size=(T, M, K)).astype(np.float32)  # 5 rows a tile: padded to 16 inside
    tile_expert = np.array([3, 0, 3], np.int32)
    got = quant_gmm.tiled_matmul(jnp.asarray(tiles), jnp.asarray(tile_expert), jnp.asarray(codes),
                                 jnp.asarray(scales), bits=bits, group=group, n=N,
                                 opts=quant_gmm.KernelOptions(impl=impl, interpret=True))
    want = np.einsum("tmk,tkn->tmn", tiles.astype(np.float64), dense[tile_expert])
    assert got.shape == (T, M, N) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_a_weight_the_kernel_cannot_split_is_named():
    assert not quant_gmm.supports(60, 32, 8, 32) and not quant_gmm.supports(64, 33, 4, 32)
    with pytest.raises(ValueError, match=r"K=60 a multiple of the scale group 32"):
        quant_gmm.tiled_matmul(jnp.zeros((1, 16, 60)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 60, 32), jnp.int8),
                               jnp.ones((1, 2, 32)), bits=8, group=32, n=32)


@pytest.mark.parametrize("platform,impl", [("cuda", "blocked"), ("tpu", "tpu")])
@pytest.mark.parametrize("bits,group", [(8, 256), (4, 32)])
def test_kernel_lowers_for_gpu_triton_and_tpu_mosaic(platform, impl, bits, group):
    """No accelerator here, but jax.export lowers for one: bfloat16 rows against int8 (per output channel) and
    packed int4 (groups of 32) codes at K = N = 256 must lower to a Triton (GPU) or Mosaic (TPU) custom call."""
    t, m, k, n, e = 4, 16, 256, 256, 8
    opts = quant_gmm.KernelOptions(impl=impl, interpret=False)
    codes = jax.ShapeDtypeStruct((e, k, n) if bits > 4 else (e, k, n // 2), jnp.int8 if bits > 4 else jnp.uint8)

    def run(tiles, tile_expert, codes, scales):
        return quant_gmm.tiled_matmul(tiles, tile_expert, codes, scales, bits=bits, group=group, n=n, opts=opts)

    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    try:
        exported = jax.export.export(jax.jit(run), platforms=[platform],
                                     disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(
            jax.ShapeDtypeStruct((t, m, k), jnp.bfloat16), jax.ShapeDtypeStruct((t,), jnp.int32), codes,
            jax.ShapeDtypeStruct((e, k // group, n), jnp.float32))
    except RuntimeError as err:  # jax >= 0.12 asks for a GPU's compute capability to lower Triton
        if "No supported GPU devices found" not in str(err):
            raise
        pytest.skip(f"this jax ({jax.__version__}) lowers Triton only with a GPU present")
    assert exported.mlir_module().count(target) == 1
