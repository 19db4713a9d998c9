"""Balance losses, z-loss and the bias update against the papers' formulas, computed by naive loops."""
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import losses, moe, routing
from tests import reference as ref


def uniform_routing(batch, seq, num_experts, k):
    """Every expert gets exactly k*T/E slots in every sequence, and all scores are equal."""
    tokens = np.arange(batch * seq)
    experts = np.stack([(tokens * k + j) % num_experts for j in range(k)], axis=1)
    logits = np.zeros((batch * seq, num_experts), np.float32)
    probs = np.full((batch * seq, num_experts), 1.0 / num_experts, np.float32)
    return routing.Routing(weights=jnp.ones(experts.shape) / k, experts=jnp.asarray(experts, jnp.int32),
                           probs=jnp.asarray(probs), logits=jnp.asarray(logits))


@pytest.mark.parametrize("kind,scope", [("switch", "batch"), ("switch", "sequence"),
                                        ("deepseek", "batch"), ("deepseek", "sequence")])
@pytest.mark.parametrize("num_experts,k", [(8, 1), (8, 2), (64, 6)])
def test_balance_loss_equals_coefficient_when_uniform(kind, scope, num_experts, k):
    cfg = base.get_config().model.moe
    cfg.update(num_experts=num_experts, top_k=k, balance_loss=kind, balance_scope=scope, balance_coef=0.013)
    route = uniform_routing(4, 64, num_experts, k)
    assert float(moe.balance_loss(route, cfg, batch=4)) == pytest.approx(0.013, rel=1e-6)
    cfg.update(balance_coef=0.0, device_balance_coef=0.05, device_groups=4)
    expected = 0.05 if kind == "deepseek" else 0.0
    assert float(moe.balance_loss(route, cfg, batch=4)) == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_balance_losses_match_naive_formulas(scope):
    rng = np.random.default_rng(0)
    batch, seq, num_experts, k, devices = 3, 20, 8, 2, 4
    logits = rng.normal(size=(batch * seq, num_experts)).astype(np.float32)
    probs = ref.sigmoid(logits)  # unnormalised scores: P_i uses s / sum(s) (DeepSeek-V3's convention)
    experts = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(batch * seq)])
    route = routing.Routing(weights=jnp.ones(experts.shape), experts=jnp.asarray(experts, jnp.int32),
                            probs=jnp.asarray(probs, jnp.float32), logits=jnp.asarray(logits))
    groups = [range(batch * seq)] if scope == "batch" else [range(b * seq, (b + 1) * seq) for b in range(batch)]
    switch, expert_level, device_level = [], [], []
    for g in groups:
        f, p = ref.balance_terms([experts[t] for t in g], [probs[t] for t in g], num_experts)
        switch.append(num_experts * sum(f[i] * p[i] for i in range(num_experts)))  # Switch: N sum f_i P_i
        f_prime = num_experts * f  # DeepSeekMoE: f'_i = N'/(K'T) * count_i
        expert_level.append(sum(f_prime[i] * p[i] for i in range(num_experts)))
        size = num_experts // devices
        device_level.append(sum(np.mean(f_prime[d * size:(d + 1) * size]) * np.sum(p[d * size:(d + 1) * size])
                                for d in range(devices)))
    cfg = base.get_config().model.moe
    cfg.update(num_experts=num_experts, top_k=k, balance_scope=scope, balance_coef=0.1)
    cfg.balance_loss = "switch"
    assert float(moe.balance_loss(route, cfg, batch)) == pytest.approx(0.1 * np.mean(switch), rel=1e-5)
    cfg.update(balance_loss="deepseek", device_balance_coef=0.3, device_groups=devices)
    expected = 0.1 * np.mean(expert_level) + 0.3 * np.mean(device_level)
    assert float(moe.balance_loss(route, cfg, batch)) == pytest.approx(expected, rel=1e-5)


def test_collapsed_routing_is_penalised():
    num_experts, k = 8, 2
    route = uniform_routing(2, 16, num_experts, k)
    collapsed = route.replace(experts=jnp.tile(jnp.array([[0, 1]], jnp.int32), (32, 1)),
                              probs=jnp.tile(jnp.array([[0.5, 0.5] + [0.0] * 6]), (32, 1)))
    uniform = losses.expert_balance_loss(losses.by_scope(route.probs, 2, "batch"),
                                         losses.by_scope(route.experts, 2, "batch"))
    worst = losses.expert_balance_loss(losses.by_scope(collapsed.probs, 2, "batch"),
                                       losses.by_scope(collapsed.experts, 2, "batch"))
    assert float(uniform) == pytest.approx(1.0) and float(worst) == pytest.approx(num_experts / k)


def test_z_loss_matches_formula():
    logits = np.random.default_rng(1).normal(size=(10, 6)) * 3
    expected = np.mean([np.log(np.sum(np.exp(row))) ** 2 for row in logits])
    assert float(losses.z_loss(jnp.asarray(logits, jnp.float32))) == pytest.approx(expected, rel=1e-5)


def test_router_entropy():
    probs = np.random.default_rng(2).dirichlet(np.ones(5), size=7)
    expected = np.mean([-sum(p * np.log(p)) for p in probs])
    assert float(losses.router_entropy(jnp.asarray(probs, jnp.float32))) == pytest.approx(expected, rel=1e-5)


def test_bias_update_rule():
    load = np.array([10, 2, 6, 6, 1], np.float32)  # mean 5
    bias = np.array([0.0, 0.1, -0.2, 0.3, 0.0], np.float32)
    got = losses.update_bias(jnp.asarray(bias), jnp.asarray(load), 1e-3)
    expected = [bias[i] + 1e-3 * np.sign(load.mean() - load[i]) for i in range(5)]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
