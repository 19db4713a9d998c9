"""Correctness of moejax's MoE kernels on whatever accelerator jax finds (experiments/gpu_check.py's first part):
the Pallas dispatch kernels (moejax/kernels/dispatch.py) against jnp references (the gathers written out; permute
and unpermute-combine forward and VJP against moejax.moe.dispatch's jnp ops), and a grouped-matmul backend's
dispatch -> experts -> combine against the dense every-expert-on-every-token reference, forward and gradients.

Each function runs one group of checks and returns {check name: verdict}, a verdict being {'passed', 'max_rel_err',
'tol'}: the largest error relative to the reference's largest magnitude, and its tolerance (TOL for values,
GRAD_TOL for gradients, by dtype).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from moejax.moe.routers import Routing

TOL = {"float32": 2e-3, "bfloat16": 3e-2}  # max |got - want| / max |want| (f32: room for TF32 matmuls on GPU)
GRAD_TOL = {"float32": 2e-3, "bfloat16": 5e-2}


def rel_err(got, want) -> float:
    """The largest over the arrays of two pytrees of max |got - want| / max |want| (each array by its own scale,
    compared in float32); NaN where got has a NaN."""
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = (np.asarray(jnp.asarray(a, jnp.float32)) for a in (g, w))
        err = float(np.max(np.abs(g - w))) / max(float(np.max(np.abs(w))), 1e-30)
        worst = err if np.isnan(err) else max(worst, err)
    return worst


def verdict(err: float, tol: float) -> dict:
    """A check's record: {'passed': err <= tol, 'max_rel_err', 'tol'}."""
    return {"passed": bool(err <= tol), "max_rel_err": err, "tol": tol}


def skewed_routing(t: int, k: int, e: int, seed: int = 0) -> Routing:
    """Routing of t tokens to k distinct of e experts, skewed towards the low ids, experts 2 and e - 1 empty;
    weights [t, k] positive, experts [t, k] int32."""
    from moejax.moe.routers import Routing

    rng = np.random.default_rng(seed)
    p = np.linspace(3.0, 1.0, e)
    p[[2, e - 1]] = 0
    ids = np.stack([rng.choice(e, size=k, replace=False, p=p / p.sum()) for _ in range(t)]).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32) + 0.1
    return Routing(weights=jnp.asarray(w), experts=jnp.asarray(ids), probs=None, logits=None)


def ref_rows(src: jax.Array, idx: jax.Array, scale: jax.Array) -> jax.Array:
    """gather_rows written out: src [N, D], idx [M], scale [M] -> [M, D] float32, scale[m] * src[idx[m]], 0 where
    idx >= N."""
    valid = (idx < src.shape[0])[:, None]
    return jnp.where(valid, src[jnp.minimum(idx, src.shape[0] - 1)].astype(jnp.float32) * scale[:, None], 0.0)


def ref_gathers(src: jax.Array, idx: jax.Array, w: jax.Array, g: jax.Array) -> tuple[jax.Array, ...]:
    """The jnp references of gather_rows, gather_combine and gather_dot: src [N, D], idx [T, k] (N: no row),
    w [T, k], g [T, D] -> ([T*k, D], [T, D], [T, k]), all float32."""
    t, k = idx.shape
    rows = ref_rows(src, idx.reshape(-1), w.reshape(-1))
    plain = ref_rows(src, idx.reshape(-1), jnp.ones(t * k)).reshape(t, k, -1)
    return rows, rows.reshape(t, k, -1).sum(1), jnp.einsum("tkd,td->tk", plain, g.astype(jnp.float32))


def gather_checks(dtype: str, case: str, shape: tuple[int, int, int]) -> dict[str, dict]:
    """{'kernel/<name>/<case>/<dtype>': verdict}: the three gather kernels against ref_gathers at shape (T, k, D),
    a source of T*k + 5 rows."""
    from moejax.kernels import dispatch as kd

    def gathers(src, idx, w, g):
        opts = kd.KernelOptions()  # the layer's: 'auto' impl, interpreted on CPU only
        return (kd.gather_rows(src, idx.reshape(-1), w.reshape(-1), opts), kd.gather_combine(src, idx, w, opts),
                kd.gather_dot(src, idx, g, opts))

    t, k, d = shape
    rng = np.random.default_rng(1)
    n = t * k + 5
    idx = rng.integers(0, n + 1, size=(t, k)).astype(np.int32)  # n: no row
    idx[0] = n  # a token with no row at all
    src, g = (jnp.asarray(rng.normal(size=s), dtype) for s in [(n, d), (t, d)])
    args = (src, jnp.asarray(idx), jnp.asarray(rng.normal(size=(t, k)), jnp.float32), g)
    got, want = jax.jit(gathers)(*args), jax.jit(ref_gathers)(*args)
    checks = {}
    for name, a, b in zip(("gather_rows", "gather_combine", "gather_dot"), got, want, strict=True):
        tol = TOL["float32"] if name == "gather_dot" else TOL[dtype]  # gather_dot returns float32
        checks[f"kernel/{name}/{case}/{dtype}"] = verdict(rel_err(a, b), tol)
    return checks


def permute_checks(dtype: str, mode: str, shape: tuple[int, int, int], num_experts: int = 16) -> dict[str, dict]:
    """{'kernel/permute_combine/<mode>/<dtype>/forward|vjp': verdict}: the Pallas permute -> unpermute-combine
    forward (rows [R, D], y [T, D]) and VJP (x, routing weights) against moejax.moe.dispatch's jnp ops, on a dropless
    plan of tile 8 or a capacity plan (factor 1: drops)."""
    from moejax.moe import dispatch, pipeline

    t, k, d = shape
    route = skewed_routing(t, k, num_experts)
    plan = (dispatch.dropless_plan(route, num_experts, 8) if mode == "dropless" else
            dispatch.capacity_plan(route, num_experts, dispatch.capacity(t, k, num_experts, 1.0), "position"))
    rng = np.random.default_rng(2)
    x, g_rows, g_y = (jnp.asarray(rng.normal(size=s), dtype) for s in [(t, d), (plan.num_rows, d), (t, d)])

    def forward_and_vjp(kernel):
        permute, combine = pipeline.kernel_ops(kernel)

        def fwd(x, w):
            rows = permute(x, plan.slot_row, plan.row_slot)
            return rows, combine(rows, w, plan.slot_row, plan.row_slot)

        out, vjp = jax.vjp(fwd, x, route.weights)
        return out, vjp((g_rows, g_y))

    got = jax.jit(lambda: forward_and_vjp("pallas"))()
    want = jax.jit(lambda: forward_and_vjp("jnp"))()
    return {f"kernel/permute_combine/{mode}/{dtype}/forward": verdict(rel_err(got[0], want[0]), TOL[dtype]),
            f"kernel/permute_combine/{mode}/{dtype}/vjp": verdict(rel_err(got[1], want[1]), GRAD_TOL[dtype])}


def gmm_checks(backend: str, dtype: str, shape: tuple[int, int, int, int, int]) -> dict[str, dict]:
    """{'gmm/<backend>/<dtype>/forward|gradient': verdict}: tokens x [T, D] through jnp dispatch ->
    grouped_apply(backend) -> combine against every expert on every token (einsums, the routing fixed), forward
    y [T, D] and the gradients of <y, c> for a random c [T, D] with respect to x, the routing weights [T, k] and the
    expert weights [E, D, F], [E, D, F], [E, F, D]."""
    from moejax.moe import dispatch, experts, pipeline

    t, k, e, d, f = shape
    route = skewed_routing(t, k, e, seed=3)
    plan = dispatch.dropless_plan(route, e, pipeline.tile_for(backend, 0, t * k, e))
    expert = experts.GLUExperts("silu")
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)
    weights = tuple(jnp.asarray(rng.normal(size=s) / math.sqrt(s[1]), dtype)
                    for s in [(e, d, f), (e, d, f), (e, f, d)])
    cotangent = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)

    def routed(x, w, weights):
        rows = dispatch.permute(x, plan.slot_row, plan.row_slot)
        out = experts.grouped_apply(expert, rows, weights, plan, backend)
        return dispatch.unpermute_combine(out, w, plan.slot_row, plan.row_slot)

    def dense(x, w, weights):
        wi_0, wi_1, wo = weights
        h = jax.nn.silu(jnp.einsum("td,edf->etf", x, wi_0)) * jnp.einsum("td,edf->etf", x, wi_1)
        mix = jnp.zeros((t, e)).at[jnp.arange(t)[:, None], route.experts].add(w)  # [T, E]
        return jnp.einsum("etf,efd,te->td", h, wo, mix)

    def value_and_grads(fn, *args):
        def value(*a):
            y = fn(*a)
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        (_, y), grads = jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2), has_aux=True))(*args)
        return y, grads

    y, grads = value_and_grads(routed, x, route.weights, weights)
    y_ref, grads_ref = value_and_grads(dense, *jax.tree.map(lambda a: a.astype(jnp.float32),
                                                            (x, route.weights, weights)))
    return {f"gmm/{backend}/{dtype}/forward": verdict(rel_err(y, y_ref), TOL[dtype]),
            f"gmm/{backend}/{dtype}/gradient": verdict(rel_err(grads, grads_ref), GRAD_TOL[dtype])}
