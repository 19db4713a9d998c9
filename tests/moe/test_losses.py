"""Balance losses, z-loss and the bias update against the papers' formulas, computed by naive loops; the
objective's weighting of the unweighted losses the layers record."""
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import losses, routers, stats
from moejax.training import objectives
from tests import helpers_configs
from tests import reference as ref


def uniform_routing(batch, seq, num_experts, k):
    """Every expert gets exactly k*T/E slots in every sequence, and all scores are equal."""
    tokens = np.arange(batch * seq)
    experts = np.stack([(tokens * k + j) % num_experts for j in range(k)], axis=1)
    logits = np.zeros((batch * seq, num_experts), np.float32)
    probs = np.full((batch * seq, num_experts), 1.0 / num_experts, np.float32)
    return routers.Routing(weights=jnp.ones(experts.shape) / k, experts=jnp.asarray(experts, jnp.int32),
                           probs=jnp.asarray(probs), logits=jnp.asarray(logits))


@pytest.mark.parametrize("kind,scope", [("switch", "batch"), ("switch", "sequence"),
                                        ("deepseek", "batch"), ("deepseek", "sequence")])
@pytest.mark.parametrize("num_experts,k", [(8, 1), (8, 2), (64, 6)])
def test_balance_losses_are_one_when_uniform(kind, scope, num_experts, k):
    """Unweighted: both levels are 1 under uniform routing; the device level only for 'deepseek' with a device
    coefficient (0 otherwise)."""
    cfg = helpers_configs.moe(num_experts=num_experts, top_k=k, balance_loss=kind, balance_scope=scope,
                              balance_coef=0.013)
    route = uniform_routing(4, 64, num_experts, k)
    expert_level, device_level = losses.balance_losses(route, cfg, batch=4)
    assert float(expert_level) == pytest.approx(1.0, rel=1e-6) and float(device_level) == 0.0
    cfg.update(device_balance_coef=0.05, device_groups=4)
    expert_level, device_level = losses.balance_losses(route, cfg, batch=4)
    assert float(expert_level) == pytest.approx(1.0, rel=1e-6)
    assert float(device_level) == pytest.approx(1.0 if kind == "deepseek" else 0.0, rel=1e-6, abs=1e-12)
    cfg.balance_loss = "none"
    assert [float(v) for v in losses.balance_losses(route, cfg, batch=4)] == [0.0, 0.0]


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_balance_losses_match_naive_formulas(scope):
    rng = np.random.default_rng(0)
    batch, seq, num_experts, k, devices = 3, 20, 8, 2, 4
    logits = rng.normal(size=(batch * seq, num_experts)).astype(np.float32)
    probs = ref.sigmoid(logits)  # unnormalised scores: P_i uses s / sum(s) (DeepSeek-V3's convention)
    experts = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(batch * seq)])
    route = routers.Routing(weights=jnp.ones(experts.shape), experts=jnp.asarray(experts, jnp.int32),
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
    cfg = helpers_configs.moe(num_experts=num_experts, top_k=k, balance_scope=scope, balance_loss="switch")
    got = losses.balance_losses(route, cfg, batch)
    assert float(got[0]) == pytest.approx(np.mean(switch), rel=1e-5) and float(got[1]) == 0.0
    cfg.update(balance_loss="deepseek", device_balance_coef=0.3, device_groups=devices)
    got = losses.balance_losses(route, cfg, batch)
    assert float(got[0]) == pytest.approx(np.mean(expert_level), rel=1e-5)
    assert float(got[1]) == pytest.approx(np.mean(device_level), rel=1e-5)


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


def test_bias_update_of_stacked_layers_balances_each_layer_by_its_own_load():
    load = np.array([[10, 2, 6, 6, 1], [3, 3, 3, 3, 3], [0, 0, 0, 0, 15]], np.float32)
    bias = np.random.default_rng(3).normal(size=load.shape).astype(np.float32)
    got = np.asarray(losses.update_bias(jnp.asarray(bias), jnp.asarray(load), 0.01))
    for layer in range(3):
        mean = sum(load[layer]) / 5
        for i in range(5):
            assert got[layer, i] == pytest.approx(bias[layer, i] + 0.01 * np.sign(mean - load[layer, i]), abs=1e-7)


def record(layer, balance, device, z, entropy, passes=1):
    """A RoutedStats record of one MoE layer with these unweighted losses (the loads play no part here)."""
    f32 = jnp.float32
    one = stats.RoutedStats(layer=jnp.int32(layer), tokens_per_expert=jnp.ones(4), dropped=f32(0), overflow=f32(0),
                            routed_slots=f32(8), num_tokens=f32(4), router_entropy=f32(entropy),
                            balance_loss=f32(balance), device_balance_loss=f32(device), z_loss=f32(z))
    return (one,) * passes


@pytest.mark.parametrize("kind", ["switch", "deepseek", "none"])
def test_router_losses_weight_the_recorded_losses(kind):
    """objective = sum over layers and passes of balance_coef * balance (+ device_balance_coef * device for
    'deepseek'; nothing for 'none') + z_loss_coef * z + entropy_loss_coef * entropy."""
    cfg = helpers_configs.moe(balance_loss=kind, balance_coef=0.1, device_balance_coef=0.3, device_groups=2,
                              z_loss_coef=1e-3, entropy_loss_coef=0.5)
    moe_aux = {"layers_0": {"ffn": {stats.STATS: record(0, 1.5, 2.0, 7.0, 1.25)}},
               "layers_2": {"ffn": {stats.STATS: record(2, 1.1, 1.2, 3.0, 0.75, passes=2)}}}
    balance = {"switch": 0.1 * (1.5 + 2 * 1.1), "deepseek": 0.1 * (1.5 + 2 * 1.1) + 0.3 * (2.0 + 2 * 1.2),
               "none": 0.0}[kind]
    expected = balance + 1e-3 * (7.0 + 2 * 3.0) + 0.5 * (1.25 + 2 * 0.75)
    assert float(objectives.router_losses(moe_aux, cfg)) == pytest.approx(expected, rel=1e-6)
    assert float(objectives.router_losses({}, cfg)) == 0.0
