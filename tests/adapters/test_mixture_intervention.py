"""Routing interventions on the routers of mixtures of LoRA experts (moejax/adapters/mixture_intervention.py): a GLU
whose three matrices have LoRA experts, with experts silenced, forced and scaled on chosen routers, against a numpy
loop that applies the intervention by hand (frozen base + sum over the kept experts of g_e (alpha/r) B_e A_e x,
the gates renormalised where the router renormalises); on a model, silencing a LoRAMoE expert by its address equals
zeroing that expert's B there; the errors name the address and the field."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from moejax import model
from moejax.adapters import lora, mixture
from moejax.adapters import mixture_intervention as mi
from moejax.moe import layer
from moejax.moe.intervention import InterventionError
from tests import helpers_configs
from tests.adapters.test_mixture import randomised, silu, softmax

SCALING = 3.0  # alpha 6 / r 2


def gates(probs, top_k, mask=(), force=(), scale=None):
    """numpy: a token's gates over E LoRA experts with the intervention by hand. top_k 0 (LoRAMoE): the softmax, a
    silenced expert's gate 0, the others unchanged. top_k k (MoLA): forced experts first, then the most probable
    unsilenced ones up to k slots, their probabilities renormalised to sum 1. scale: times the factor after."""
    num = probs.size
    if top_k:
        order = [e for e in np.argsort(-probs, kind="stable") if e not in mask and e not in force]
        chosen = list(force) + order[: top_k - len(force)]
        g = np.zeros(num)
        g[chosen] = probs[chosen] / probs[chosen].sum()
    else:
        g = probs.copy()
        g[list(mask)] = 0.0
    return g * (np.ones(num) if scale is None else scale)


def linear(x, p, name, top_k, **iv):
    w, a, b, router = (p[name + s] for s in ("", "_moe_lora_a", "_moe_lora_b", "_moe_lora_router"))
    out = x @ w
    for t in range(x.shape[0]):
        g = gates(softmax(x[t] @ router), top_k, **iv)
        for e in range(a.shape[0]):
            out[t] += g[e] * SCALING * ((x[t] @ a[e]) @ b[e])
    return out


@pytest.fixture(scope="module", params=[0, 2], ids=["loramoe", "mola_top2"])
def glu(request):
    top_k = request.param
    mix = mixture.MixtureSpec(num_experts=4, top_k=top_k, balance="none")
    module = layer.GLU(24, kernel_init=nn.initializers.normal(0.3),
                       lora=lora.LoraSpec(("wi_0", "wi_1", "wo"), rank=2, alpha=6.0, mixture=mix))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = randomised(module.init(jax.random.key(1), x)["params"])
    return top_k, mix, module, x, params


def test_silence_force_scale_against_numpy(glu):
    """wo: expert 1 silenced; wi_0: expert 3 forced (MoLA) or scaled by 2.5 (LoRAMoE); wi_1 untouched."""
    top_k, mix, module, x, params = glu
    wi_0 = ({"force": (3,)} if top_k else {"scale": np.array([1.0, 1.0, 1.0, 2.5])})
    ivs = {"wo": mi.router_intervention(mix, 4, mask=np.arange(4) == 1),
           "wi_0": (mi.router_intervention(mix, 4, force=np.arange(4) == 3) if top_k
                    else mi.router_intervention(mix, 4, scale=wi_0["scale"]))}
    y, aux = module.apply({"params": params, **mi.variables(ivs)}, x, mutable=["moe_aux"])
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    xs = np.asarray(x, np.float64).reshape(10, 16)
    h = silu(linear(xs, p, "wi_0", top_k, **wi_0)) * linear(xs, p, "wi_1", top_k)
    want = linear(h, p, "wo", top_k, mask=(1,))
    np.testing.assert_allclose(np.asarray(y).reshape(10, 16), want, rtol=1e-4, atol=1e-5)
    plain = module.apply({"params": params}, x)
    assert np.abs(np.asarray(plain) - np.asarray(y)).max() > 1e-3  # the intervention changed the output
    records = {name: aux["moe_aux"][name + mixture.ROUTING_SUFFIX][0] for name in ("wo", "wi_0")}
    experts, weights, _ = (np.asarray(a) for a in records["wo"])
    assert not ((experts == 1) & (weights > 0)).any()  # the silenced expert takes no token
    if top_k:
        assert ((np.asarray(records["wi_0"][0]) == 3).any(-1)).all()  # the forced expert takes every token
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def tiny(top_k):
    config = helpers_configs.small_model(helpers_configs.tiny(), num_layers=2, moe_every=0, scan_layers=False)
    config.model.lora.update(targets=("ffn/(wi_0|wi_1|wo)",), rank=2, alpha=4.0)
    helpers_configs.override(config, {"model.lora.mixture.num_experts": 4, "model.lora.mixture.top_k": top_k,
                                      "model.lora.mixture.balance": "none"})
    model.validate(config.model)
    return config


def test_silencing_by_address_on_a_model_equals_zeroing_the_expert():
    """LoRAMoE (no renormalisation): silencing expert 2 of layers_1/ffn/wo removes exactly its term, as zeroing its
    B does; layer 0's router is untouched. MoLA: forcing expert 0 of layers_0/ffn/wi_1 routes every token to it."""
    config = tiny(0)
    assert mi.addresses(config) == {f"layers_{i}/ffn/{w}": 4 for i in range(2) for w in ("wi_0", "wi_1", "wo")}
    module = model.Transformer(config.model)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 100)
    params = randomised(module.init(jax.random.key(1), tokens)["params"])
    iv = mi.silence(config, {"layers_1/ffn/wo": [2]})
    got = module.apply({"params": params, **mi.variables(iv)}, tokens)
    edited = jax.tree.map(lambda v: v, params)
    b = edited["layers_1"]["ffn"]["wo_moe_lora_b"]
    edited["layers_1"]["ffn"]["wo_moe_lora_b"] = b.at[2].set(0.0)
    np.testing.assert_allclose(got, module.apply({"params": edited}, tokens), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(module.apply({"params": params}, tokens))).max() > 1e-4

    config = tiny(2)
    module = model.Transformer(config.model)
    params = randomised(module.init(jax.random.key(1), tokens)["params"])
    iv = mi.merge(mi.force(config, {"layers_0/ffn/wi_1": [0]}), mi.silence(config, {"layers_0/ffn/wi_1": [3]}))
    _, aux = jax.jit(lambda v: module.apply(v, tokens, mutable=["moe_aux"]))({"params": params, **mi.variables(iv)})
    experts = np.asarray(aux["moe_aux"]["layers_0"]["ffn"]["wi_1" + mixture.ROUTING_SUFFIX][0][0])
    assert (experts == 0).any(-1).all() and not (experts == 3).any()


def test_errors_name_the_address_and_field():
    config = tiny(2)
    with pytest.raises(InterventionError, match=r"'layers_0/attn/q/kernel' is not an adapted weight with LoRA "
                                                r"experts; this model's are: layers_0/ffn/wi_0"):
        mi.silence(config, {"layers_0/attn/q/kernel": [0]})
    with pytest.raises(InterventionError, match=r"mask\['layers_1/ffn/wo'\] expert 4 is invalid: must be an "
                                                r"expert index in \[0, 4\)"):
        mi.silence(config, {"layers_1/ffn/wo": [4]})
    with pytest.raises(InterventionError, match=r"LoRA-expert router layers_1/ffn/wo \(4 LoRA experts, top_k 2.*"
                                                r"force\[0\]"):
        mi.force(config, {"layers_1/ffn/wo": [0, 1, 2]})  # three forced experts, two slots
    scanned = config.copy_and_resolve_references()
    scanned.model.scan_layers = True
    with pytest.raises(InterventionError, match="model.scan_layers=False"):
        mi.silence(scanned, {"layers_1/ffn/wo": [0]})
