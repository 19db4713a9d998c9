"""Every config file loads, validates, and has the shapes its docstring promises."""
import jax
import jax.numpy as jnp
import pytest
from moejax.configs import base

from moejax import checks, model
from tests.helpers_configs import CONFIG_NAMES, CONFIGS, load, module_of


@pytest.mark.parametrize("name,preset", [
    ("deepseekmoe", None), ("deepseekmoe", "small"), ("deepseekmoe", "2b"), ("deepseekmoe", "16b"), ("dense", None),
    ("switch", None), ("gshard", None), ("base", None)])
def test_configs_validate(name, preset):
    model.validate(load(name, preset).model)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'huge'.*'tiny', 'small', '2b', '16b'"):
        load("deepseekmoe", "huge")


def test_every_config_file_is_listed():
    released = {"mixtral", "qwen3_moe", "olmoe", "deepseek_v2_lite", "deepseek_v3", "gpt_oss"}
    assert len(CONFIG_NAMES) >= 21 and {"base", "deepseekmoe", "upcycling", "gshard"} | released <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_presets_validate(name):
    """get_config refuses an unknown preset, naming the file, the preset and the allowed ones (or that it takes
    none); every name in PRESETS builds, and so does the default (None or '')."""
    module = module_of(name)
    presets = module.PRESETS
    assert isinstance(presets, tuple) and all(isinstance(p, str) and p for p in presets)
    with pytest.raises(ValueError) as refused:
        module.get_config("nope")
    message = str(refused.value)
    assert f"configs/{name}.py" in message and "'nope'" in message
    if presets:
        assert "allowed presets are " + ", ".join(repr(p) for p in presets) in message
    else:
        assert f"configs/{name}.py takes no preset" in message
    default = module.get_config(None)
    assert default.to_json(sort_keys=True) == module.get_config("").to_json(sort_keys=True)
    built = {p: module.get_config(p).to_json(sort_keys=True) for p in presets}
    if presets:
        assert default.to_json(sort_keys=True) in built.values()  # the default is one of the presets
        assert len(set(built.values())) == len(presets)  # and no two presets are the same config


@pytest.mark.filterwarnings("ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")
def test_presets_through_config_flags():
    """moejax.main's --config flag passes the text after ':' to get_config; a preset-less config refuses one."""
    from ml_collections.config_flags import config_flags

    parser = config_flags.ConfigFileFlagParser("config")
    assert parser.parse(str(CONFIGS / "upcycling.py") + ":fine").model.moe.num_experts == 32
    with pytest.raises(ValueError, match=r"configs/gshard\.py takes no preset \(got 'tiny'\)"):
        parser.parse(str(CONFIGS / "gshard.py") + ":tiny")


def count(cfg):
    shapes = jax.eval_shape(lambda: model.Transformer(cfg.model).init(jax.random.key(0), jnp.zeros((1, 8), int)))
    return model.param_counts(shapes["params"], cfg.model)


def test_tiny_sizes_match_the_paper_ratios():
    """DeepSeekMoE-small (docs/methods.md#tiny-and-small-shapes): < 50M total; activated FFN = 8 x 176 = the dense
    config's 1408-wide FFN. The default tiny preset has the same ratios at half the width."""
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


def test_field_roles_name_real_fields_and_nest():
    """FIELD_ROLES names fields the default config has; evaluation overrides are compute fields of the model (so
    a fine-tune keeps them and an evaluation can change them without touching weights); resume fields are not."""
    config = base.get_config()
    for path in base.FIELD_ROLES:
        node = config
        for part in path.split("."):
            assert part in node, f"FIELD_ROLES names {path}, which configs/base.py does not define"
            node = node[part]
    compute, evaluation, resume = (set(base.fields_with(r)) for r in ("compute", "eval", "resume"))
    assert evaluation <= compute and not compute & resume
    assert all(path.startswith("model.") for path in compute)
    with pytest.raises(ValueError, match="not one of resume, compute, eval"):
        base.fields_with("resumable")
