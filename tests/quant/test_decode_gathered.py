"""Quantised decoding reads only the routed experts a step selects (moejax/moe/quantised.py): the gathered,
dequantised expert FFN (the jnp path, and the Pallas dequantising grouped matmul interpreted) against a numpy loop
over the slots, and no float array of all E experts' weights in the step. (The tokens against the fake-quantised
model and on a mesh: tests/quant/test_decode.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import experts, pipeline, quantised
from moejax.moe.routers import Routing

E, D, F = 8, 16, 8


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """int codes in [-8, 7] [..., N] (N even) -> uint8 [..., N / 2]: two's complement, output c in the low nibble
    of byte c, output c + N / 2 in the high one."""
    u = (codes.astype(np.int16) & 0x0F).astype(np.uint8)
    half = codes.shape[-1] // 2
    return (u[..., :half] | (u[..., half:] << 4)).astype(np.uint8)


def random_weight(rng, k: int, n: int, bits: int, group: int):
    """(QuantisedWeight [E, k, n], its dequantised values in numpy)."""
    q = 2 ** (bits - 1) - 1
    codes = rng.integers(-q, q + 1, size=(E, k, n))
    gk = group or k
    scales = rng.uniform(0.01, 0.1, size=(E, k // gk, n)).astype(np.float32)
    dense = codes.astype(np.float32) * np.repeat(scales, gk, axis=1)
    held = pack_nibbles(codes) if bits <= 4 else codes.astype(np.int8)
    return quantised.QuantisedWeight(jnp.asarray(held), jnp.asarray(scales), bits, group, (E, k, n), (E, k, n),
                                      "float32"), dense


def numpy_moe(x, ids, w, dense):
    """sum_j w[t, j] * glu_{ids[t, j]}(x[t]) over the slots with an id < E (silu GLU), in float64."""
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if e < E:
                wi_0, wi_1, wo = (d[e].astype(np.float64) for d in dense)
                out[t] += w[t, j] * ((silu(x[t] @ wi_0) * (x[t] @ wi_1)) @ wo)
    return out


@pytest.mark.parametrize("bits,group,kernel", [(8, 0, "jnp"), (4, 8, "jnp"), (4, 8, "pallas")])
def test_gathered_expert_ffn_matches_a_numpy_loop_and_dequantises_only_the_selected(bits, group, kernel):
    rng = np.random.default_rng(bits + len(kernel))
    made = [random_weight(rng, D, F, bits, group), random_weight(rng, D, F, bits, group),
            random_weight(rng, F, D, bits, group)]
    weights, dense = tuple(m[0] for m in made), [m[1] for m in made]
    x = rng.normal(size=(3, D)).astype(np.float32)
    ids = np.array([[5, 1], [1, E], [6, 5]], np.int32)  # a shared expert, a null slot: 3 distinct of 8
    w = rng.uniform(0.2, 1.0, size=ids.shape).astype(np.float32)

    def run(x, w, weights):
        route = Routing(weights=w, experts=jnp.asarray(ids), probs=None, logits=None)
        return pipeline.routed_experts(x, route, experts.GLUExperts(), weights, num_experts=E, backend="tiled",
                                       kernel=kernel, tile=8)[0]

    assert quantised.gathers(weights, ids.size, E)
    got = jax.jit(run)(x, w, weights)
    np.testing.assert_allclose(np.asarray(got), numpy_moe(x, ids, w, dense), rtol=2e-5, atol=2e-5)
    # no float array of all E experts' weights is made: only the slots' min(T k, E) gathered experts
    jaxpr = jax.make_jaxpr(run)(x, w, weights)
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars
              if jnp.issubdtype(v.aval.dtype, jnp.floating)}
    assert not any(s[:1] == (E,) and len(s) == 3 for s in shapes), sorted(shapes)
