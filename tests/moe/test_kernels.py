"""Pallas dispatch kernels (interpret mode on CPU) and the grouped-matmul backends against numpy loops.

Both kernel lowerings run here: 'blocked' (the Triton one) and 'tpu' (scalar-prefetched index_maps, the Mosaic
one), each interpreted. Shapes are uneven on purpose: M, T and D are not multiples of the blocks, some experts
get no token, and index N (one past the source) stands for "no row".
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import dispatch as kd
from moejax.moe import dispatch, experts, layer
from moejax.moe.routers import Routing
from tests import helpers_configs, helpers_moe, reference

IMPLS = ["blocked", "tpu"]
DTYPES = [jnp.float32, jnp.bfloat16]


def opts(impl):
    return kd.KernelOptions(impl=impl, block_rows=8, block_cols=16, interpret=True)


# Jitted: an interpreted kernel run eagerly dispatches every grid step's ops one by one (10x slower).
gather_rows = jax.jit(kd.gather_rows, static_argnums=3)
gather_combine = jax.jit(kd.gather_combine, static_argnums=3)
gather_dot = jax.jit(kd.gather_dot, static_argnums=3)
permute = jax.jit(kd.permute, static_argnums=3)
unpermute_combine = jax.jit(kd.unpermute_combine, static_argnums=4)


def tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def random_inputs(dtype, n=37, d=48, t=21, k=3, seed=0):
    rng = np.random.default_rng(seed)
    src = jnp.asarray(rng.normal(size=(n, d)), dtype)
    idx = rng.integers(0, n + 1, size=(t, k)).astype(np.int32)  # n = no row
    idx[0, :] = n  # a token with no rows at all
    w = jnp.asarray(rng.normal(size=(t, k)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(t, d)), dtype)
    return src, jnp.asarray(idx), w, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_gather_kernels_match_numpy_loops(impl, dtype):
    src, idx, w, g = random_inputs(dtype)
    s, i, wn, gn = f32(src), np.asarray(idx), np.asarray(w), f32(g)
    flat = i.reshape(-1)
    got = gather_rows(src, idx.reshape(-1), w.reshape(-1), opts(impl))
    assert got.dtype == dtype and got.shape == (flat.size, src.shape[1])
    np.testing.assert_allclose(f32(got), reference.gather_rows(s, flat, wn.reshape(-1)), **tol(dtype))
    np.testing.assert_allclose(f32(gather_rows(src, idx.reshape(-1), None, opts(impl))),
                               reference.gather_rows(s, flat, np.ones(flat.size)), **tol(dtype))
    got = gather_combine(src, idx, w, opts(impl))
    assert got.dtype == dtype
    np.testing.assert_allclose(f32(got), reference.gather_combine(s, i, wn), **tol(dtype))
    assert not np.asarray(got[0]).any()  # the token without rows
    got = gather_dot(src, idx, g, opts(impl))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference.gather_dot(s, i, gn), rtol=1e-4, atol=1e-3)


def uneven_plan(num_tokens=19, top_k=3, num_experts=6, tile=4, capacity=None, seed=1):
    """Routing with expert 2 empty and skewed loads; a dropless plan padded to tiles, or a capacity plan."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice([0, 0, 0, 1, 3, 4, 5], size=top_k, replace=False) for _ in range(num_tokens)])
    weights = rng.random((num_tokens, top_k)).astype(np.float32)
    route = Routing(weights=jnp.asarray(weights), experts=jnp.asarray(ids, jnp.int32), probs=None, logits=None)
    if capacity is None:
        plan = dispatch.dropless_plan(route, num_experts, tile)
    else:
        plan = dispatch.capacity_plan(route, num_experts, capacity, "position")
    return route, plan


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, capacity", [(jnp.float32, None), (jnp.bfloat16, 4)],
                         ids=["f32-dropless", "bf16-capacity"])
def test_permute_and_combine_forward_and_vjp(impl, dtype, capacity):
    route, plan = uneven_plan(capacity=capacity)
    slot_row, row_slot = plan.slot_row, plan.row_slot
    sr, num_rows = np.asarray(slot_row), plan.num_rows
    if capacity is None:
        assert int(plan.expert_rows[2]) == 0 and (np.asarray(plan.tokens_per_expert) % plan.tile).any()
    else:
        assert int(plan.dropped) > 0
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(sr.shape[0], 40)), dtype)
    w = route.weights
    o = opts(impl)

    rows = permute(x, slot_row, row_slot, o)
    want_rows = reference.permute(f32(x), sr, num_rows)
    assert rows.dtype == dtype
    np.testing.assert_allclose(f32(rows), want_rows, **tol(dtype))
    y = unpermute_combine(rows, w, slot_row, row_slot, o)
    np.testing.assert_allclose(f32(y), reference.gather_combine(want_rows, sr, np.asarray(w)), **tol(dtype))

    # VJPs against numpy: permute^T sums a token's rows; combine^T scales rows by their weight and dots them.
    g_rows = jnp.asarray(rng.normal(size=rows.shape), dtype)
    (gx,) = jax.vjp(lambda x: permute(x, slot_row, row_slot, o), x)[1](g_rows)
    np.testing.assert_allclose(f32(gx), reference.gather_combine(f32(g_rows), sr, np.ones(sr.shape)), **tol(dtype))
    g_y = jnp.asarray(rng.normal(size=y.shape), dtype)
    g_r, g_w = jax.vjp(lambda r, w: unpermute_combine(r, w, slot_row, row_slot, o), rows, w)[1](g_y)
    want_gr = np.zeros(rows.shape, np.float32)
    for t in range(sr.shape[0]):
        for j in range(sr.shape[1]):
            if sr[t, j] < num_rows:
                want_gr[sr[t, j]] = np.asarray(w)[t, j] * f32(g_y)[t]
    np.testing.assert_allclose(f32(g_r), want_gr, **tol(dtype))
    np.testing.assert_allclose(np.asarray(g_w), reference.gather_dot(f32(rows), sr, f32(g_y)), rtol=2e-2 if dtype ==
                               jnp.bfloat16 else 1e-4, atol=5e-2 if dtype == jnp.bfloat16 else 1e-4)
    # and the same as the jnp ops the layer uses by default
    ref_y, ref_vjp = jax.vjp(lambda x, w: dispatch.unpermute_combine(dispatch.permute(x, slot_row, row_slot), w,
                                                                     slot_row, row_slot), x, w)
    got_y, got_vjp = jax.vjp(lambda x, w: unpermute_combine(permute(x, slot_row, row_slot, o), w, slot_row,
                                                               row_slot, o), x, w)
    np.testing.assert_allclose(f32(got_y), f32(ref_y), **tol(dtype))
    for a, b in zip(got_vjp(g_y), ref_vjp(g_y), strict=True):
        np.testing.assert_allclose(f32(a), f32(b), **tol(dtype))


@pytest.mark.parametrize("tile", [1, 4])
def test_permute_tokens_groups_rows_by_expert(tile):
    """Group sizes, offsets and the rows of each group against a numpy sort: expert 2 is empty, every group is
    padded with zero rows to a multiple of the tile."""
    rng = np.random.default_rng(5)
    ids = np.stack([rng.choice([0, 1, 1, 3, 4], size=2, replace=False) for _ in range(13)]).astype(np.int32)
    x = jnp.asarray(rng.normal(size=(13, 24)), jnp.float32)
    rows, sizes, offsets, _ = kd.permute_tokens(x, jnp.asarray(ids), 5, tile, opts("blocked"))
    counts = np.bincount(ids.reshape(-1), minlength=5)
    want_sizes = -(-counts // tile) * tile
    np.testing.assert_array_equal(sizes, want_sizes)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(want_sizes)[:-1]]))
    for e in range(5):
        tokens = [t for t in range(13) for j in range(2) if ids[t, j] == e]  # token order within a group
        group = np.asarray(rows)[offsets[e]:offsets[e] + sizes[e]]
        np.testing.assert_allclose(group[:len(tokens)], np.asarray(x)[tokens])
        assert not group[len(tokens):].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_megablox_gmm_uneven_groups_and_unaligned_k_n(dtype):
    """Group sizes 0 / not tile multiples, rows past the groups, K = 40 and N = 24 with 16-wide tiles."""
    rng = np.random.default_rng(0)
    sizes = jnp.asarray([10, 0, 30, 3, 0], jnp.int32)  # 43 of 50 rows
    lhs = jnp.asarray(rng.normal(size=(50, 40)), dtype)
    rhs = jnp.asarray(rng.normal(size=(5, 40, 24)) / 6, dtype)
    gmm = jax.jit(functools.partial(experts.megablox_gmm, tile=16, interpret=True))
    out = gmm(lhs, rhs, sizes)
    assert out.shape == (50, 24) and out.dtype == dtype
    want = reference.grouped_matmul(f32(lhs), f32(rhs), np.asarray(sizes))
    np.testing.assert_allclose(f32(out), want, **tol(dtype))
    # gradients: d lhs = g @ rhs_g^T per group, d rhs_g = lhs_g^T @ g; rows past the groups get 0, not garbage
    g = jnp.asarray(rng.normal(size=(50, 24)), dtype)
    d_lhs, d_rhs = jax.vjp(gmm, lhs, rhs, sizes)[1](g)[:2]
    gn, ln, rn = f32(g), f32(lhs), f32(rhs)
    want_dl, want_dr = np.zeros(ln.shape, np.float32), np.zeros(rn.shape, np.float32)
    start = 0
    for e, size in enumerate(np.asarray(sizes)):
        want_dl[start:start + size] = gn[start:start + size] @ rn[e].T
        want_dr[e] = ln[start:start + size].T @ gn[start:start + size]
        start += size
    np.testing.assert_allclose(f32(d_lhs), want_dl, rtol=tol(dtype)["rtol"], atol=5 * tol(dtype)["atol"])
    np.testing.assert_allclose(f32(d_rhs), want_dr, rtol=tol(dtype)["rtol"], atol=10 * tol(dtype)["atol"])


def test_tokamax_backend_matches_numpy_or_names_the_missing_package():
    rng = np.random.default_rng(0)
    sizes = jnp.asarray([7, 0, 9], jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(20, 12)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 12, 8)), jnp.float32)
    try:
        import tokamax  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"model\.moe\.gmm_backend='tokamax'.*pip install tokamax"):
            experts.resolve_backend("tokamax")
        with pytest.raises(ValueError, match=r"config field model\.moe\.gmm_backend='tokamax'.*pip install tokamax"):
            helpers_configs.moe("mixtral", gmm_backend="tokamax")
        return
    out = experts.ragged_matmul(lhs, rhs, sizes, "tokamax")
    want = reference.grouped_matmul(np.asarray(lhs), np.asarray(rhs), [7, 0, 9])
    np.testing.assert_allclose(np.asarray(out)[:16], want[:16], rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_the_tiled_loop():
    assert jax.default_backend() == "cpu" and experts.resolve_backend("auto") == "tiled"


@pytest.mark.parametrize("fields", [dict(dispatch_kernel="pallas"),
                                    dict(dispatch_kernel="pallas", dispatch="capacity", capacity_factor=1.0),
                                    dict(gmm_backend="megablox"),
                                    dict(dispatch_kernel="pallas", gmm_backend="megablox", num_shared=1)],
                         ids=["pallas-dropless", "pallas-capacity", "megablox-dropless",
                              "pallas+megablox-shared"])
def test_moe_layer_with_kernels_matches_the_dense_reference(fields):
    """The whole layer, forward against the naive loop reference.moe_layer, forward and every gradient against the
    dense every-expert-on-every-token reference (tests/helpers_moe.py) and against the default 'jnp' + 'tiled'
    layer on the same parameters."""
    cfg = helpers_configs.moe("mixtral", **fields)
    default = helpers_configs.moe("mixtral", **{k: v for k, v in fields.items()
                                                if k not in ("dispatch_kernel", "gmm_backend")})
    module, x, params, state = helpers_moe.init(cfg)
    tokens, ids, weights, keep = helpers_moe.decisions(cfg, params, x)
    if cfg.dispatch == "capacity":
        assert not keep.all()
    cotangent = jax.random.normal(jax.random.key(99), x.shape)

    def loss(module):
        return jax.jit(jax.value_and_grad(
            lambda p, x: jnp.sum(module.apply({"params": p, "moe_state": state}, x) * cotangent), argnums=(0, 1)))

    y = jax.jit(lambda p, x: module.apply({"params": p, "moe_state": state}, x))(params, x)
    np.testing.assert_allclose(np.asarray(y).reshape(tokens.shape), reference.moe_layer(tokens, params, ids, weights,
                                                                                         keep), rtol=1e-5, atol=1e-5)
    dense = jax.value_and_grad(
        lambda p, x: jnp.sum(helpers_moe.dense_moe(cfg, p, x, ids, keep) * cotangent), argnums=(0, 1))
    got = loss(module)(params, x)
    for want in (dense(params, x), loss(layer.MoE(default, dtype=jnp.float32))(params, x)):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        helpers_moe.assert_trees_close(got[1], want[1], relative_atol=True)


def test_bad_dispatch_kernel_or_backend_names_the_field(monkeypatch):
    with pytest.raises(ValueError, match=r"model\.moe\.dispatch_kernel.*'triton'.*jnp.*pallas"):
        helpers_configs.moe("mixtral", dispatch_kernel="triton")
    with pytest.raises(ValueError, match=r"model\.moe\.gmm_backend.*'pallas'.*tiled.*megablox.*tokamax"):
        helpers_configs.moe("mixtral", gmm_backend="pallas")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match=r"model\.moe\.gmm_backend='megablox'.*TPU.*on GPU use"):
        helpers_configs.moe("mixtral", gmm_backend="megablox")


def test_pallas_dispatch_under_expert_parallelism():
    """The kernels inside shard_map (data 2 x expert 4, 'a2a': permute to the send buffer and to the local
    experts' rows, combine back twice): output and gradients equal the single-device layer."""
    single, x, params, state = helpers_moe.init(helpers_configs.moe(), shape=(8, 4, helpers_moe.D), std=0.02)
    y_ref, g_ref, _ = helpers_moe.loss_and_grads(single, params, state, x)
    mesh = helpers_moe.mesh_of((2, 1, 4, 1))
    cfg = helpers_configs.moe(dispatch_kernel="pallas", ep_mode="a2a")
    y, g, _ = helpers_moe.loss_and_grads(layer.MoE(cfg, mesh=mesh), params, state, x, helpers_moe.token_sharding(mesh))
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    helpers_moe.assert_trees_close(g, g_ref)


@pytest.mark.parametrize("platform, impl", [("cuda", "blocked"), ("tpu", "tpu")])
def test_kernels_lower_for_gpu_triton_and_tpu_mosaic(platform, impl):
    """No accelerator here, but jax.export lowers for one: permute -> unpermute-combine forward and backward at
    the DeepSeek-V2-Lite width (D = 2048, k = 6: not a power of two, which Triton needs and the kernel pads) must
    lower to Triton (GPU) or Mosaic (TPU) custom calls. (The default GPU lowering, Mosaic GPU, would stage the
    whole source in shared memory and fail here.)"""
    t, d, k, e = 64, 2048, 6, 8
    o = kd.KernelOptions(impl=impl, interpret=False)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, e, size=(t, k)), jnp.int32)
    plan = dispatch.dropless_plan(Routing(weights=jnp.ones((t, k)), experts=ids, probs=None, logits=None), e, 8)

    def loss(x, w):
        rows = kd.permute(x, plan.slot_row, plan.row_slot, o)
        return jnp.sum(kd.unpermute_combine(rows * 2, w, plan.slot_row, plan.row_slot, o).astype(jnp.float32))

    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    try:
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=[platform],
                                     disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(
            jax.ShapeDtypeStruct((t, d), jnp.bfloat16), jax.ShapeDtypeStruct((t, k), jnp.float32))
    except RuntimeError as err:  # jax >= 0.12 asks for a GPU's compute capability to lower Triton
        if "No supported GPU devices found" not in str(err):
            raise
        pytest.skip(f"this jax ({jax.__version__}) lowers Triton only with a GPU present")
    text = exported.mlir_module()
    # forward: gather_rows + gather_combine; backward: gather_rows (scaled), gather_dot, gather_combine
    assert text.count(f"@{target}" if platform == "cuda" else target) >= 4, text[:2000]


def test_megablox_glu_lowers_for_tpu(monkeypatch):
    """The megablox backend's GLU forward+backward, with F = 1400 (not a multiple of the 128 tile), lowers to
    Mosaic TPU custom calls through jax.export (default_backend reads 'tpu' so that nothing is interpreted)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    t, d, f, e = 256, 2048, 1400, 8
    sizes = jnp.full((e,), t // e, jnp.int32)
    plan = dispatch.Plan(slot_row=jnp.zeros((t, 1), jnp.int32), row_slot=jnp.zeros((t,), jnp.int32),
                         expert_rows=sizes, tile_expert=jnp.zeros((t,), jnp.int32), used_tiles=jnp.asarray(t),
                         tokens_per_expert=sizes, dropped=jnp.zeros((), jnp.int32), tile=1)

    def loss(rows, w0, w1, wo):
        return jnp.sum(experts.grouped_apply(experts.GLUExperts("silu"), rows, (w0, w1, wo), plan, "megablox")
                       .astype(jnp.float32))

    shapes = [(t, d), (e, d, f), (e, d, f), (e, f, d)]
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=["tpu"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(
        *(jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes))
    text = exported.mlir_module()
    assert text.count("tpu_custom_call") >= 3 and "tgmm" in text  # gmm forward, gmm + tgmm (weights) backward
