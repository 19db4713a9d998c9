"""Pallas kernels for token dispatch: permute (tokens -> expert-grouped rows) and unpermute-combine (the k expert
outputs of each token, weighted and summed back into token order), each with a custom VJP.

Both ops reduce to three row-gather kernels, where an index equal to the number of source rows stands for a
zero row (dropped slots, padding rows):

* ``gather_rows(src [N, D], idx [M], scale [M]?)``     out[m] = scale[m] * src[idx[m]]
* ``gather_combine(src [N, D], idx [T, k], w [T, k]?)`` out[t] = sum_j w[t, j] * src[idx[t, j]]  (float32 sum)
* ``gather_dot(src [N, D], idx [T, k], g [T, D])``      out[t, j] = <src[idx[t, j]], g[t]>     (float32)

permute is gather_rows forward and gather_combine (w = 1) backward; unpermute_combine is gather_combine forward,
gather_rows (scaled by each row's routing weight) and gather_dot backward. ``moejax.moe.dispatch.permute`` /
``unpermute_combine`` are the jnp versions of the two ops that the MoE layer uses with
``model.moe.dispatch_kernel='jnp'``; the tests compare both with numpy loops.

Two lowerings:
* 'blocked' (GPU Triton, and ``interpret=True`` on CPU): a program per block of ``block_rows`` output rows and
  ``block_cols`` columns loads its indices and gathers its rows with one vector-indexed load.
* 'tpu' (Mosaic): the indices are scalar-prefetched into SMEM and each grid step's BlockSpec index_map picks the
  source row, so the gather is the pipeline's own DMA (the source is viewed as [N, 1, D] so that every block's
  last two dims equal the array's).
``impl='auto'`` picks 'tpu' on TPU and 'blocked' elsewhere; ``interpret=None`` interprets on CPU only. On this
project's CPU-only machines both lowerings run in interpret mode in the tests, and tests/moe/test_kernels.py lowers
them for GPU (to Triton) and TPU (to Mosaic) through jax.export; neither has run on hardware yet.

Triton constraints the blocked kernels respect: every array is a power of two (k slots are padded to the next
power of two with no-row slots), columns of the index and weight blocks are read from the refs rather than sliced
out of loaded values, and the compiler params select Triton (the default GPU lowering, Mosaic GPU, would stage the
whole source in shared memory).
"""
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax import vma
from moejax.moe import dispatch as plans
from moejax.moe.routers import Routing

IMPLS = ("auto", "blocked", "tpu")


def resolve_impl(impl: str, interpret: bool | None) -> tuple[str, bool]:
    """(the lowering, interpret or not) of a kernel's options on this backend: 'auto' is 'tpu' on TPU, else 'blocked'
    (Triton); interpret defaults to True on CPU only."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    platform = jax.default_backend()
    impl = ("tpu" if platform == "tpu" else "blocked") if impl == "auto" else impl
    return impl, platform == "cpu" if interpret is None else interpret


@dataclass(frozen=True)
class KernelOptions:
    """Static options of the dispatch kernels (hashable: a nondiff argument of the custom VJPs)."""

    impl: str = "auto"
    block_rows: int = 32
    block_cols: int = 512
    interpret: bool | None = None

    def resolved(self) -> tuple[str, bool]:
        return resolve_impl(self.impl, self.interpret)


DEFAULT = KernelOptions()


def _block_cols(dim: int, limit: int) -> int:
    """The largest power of two <= limit dividing dim (Triton blocks are powers of two), else dim itself."""
    size = 1 << max(0, limit.bit_length() - 1)
    while size > 1 and dim % size:
        size //= 2
    return size if size > 1 else dim


def _pad_to(x: jax.Array, size: int, value) -> jax.Array:
    pad = size - x.shape[0]
    if pad == 0:
        return x
    return jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), value, x.dtype)])


# ---------------------------------------------------------------------------------------------------------------
# 'blocked' kernels (Triton on GPU, interpret on CPU).


def _triton_params():
    """Selects the Triton lowering on GPU (the default GPU lowering, Mosaic GPU, would stage the whole source in
    shared memory); ignored by interpret mode."""
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=4, num_stages=1)


def _load_rows(src_ref, idx, col):
    """The rows src[idx] (zeros where idx >= N) of column block ``col`` as float32."""
    valid = idx < src_ref.shape[0]
    rows = src_ref[jnp.where(valid, idx, 0), col]
    return jnp.where(valid[:, None], rows.astype(jnp.float32), 0.0)


def _blocked_gather_rows(src, idx, scale, opts, interpret):
    (num, dim), m = src.shape, idx.shape[0]
    bm, bd = opts.block_rows, _block_cols(dim, opts.block_cols)
    padded = -(-m // bm) * bm
    idx_p = _pad_to(idx.astype(jnp.int32), padded, num)
    scale_p = _pad_to(jnp.ones((m,), jnp.float32) if scale is None else scale.astype(jnp.float32), padded, 0.0)

    def kernel(idx_ref, scale_ref, src_ref, out_ref):
        col = pl.ds(pl.program_id(1) * bd, bd)
        rows = _load_rows(src_ref, idx_ref[...], col)
        out_ref[...] = (rows * scale_ref[...][:, None]).astype(out_ref.dtype)

    idx_p, scale_p, src = vma.unify(idx_p, scale_p, src)
    out = pl.pallas_call(
        kernel,
        out_shape=vma.out_struct((padded, dim), src.dtype, src),
        grid=(padded // bm, dim // bd),
        in_specs=[pl.BlockSpec((bm,), lambda i, j: (i,)), pl.BlockSpec((bm,), lambda i, j: (i,)),
                  pl.BlockSpec()],
        out_specs=pl.BlockSpec((bm, bd), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
    )(idx_p, scale_p, src)
    return out[:m]


def _pad_slots(idx, weights, num, padded_t):
    """idx [T, k] and weights padded to [padded_t, kp] with kp the next power of two (Triton wants power-of-two
    arrays): the padding slots point at no row and weigh 0."""
    t, k = idx.shape
    kp = 1 << max(0, (k - 1).bit_length())
    idx_p = jnp.pad(idx.astype(jnp.int32), ((0, padded_t - t), (0, kp - k)), constant_values=num)
    w_p = None if weights is None else jnp.pad(weights.astype(jnp.float32), ((0, padded_t - t), (0, kp - k)))
    return idx_p, w_p, kp


def _blocked_gather_combine(src, idx, weights, opts, interpret):
    (num, dim), (t, k) = src.shape, idx.shape
    bm, bd = opts.block_rows, _block_cols(dim, opts.block_cols)
    padded = -(-t // bm) * bm
    w = jnp.ones((t, k), jnp.float32) if weights is None else weights
    idx_p, w_p, kp = _pad_slots(idx, w, num, padded)

    def kernel(idx_ref, w_ref, src_ref, out_ref):
        col = pl.ds(pl.program_id(1) * bd, bd)
        acc = jnp.zeros((bm, bd), jnp.float32)
        for j in range(k):  # k is small and static: unrolled; columns are read from the refs (no value slicing)
            acc += _load_rows(src_ref, idx_ref[:, j], col) * w_ref[:, j][:, None]
        out_ref[...] = acc.astype(out_ref.dtype)

    idx_p, w_p, src = vma.unify(idx_p, w_p, src)
    out = pl.pallas_call(
        kernel,
        out_shape=vma.out_struct((padded, dim), src.dtype, src),
        grid=(padded // bm, dim // bd),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
                  pl.BlockSpec()],
        out_specs=pl.BlockSpec((bm, bd), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
    )(idx_p, w_p, src)
    return out[:t]


def _blocked_gather_dot(src, idx, g, opts, interpret):
    (num, dim), (t, k) = src.shape, idx.shape
    bm, bd = opts.block_rows, _block_cols(dim, opts.block_cols)
    padded = -(-t // bm) * bm
    idx_p, _, kp = _pad_slots(idx, None, num, padded)
    g_p = _pad_to(g, padded, 0)

    def kernel(idx_ref, g_ref, src_ref, out_ref):
        for j in range(kp):
            if j >= k:  # padding slots: no row
                out_ref[:, j] = jnp.zeros((bm,), jnp.float32)
                continue
            idx_j = idx_ref[:, j]

            def body(c, acc, idx_j=idx_j):
                col = pl.ds(pl.multiple_of(c * bd, bd), bd)
                return acc + jnp.sum(_load_rows(src_ref, idx_j, col) * g_ref[:, col].astype(jnp.float32), axis=1)

            out_ref[:, j] = jax.lax.fori_loop(0, dim // bd, body, jnp.zeros((bm,), jnp.float32))

    idx_p, g_p, src = vma.unify(idx_p, g_p, src)
    out = pl.pallas_call(
        kernel,
        out_shape=vma.out_struct((padded, kp), jnp.float32, src),
        grid=(padded // bm,),
        in_specs=[pl.BlockSpec((bm, kp), lambda i: (i, 0)), pl.BlockSpec((bm, dim), lambda i: (i, 0)),
                  pl.BlockSpec()],
        out_specs=pl.BlockSpec((bm, kp), lambda i: (i, 0)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
    )(idx_p, g_p, src)
    return out[:t, :k]


# ---------------------------------------------------------------------------------------------------------------
# 'tpu' kernels (Mosaic): scalar-prefetched indices drive the BlockSpec index_maps, one source row per step.


def _tpu_gather_rows(src, idx, scale, opts, interpret):
    from jax.experimental.pallas import tpu as pltpu

    (num, dim), m = src.shape, idx.shape[0]
    src3 = src.reshape(num, 1, dim)
    scale = jnp.ones((m,), jnp.float32) if scale is None else scale.astype(jnp.float32)

    def kernel(idx_ref, scale_ref, src_ref, out_ref):
        r = pl.program_id(0)
        live = idx_ref[r] < num
        out_ref[...] = jnp.where(live, src_ref[...].astype(jnp.float32) * scale_ref[r], 0.0).astype(out_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(m,),
        in_specs=[pl.BlockSpec((1, 1, dim), lambda r, idx_ref, scale_ref: (jnp.minimum(idx_ref[r], num - 1), 0, 0))],
        out_specs=pl.BlockSpec((1, 1, dim), lambda r, idx_ref, scale_ref: (r, 0, 0)))
    idx_flat, scale, src3 = vma.unify(idx.astype(jnp.int32), scale, src3)
    out = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=vma.out_struct((m, 1, dim), src.dtype, src3),
                         interpret=interpret)(idx_flat, scale, src3)
    return out.reshape(m, dim)


def _tpu_gather_combine(src, idx, weights, opts, interpret):
    from jax.experimental.pallas import tpu as pltpu

    (num, dim), (t, k) = src.shape, idx.shape
    src3 = src.reshape(num, 1, dim)
    w = jnp.ones((t * k,), jnp.float32) if weights is None else weights.reshape(-1).astype(jnp.float32)

    def kernel(idx_ref, w_ref, src_ref, out_ref, acc_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        slot = i * k + j

        @pl.when(j == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        live = idx_ref[slot] < num
        acc_ref[...] += jnp.where(live, src_ref[...].astype(jnp.float32) * w_ref[slot], 0.0)

        @pl.when(j == k - 1)
        def _():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    index = lambda i, j, idx_ref, w_ref: (jnp.minimum(idx_ref[i * k + j], num - 1), 0, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(t, k),
        in_specs=[pl.BlockSpec((1, 1, dim), index)],
        out_specs=pl.BlockSpec((1, 1, dim), lambda i, j, idx_ref, w_ref: (i, 0, 0)),
        scratch_shapes=[pltpu.VMEM((1, 1, dim), jnp.float32)])
    idx_flat, w, src3 = vma.unify(idx.reshape(-1).astype(jnp.int32), w, src3)
    out = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=vma.out_struct((t, 1, dim), src.dtype, src3),
                         interpret=interpret)(idx_flat, w, src3)
    return out.reshape(t, dim)


def _tpu_gather_dot(src, idx, g, opts, interpret):
    from jax.experimental.pallas import tpu as pltpu

    (num, dim), (t, k) = src.shape, idx.shape
    src3, g3 = src.reshape(num, 1, dim), g.reshape(t, 1, dim)

    def kernel(idx_ref, src_ref, g_ref, out_ref):
        slot = pl.program_id(0) * k + pl.program_id(1)
        live = idx_ref[slot] < num
        dot = jnp.sum(src_ref[...].astype(jnp.float32) * g_ref[...].astype(jnp.float32), axis=2, keepdims=True)
        out_ref[...] = jnp.where(live, dot, 0.0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(t, k),
        in_specs=[pl.BlockSpec((1, 1, dim), lambda i, j, idx_ref: (jnp.minimum(idx_ref[i * k + j], num - 1), 0, 0)),
                  pl.BlockSpec((1, 1, dim), lambda i, j, idx_ref: (i, 0, 0))],
        out_specs=pl.BlockSpec((1, 1, 1), lambda i, j, idx_ref: (i * k + j, 0, 0)))
    idx_flat, src3, g3 = vma.unify(idx.reshape(-1).astype(jnp.int32), src3, g3)
    out = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=vma.out_struct((t * k, 1, 1), jnp.float32, src3),
                         interpret=interpret)(idx_flat, src3, g3)
    return out.reshape(t, k)


# ---------------------------------------------------------------------------------------------------------------
# Public kernels.


def gather_rows(src, idx, scale=None, opts: KernelOptions = DEFAULT):
    """out[m] = scale[m] * src[idx[m]]; idx >= N gives a zero row. src [N, D], idx [M] -> [M, D] (src dtype)."""
    impl, interpret = opts.resolved()
    fn = _tpu_gather_rows if impl == "tpu" else _blocked_gather_rows
    return fn(src, idx, scale, opts, interpret)


def gather_combine(src, idx, weights=None, opts: KernelOptions = DEFAULT):
    """out[t] = sum_j weights[t, j] * src[idx[t, j]] summed in float32; idx >= N adds nothing.
    src [N, D], idx [T, k], weights [T, k] or None (ones) -> [T, D] (src dtype)."""
    impl, interpret = opts.resolved()
    fn = _tpu_gather_combine if impl == "tpu" else _blocked_gather_combine
    return fn(src, idx, weights, opts, interpret)


def gather_dot(src, idx, g, opts: KernelOptions = DEFAULT):
    """out[t, j] = <src[idx[t, j]], g[t]> in float32; 0 where idx >= N. src [N, D], idx [T, k], g [T, D]."""
    impl, interpret = opts.resolved()
    fn = _tpu_gather_dot if impl == "tpu" else _blocked_gather_dot
    return fn(src, idx, g, opts, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x: jax.Array, slot_row: jax.Array, row_slot: jax.Array, opts: KernelOptions = DEFAULT) -> jax.Array:
    """Rows of the expert buffer: rows[r] = x[token of row r], 0 for empty rows. x [T, D] -> [R, D].

    slot_row [T, k] (R: no row) and row_slot [R] (T*k: empty) come from ``moejax.moe.dispatch.*_plan``, which sorts
    the slots by expert and pads each expert's group to a multiple of its tile; ``plan.expert_rows`` holds the
    group sizes and their exclusive cumsum the offsets.
    """
    num_tokens, top_k = slot_row.shape
    return gather_rows(x, plans.row_tokens(row_slot, num_tokens, top_k), None, opts)


def _permute_fwd(x, slot_row, row_slot, opts):
    return permute(x, slot_row, row_slot, opts), (slot_row, row_slot, x[:0])  # x[:0]: x's type, no data


def _permute_bwd(opts, res, grad_rows):
    slot_row, row_slot, x_type = res
    return vma.sum_to_type(gather_combine(grad_rows, slot_row, None, opts), x_type), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def unpermute_combine(rows: jax.Array, weights: jax.Array, slot_row: jax.Array, row_slot: jax.Array,
                      opts: KernelOptions = DEFAULT) -> jax.Array:
    """y[t] = sum_j weights[t, j] * rows[slot_row[t, j]] (float32 sum): rows [R, D], weights [T, k] -> [T, D]."""
    return gather_combine(rows, slot_row, weights, opts)


def _combine_fwd(rows, weights, slot_row, row_slot, opts):
    return unpermute_combine(rows, weights, slot_row, row_slot, opts), (rows, weights, slot_row, row_slot)


def _combine_bwd(opts, res, grad_y):
    rows, weights, slot_row, row_slot = res
    num_tokens, top_k = slot_row.shape
    row_weight = plans.append_zero_row(weights.reshape(-1))[row_slot]
    row_token = plans.row_tokens(row_slot, num_tokens, top_k)
    grad_rows = gather_rows(grad_y, row_token, row_weight, opts).astype(rows.dtype)
    grad_weights = gather_dot(rows, slot_row, grad_y, opts).astype(weights.dtype)
    return vma.sum_to_type(grad_rows, rows), vma.sum_to_type(grad_weights, weights), None, None


unpermute_combine.defvjp(_combine_fwd, _combine_bwd)


def permute_tokens(x: jax.Array, expert_ids: jax.Array, num_experts: int, tile: int = 1,
                   opts: KernelOptions = DEFAULT):
    """x [T, D] and its routed experts [T, k] -> (rows [R, D] in expert order, group_sizes [E], group_offsets [E],
    plan). Expert e's rows are rows[group_offsets[e] : group_offsets[e] + group_sizes[e]], its group padded with
    zero rows up to a multiple of ``tile`` (1: no padding, the layout of ragged_dot and megablox); ids >= E are
    not routed. ``unpermute_combine(out_rows, weights, plan.slot_row, plan.row_slot, opts)`` takes them back."""
    route = Routing(weights=jnp.ones(expert_ids.shape, jnp.float32), experts=expert_ids.astype(jnp.int32),
                    probs=None, logits=None)
    plan = plans.dropless_plan(route, num_experts, tile)
    sizes = plan.expert_rows
    return permute(x, plan.slot_row, plan.row_slot, opts), sizes, jnp.cumsum(sizes) - sizes, plan
