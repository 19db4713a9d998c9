"""Weight formats: how a weight matrix is rounded to a low-precision grid with scales, dequantised, and stored.

Every quantised parameter is viewed as a stack of matrices ``[B, K, N]`` (``moejax.quant.rules.Matrix``): B the
leading axes it is stacked on (the scanned layers, the routed experts), K the input (contraction) width, N the
output width, so that ``y = x @ W[b]``. A scale covers a tile of ``gk`` inputs by ``gn`` outputs; the quantised value
of w is ``grid(w / s) * s``, ``grid`` rounding to the format's grid of values:

========== =================== ================================ =====================================================
format     grid                scale tile (gk x gn)             scale
========== =================== ================================ =====================================================
int<b>     integers |q| <= Q,  K x 1 (per output channel);       amax / Q (float32), Q = 2^(b-1) - 1, b in 2..8
           Q = 2^(b-1) - 1     int<b>/g<G>: G x 1 (per group)   (symmetric; a tile of zeros gets scale 1)
fp8        FP8 E4M3 (+-448)    128 x 128 (fp8/<gk>x<gn>)        amax / 448 (float32; DeepSeek-V3's ``scale_inv``)
mxfp4      FP4 E2M1 (+-6)      32 x 1                           2^ceil(log2(amax / 6)), exponent in [-126, 127], stored
                                                                as E8M0 (a biased byte)
ternary    {-1, 0, 1}          K x N (the whole matrix)          max(mean |w|, 1e-5) (float32): BitNet b1.58's absmean
                                                                (arXiv 2402.17764), as MoTE (arXiv 2506.14435) trains
                                                                its routed experts
========== =================== ================================ =====================================================

Rounding: integers round half to even (``np.round``), FP8 and FP4 by the float cast (round to nearest, ties to
even; values past the grid saturate). The FP8 block layout is DeepSeek-V3's (a [out, in] weight with
``weight_scale_inv`` [ceil(out / 128), ceil(in / 128)]), MXFP4 GPT-OSS's (blocks [B, N, K/32, 16] of two E2M1 codes per
byte, low nibble first, and E8M0 scales [B, N, K/32]): ``pack`` writes those layouts, so
``moejax.hf.quant.dequantize_fp8`` / ``dequantize_mxfp4`` read them back (a partial last tile is zero-padded). The
MXFP4 exponent is the smallest that keeps the group's largest magnitude within 6 (no value saturates), as
``moejax.hf.quant.quantize_mxfp4`` and Qwix choose it; the OCP MX specification's floor(log2(amax)) - 2 may
saturate a group's largest values instead. ``moejax.hf.quant.quantize_mxfp4`` rounds exact ties toward the smaller
magnitude; here they go to the even code, as the E2M1 cast does.

The functions take numpy or jax.numpy (``xp``): the same float32 operations for the GPTQ loop and quantisation-aware
training (jax) and the round-to-nearest transform (numpy), which agree bit for bit (``_divide`` keeps XLA from
turning divisions into multiplications by a reciprocal), but for the ternary scale: XLA may sum mean |w| in another
order, so it may differ by one unit in the last place. What is stored is the grid and the scales, so the compact
form and the fake-quantised weights agree exactly either way.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP4_MAX = 6.0  # the largest float4_e2m1fn
MXFP4_GROUP = 32
FP8_BLOCK = 128
INT_BITS = range(2, 9)
TERNARY_EPS = 1e-5  # BitNet b1.58's floor on the absmean scale
FORMAT_HELP = ("int<b> (b in 2..8, per output channel), int<b>/g<G> (groups of G inputs), fp8 (E4M3, 128x128 blocks), "
               "fp8/<gk>x<gn>, mxfp4 (E2M1, E8M0 scales per 32 inputs), ternary ({-1, 0, 1} times the matrix's mean "
               "|w|), none")


@dataclasses.dataclass(frozen=True)
class Format:
    """A weight format: ``kind`` 'int' | 'fp8' | 'mxfp4' | 'ternary', the code ``bits``, and the scale ``tile`` (gk,
    gn): gk inputs by gn outputs per scale, gk = 0 for every input (per output channel), gn = 0 for every output
    (ternary: one scale per matrix)."""

    kind: str
    bits: int
    tile: tuple[int, int]

    @property
    def name(self) -> str:
        if self.kind == "int":
            return f"int{self.bits}" + (f"/g{self.tile[0]}" if self.tile[0] else "")
        if self.kind == "fp8":
            return "fp8" if self.tile == (FP8_BLOCK, FP8_BLOCK) else f"fp8/{self.tile[0]}x{self.tile[1]}"
        return self.kind

    @property
    def qmax(self) -> float:
        """The grid's largest magnitude."""
        return {"int": float(2 ** (self.bits - 1) - 1), "fp8": FP8_MAX, "mxfp4": FP4_MAX, "ternary": 1.0}[self.kind]

    def tile_for(self, k: int, n: int = 1) -> tuple[int, int]:
        """(gk, gn) for K inputs and N outputs: gk = K for a per-channel format (a tile never exceeds K), gn = N for
        a per-matrix one."""
        gk, gn = self.tile
        return (min(gk, k) if gk else k), (gn or n)

    def scale(self, amax: Any, xp: Any = np) -> Any:
        """The float32 scale of a tile from its largest magnitude (amax >= 0): 1 for a tile of zeros."""
        amax = xp.asarray(amax, xp.float32)
        if self.kind == "mxfp4":
            exponent = _ceil_log2(amax / xp.float32(FP4_MAX), xp)
            exponent = xp.where(amax > 0, xp.clip(exponent, -126, 127), 0)  # no subnormal scale (XLA flushes them)
            return xp.ldexp(xp.ones_like(amax), exponent.astype(xp.int32))
        scale = _divide(amax, xp.float32(self.qmax), xp)
        return xp.where(amax > 0, scale, xp.float32(1.0)).astype(xp.float32)

    def grid(self, x: Any, xp: Any = np) -> Any:
        """x (already divided by its scale) rounded onto the grid, as float32."""
        x = xp.asarray(x, xp.float32)
        if self.kind in ("int", "ternary"):
            return xp.clip(xp.round(x), -self.qmax, self.qmax)
        x = xp.clip(x, -self.qmax, self.qmax)
        if self.kind == "mxfp4":  # rounded by hand: XLA:CPU's classic emitter converts to float4 by way of a wider
            return _e2m1_round(x, xp)  # float, rounding twice (1.7499 -> 1.75 -> 2.0)
        return x.astype(_fp8(xp)).astype(xp.float32)

    def bits_per_weight(self, k: int, n: int) -> float:
        """Stored bits per weight of a [K, N] matrix: the codes (int<b> with b <= 4 in a nibble, otherwise a byte)
        and the scales (float32, or one byte for MXFP4's E8M0) spread over the matrix."""
        gk, gn = self.tile_for(k, n)
        scales = -(-k // gk) * -(-n // gn)
        return self.storage_bits + scales * (8 if self.kind == "mxfp4" else 32) / (k * n)

    @property
    def storage_bits(self) -> int:
        """Bits per stored code: 4 for codes of 4 bits or fewer (two per byte), else 8."""
        return 4 if self.bits <= 4 else 8


def _e2m1_round(x: Any, xp: Any) -> Any:
    """x (float32 in [-6, 6]) rounded to the nearest float4_e2m1fn value, ties to the even code, as float32: the
    grid's spacing is 0.5 below 2, 1 in [2, 4) and 2 from 4, all powers of two, so x / spacing rounded half to even
    and scaled back is exact."""
    a = xp.abs(x)
    spacing = xp.where(a < 2.0, xp.float32(0.5), xp.where(a < 4.0, xp.float32(1.0), xp.float32(2.0)))
    return (xp.round(x / spacing) * spacing).astype(xp.float32)


def _divide(a: Any, b: Any, xp: Any) -> Any:
    """a / b as IEEE float32 division under XLA too: XLA turns a division by a broadcast (a scalar, a repeated scale)
    into a multiplication by its reciprocal, one unit in the last place off; ``a * 0 + b`` is an array of a's shape
    it leaves alone (so jax's fake quantisation, QAT's forward, equals numpy's bit for bit)."""
    return a / b if xp is np else a / (a * 0 + b)


def _ceil_log2(x: Any, xp: Any) -> Any:
    """ceil(log2(x)) for x > 0, exact at powers of two (frexp: x = m 2^e with m in [0.5, 1))."""
    mantissa, exponent = xp.frexp(xp.where(x > 0, x, xp.float32(1.0)))
    return xp.where(mantissa == 0.5, exponent - 1, exponent)


def _fp8(xp: Any) -> Any:
    return ml_dtypes.float8_e4m3fn if xp is np else xp.float8_e4m3fn


def parse(text: Any, field: str = "format") -> Format | None:
    """A format from its name (``FORMAT_HELP``); None for 'none'. ValueError naming ``field``, the value and what
    is allowed."""
    value = str(text).strip().lower() if isinstance(text, str) else None
    if value == "none":
        return None
    if value == "ternary":
        return Format("ternary", 2, (0, 0))
    match = re.fullmatch(r"int(\d+)(?:/g(\d+))?", value or "")
    if match:
        bits, group = int(match.group(1)), int(match.group(2) or 0)
        if bits in INT_BITS and (match.group(2) is None or group >= 1):
            return Format("int", bits, (group, 1))
    elif value == "mxfp4":
        return Format("mxfp4", 4, (MXFP4_GROUP, 1))
    elif value is not None:
        match = re.fullmatch(r"fp8(?:/(\d+)x(\d+))?", value)
        if match:
            gk, gn = int(match.group(1) or FP8_BLOCK), int(match.group(2) or FP8_BLOCK)
            if gk >= 1 and gn >= 1:
                return Format("fp8", 8, (gk, gn))
    raise ValueError(f"{field}={text!r} is not a weight format: allowed are {FORMAT_HELP}")


def int_format(bits: int, group_size: int = 0) -> Format:
    """int<bits>, per channel (group_size 0) or in groups of group_size inputs."""
    return Format("int", int(bits), (int(group_size), 1))


# ------------------------------------------------------------------------------------------------ the grid


def _pad(x: np.ndarray, k: int, n: int, xp: Any = np) -> Any:
    """x [B, K, N] zero-padded to [B, k, n]."""
    return xp.pad(x, ((0, 0), (0, k - x.shape[1]), (0, n - x.shape[2])))


def tile_amax(w: Any, fmt: Format, xp: Any = np) -> Any:
    """The largest magnitude of every scale tile of w [B, K, N]: [B, ceil(K / gk), ceil(N / gn)]."""
    b, k, n = w.shape
    gk, gn = fmt.tile_for(k, n)
    rows, cols = -(-k // gk), -(-n // gn)
    tiles = _pad(xp.abs(xp.asarray(w, xp.float32)), rows * gk, cols * gn, xp).reshape(b, rows, gk, cols, gn)
    return tiles.max(axis=(2, 4))


def expand(scales: Any, fmt: Format, k: int, n: int, xp: Any = np) -> Any:
    """Scales [B, Gk, Gn] repeated over their tiles: [B, K, N]."""
    if fmt.kind == "ternary":
        return xp.broadcast_to(scales, (scales.shape[0], k, n))
    gk, gn = fmt.tile_for(k, n)
    return xp.repeat(xp.repeat(scales, gk, axis=1), gn, axis=2)[:, :k, :n]


def quantize(w: Any, fmt: Format, xp: Any = np) -> tuple[Any, Any]:
    """w [B, K, N] -> (grid values [B, K, N] float32, scales [B, Gk, Gn] float32), rounded to nearest."""
    w = xp.asarray(w, xp.float32)
    if fmt.kind == "ternary":  # BitNet b1.58: W / max(mean |W|, eps), rounded and clipped to {-1, 0, 1}
        total = xp.sum(xp.abs(w), axis=(1, 2), keepdims=True, dtype=xp.float32)
        scales = xp.maximum(_divide(total, xp.float32(w.shape[1] * w.shape[2]), xp), xp.float32(TERNARY_EPS))
    else:
        scales = fmt.scale(tile_amax(w, fmt, xp), xp)
    return fmt.grid(_divide(w, expand(scales, fmt, w.shape[1], w.shape[2], xp), xp), xp), scales


def dequantize(grid: Any, scales: Any, fmt: Format, dtype: Any = np.float32, xp: Any = np) -> Any:
    """Grid values [B, K, N] times their scales, in float32, cast to dtype."""
    return (xp.asarray(grid, xp.float32) * expand(scales, fmt, grid.shape[1], grid.shape[2], xp)).astype(dtype)


def fake_quantize(w: Any, fmt: Format, dtype: Any = None, xp: Any = np) -> Any:
    """w [B, K, N] quantised and dequantised (round to nearest), in dtype (default w's)."""
    return dequantize(*quantize(w, fmt, xp), fmt, w.dtype if dtype is None else dtype, xp)


# ------------------------------------------------------------------------------------------ the compact form


def _nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit codes (uint8 < 16), flattened, two per byte, the first in the low nibble (an odd count padded)."""
    flat = values.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def _from_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2], out[1::2] = packed & 0x0F, packed >> 4
    return out[:count]


def pack(grid: np.ndarray, scales: np.ndarray, fmt: Format) -> dict[str, np.ndarray]:
    """The stored arrays of a quantised [B, K, N] stack (grid values and scales from ``quantize``):

    * int<b>: 'codes' int8 [B, K, N] (b > 4), or 'packed' uint8 (b <= 4: the codes' two's-complement nibbles in C
      order, two per byte, low first); 'scales' float32 [B, Gk, Gn]; ternary as int2 with 'scales' [B, 1, 1];
    * fp8: 'weight' uint8 [B, N, K] (float8_e4m3fn bytes, DeepSeek-V3's [out, in] layout) and 'scale_inv' float32
      [B, Gn, Gk];
    * mxfp4: 'blocks' uint8 [B, N, ceil(K/32), 16] and 'scales' uint8 [B, N, ceil(K/32)] (E8M0: exponent + 127),
      GPT-OSS's layout.
    """
    grid = np.asarray(grid, np.float32)
    scales = np.asarray(scales, np.float32)
    if fmt.kind in ("int", "ternary"):
        codes = grid.astype(np.int8)
        if fmt.bits <= 4:
            return {"packed": _nibbles(codes.view(np.uint8) & 0x0F), "scales": scales}
        return {"codes": codes, "scales": scales}
    if fmt.kind == "fp8":
        codes = grid.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        return {"weight": np.ascontiguousarray(codes.swapaxes(1, 2)), "scale_inv": np.ascontiguousarray(
            scales.swapaxes(1, 2))}
    b, k, n = grid.shape
    groups = -(-k // MXFP4_GROUP)
    codes = _pad(grid.astype(ml_dtypes.float4_e2m1fn).view(np.uint8), groups * MXFP4_GROUP, n)  # 0 is +0.0
    codes = codes.swapaxes(1, 2).reshape(b, n, groups, MXFP4_GROUP)
    exponents = np.frexp(scales)[1].astype(np.int32) - 1  # scales are powers of two: 2^(e-1) = 0.5 * 2^e
    return {"blocks": (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8),
            "scales": np.ascontiguousarray((exponents + 127).astype(np.uint8).swapaxes(1, 2))}


def unpack(arrays: dict[str, np.ndarray], fmt: Format, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``pack``'s arrays back to (grid values [B, K, N] float32, scales [B, Gk, Gn] float32), exactly."""
    b, k, n = shape
    if fmt.kind in ("int", "ternary"):
        if fmt.bits <= 4:
            nibbles = _from_nibbles(arrays["packed"], b * k * n).astype(np.int8)
            codes = np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)
        else:
            codes = arrays["codes"]
        return codes.reshape(shape).astype(np.float32), np.asarray(arrays["scales"], np.float32)
    if fmt.kind == "fp8":
        grid = arrays["weight"].view(ml_dtypes.float8_e4m3fn).astype(np.float32).swapaxes(1, 2)
        return np.ascontiguousarray(grid), np.ascontiguousarray(arrays["scale_inv"].swapaxes(1, 2))
    blocks = arrays["blocks"]
    codes = np.empty((*blocks.shape[:-1], 2 * blocks.shape[-1]), np.uint8)
    codes[..., 0::2], codes[..., 1::2] = blocks & 0x0F, blocks >> 4
    grid = codes.reshape(b, n, -1)[:, :, :k].view(ml_dtypes.float4_e2m1fn).astype(np.float32).swapaxes(1, 2)
    scales = np.ldexp(np.float32(1), arrays["scales"].astype(np.int32) - 127).astype(np.float32).swapaxes(1, 2)
    return np.ascontiguousarray(grid), np.ascontiguousarray(scales)


def packed_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
