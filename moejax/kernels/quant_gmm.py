"""A Pallas grouped matmul with int weights dequantised in the kernel's tiles (quantised decoding's routed experts,
moejax/moe/quantised.py with ``model.moe.dispatch_kernel='pallas'``).

``tiled_matmul(tiles [T, m, K], tile_expert [T], codes, scales, bits, group, n)`` -> [T, m, N] float32: tile t's
rows times the weights of expert ``tile_expert[t]``, w[e] = codes[e] * scales[e] (a scale per output and group of
``group`` inputs, or per output when group = K). ``codes``: int8 [G, K, N] (bits > 4), or for bits <= 4 uint8 [G,
K, N / 2], two's-complement nibbles with output c in the low nibble of byte c and c + N / 2 in the high one
(moejax.moe.quantised.QuantisedWeight's layout). The rows come in the tiled layout of
``moejax.moe.dispatch.dropless_plan`` / ``capacity_plan`` (each tile one expert's); the float weights are never
written out: each program loads an int block of one expert, converts and scales it, and multiplies. For int4 the
two halves of the outputs are two accumulators against the low and high nibbles (their scales split outside the
kernel), concatenated after it.

Two lowerings, as in moejax/kernels/dispatch.py:
* 'blocked' (GPU Triton, and ``interpret=True`` on CPU): a program per (tile, block of outputs) reads the tile's
  expert id from its one-element block, then loops over K in chunks of at most one scale group, loading each chunk
  of the expert's codes by pointer offset (the codes and scales stay whole, unstaged).
* 'tpu' (Mosaic): the tile experts are scalar-prefetched and the codes' and scales' BlockSpec index_maps pick the
  expert's [K, block of outputs] block, which the pipeline DMAs into VMEM; the kernel dequantises it whole (each
  group's scale broadcast over its rows) and runs one dot.
Triton's dots need 16 rows: a tile of fewer rows is zero-padded. ``impl='auto'`` picks 'tpu' on TPU and 'blocked'
elsewhere; ``interpret=None`` interprets on CPU only. Tested on CPU in interpret mode against numpy and lowered for
GPU and TPU through jax.export (tests/quant/test_decode_kernel.py); not run on hardware yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax import vma
from moejax.kernels.dispatch import _block_cols, _triton_params, resolve_impl

TILE_ROWS = 16  # rows per expert tile of the plans the quantised path builds for this kernel (Triton: >= 16)


@dataclass(frozen=True)
class KernelOptions:
    """Static options of the kernel."""

    impl: str = "auto"
    block_cols: int = 128
    block_k: int = 128
    interpret: bool | None = None

    def resolved(self) -> tuple[str, bool]:
        return resolve_impl(self.impl, self.interpret)


DEFAULT = KernelOptions()


def supports(k: int, n: int, bits: int, group: int) -> bool:
    """Whether the kernel takes a [K, N] weight: whole scale groups (K a multiple of the group) and, for int4, an
    even N (byte c holds outputs c and c + N / 2)."""
    return k % group == 0 and (bits > 4 or n % 2 == 0)


def _unpack(raw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 bytes -> (low, high) nibbles as float32 two's-complement values in [-8, 7]."""
    raw = raw.astype(jnp.int32)
    lo, hi = raw & 0x0F, (raw >> 4) & 0x0F
    return tuple(jnp.where(v >= 8, v - 16, v).astype(jnp.float32) for v in (lo, hi))


def _grids(raw: jax.Array, packed: bool) -> tuple[jax.Array, ...]:
    return _unpack(raw) if packed else (raw.astype(jnp.float32),)


def _blocked(tiles, tile_expert, codes, scale_parts, group, packed, opts, interpret):
    t, m, k = tiles.shape
    width = codes.shape[-1]
    bn = _block_cols(width, opts.block_cols)
    bk = _block_cols(group, min(opts.block_k, group))  # a chunk never straddles two scale groups
    parts = len(scale_parts)

    def kernel(te_ref, x_ref, codes_ref, *refs):
        scale_refs, out_refs = refs[:parts], refs[parts:]
        e = te_ref[0]
        cols = pl.ds(pl.program_id(1) * bn, bn)

        def body(c, accs):
            start = pl.multiple_of(c * bk, bk)
            xs = x_ref[0, :, pl.ds(start, bk)].astype(jnp.float32)
            grids = _grids(codes_ref[e, pl.ds(start, bk), cols], packed)
            row = start // group
            return tuple(acc + jnp.dot(xs, grid * s_ref[e, row, cols][None, :].astype(jnp.float32),
                                       preferred_element_type=jnp.float32)
                         for acc, grid, s_ref in zip(accs, grids, scale_refs, strict=True))

        init = tuple(jnp.zeros((m, bn), jnp.float32) for _ in range(parts))
        accs = jax.lax.fori_loop(0, k // bk, body, init)
        for o_ref, acc in zip(out_refs, accs, strict=True):
            o_ref[0] = acc

    args = vma.unify(tile_expert, tiles, codes, *scale_parts)
    out = pl.pallas_call(
        kernel,
        out_shape=[vma.out_struct((t, m, width), jnp.float32, args[1]) for _ in range(parts)],
        grid=(t, width // bn),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)), pl.BlockSpec((1, m, k), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec(), *(pl.BlockSpec() for _ in range(parts))],
        out_specs=[pl.BlockSpec((1, m, bn), lambda i, j: (i, 0, j)) for _ in range(parts)],
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
    )(*args)
    return out


def _tpu(tiles, tile_expert, codes, scale_parts, group, packed, opts, interpret):
    from jax.experimental.pallas import tpu as pltpu

    t, m, k = tiles.shape
    width = codes.shape[-1]
    bn = width if width <= opts.block_cols or width % opts.block_cols else opts.block_cols
    groups = k // group
    parts = len(scale_parts)

    def kernel(te_ref, x_ref, codes_ref, *refs):
        scale_refs, out_refs = refs[:parts], refs[parts:]
        xs = x_ref[0].astype(jnp.float32)  # [m, K]
        for grid, s_ref, o_ref in zip(_grids(codes_ref[0], packed), scale_refs, out_refs, strict=True):
            scale = jnp.broadcast_to(s_ref[0].astype(jnp.float32)[:, None, :], (groups, group, bn)).reshape(k, bn)
            o_ref[0] = jnp.dot(xs, grid * scale, preferred_element_type=jnp.float32)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(t, width // bn),
        in_specs=[pl.BlockSpec((1, m, k), lambda i, j, te: (i, 0, 0)),
                  pl.BlockSpec((1, k, bn), lambda i, j, te: (te[i], 0, j)),
                  *(pl.BlockSpec((1, groups, bn), lambda i, j, te: (te[i], 0, j)) for _ in range(parts))],
        out_specs=[pl.BlockSpec((1, m, bn), lambda i, j, te: (i, 0, j)) for _ in range(parts)])
    args = vma.unify(tile_expert, tiles, codes, *scale_parts)
    return pl.pallas_call(kernel, grid_spec=grid_spec, interpret=interpret,
                          out_shape=[vma.out_struct((t, m, width), jnp.float32, args[1]) for _ in range(parts)])(*args)


def tiled_matmul(tiles: jax.Array, tile_expert: jax.Array, codes: jax.Array, scales: jax.Array, *, bits: int,
                 group: int, n: int, opts: KernelOptions = DEFAULT) -> jax.Array:
    """tiles [T, m, K] @ (codes * scales)[tile_expert[t]] -> [T, m, N] float32 (see the module docstring)."""
    t, m, k = tiles.shape
    if not supports(k, n, bits, group):
        raise ValueError(f"the dequantising grouped matmul needs K={k} a multiple of the scale group {group} and, "
                         f"for int{bits}, an even N={n}")
    impl, interpret = opts.resolved()
    packed = bits <= 4
    rows = max(TILE_ROWS, 1 << max(0, (m - 1).bit_length()))  # Triton: >= 16 rows, a power of two
    padded = jnp.pad(tiles, ((0, 0), (0, rows - m), (0, 0))) if rows != m else tiles
    scales = jnp.asarray(scales, jnp.float32)
    half = n // 2
    scale_parts = (scales[..., :half], scales[..., half:]) if packed else (scales,)
    fn = _tpu if impl == "tpu" else _blocked
    outs = fn(padded, tile_expert.astype(jnp.int32), codes, scale_parts, group, packed, opts, interpret)
    out = jnp.concatenate(outs, axis=-1) if packed else outs[0]
    return out[:, :m]
