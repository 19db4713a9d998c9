"""LoRA adapters in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``, whose keys are PEFT's
(``base_model.model.<module>.lora_A.weight`` [r, in], ``....lora_B.weight`` [out, r]) for the modules of the released
family the model saves as (moejax/hf/families/: the module of a weight is its checkpoint tensor's name without
``.weight``), so that ``peft.PeftModel.from_pretrained(<the model moejax.hf.save wrote>, <dir>)`` runs the adapted
model.

    moejax.adapters.save_peft(config, variables, out_dir)            # adapter_config.json, adapter_model.safetensors
    config, adapters = moejax.adapters.load_peft(config, out_dir)     # moejax's layout, same values

What PEFT can express: a LoRA on an ``nn.Linear`` module. Routed experts only where the family keeps one Linear per
expert (``block_sparse_moe.experts.{j}.w1`` in Mixtral, ``mlp.experts.{j}.gate_proj`` in the Qwen and DeepSeek
families and OLMoE, as transformers 4 builds them): per-expert adapters are written per expert, a shared adapter as
the same A and B in every expert. Refused by name: routed experts stored stacked (GPT-OSS's packed
``experts.gate_up_proj``), routers that are a bare weight rather than a Linear module (DeepSeek's ``mlp.gate``,
GPT-OSS's ``mlp.router``), scanned layers (save them unstacked), models with an expert map or placement.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from moejax import hf, moe
from moejax.adapters import lora
from moejax.hf import io, tensors
from moejax.hf.config import HFConfigError
from moejax.hf.families import config_to_hf, family

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# modules whose weight transformers keeps as a bare parameter, not an nn.Linear that PEFT could wrap
NOT_LINEAR: dict[str, tuple[str, ...]] = {"deepseek_v2": ("mlp.gate",), "deepseek_v3": ("mlp.gate",),
                                          "gpt_oss": ("mlp.router",)}
INIT_NAMES = {"kaiming_uniform": True, "gaussian": "gaussian"}  # model.lora.init -> PEFT's init_lora_weights


class AdapterError(ValueError):
    """Adapters PEFT's format cannot express, or an adapter directory that does not fit the model."""


def _model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.model if "model" in config else config


def _family(m: ml_collections.ConfigDict, model_type: str | None):
    from moejax.moe import expert_map, placement

    if expert_map.has_map(m.moe) or placement.has_placement(m.moe):
        raise AdapterError("the model has an expert map or an expert placement (model.moe.expert_map, "
                           "expert_placement): merge the adapters (moejax.adapters.merge) and save the model instead")
    try:
        return family(config_to_hf(lora.without_adapters(m), model_type)["model_type"])
    except HFConfigError as e:
        raise AdapterError(f"the adapters' base model cannot be saved as a released family: {e}") from e


def _module(keys: tuple[str, ...], fam: Any, expert: int | None = None) -> tuple[str, Any]:
    """(the transformers module name, the rule) of the base weight at params path keys."""
    found = tensors.rule_for(keys, fam)
    where = "/".join(keys)
    if found is None:
        raise AdapterError(f"moejax weight {where} has no tensor in a {fam.model_type} checkpoint")
    rule, i = found
    if rule.kind not in ("linear", "linear2") or not rule.hf.endswith(".weight"):
        raise AdapterError(f"adapters on {where} cannot be written for PEFT: its {fam.model_type} tensor "
                           f"{rule.hf.format(i=i, j='{j}')} is not one nn.Linear weight (PEFT adapts Linear modules)")
    if keys[-2] == moe.EXPERTS and not rule.per_expert:
        raise AdapterError(f"adapters on the routed experts {where} cannot be written for PEFT: {fam.model_type} "
                           f"stores its experts stacked ({rule.hf.format(i=i)}), with no Linear module per expert")
    name = rule.hf.format(i=i, j=expert)[: -len(".weight")]
    if name.endswith(NOT_LINEAR.get(fam.model_type, ())):
        raise AdapterError(f"adapters on {where} cannot be written for PEFT: transformers' {fam.model_type} keeps "
                           f"{name}.weight as a bare parameter, not an nn.Linear module")
    return name, rule


def peft_config(m: ml_collections.ConfigDict, modules: list[str], base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json of the model section m's adapters on the transformers modules ``modules``."""
    spec = lora.spec(m)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
            "inference_mode": True, "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "use_rslora": spec.rslora, "init_lora_weights": INIT_NAMES[spec.init], "target_modules": sorted(modules),
            "exclude_modules": None, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "use_dora": False, "lora_bias": False}


def _to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A.weight [r, in], lora_B.weight [out, r]) of moejax's A [in..., r] and B [r, out...]."""
    rank = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, rank).T), np.ascontiguousarray(b.reshape(rank, -1).T)


def _adapters(params: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[Any, Any, bool]]:
    """{path of the adapted weight: (A, B, shared across experts)} of a params tree."""
    flat = tensors.flatten(lora.split(params)[1])
    out = {}
    for keys, a in flat.items():
        name, shared, which = lora.base_name(keys[-1])
        if which == "a":
            out[(*keys[:-1], name)] = (a, flat[(*keys[:-1], lora.adapter_names(name, shared)[1])], shared)
    return out


def save(config: ml_collections.ConfigDict, variables: Mapping[str, Any], out_dir: str | pathlib.Path, *,
         model_type: str | None = None, base_model: str | None = None) -> pathlib.Path:
    """Writes the adapters of (config, variables) to out_dir as adapter_config.json and adapter_model.safetensors
    (each tensor in its adapter's dtype). model_type: the family (default: the one moejax.hf.save picks for the
    base model); base_model: adapter_config.json's base_model_name_or_path. Raises AdapterError naming what PEFT
    cannot express, before anything is written."""
    m = _model(config)
    if lora.spec(m) is None:
        raise AdapterError("the model has no adapters (model.lora.targets is empty)")
    if lora.spec(m).mixture is not None:
        raise AdapterError("model.lora.mixture: PEFT's LoRA format has no LoRA experts or router")
    fam = _family(m, model_type)
    entries: list[io.Entry] = []
    modules = []
    for keys, (a, b, shared) in _adapters(variables["params"]).items():
        a, b = np.asarray(a), np.asarray(b)
        if keys[-2] == moe.EXPERTS:
            weight = variables["params"]
            for key in keys:
                weight = weight[key]
            for j in range(np.shape(weight)[0]):
                name, _ = _module(keys, fam, j)
                pair = _to_peft(a, b) if shared else _to_peft(a[j], b[j])
                modules.append(name)
                entries += _entries(name, pair)
            continue
        name, _ = _module(keys, fam)
        modules.append(name)
        entries += _entries(name, _to_peft(a, b))
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.write_file(out / WEIGHTS_FILE, entries, {"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(peft_config(m, modules, base_model), indent=2) + "\n")
    return out


def _entries(module: str, pair: tuple[np.ndarray, np.ndarray]) -> list[io.Entry]:
    return [(f"{PREFIX}{module}.lora_{which}.weight", array.shape, array.dtype, lambda array=array: array)
            for which, array in zip("AB", pair, strict=True)]


# ----------------------------------------------------------------------------------------------- loading


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
    file = directory / CONFIG_FILE
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {file}: {e}") from e
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type={raw.get('peft_type')!r}; moejax reads LoRA adapters ('LORA')")
    for field, off in (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False), ("rank_pattern", {}),
                       ("alpha_pattern", {}), ("modules_to_save", None), ("layers_to_transform", None)):
        if raw.get(field) not in (None, off):
            raise AdapterError(f"{file}: {field}={raw[field]!r} has no moejax equivalent (allowed: {off!r})")
    init = raw.get("init_lora_weights", True)
    if init not in (True, "gaussian", False):
        raise AdapterError(f"{file}: init_lora_weights={init!r}; allowed: true, 'gaussian'")
    return raw


def _adaptable(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of the weights of the base model that adapters can adapt (traced, nothing allocated)."""
    abstract = hf.abstract_variables(lora.without_adapters(m))["params"]
    flat = tensors.flatten(abstract)
    return {tuple(path.split("/")): tuple(flat[tuple(path.split("/"))].shape)
            for path in lora.adaptable_paths(abstract, m)}


def _paths_by_module(m: ml_collections.ConfigDict, fam: Any, adaptable: Mapping[tuple[str, ...], Any]
                     ) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """{transformers module: (moejax weight path, expert or None)} for every adaptable weight of the base model."""
    out = {}
    for keys in adaptable:
        found = tensors.rule_for(keys, fam)
        if found is None or found[0].kind not in ("linear", "linear2"):
            continue
        rule, i = found
        if rule.per_expert:
            for j in range(m.moe.num_experts):
                out[rule.hf.format(i=i, j=j)[: -len(".weight")]] = (keys, j)
        elif keys[-2] != moe.EXPERTS:
            out[rule.hf.format(i=i)[: -len(".weight")]] = (keys, None)
    return out


def _targets(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Anchored rules that pick exactly the weights at paths: one per weight name, its layers as alternatives."""
    groups: dict[str, list[str]] = {}
    for keys in paths:
        rest = "/".join(keys[1:]) if re.fullmatch(r"layers_\d+", keys[0]) else None
        if rest is None:
            groups.setdefault("/".join(keys), [])
        else:
            groups.setdefault(rest, []).append(keys[0][len("layers_"):])
    rules = []
    for rest, layers in sorted(groups.items()):
        if layers:
            rules.append(f"^layers_({'|'.join(sorted(set(layers), key=int))})/{re.escape(rest)}$")
        else:
            rules.append(f"^{re.escape(rest)}$")
    return tuple(rules)


def load(config: ml_collections.ConfigDict, directory: str | pathlib.Path, *, model_type: str | None = None
         ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, adapters) of the PEFT LoRA directory for the base model of config: config (a copy) with its
    ``model.lora`` from adapter_config.json (rank, alpha, rslora, dropout, init; targets: config's own when they pick
    exactly the adapted weights, else anchored rules that do; experts 'shared' kept when every expert's adapter is
    the same), and the adapters as a params tree in moejax's layout (numpy, the file's dtypes) for
    ``moejax.adapters.lora.join``. Experts of an adapted matrix without an adapter in the file get zeros (no
    change, as in PEFT). Raises AdapterError naming a file, key or field that does not fit."""
    import copy

    directory = pathlib.Path(directory)
    raw = _read_config(directory)
    new_config = copy.deepcopy(config)
    m = _model(new_config)
    fam = _family(m, model_type)
    shapes = _adaptable(m)
    by_module = _paths_by_module(m, fam, shapes)
    weights = io.SafetensorsFile(directory / WEIGHTS_FILE) if (directory / WEIGHTS_FILE).is_file() else None
    if weights is None:
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE}")
    found: dict[tuple[str, ...], dict[int | None, dict[str, np.ndarray]]] = {}
    rank = int(raw.get("r", 8))
    for key in weights.keys():
        match = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if match is None or match.group(1) not in by_module:
            raise AdapterError(f"{directory / WEIGHTS_FILE}: tensor {key} is not a LoRA weight of a module the "
                               f"{fam.model_type} model has (expected {PREFIX}<module>.lora_A.weight / lora_B.weight)")
        keys, expert = by_module[match.group(1)]
        array = np.asarray(weights.array(key))
        shape = shapes[keys][1:] if expert is not None else shapes[keys]
        n_in = 1 if expert is not None else lora._adaptable_suffix(keys)
        d_in, d_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        expected = (rank, d_in) if match.group(2) == "A" else (d_out, rank)
        if array.shape != expected:
            raise AdapterError(f"{directory / WEIGHTS_FILE}: tensor {key} has shape {list(array.shape)}, expected "
                               f"{list(expected)} (rank r={rank} of {CONFIG_FILE}; moejax weight {'/'.join(keys)} "
                               f"{list(shapes[keys])})")
        found.setdefault(keys, {}).setdefault(expert, {})[match.group(2)] = array
    if not found:
        raise AdapterError(f"{directory / WEIGHTS_FILE} holds no LoRA weight")
    shared_ok = m.lora.experts == "shared"
    adapters: dict[tuple[str, ...], np.ndarray] = {}
    for keys, per_expert in found.items():
        n_in = 1 if keys[-2] == moe.EXPERTS else lora._adaptable_suffix(keys)
        shape = shapes[keys]
        for pair in per_expert.values():
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"{directory / WEIGHTS_FILE}: the adapter of {'/'.join(keys)} lacks its lora_"
                                   f"{({'A', 'B'} - set(pair)).pop()}.weight")
        if keys[-2] == moe.EXPERTS:
            _, d_in, d_out = shape
            a = np.zeros((shape[0], d_in, rank), next(iter(per_expert.values()))["A"].dtype)
            b = np.zeros((shape[0], rank, d_out), a.dtype)
            for j, pair in per_expert.items():
                a[j], b[j] = pair["A"].T, pair["B"].T
            same = len(per_expert) == shape[0] and all(np.array_equal(a[j], a[0]) and np.array_equal(b[j], b[0])
                                                       for j in range(shape[0]))
            shared_ok = shared_ok and same
            adapters[(*keys[:-1], keys[-1] + lora.A_SUFFIX)] = a
            adapters[(*keys[:-1], keys[-1] + lora.B_SUFFIX)] = b
            continue
        pair = per_expert[None]
        adapters[(*keys[:-1], keys[-1] + lora.A_SUFFIX)] = pair["A"].T.reshape(*shape[:n_in], rank)
        adapters[(*keys[:-1], keys[-1] + lora.B_SUFFIX)] = pair["B"].T.reshape(rank, *shape[n_in:])
    if shared_ok and any(k[-2] == moe.EXPERTS for k in found):  # one adapter for every expert
        for keys in [k for k in found if k[-2] == moe.EXPERTS]:
            for which, suffix in (("a", lora.A_SUFFIX), ("b", lora.B_SUFFIX)):
                stacked = adapters.pop((*keys[:-1], keys[-1] + suffix))
                adapters[(*keys[:-1], lora.adapter_names(keys[-1], shared=True)[which == "b"])] = stacked[0]
    else:
        m.lora.experts = "per_expert"
    m.lora.update(rank=rank, alpha=float(raw.get("lora_alpha", 8)), rslora=bool(raw.get("use_rslora", False)),
                  dropout=float(raw.get("lora_dropout", 0.0)),
                  init="gaussian" if raw.get("init_lora_weights", True) == "gaussian" else "kaiming_uniform")
    spec = lora.spec(m)
    adapted = sorted(found)
    if spec is None or [k for k in shapes if spec.picks(k)] != [k for k in shapes if k in found]:
        m.lora.targets = _targets(adapted)
    return new_config, tensors.unflatten(adapters)
