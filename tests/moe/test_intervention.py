"""Routing interventions (moejax/moe/intervention.py) against numpy references of the routing they define: the
MoE layer on its own (tests/reference.py's naive layer given the intervened routing) and the whole Transformer
(a router bias at -inf as the independent reference of a mask; the scanned model against the unscanned one)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import kv_cache, model
from moejax.moe import intervention as iv_lib
from moejax.moe import layer, routers, stats
from moejax.moe.intervention import Intervention, InterventionError
from tests import helpers_configs, helpers_moe
from tests import reference as ref

INF = float("inf")


def model_cfg(moe_cfg, num_layers=1, **fields):
    """A ``model`` section holding ``moe_cfg``: width 16, 2 heads, vocab 32."""
    m = base.get_config().model
    m.update(vocab_size=32, d_model=16, num_layers=num_layers, num_heads=2, ffn_dim=32)
    m.update(fields)
    m.moe = moe_cfg
    model.validate(m)
    return m


def lone_layer(router=None, **fields):
    """(moe cfg, model cfg of one layer, module, x [2, 12, 16], params)."""
    cfg = helpers_configs.moe(router, **fields)
    module, x, params, _ = helpers_moe.init(cfg)
    return cfg, model_cfg(cfg), module, x, params


def run_layer(module, params, x, iv=None, train=False):
    """(y [T, D], RoutedStats) of the lone layer, jitted."""
    fn = jax.jit(lambda p, x, iv: module.apply({"params": p}, x, train=train, intervention=iv, layer=0,
                                               mutable=["moe_aux"]))
    y, aux = fn(params, x, iv)
    return np.asarray(y, np.float64).reshape(-1, x.shape[-1]), helpers_moe.lone_stats(aux["moe_aux"])


def logits_of(params, x):
    tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return tokens, tokens @ np.asarray(params["router"]["kernel"], np.float64)


def routed_reference(cfg, params, x, selection_bias=None):
    """(tokens, logits, ids [T, k], weights [T, k]) of the numpy router with a selection-only bias."""
    tokens, logits = logits_of(params, x)
    ids, weights = ref.route_tokens(logits, cfg, selection_bias)
    return tokens, logits, ids, weights


def counts(ids, num_experts):
    return np.bincount(np.asarray(ids).reshape(-1), minlength=num_experts + 1)[:num_experts]


# ------------------------------------------------------------------ the lone MoE layer


@pytest.mark.parametrize("router", ["mixtral", "switch", "deepseek_v3"])
def test_mask_never_selected_and_equals_numpy(router):
    cfg, mcfg, module, x, params = lone_layer(router)
    tokens, logits, ids, _ = routed_reference(cfg, params, x)
    expert = int(np.argmax(counts(ids, 8)))  # the busiest expert
    y, record = run_layer(module, params, x, iv_lib.mask_experts(mcfg, {0: [expert]}))
    assert record.tokens_per_expert[expert] == 0 and record.routed_slots == ids.size
    bias = np.zeros(8)
    bias[expert] = -INF
    _, want_ids, want_w = routed_reference(cfg, params, x, bias)[1:]
    want = ref.moe_layer(tokens, params, want_ids, want_w)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    if router == "mixtral":  # renormalised: the same as the router column at -inf (the expert pruned)
        column = logits.copy()
        column[:, expert] = -INF
        pruned_ids, pruned_w = ref.route_tokens(column, cfg)
        np.testing.assert_allclose(y, ref.moe_layer(tokens, params, pruned_ids, pruned_w), rtol=1e-5, atol=1e-5)
        got = routers.route(jnp.asarray(column, jnp.float32), cfg)  # the router itself at -inf: same choice
        np.testing.assert_array_equal(np.sort(np.asarray(got.experts), -1), np.sort(want_ids, -1))


@pytest.mark.parametrize("router,after", [("mixtral", True), ("mixtral", False)])
def test_scale_equals_numpy(router, after):
    cfg, mcfg, module, x, params = lone_layer(router)
    tokens, logits, ids, _ = routed_reference(cfg, params, x)
    expert, factor = int(np.argmax(counts(ids, 8))), 3.0
    y, _ = run_layer(module, params, x, iv_lib.scale_experts(mcfg, {0: {expert: factor}}, after_norm=after))
    probs = ref.softmax(logits)
    want_w = np.zeros(ids.shape)
    for t in range(len(ids)):
        p = np.array([probs[t, e] for e in ids[t]])
        s = np.array([factor if e == expert else 1.0 for e in ids[t]])
        if router == "switch":  # no renormalisation: the scale multiplies the probability, before = after
            want_w[t] = p * s
        elif after:  # Mixtral: renormalised probabilities, then the scale
            want_w[t] = p / p.sum() * s
        else:  # the scale on the probabilities, then the renormalisation
            want_w[t] = p * s / (p * s).sum()
    want = ref.moe_layer(tokens, params, ids, want_w)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, ref.moe_layer(tokens, params, ids, ref.route_tokens(logits, cfg)[1]), atol=1e-3)


@pytest.mark.parametrize("router", ["mixtral", "switch"])
def test_force_in_every_selection_and_equals_numpy(router):
    cfg, mcfg, module, x, params = lone_layer(router)
    tokens, logits, ids, _ = routed_reference(cfg, params, x)
    expert = int(np.argmin(counts(ids, 8)))  # the idlest expert
    num_tokens = len(ids)
    assert counts(ids, 8)[expert] < num_tokens
    y, record = run_layer(module, params, x, iv_lib.force_experts(mcfg, {0: [expert]}))
    assert record.tokens_per_expert[expert] == num_tokens
    probs = ref.softmax(logits)
    want_ids, want_w = np.zeros((num_tokens, 2), int), np.zeros((num_tokens, 2))
    for t in range(num_tokens):  # the forced expert, then the best other one; weights from the real scores
        best = max((e for e in range(8) if e != expert), key=lambda e: probs[t, e])
        want_ids[t] = expert, best
        p = probs[t, want_ids[t]]
        want_w[t] = p / p.sum() if router == "mixtral" else p
    np.testing.assert_allclose(y, ref.moe_layer(tokens, params, want_ids, want_w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["switch", "mixtral"])
def test_top_k_1_equals_a_top_1_layer(router):
    cfg, mcfg, module, x, params = lone_layer(router)
    y, record = run_layer(module, params, x, iv_lib.limit_top_k(mcfg, {0: 1}))
    assert record.routed_slots == x.shape[0] * x.shape[1]
    top1 = helpers_configs.moe(router, top_k=1)
    want, _ = run_layer(helpers_moe.init(top1)[0], params, x)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_rank_2_equals_the_second_expert_alone():
    cfg, mcfg, module, x, params = lone_layer("deepseek_v2", num_shared=1)  # groups, scaling, a shared expert
    tokens, _, ids, _ = routed_reference(cfg, params, x)
    y, record = run_layer(module, params, x, iv_lib.rank_only(mcfg, 2, weight="one"))  # default: test_scmoe.py
    assert record.routed_slots == len(ids)
    want = ref.moe_layer(tokens, params, ids[:, 1:], np.ones((len(ids), 1)))  # + the shared GLU
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router,fields", [
    ("top_p", dict(top_k=3)), ("adamoe", dict(num_null_experts=2)), ("expert_choice", {}),
])
def test_mask_and_force_on_other_selecting_routers(router, fields):
    cfg, mcfg, module, x, params = lone_layer({"kind": router}, **fields)
    _, logits = logits_of(params, x)
    first = np.argmax(logits, -1)  # each of these routers gives its first slot to the best-scoring expert
    busiest = int(np.argmax(counts(first[first < 8], 8)))
    forced = (busiest + 1) % 8
    iv = iv_lib.mask_experts(mcfg, {0: [busiest]}) | iv_lib.force_experts(mcfg, {0: [forced]})
    _, record = run_layer(module, params, x, iv)
    assert record.tokens_per_expert[busiest] == 0
    assert record.tokens_per_expert[forced] == x.shape[0] * x.shape[1]


def test_unsupported_router_operations_raise():
    _, _, _, x, params = lone_layer(top_k=1)  # the hash layer has the same parameters
    mcfg = model_cfg(helpers_configs.moe({"kind": "hash"}, top_k=1))
    module = layer.MoE(mcfg.moe)
    ids = jnp.zeros(x.shape[:2], jnp.int32)
    with pytest.raises(InterventionError, match=r"mask is in use.*'hash' takes only 'scale'"):
        module.apply({"params": params}, x, token_ids=ids, intervention=iv_lib.mask_experts(mcfg, {0: [1]}))
    module.apply({"params": params}, x, token_ids=ids, intervention=iv_lib.scale_experts(mcfg, {0: {1: 2.0}}))
    cfg, mcfg, module, x, params = lone_layer({"kind": "expert_choice"})
    with pytest.raises(InterventionError, match=r"rank is in use.*'expert_choice' in training"):
        module.apply({"params": params}, x, train=True, intervention=iv_lib.rank_only(mcfg, 1))


def test_a_registered_router_takes_the_operations_its_facts_allow(monkeypatch):
    """A new kind is judged by its RouterSpec alone: ranking by score (and renormalising) it takes a mask and
    routes as the built-in router of the same rule does; without, only the scale, refused with its own reason."""
    monkeypatch.setattr(routers, "ROUTERS", dict(routers.ROUTERS))

    def softmax_top_k(logits, cfg, ctx):  # Mixtral's rule: top-k of the softmax, renormalised
        probs = jax.nn.softmax(logits, axis=-1)
        _, experts = jax.lax.top_k(routers.with_bias(probs, ctx.bias), cfg.top_k)
        weights = jnp.take_along_axis(probs, experts, axis=-1)
        return routers.Routing(weights=weights / (weights.sum(-1, keepdims=True) + 1e-20),
                               experts=experts.astype(jnp.int32), probs=probs, logits=logits)

    routers.register("ranked_softmax", ranks_by_score=True, renormalises=True)(softmax_top_k)
    routers.register("unranked_softmax", unranked="the test router says so")(softmax_top_k)
    _, mcfg, module, x, params = lone_layer("mixtral")
    iv = iv_lib.mask_experts(mcfg, {0: [1, 4]}) | iv_lib.limit_top_k(mcfg, 1)
    expected, _ = run_layer(module, params, x, iv)
    ranked = layer.MoE(helpers_configs.moe({"kind": "ranked_softmax"}))
    got, record = run_layer(ranked, params, x, iv)
    assert record.tokens_per_expert[1] == record.tokens_per_expert[4] == 0
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    unranked = layer.MoE(helpers_configs.moe({"kind": "unranked_softmax"}))
    with pytest.raises(InterventionError, match=r"mask is in use.*'unranked_softmax' takes only 'scale': the test "
                                                r"router says so"):
        run_layer(unranked, params, x, iv)
    run_layer(unranked, params, x, iv_lib.scale_experts(mcfg, {0: {1: 2.0}}))


# ------------------------------------------------------------------ the Transformer


def forward(net):
    return jax.jit(lambda v, t, iv: net.apply(v, t, intervention=iv, mutable=["moe_aux"]))


@pytest.fixture(scope="module")
def tiny():
    """(model cfg, Transformer, tokens [2, 12], variables, jitted forward(variables, tokens, iv)): 2 MoE layers,
    Mixtral's router."""
    cfg = model_cfg(helpers_configs.moe("mixtral"), num_layers=2)
    net = model.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    variables = net.init(jax.random.key(1), tokens)
    return cfg, net, tokens, {k: variables[k] for k in ("params", "moe_state")}, forward(net)


def test_model_mask_equals_router_bias_at_minus_inf():
    moe_cfg = helpers_configs.moe("mixtral")
    moe_cfg.router.bias = True
    cfg = model_cfg(moe_cfg, num_layers=2)
    net = model.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    variables = {"params": net.init(jax.random.key(1), tokens)["params"]}
    run = forward(net)
    base_logits, base_aux = run(variables, tokens, None)
    base = stats.collect(base_aux["moe_aux"])
    expert = int(np.argmax(base[("layers_1", "ffn")].tokens_per_expert))
    logits, aux = run(variables, tokens, iv_lib.mask_experts(cfg, {1: [expert]}))
    got = stats.collect(aux["moe_aux"])
    assert got[("layers_1", "ffn")].tokens_per_expert[expert] == 0
    assert base[("layers_1", "ffn")].tokens_per_expert[expert] > 0
    np.testing.assert_array_equal(got[("layers_0", "ffn")].tokens_per_expert,
                                  base[("layers_0", "ffn")].tokens_per_expert)  # layer 0 untouched
    router = variables["params"]["layers_1"]["ffn"]["router"]
    pruned = jax.tree.map(lambda a: a, variables)  # new dicts, same arrays
    pruned["params"]["layers_1"]["ffn"]["router"]["bias"] = router["bias"].at[expert].set(-1e30)
    want, _ = run(pruned, tokens, None)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits, base_logits, atol=1e-4)


def test_none_and_unit_scale_are_the_identity(tiny):
    cfg, net, tokens, variables, run = tiny
    want = np.asarray(run(variables, tokens, None)[0])
    # unit scales before the renormalisation: the rescaling too must leave the weights bitwise as they are
    for iv in (Intervention.none(cfg), Intervention.create(cfg, scale=np.ones((2, 8), np.float32),
                                                           scale_after_norm=False)):
        np.testing.assert_array_equal(np.asarray(run(variables, tokens, iv)[0]), want)


def test_grads_through_a_masked_model(tiny):
    cfg, net, tokens, variables, _ = tiny
    iv = iv_lib.mask_experts(cfg, {0: [2, 5]})

    def loss(params, iv):
        logits = net.apply({**variables, "params": params}, tokens, train=True, intervention=iv,
                           mutable=["moe_aux"])[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    grads = jax.jit(jax.grad(loss))(variables["params"], iv)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    wi_0 = np.asarray(grads["layers_0"]["ffn"]["experts"]["wi_0"])
    assert (wi_0[[2, 5]] == 0).all() and (np.abs(wi_0).sum((1, 2)) > 0).sum() == 6


def test_prefill_with_cache_equals_the_full_forward(tiny):
    cfg, net, tokens, variables, run = tiny
    iv = iv_lib.rank_only(cfg, 2) | iv_lib.scale_experts(cfg, {1: {0: 0.5}})

    @jax.jit
    def prefill(variables, tokens, iv):
        cache = kv_cache.Cache(16, jnp.int32(0), jnp.zeros((tokens.shape[0],), jnp.int32))
        return net.apply(variables, tokens, cache=cache, intervention=iv, mutable=[kv_cache.COLLECTION])[0]

    np.testing.assert_allclose(prefill(variables, tokens, iv), run(variables, tokens, iv)[0],
                               rtol=1e-5, atol=1e-5)


def unscanned_params(scanned, first_dense, units):
    """The scanned model's parameters in the unscanned layout (moe_every 1: one block per unit)."""
    out = {k: v for k, v in scanned.items() if k != "blocks"}
    for u in range(units):
        out[f"layers_{first_dense + u}"] = jax.tree.map(lambda a, u=u: a[u], scanned["blocks"]["block_0"])
    return out


def test_scanned_layers_read_their_own_rows():
    moe_cfg = helpers_configs.moe("mixtral")
    cfg = model_cfg(moe_cfg, num_layers=3, first_dense_layers=1, scan_layers=True)
    net = model.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    variables = {"params": net.init(jax.random.key(1), tokens)["params"]}
    run = forward(net)
    # one intervention per MoE layer (and one on the dense layer's row, never read), against the unscanned model
    # with the same parameters: each scanned layer reads the row of its model layer index
    dense_row = np.zeros((3, 8), bool)
    dense_row[0, 3] = True
    iv = (iv_lib.rank_only(cfg, 2, layers=[1]) | iv_lib.mask_experts(cfg, {2: [0, 1, 2]}) |
          iv_lib.scale_experts(cfg, {2: {4: 4.0}}) | Intervention.create(cfg, mask=dense_row))
    logits, aux = run(variables, tokens, iv)
    flat = model.Transformer(model_cfg(moe_cfg, num_layers=3, first_dense_layers=1))
    flat_vars = {"params": unscanned_params(variables["params"], 1, 2)}
    want, flat_aux = forward(flat)(flat_vars, tokens, iv)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    got = stats.by_layer(stats.collect(aux["moe_aux"]))
    np.testing.assert_array_equal(got.layer, [1, 2])
    np.testing.assert_array_equal(got.routed_slots, [24, 48])  # rank 2 on layer 1: one slot per token
    assert (got.tokens_per_expert[1, :3] == 0).all()
    want_load = stats.by_layer(stats.collect(flat_aux["moe_aux"])).tokens_per_expert
    np.testing.assert_array_equal(got.tokens_per_expert, want_load)


# ------------------------------------------------------------------ bad input


def test_bad_input_names_the_field_and_value():
    cfg = model_cfg(helpers_configs.moe(), num_layers=3, first_dense_layers=1)
    cases = [
        (lambda: Intervention.create(cfg, mask=np.zeros((2, 8), bool)), r"mask\.shape=\(2, 8\).*\(3, 8\)"),
        (lambda: Intervention.create(cfg, mask=np.zeros((3, 8), np.int32)), r"mask\.dtype='int32'"),
        (lambda: iv_lib.limit_top_k(cfg, {1: 3}), r"top_k\[1\]=3.*model\.moe\.top_k=2"),
        (lambda: Intervention.create(cfg, top_k=np.array([0, 0, 5])), r"top_k\[2\]=5"),
        (lambda: iv_lib.rank_only(cfg, 9), r"rank=9.*\[1, model\.moe\.num_experts=8\]"),
        (lambda: iv_lib.mask_experts(cfg, {0: [1]}), r"mask layer=0.*MoE layer.*\[1, 2\]"),
        (lambda: iv_lib.mask_experts(cfg, {1: [8]}), r"mask\[1\] expert=8.*num_experts=8"),
        (lambda: iv_lib.scale_experts(cfg, {1: {0: -1.0}}), r"scale\[1, 0\]=-1\.0"),
        (lambda: iv_lib.force_experts(cfg, {1: [0, 1, 2]}), r"force\[1\]=\[0, 1, 2\].*2 slots"),
        (lambda: iv_lib.mask_experts(cfg, {2: range(7)}), r"mask\[2\]=\[0, 1, 2, 3, 4, 5, 6\]"),
        (lambda: iv_lib.mask_experts(cfg, {1: [3]}) | iv_lib.force_experts(cfg, {1: [3]}), r"force\[1, 3\]=True"),
        (lambda: iv_lib.rank_only(cfg, 1) | iv_lib.rank_only(cfg, 2), r"rank\[1\]=2"),
        (lambda: iv_lib.rank_only(cfg, 2) | iv_lib.limit_top_k(cfg, 1), r"rank\[1\]=2.*top_k=1"),
        (lambda: Intervention.none(cfg).replace(rank=jnp.array([0, 1, 0])).check(cfg), r"ops=\(\).*'rank'"),
    ]
    for build, message in cases:
        with pytest.raises(InterventionError, match=message):
            build()
    other = model_cfg(helpers_configs.moe(), num_layers=2)
    net = model.Transformer(other)
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(InterventionError, match=r"mask\.shape=\(3, 8\).*model\.num_layers=2"):
        net.init(jax.random.key(0), tokens, intervention=Intervention.none(cfg))
