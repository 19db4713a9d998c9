"""Every config file loads, validates, and has the shapes its docstring promises."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from moejax import checks, model

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def load(name: str, preset: str | None = None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


@pytest.mark.parametrize("name,preset", [
    ("deepseekmoe", None), ("deepseekmoe", "small"), ("deepseekmoe", "2b"), ("deepseekmoe", "16b"), ("dense", None),
    ("switch", None), ("gshard", None), ("base", None)])
def test_configs_validate(name, preset):
    model.validate(load(name, preset).model)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'huge'.*'tiny', 'small', '2b', '16b'"):
        load("deepseekmoe", "huge")


def count(cfg):
    shapes = jax.eval_shape(lambda: model.Transformer(cfg.model).init(jax.random.key(0), jnp.zeros((1, 8), int)))
    return model.param_counts(shapes["params"], cfg.model)


def test_tiny_sizes_match_the_paper_ratios():
    """DeepSeekMoE-small (PAPERS.md's tiny shapes): < 50M total; activated FFN = 8 x 176 = the dense config's
    1408-wide FFN. The default tiny preset has the same ratios at half the width."""
    cfg = load("deepseekmoe", "small")
    tiny, dense = count(cfg), count(load("dense"))
    routers = cfg.model.num_layers * cfg.model.d_model * cfg.model.moe.num_experts
    assert tiny["total"] < 50e6
    assert tiny["activated"] - routers == dense["total"]


def test_2b_expert_parameters():
    """Paper: expert parameters of the 2B model equal 16 standard 3413-wide FFNs in each of the 9 layers."""
    cfg = load("deepseekmoe", "2b")
    per_layer = (cfg.model.moe.num_experts + cfg.model.moe.num_shared) * 3 * cfg.model.d_model * \
        cfg.model.moe.expert_ffn
    assert per_layer == pytest.approx(16 * 3 * 1280 * 3413, rel=1e-3)
    with pytest.raises(checks.ConfigError):
        cfg.model.moe.top_k = 64
        model.validate(cfg.model)
