"""Quantised checkpoint weights, dequantised in numpy on load.

* FP8 with block scales (DeepSeek-V3, ``quantization_config.quant_method='fp8'``): a Linear weight ``W`` [out, in]
  stored as float8_e4m3fn beside ``W_scale_inv`` [ceil(out / b0), ceil(in / b1)] (float32; b = weight_block_size,
  128 x 128): ``W[i, j] = fp8[i, j] * scale_inv[i // b0, j // b1]``.
* MXFP4 (GPT-OSS, ``quant_method='mxfp4'``): a stacked expert tensor ``P`` is stored as ``P_blocks`` [E, R, G, 16]
  uint8 (two FP4 E2M1 codes per byte, the low nibble first) and ``P_scales`` [E, R, G] uint8 (a power-of-two
  exponent biased by 127, one per 32 values). Decoding gives [E, R, G * 32], whose last two axes are swapped into
  the parameter layout [E, G * 32, R] (transformers' integrations/mxfp4.py, ``convert_moe_packed_tensors``).

The quantisers here (``quantize_fp8``, ``quantize_mxfp4``) make synthetic checkpoints for tests.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

# The 16 FP4 E2M1 values by code (sign bit 3, then 2 exponent bits and 1 mantissa bit).
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
MXFP4_GROUP = 32  # values per shared exponent


def scales_to_float(scales: np.ndarray) -> np.ndarray:
    """Block scales as float32: float tensors as they are, uint8 / E8M0 ones as 2 ** (byte - 127)."""
    if scales.dtype == np.uint8:
        return np.ldexp(np.float32(1), scales.astype(np.int32) - 127)
    return scales.astype(np.float32)


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of an FP8 weight [..., out, in] with blocks of block = (b0, b1)."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                   dtype: np.dtype = np.float32) -> np.ndarray:
    """weight [..., out, in] (FP8) * its per-block scale_inv [..., ceil(out/b0), ceil(in/b1)] -> dtype."""
    *_, rows, cols = weight.shape
    b0, b1 = block
    scale = scales_to_float(np.asarray(scale_inv))
    if scale.shape != fp8_scale_shape(weight.shape, block):
        raise ValueError(f"FP8 scales of shape {scale.shape} do not fit a weight of shape {weight.shape} with "
                         f"{b0}x{b1} blocks (expected {fp8_scale_shape(weight.shape, block)})")
    out = np.asarray(weight).astype(np.float32)
    if rows % b0 == 0 and cols % b1 == 0:  # broadcast the scales over whole blocks without expanding them
        view = out.reshape(*out.shape[:-2], rows // b0, b0, cols // b1, b1)
        view *= scale[..., :, None, :, None]
    else:
        out *= np.repeat(np.repeat(scale, b0, axis=-2), b1, axis=-1)[..., :rows, :cols]
    return out.astype(dtype, copy=False)


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantised shape of MXFP4 blocks [E, R, G, B]: [E, G * 2B, R]."""
    experts, rows, groups, nbytes = blocks_shape
    return (experts, groups * nbytes * 2, rows)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
    """MXFP4 blocks [E, R, G, B] uint8 and scales [E, R, G] uint8 -> [E, G * 2B, R] in dtype."""
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    if blocks.ndim != 4 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not fit: expected blocks "
                         f"[E, R, G, B] and scales [E, R, G]")
    experts, rows, groups, nbytes = blocks.shape
    values = np.empty((experts, rows, groups, nbytes * 2), np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(experts, rows, groups * nbytes * 2).swapaxes(1, 2).astype(dtype)


# ----------------------------------------------------------------------------------------------- quantisers (tests)


def quantize_fp8(weight: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """weight [..., out, in] -> (float8_e4m3fn weight, float32 scale_inv), each block scaled to the FP8 range."""
    weight = np.asarray(weight, np.float32)
    *lead, rows, cols = weight.shape
    b0, b1 = block
    grid = fp8_scale_shape(weight.shape, block)
    padded = np.zeros((*lead, grid[-2] * b0, grid[-1] * b1), np.float32)
    padded[..., :rows, :cols] = weight
    tiles = padded.reshape(*lead, grid[-2], b0, grid[-1], b1)
    amax = np.abs(tiles).max(axis=(-3, -1))
    scale = np.where(amax > 0, amax / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max), 1.0).astype(np.float32)
    quantized = (tiles / scale[..., :, None, :, None]).reshape(padded.shape)[..., :rows, :cols]
    return quantized.astype(ml_dtypes.float8_e4m3fn), scale


def quantize_mxfp4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weight [E, K, R] (K a multiple of 32) -> (blocks [E, R, K/32, 16] uint8, scales [E, R, K/32] uint8), rounding
    each value to the nearest FP4 value after a shared power-of-two scale per 32 values."""
    weight = np.asarray(weight, np.float32).swapaxes(1, 2)  # [E, R, K]
    experts, rows, width = weight.shape
    groups = weight.reshape(experts, rows, width // MXFP4_GROUP, MXFP4_GROUP)
    amax = np.abs(groups).max(-1)
    exponent = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(np.int32)
    exponent = np.clip(exponent, -127, 127)
    scaled = groups / np.ldexp(np.float32(1), exponent)[..., None]
    codes = np.abs(scaled[..., None] - FP4_VALUES).argmin(-1).astype(np.uint8)  # nearest value (+0 before -0)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.astype(np.uint8), (exponent + 127).astype(np.uint8)
