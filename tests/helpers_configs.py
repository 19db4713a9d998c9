"""Small config builders shared by the test modules. The numpy references live in tests/reference.py; the tiny
training config is the config file tests/helpers_train.py (``--config=tests/helpers_train.py``)."""
import importlib.util
import pathlib
from typing import Any

import ml_collections
from moejax.configs import base

from moejax.moe import layer
from tests import helpers_train

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# The config files (base.py's sections, base_*.py, are parts of base.py, not configs).
CONFIG_NAMES = sorted(path.stem for path in CONFIGS.glob("*.py")
                      if path.name != "__init__.py" and not path.name.startswith("base_"))

# Router knobs of released models (model.moe.router fields), for the MoE-layer tests.
ROUTERS = {
    "mixtral": dict(score="softmax", norm_topk_prob=True),
    "deepseek_v2": dict(score="softmax", num_groups=4, topk_groups=2, group_score="max", routed_scaling_factor=16.0),
    "deepseek_v3": dict(score="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum", norm_topk_prob=True,
                        routed_scaling_factor=2.5),
    "megatron": dict(score="softmax", softmax_before_topk=False),
    "switch": dict(score="softmax"),
}


def moe(router: str | dict | None = None, **fields) -> ml_collections.ConfigDict:
    """A validated ``model.moe`` section: 8 experts, top-2, expert width 8, dropless; the router knobs of
    ``router`` (a name in ROUTERS or a dict of router fields), then ``fields``."""
    cfg = base.moe_config()
    cfg.update(num_experts=8, top_k=2, expert_ffn=8, dispatch="dropless")
    cfg.router.update(ROUTERS[router] if isinstance(router, str) else router or {})
    cfg.update(fields)
    layer.validate(cfg)
    return cfg


def module_of(name: str):
    """configs/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str, preset: str | None = None) -> ml_collections.ConfigDict:
    """configs/<name>.py's get_config(preset)."""
    return module_of(name).get_config(preset)


def override(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """config with its dotted fields set ({'train.steps': 5, ...}), like --config.<field>=<value>."""
    for field, value in overrides.items():
        *path, name = field.split(".")
        section = config
        for part in path:
            section = section[part]
        section[name] = value
    return config


def tiny(data_dir: str | pathlib.Path | None = None, overrides: dict[str, Any] | None = None
         ) -> ml_collections.ConfigDict:
    """tests/helpers_train.py's tiny config (2 MoE layers of 8 experts, 40 steps), reading the corpus in data_dir,
    with overrides."""
    config = helpers_train.get_config()
    if data_dir is not None:
        config.data.dir = str(data_dir)
    return override(config, overrides or {})


def small_model(config: ml_collections.ConfigDict, **model_fields) -> ml_collections.ConfigDict:
    """config (a whole config) at width 32 (2 heads, dense FFN 64) with ``model`` fields changed."""
    config.model.update(d_model=32, num_heads=2, ffn_dim=64)
    config.model.update(model_fields)
    return config
