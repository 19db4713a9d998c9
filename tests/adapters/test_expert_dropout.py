"""Dropout on routed-expert adapters (moejax/adapters/expert_lora.py, moejax/moe/pipeline.py): one mask per routed
slot and adapted matrix on the input of A, as PEFT's lora_dropout on each expert's Linear. The routed experts with
given masks against a numpy loop over each token's slots (every backend) and the adapters' gradients against a jnp
loop; in the MoE layer the masks come from the 'dropout' stream in training only."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.adapters import expert_lora, lora
from moejax.moe import experts, layer, pipeline, routers
from tests import helpers_configs

T, K, E, D, F, R = 10, 2, 4, 16, 8, 3
SCALING = 1.5


def problem(seed=0):
    """Tokens, a routing, GLU weights with adapters on wi_0 and wo, and keep masks (0 or 1/(1-p)) per slot."""
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(T, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    weights = rng.uniform(0.2, 1.0, size=(T, K)).astype(np.float32)
    w = {"wi_0": rng.normal(size=(E, D, F)) * 0.4, "wi_1": rng.normal(size=(E, D, F)) * 0.4,
         "wo": rng.normal(size=(E, F, D)) * 0.4, "wi_0_lora_a": rng.normal(size=(E, D, R)) * 0.5,
         "wi_0_lora_b": rng.normal(size=(E, R, F)) * 0.5, "wo_lora_a": rng.normal(size=(E, F, R)) * 0.5,
         "wo_lora_b": rng.normal(size=(E, R, D)) * 0.5}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    masks = (rng.uniform(size=(T * K, D + F)) > 0.4) / 0.6
    return tokens, ids, weights, w, masks.astype(np.float32)


def silu(x):
    return x / (1 + np.exp(-x))


def numpy_loop(tokens, ids, weights, w, masks):
    """y_t = sum_j weights[t, j] * expert_{ids[t, j]}(x_t) with the slot's masks on the adapters' inputs."""
    x64 = {k: v.astype(np.float64) for k, v in w.items()}
    out = np.zeros((T, D))
    for t in range(T):
        for j in range(K):
            e, m = ids[t, j], masks[t * K + j]
            x = tokens[t].astype(np.float64)
            gate = x @ x64["wi_0"][e] + SCALING * ((x * m[:D]) @ x64["wi_0_lora_a"][e]) @ x64["wi_0_lora_b"][e]
            h = silu(gate) * (x @ x64["wi_1"][e])
            y = h @ x64["wo"][e] + SCALING * ((h * m[D:]) @ x64["wo_lora_a"][e]) @ x64["wo_lora_b"][e]
            out[t] += weights[t, j] * y
    return out


def routed(tokens, ids, weights, w, masks, backend):
    expert = expert_lora.AdaptedExperts(experts.GLUExperts(), ("wi_0", "wo"), SCALING, dropout_widths=(D, F))
    names = expert.param_names
    route = routers.Routing(weights=jnp.asarray(weights), experts=jnp.asarray(ids), probs=jnp.zeros((T, E)),
                            logits=jnp.zeros((T, E)))
    tile = pipeline.tile_for(backend, 0, T * K, E)
    out, _ = pipeline.routed_experts(jnp.asarray(tokens), route, expert, tuple(jnp.asarray(w[n]) for n in names),
                                     num_experts=E, backend=backend, kernel="jnp", tile=tile,
                                     slot_inputs=jnp.asarray(masks))
    return out


@pytest.mark.parametrize("backend", ["tiled", "ragged_dot"])
def test_slot_masks_against_a_numpy_loop_and_gradients(backend):
    tokens, ids, weights, w, masks = problem()
    got = jax.jit(routed, static_argnums=5)(tokens, ids, weights, w, masks, backend)
    np.testing.assert_allclose(got, numpy_loop(tokens, ids, weights, w, masks), rtol=1e-4, atol=1e-5)

    def jnp_loop(w):
        out = jnp.zeros((T, D))
        for t in range(T):
            for j in range(K):
                e, m, x = ids[t, j], masks[t * K + j], tokens[t]
                gate = x @ w["wi_0"][e] + SCALING * ((x * m[:D]) @ w["wi_0_lora_a"][e]) @ w["wi_0_lora_b"][e]
                h = jax.nn.silu(gate) * (x @ w["wi_1"][e])
                out = out.at[t].add(weights[t, j] * (h @ w["wo"][e] + SCALING * ((h * m[D:]) @ w["wo_lora_a"][e])
                                                     @ w["wo_lora_b"][e]))
        return out

    adapters = {k: v for k, v in w.items() if "lora" in k}
    loss = lambda fn: lambda a: jnp.sum(jnp.cos(fn({**w, **a})))  # noqa: E731
    got = jax.jit(jax.grad(loss(lambda p: routed(tokens, ids, weights, p, masks, backend))))(adapters)
    want = jax.grad(loss(jnp_loop))(adapters)
    for name in adapters:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=2e-4, err_msg=name)


def test_layer_draws_masks_in_training_only():
    """With lora.dropout 0.5 on the routed experts: the 'dropout' stream changes the layer's output (two keys, two
    outputs); without it (evaluation) the output is the undropped one."""
    cfg = helpers_configs.moe("mixtral")
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    spec = lora.LoraSpec(("experts/(wi_0|wo)",), rank=2, alpha=4.0, dropout=0.5)
    module = layer.MoE(cfg, kernel_init=nn.initializers.normal(0.4), lora=spec)
    params = module.init(jax.random.key(1), x)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.5 if jax.tree_util.keystr(p).endswith("_lora_b']") else v, params)
    plain = layer.MoE(cfg, kernel_init=nn.initializers.normal(0.4), lora=spec.__class__(spec.targets, 2, 4.0))
    want = plain.apply({"params": params}, x)
    np.testing.assert_allclose(module.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)
    one = module.apply({"params": params}, x, rngs={"dropout": jax.random.key(2)})
    two = module.apply({"params": params}, x, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(one, want) and not np.allclose(one, two)
