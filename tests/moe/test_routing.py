"""Routers against naive per-token references and against released models' routing code, re-typed in numpy."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checks
from moejax.moe import layer, routers
from tests import helpers_configs
from tests import reference as ref

E = 16


def moe_cfg(top_k=4, **router):
    """16 experts, top-4 unless told, with these router fields."""
    return helpers_configs.moe(router, num_experts=E, top_k=top_k)


def check_against_reference(cfg, logits, bias=None):
    got = routers.route(jnp.asarray(logits), cfg, bias=None if bias is None else jnp.asarray(bias))
    ids, weights = ref.route_tokens(logits, cfg, bias)
    np.testing.assert_array_equal(np.asarray(got.experts), ids)
    np.testing.assert_allclose(np.asarray(got.weights), weights, rtol=1e-5, atol=1e-7)
    return got


@pytest.mark.parametrize("score,before,norm,scaling", [
    *itertools.product(["softmax"], [True, False], [True, False], [1.0, 2.5]),
    *itertools.product(["sigmoid"], [True], [True, False], [1.0, 2.5]),
])
def test_topk_knobs(score, before, norm, scaling):
    logits = np.random.default_rng(0).normal(size=(32, E)).astype(np.float32)
    cfg = moe_cfg(score=score, softmax_before_topk=before, norm_topk_prob=norm, routed_scaling_factor=scaling)
    got = check_against_reference(cfg, logits)
    assert got.experts.dtype == jnp.int32
    assert got.probs.shape == (32, E) and got.logits.shape == (32, E)


@pytest.mark.parametrize("group_score,fill,score", [
    ("max", 0.0, "softmax"), ("top2_sum", 0.0, "sigmoid"), ("top2_sum", float("-inf"), "sigmoid"),
    ("max", float("-inf"), "softmax"),
])
def test_group_limited(group_score, fill, score):
    logits = np.random.default_rng(1).normal(size=(32, E)).astype(np.float32)
    bias = np.random.default_rng(2).normal(size=E).astype(np.float32) * 0.5
    cfg = moe_cfg(score=score, num_groups=4, topk_groups=2, group_score=group_score, group_mask_fill=fill)
    got = check_against_reference(cfg, logits, bias)
    groups = np.asarray(got.experts) // (E // 4)
    assert all(len(set(row)) <= 2 for row in groups)


def test_bias_selects_but_never_weighs():
    logits = np.random.default_rng(3).normal(size=(64, E)).astype(np.float32)
    bias = np.zeros(E, np.float32)
    bias[5] = 10.0
    cfg = moe_cfg(score="sigmoid", top_k=2)
    got = check_against_reference(cfg, logits, bias)
    assert (np.asarray(got.experts) == 5).any(axis=1).all()
    chosen = np.asarray(got.weights)[np.asarray(got.experts) == 5]
    np.testing.assert_allclose(chosen, ref.sigmoid(logits[:, 5]), rtol=1e-6)


@pytest.mark.parametrize("model", ["mixtral", "deepseek_v2", "deepseek_v3"])
def test_released_model_semantics(model):
    rng = np.random.default_rng(4)
    num_experts = 64
    logits = rng.normal(size=(48, num_experts)).astype(np.float32)
    bias = None
    if model == "mixtral":
        cfg = helpers_configs.moe(dict(score="softmax", norm_topk_prob=True), num_experts=num_experts, top_k=2)
        expected = [ref.mixtral(row) for row in logits]
    elif model == "deepseek_v2":
        cfg = helpers_configs.moe(dict(score="softmax", num_groups=8, topk_groups=3, group_score="max",
                                       group_mask_fill=0.0, routed_scaling_factor=16.0), num_experts=num_experts,
                                  top_k=6)
        expected = [ref.deepseek_v2(row) for row in logits]
    else:
        bias = (rng.normal(size=num_experts) * 0.1).astype(np.float32)
        cfg = helpers_configs.moe(dict(score="sigmoid", num_groups=8, topk_groups=4, group_score="top2_sum",
                                       group_mask_fill=0.0, norm_topk_prob=True, routed_scaling_factor=2.5),
                                  num_experts=num_experts, top_k=8)
        expected = [ref.deepseek_v3(row, bias) for row in logits]
    got = routers.route(jnp.asarray(logits), cfg, bias=None if bias is None else jnp.asarray(bias))
    for t, (idx, w) in enumerate(expected):
        np.testing.assert_array_equal(np.asarray(got.experts[t]), idx)
        np.testing.assert_allclose(np.asarray(got.weights[t]), w, rtol=1e-5)


def test_router_runs_in_float32():
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(8, E)), jnp.bfloat16)
    got = routers.route(logits, moe_cfg())
    assert got.weights.dtype == got.probs.dtype == got.logits.dtype == jnp.float32


def test_jitter_is_multiplicative_and_bounded():
    x = jnp.ones((64, 32))
    noisy = routers.jitter(x, 0.1, jax.random.key(0))
    ratio = np.asarray(noisy / x)
    assert ratio.min() >= 0.9 and ratio.max() <= 1.1 and ratio.std() > 0.03


@pytest.mark.parametrize("change,field", [
    (dict(top_k=17), "model.moe.top_k"),
    (dict(num_groups=4, topk_groups=5), "model.moe.router.topk_groups"),
    (dict(num_groups=5), "model.moe.router.num_groups"),
    (dict(score="relu"), "model.moe.router.score"),
    (dict(kind="nope"), "model.moe.router.kind"),
    (dict(group_score="mean"), "model.moe.router.group_score"),
])
def test_impossible_settings_are_named(change, field):
    cfg = moe_cfg()
    for key, value in change.items():
        (cfg if key == "top_k" else cfg.router)[key] = value
    value = change[field.rsplit(".", 1)[1]]
    with pytest.raises(checks.ConfigError) as err:
        layer.validate(cfg)
    assert field in str(err.value) and repr(value) in str(err.value)


def test_registry_says_what_each_router_needs():
    assert {"topk", "top_p", "adamoe", "expert_choice", "hash", "smoe_dropout", "thor"} <= set(routers.ROUTERS)
    needs = {kind: (s.needs_rng, s.needs_token_ids, s.needs_progress) for kind, s in routers.ROUTERS.items()}
    assert needs["thor"] == (True, False, False)
    assert needs["hash"] == (False, True, False)
    assert needs["smoe_dropout"] == (False, False, True)
    assert needs["topk"] == needs["top_p"] == needs["adamoe"] == needs["expert_choice"] == (False, False, False)
    assert routers.spec("topk") is routers.ROUTERS["topk"]
    with pytest.raises(checks.ConfigError, match=r"model\.moe\.router\.kind='nope'.*'adamoe'.*'topk'"):
        routers.spec("nope")


@pytest.mark.parametrize("change,field,why", [
    (dict(kind="hash", top_k=2), "model.moe.top_k", "one expert per token"),
    (dict(kind="thor", top_k=2), "model.moe.top_k", "one random expert per pass"),
    (dict(kind="expert_choice", dispatch="capacity"), "model.moe.dispatch", "use 'dropless'"),
])
def test_routers_check_their_own_fields(change, field, why):
    cfg = moe_cfg()
    cfg.router.kind = change["kind"]
    cfg.update({key: value for key, value in change.items() if key != "kind"})
    with pytest.raises(checks.ConfigError, match=why) as err:
        layer.validate(cfg)
    assert field in str(err.value)


def test_a_registered_router_runs_in_the_layer_with_the_context_it_asks_for(monkeypatch):
    """A new router is one function under @register: the layer finds it by kind, gives it what its spec asks for
    (here the token ids and the training progress, not an rng) and calls its config check."""
    monkeypatch.setattr(routers, "ROUTERS", dict(routers.ROUTERS))
    seen = {}

    def check(cfg, prefix):
        if cfg.top_k != 1:
            checks.fail(f"{prefix}.top_k", cfg.top_k, "the test router takes 1")

    @routers.register("by_parity", needs_token_ids=True, needs_progress=True, validate=check)
    def by_parity(logits, cfg, ctx):
        """Even token ids to expert 0, odd ones to expert 1, weight 1 - progress (1 without progress)."""
        seen.update(rng=ctx.rng, train=ctx.train, progress=ctx.progress)
        experts = (ctx.token_ids % 2).astype(jnp.int32)[:, None]
        done = 0.0 if ctx.progress is None else ctx.progress
        weights = jnp.broadcast_to(1.0 - done, experts.shape).astype(jnp.float32)
        return routers.Routing(weights=weights, experts=experts, probs=jax.nn.softmax(logits), logits=logits)

    assert routers.spec("by_parity").needs_token_ids and not routers.spec("by_parity").needs_rng
    cfg = moe_cfg(top_k=2)
    cfg.router.kind = "by_parity"
    with pytest.raises(checks.ConfigError, match="the test router takes 1"):
        layer.validate(cfg)
    cfg.top_k = 1
    layer.validate(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    token_ids = jnp.arange(6).reshape(2, 3)
    module = layer.MoE(cfg)
    params = module.init(jax.random.key(1), x, token_ids=token_ids)["params"]
    y = module.apply({"params": params}, x, train=True, token_ids=token_ids, progress=jnp.float32(0.25))
    assert seen["rng"] is None and seen["train"] is True and float(seen["progress"]) == 0.25
    tokens = np.asarray(x, np.float64).reshape(-1, 8)
    ids = (np.arange(6) % 2)[:, None]
    expected = ref.moe_layer(tokens, params, ids, np.full((6, 1), 0.75))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), expected, rtol=1e-5, atol=1e-6)


def test_registering_a_taken_kind_is_refused(monkeypatch):
    monkeypatch.setattr(routers, "ROUTERS", dict(routers.ROUTERS))
    with pytest.raises(ValueError, match=r"router kind 'topk' is already registered \(by moejax\.moe\.routers\.topk\)"):
        routers.register("topk")(lambda logits, cfg, ctx: None)
    assert routers.ROUTERS["topk"].fn is routers.topk  # the first registration stands


def test_the_registry_holds_each_kinds_facts():
    ranking = {kind for kind, s in routers.ROUTERS.items() if s.ranks_by_score}
    assert {"topk", "top_p", "adamoe", "smoe_dropout", "expert_choice"} <= ranking
    assert not {"hash", "thor"} & ranking and routers.spec("hash").unranked and routers.spec("thor").unranked
    assert not routers.spec("expert_choice").ranks_in_training
    assert [kind for kind, s in routers.ROUTERS.items() if s.ids_depend_on_num_experts] == ["hash"]
    assert [kind for kind, s in routers.ROUTERS.items() if s.null_experts] == ["adamoe"]
    assert [kind for kind, s in routers.ROUTERS.items() if s.group_limited] == ["topk"]
    # renormalisation: a fact of the kind, for top-k a function of its knobs
    assert routers.renormalises(moe_cfg(norm_topk_prob=True)) and routers.renormalises(moe_cfg(
        softmax_before_topk=False))
    assert not routers.renormalises(moe_cfg()) and not routers.renormalises(moe_cfg(score="sigmoid"))
    assert routers.renormalises(moe_cfg(kind="adamoe")) and routers.renormalises(moe_cfg(kind="smoe_dropout"))
    assert not routers.renormalises(moe_cfg(kind="top_p")) and not routers.renormalises(moe_cfg(kind="expert_choice"))


def test_a_kind_checks_only_its_own_fields():
    cfg = moe_cfg(top_p=0.0)  # a top_p field: the top_p router's business only
    layer.validate(cfg)
    cfg.router.kind = "top_p"
    with pytest.raises(checks.ConfigError, match=r"model\.moe\.router\.top_p=0\.0.*\(0, 1\]"):
        layer.validate(cfg)


def test_null_experts_need_a_router_that_declares_them(monkeypatch):
    cfg = moe_cfg()
    cfg.num_null_experts = 2
    with pytest.raises(checks.ConfigError, match=r"model\.moe\.num_null_experts=2.*\['adamoe'\].*'topk'"):
        layer.validate(cfg)
    monkeypatch.setattr(routers, "ROUTERS", dict(routers.ROUTERS))
    routers.register("with_nulls", null_experts=True)(routers.adamoe)
    cfg.router.kind = "with_nulls"
    layer.validate(cfg)
