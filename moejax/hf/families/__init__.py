"""The released families, one module each: its config mapping both ways (``from_hf``, ``to_hf``), its tensor rule
table and the config.json fields it ignores, registered in moejax.hf.registry when the module is imported.

MODULES is the order of registration: the order ``SUPPORTED`` lists the families in (config_to_hf tries them in
reverse). A new family is a module here, its name in MODULES and its golden cases in tests/hf/golden/make_hf_goldens.py
or a sibling ``cases_*.py`` module there.
"""
import importlib

from moejax.hf.registry import FAMILIES, config_from_hf, config_to_hf, family

__all__ = ["FAMILIES", "MODULES", "SUPPORTED", "config_from_hf", "config_to_hf", "family"]

MODULES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek", "gpt_oss", "phimoe", "glm4_moe", "dots1",
           "ernie4_5_moe", "minimax_m2", "flex_olmo", "qwen3_next", "llama4", "longcat_flash",
           # the dense families, the most specific first: config_to_hf tries llama first for a dense moejax model
           "phi3", "olmo2", "qwen3", "qwen2", "mistral", "llama")
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
SUPPORTED = tuple(FAMILIES)
