"""Routers against naive per-token references and against released models' routing code, re-typed in numpy."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import checks, routing
from tests import reference as ref

E = 16


def moe_cfg(**router):
    cfg = base.get_config().model.moe
    cfg.num_experts = E
    cfg.top_k = router.pop("top_k", 4)
    cfg.router.update(router)
    return cfg


def check_against_reference(cfg, logits, bias=None):
    got = routing.route(jnp.asarray(logits), cfg, bias=None if bias is None else jnp.asarray(bias))
    r = cfg.router
    for t in range(logits.shape[0]):
        ids, weights = ref.route_token(
            logits[t], k=cfg.top_k, score=r.score, softmax_before_topk=r.softmax_before_topk,
            norm_topk_prob=r.norm_topk_prob, scaling=r.routed_scaling_factor, num_groups=r.num_groups,
            topk_groups=r.topk_groups, group_score=r.group_score, fill=r.group_mask_fill, bias=bias)
        np.testing.assert_array_equal(np.asarray(got.experts[t]), ids)
        np.testing.assert_allclose(np.asarray(got.weights[t]), weights, rtol=1e-5, atol=1e-7)
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


# Released models' routing, re-typed from their reference code (HF transformers modeling files), per token.

def mixtral(logits, k=2):
    p = ref.softmax(logits)
    idx = np.argsort(-p, kind="stable")[:k]
    return idx, p[idx] / p[idx].sum()


def deepseek_v2(logits, k=6, n_group=8, topk_group=3, scaling=16.0):
    scores = ref.softmax(logits)
    group_scores = scores.reshape(n_group, -1).max(-1)
    group_idx = np.argsort(-group_scores, kind="stable")[:topk_group]
    mask = np.zeros(n_group, bool)
    mask[group_idx] = True
    tmp = np.where(np.repeat(mask, len(scores) // n_group), scores, 0.0)
    idx = np.argsort(-tmp, kind="stable")[:k]
    return idx, scores[idx] * scaling


def deepseek_v3(logits, bias, k=8, n_group=8, topk_group=4, scaling=2.5):
    scores = ref.sigmoid(logits)
    for_choice = scores + bias
    group_scores = np.sort(for_choice.reshape(n_group, -1), axis=-1)[:, -2:].sum(-1)
    group_idx = np.argsort(-group_scores, kind="stable")[:topk_group]
    mask = np.zeros(n_group, bool)
    mask[group_idx] = True
    tmp = np.where(np.repeat(mask, len(scores) // n_group), for_choice, 0.0)
    idx = np.argsort(-tmp, kind="stable")[:k]
    w = scores[idx]
    return idx, w / (w.sum() + 1e-20) * scaling


@pytest.mark.parametrize("model", ["mixtral", "deepseek_v2", "deepseek_v3"])
def test_released_model_semantics(model):
    rng = np.random.default_rng(4)
    num_experts = 64
    logits = rng.normal(size=(48, num_experts)).astype(np.float32)
    bias = None
    cfg = base.get_config().model.moe
    cfg.num_experts = num_experts
    if model == "mixtral":
        cfg.top_k = 2
        cfg.router.update(score="softmax", norm_topk_prob=True)
        expected = [mixtral(row) for row in logits]
    elif model == "deepseek_v2":
        cfg.top_k = 6
        cfg.router.update(score="softmax", num_groups=8, topk_groups=3, group_score="max", group_mask_fill=0.0,
                          routed_scaling_factor=16.0)
        expected = [deepseek_v2(row) for row in logits]
    else:
        cfg.top_k = 8
        bias = (rng.normal(size=num_experts) * 0.1).astype(np.float32)
        cfg.router.update(score="sigmoid", num_groups=8, topk_groups=4, group_score="top2_sum",
                          group_mask_fill=0.0, norm_topk_prob=True, routed_scaling_factor=2.5)
        expected = [deepseek_v3(row, bias) for row in logits]
    routing.validate(cfg)
    got = routing.route(jnp.asarray(logits), cfg, bias=None if bias is None else jnp.asarray(bias))
    for t, (idx, w) in enumerate(expected):
        np.testing.assert_array_equal(np.asarray(got.experts[t]), idx)
        np.testing.assert_allclose(np.asarray(got.weights[t]), w, rtol=1e-5)


def test_router_runs_in_float32():
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(8, E)), jnp.bfloat16)
    got = routing.route(logits, moe_cfg())
    assert got.weights.dtype == got.probs.dtype == got.logits.dtype == jnp.float32


def test_jitter_is_multiplicative_and_bounded():
    x = jnp.ones((64, 32))
    noisy = routing.jitter(x, 0.1, jax.random.key(0))
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
    from moejax import moe
    cfg = moe_cfg()
    for key, value in change.items():
        (cfg if key == "top_k" else cfg.router)[key] = value
    value = change[field.rsplit(".", 1)[1]]
    with pytest.raises(checks.ConfigError) as err:
        moe.validate(cfg)
    assert field in str(err.value) and repr(value) in str(err.value)
