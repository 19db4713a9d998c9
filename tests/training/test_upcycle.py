"""Sparse upcycling: the upcycled MoE computes the dense model's function when its routing reproduces the dense FFN
(the dense model itself is the reference), and the parameter mapping matches the slicing formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checks, model, upcycle
from moejax.training import config as config_lib
from moejax.training.objectives import cross_entropy
from tests import helpers_configs


def configs(granularity=1, num_experts=4, top_k=2, num_shared=0, router_init="normal"):
    """(dense config, MoE config) of a small model whose dense FFN is 64 wide."""
    config = helpers_configs.small_model(helpers_configs.tiny(), num_layers=2, moe_every=1)
    config.model.moe.update(num_experts=num_experts, top_k=top_k, expert_ffn=64 // granularity,
                            num_shared=num_shared, dispatch="dropless", balance_loss="none")
    config.upcycle.update(enabled=True, granularity=granularity, router_init=router_init, dense_steps=5)
    return upcycle.dense_config(config), config


def losses(dense_config, config, seed=0):
    """Cross-entropy of the dense model (random weights) and of the MoE upcycled from it, on one batch."""
    batch = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (4, 17)), jnp.int32)
    dense_module = model.Transformer(dense_config.model)
    dense_params = dense_module.init(jax.random.key(seed), batch[:, :-1])["params"]
    moe_module = model.Transformer(config.model)
    fresh = moe_module.init(jax.random.key(seed + 1), batch[:, :-1])
    params = jax.tree.map(jnp.asarray, upcycle.upcycle_params(dense_params, fresh["params"], config))
    dense_loss = cross_entropy(dense_module.apply({"params": dense_params}, batch[:, :-1]), batch[:, 1:])
    moe_loss = cross_entropy(
        moe_module.apply({"params": params, "moe_state": fresh["moe_state"]}, batch[:, :-1]), batch[:, 1:])
    return float(dense_loss), float(moe_loss), dense_params, params


def test_copies_with_renormalised_top2_give_the_dense_loss():
    dense_config, config = configs()
    config.model.moe.router.norm_topk_prob = True
    config_lib.validate(config)
    dense_loss, moe_loss, _, _ = losses(dense_config, config)
    np.testing.assert_allclose(moe_loss, dense_loss, rtol=1e-6)


def test_fine_grained_slices_of_one_copy_give_the_dense_loss():
    """Zero routers: every token picks slices 0..m-1 (one whole copy) with weight 1/m, scaled by m."""
    dense_config, config = configs(granularity=4, num_experts=8, top_k=4, router_init="zeros")
    config.model.moe.router.update(norm_topk_prob=True, routed_scaling_factor=4.0)
    dense_loss, moe_loss, _, _ = losses(dense_config, config)
    np.testing.assert_allclose(moe_loss, dense_loss, rtol=1e-6)
    config.upcycle.router_init = "normal"  # control: random routing mixes slices of the copies unevenly
    config.model.moe.router.update(norm_topk_prob=False, routed_scaling_factor=1.0)
    _, moe_loss, _, _ = losses(dense_config, config)
    assert abs(moe_loss - dense_loss) > 1e-4  # 20x the tolerance above


def test_parameter_mapping_follows_the_slicing_formula():
    dense_config, config = configs(granularity=4, num_experts=8, top_k=2, num_shared=4)
    _, _, dense, params = losses(dense_config, config)
    for i in range(2):
        d, m = dense[f"layers_{i}"]["ffn"], params[f"layers_{i}"]["ffn"]
        for name in ("wi_0", "wi_1", "wo"):
            np.testing.assert_array_equal(m["shared"][name], d[name])  # the shared expert is the dense FFN
            for e in range(8):
                j = e % 4
                expected = d[name][j * 16:(j + 1) * 16] if name == "wo" else d[name][:, j * 16:(j + 1) * 16]
                np.testing.assert_array_equal(m["experts"][name][e], expected)
        np.testing.assert_array_equal(params[f"layers_{i}"]["attn"]["q"]["kernel"],
                                      dense[f"layers_{i}"]["attn"]["q"]["kernel"])
    np.testing.assert_array_equal(params["embed"]["embedding"], dense["embed"]["embedding"])


@pytest.mark.parametrize("field,value,message", [
    ("model.moe.expert_ffn", 24, "model.moe.expert_ffn=24.*ffn_dim / upcycle.granularity = 64 / 2"),
    ("model.moe.num_experts", 5, "model.moe.num_experts=5.*multiple of upcycle.granularity=2"),
    ("model.moe.num_shared", 1, "model.moe.num_shared=1.*must equal model.ffn_dim=64"),
    ("upcycle.router_init", "orthogonal", "upcycle.router_init='orthogonal'.*'normal', 'zeros'"),
])
def test_bad_upcycling_configs_name_the_field(field, value, message):
    _, config = configs(granularity=2, num_experts=4)
    section, _, name = field.rpartition(".")
    node = config
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(checks.ConfigError, match=message):
        config_lib.validate(config)


def test_dense_stage_config_and_workdir(tmp_path):
    """The dense run an upcycling run starts from: every layer dense, upcycle.dense_steps steps (warm-up capped),
    in <workdir>/dense unless upcycle.dense_checkpoint names one; the MoE config itself is left as it was."""
    _, config = configs(granularity=2, num_experts=4)
    config.train.warmup_steps = 10
    dense = upcycle.dense_config(config)
    assert dense.model.moe_every == 0 and not dense.upcycle.enabled
    assert dense.train.steps == 5 and dense.train.warmup_steps == 5
    assert config.model.moe_every == 1 and config.upcycle.enabled and config.train.steps == 40
    assert upcycle.dense_workdir(config, tmp_path) == tmp_path / "dense"
    config.upcycle.dense_checkpoint = str(tmp_path / "elsewhere")
    assert upcycle.dense_workdir(config, tmp_path) == tmp_path / "elsewhere"
