"""Released MoE checkpoints in the Hugging Face layout (config.json + safetensors), read and written without torch.

    config, variables = moejax.hf.load(path)            # also moejax.load(path) for such a directory
    logits = moejax.model.Transformer(config.model).apply(variables, tokens)
    moejax.hf.save(config, variables, out_dir)          # transformers.AutoModelForCausalLM.from_pretrained(out_dir)

Families (``SUPPORTED``): mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 (its multi-token-prediction
layers are skipped with a note), gpt_oss. The config mapping is in families.py (config_read.py and config_write.py),
one table of tensor names and layouts per family in tables.py, the safetensors reader and writer in io.py, FP8
(DeepSeek-V3) and MXFP4 (GPT-OSS) dequantisation in quant.py.

Loading streams: each parameter is read from the memory-mapped files when it is placed, straight into its sharding
on the mesh (``mesh=``, else the mesh set with ``jax.set_mesh``, else the default device), with the routed experts
split over ``mesh.expert`` (moejax.parallel.param_shardings). An expert parameter is built per shard from the
per-expert tensors of the experts that shard holds, so host memory stays near one tensor group.
"""
from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from moejax.hf import families, io, quant, tables
from moejax.hf.families import SUPPORTED, HFConfigError, config_from_hf, config_to_hf
from moejax.hf.io import CheckpointError
from moejax.hf.tables import Rule

__all__ = ["load", "save", "is_hf_dir", "read_config", "SUPPORTED", "HFConfigError", "CheckpointError"]

MAX_SHARD_BYTES = 5 * 2**30
QUANT_METHODS = ("fp8", "mxfp4")  # quantization_config.quant_method values dequantised on load
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved; transformers ignores them too


def is_hf_dir(path: str | pathlib.Path) -> bool:
    """Whether path holds a transformers config.json (with a model_type) and safetensors weights."""
    directory = pathlib.Path(path)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "model_type" in raw and (
        (directory / io.INDEX_FILE).is_file() or any(directory.glob("*.safetensors")))


def read_config(path: str | pathlib.Path, dtype: str | None = None):
    """The moejax config (configs/base.py defaults, ``model`` from config.json) of a transformers directory or
    config dict, without reading weights."""
    raw = path if isinstance(path, dict) else _read_json(pathlib.Path(path) / "config.json")
    config, _ = config_from_hf(raw)
    if dtype is not None:
        config.model.param_dtype = config.model.dtype = dtype
    return config


def _read_json(file: pathlib.Path) -> dict[str, Any]:
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return raw


# ----------------------------------------------------------------------------------------------- tensors


class Tensors:
    """A checkpoint's tensors as float arrays: FP8 weights (with ``<name>_scale_inv``) and MXFP4 ones
    (``<name>_blocks`` / ``<name>_scales``) come dequantised."""

    def __init__(self, checkpoint: io.Checkpoint, quantization: dict[str, Any] | None):
        self.ckpt = checkpoint
        self.fp8_block = tuple((quantization or {}).get("weight_block_size") or (128, 128))

    def shape(self, key: str) -> tuple[tuple[int, ...], list[str]] | None:
        """(the dequantised shape, the checkpoint keys it reads) of tensor key, or None when it is absent."""
        ckpt = self.ckpt
        if key in ckpt:
            if ckpt.dtype(key) in quant.FP8_DTYPES:
                scale = key + "_scale_inv"
                if scale not in ckpt:
                    raise CheckpointError(f"FP8 tensor {key} has no {scale} beside it")
                expected = quant.fp8_scale_shape(ckpt.shape(key), self.fp8_block)
                if ckpt.shape(scale) != expected:
                    raise CheckpointError(f"{scale} has shape {list(ckpt.shape(scale))}, expected {list(expected)} "
                                          f"({self.fp8_block[0]}x{self.fp8_block[1]} blocks of {key} "
                                          f"{list(ckpt.shape(key))})")
                return ckpt.shape(key), [key, scale]
            return ckpt.shape(key), [key]
        blocks, scales = key + "_blocks", key + "_scales"
        if blocks in ckpt and scales in ckpt:
            shape_b, shape_s = ckpt.shape(blocks), ckpt.shape(scales)
            if len(shape_b) != 4 or shape_b[:-1] != shape_s:
                raise CheckpointError(f"MXFP4 tensor {key}: {blocks} {list(shape_b)} and {scales} {list(shape_s)} "
                                      f"do not fit (expected [E, R, G, 16] and [E, R, G])")
            return quant.mxfp4_shape(shape_b), [blocks, scales]
        return None

    def read(self, key: str, rows: slice | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Tensor key (its first-axis slice ``rows``) as a float array of dtype."""
        ckpt = self.ckpt
        rows = slice(None) if rows is None else rows
        if key in ckpt:
            array = ckpt.array(key)
            if array.dtype in quant.FP8_DTYPES:
                return quant.dequantize_fp8(array[rows], ckpt.array(key + "_scale_inv")[rows] if array.ndim > 2
                                            else ckpt.array(key + "_scale_inv"), self.fp8_block, dtype)
            return array[rows].astype(dtype)
        return quant.dequantize_mxfp4(ckpt.array(key + "_blocks")[rows], ckpt.array(key + "_scales")[rows], dtype)


# ----------------------------------------------------------------------------------------------- the load plan


def _path(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, (*prefix, str(key))))
        return out
    return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for keys, value in flat.items():
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def rule_for(keys: tuple[str, ...], top: dict[str, Rule], layer: dict[str, Rule]) -> tuple[Rule, int | None] | None:
    """The rule of parameter path keys (collection excluded), and its layer index."""
    if keys[0].startswith("layers_"):
        rule = layer.get(_path(keys[1:]))
        return None if rule is None else (rule, int(keys[0][len("layers_"):]))
    rule = top.get(_path(keys))
    return None if rule is None else (rule, None)


class Source:
    """One moejax parameter read from the checkpoint: ``read(index)`` gives the slice ``index`` (a tuple of slices,
    as jax.make_array_from_callback asks for a shard) in the parameter's layout and dtype. A slice that several
    devices hold (replicas) is read once and dropped after its last device took it (``expect``)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, read: Callable[[tuple[slice, ...]], np.ndarray]):
        self.shape, self.dtype, self._read = shape, np.dtype(dtype), read
        self._cache: dict[Any, np.ndarray] = {}
        self._remaining: dict[Any, int] = {}

    @staticmethod
    def _key(index: tuple[slice, ...]) -> Any:
        return tuple((s.start, s.stop, s.step) for s in index)

    def expect(self, indices: list[tuple[slice, ...]]) -> None:
        """The shards (one index per device) about to be read."""
        self._remaining = {}
        for index in indices:
            key = self._key(index)
            self._remaining[key] = self._remaining.get(key, 0) + 1

    def done(self) -> None:
        """Drops what the placed parameter kept on the host."""
        self._cache.clear()
        getattr(self._read, "clear", lambda: None)()

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        key = self._key(index)
        array = self._cache.pop(key, None)
        if array is None:
            array = np.asarray(self._read(index), self.dtype)
        left = self._remaining.get(key, 1) - 1
        self._remaining[key] = left
        if left > 0:
            self._cache[key] = array
        return array


def _full(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def plan(config_model, tensors: Tensors, model_type: str, abstract: dict[str, Any]) -> dict[tuple[str, ...], Source]:
    """A Source per leaf of the abstract variables {'params', 'moe_state'}; every missing, mis-shaped or unused
    checkpoint tensor is reported (all of them) before anything is read."""
    top, layer = tables.tables(model_type)
    fam = families.FAMILIES[model_type]
    sources: dict[tuple[str, ...], Source] = {}
    used: set[str] = set()
    missing, misshaped, unknown = [], [], []
    num_experts = config_model.moe.num_experts

    def check(key: str, shape: tuple[int, ...], what: str) -> bool:
        found = tensors.shape(key)
        if found is None:
            missing.append(f"{key} (expected shape {list(shape)}, for {what})")
            return False
        used.update(found[1])
        if tuple(found[0]) != tuple(shape):
            misshaped.append(f"{key} has shape {list(found[0])}, expected {list(shape)} (for {what})")
            return False
        return True

    for keys, leaf in _flatten(abstract).items():
        shape, dtype = tuple(leaf.shape), leaf.dtype
        what = f"moejax parameter {_path(keys)} {list(shape)}"
        found = rule_for(keys[1:], top, layer)
        if found is None:
            unknown.append(what)
            continue
        rule, i = found
        if rule.kind == "zeros":
            sources[keys] = Source(shape, dtype, lambda index, shape=shape: np.zeros(shape)[index])
            continue
        if rule.per_expert:
            names = [rule.hf.format(i=i, j=j) for j in range(num_experts)]
            one = tables.hf_shape(rule.kind, shape[1:])
            if all([check(name, one, what) for name in names]):
                sources[keys] = Source(shape, dtype, _per_expert(tensors, names, rule.kind, shape[1:], dtype))
            continue
        name = rule.hf.format(i=i)
        if check(name, tables.hf_shape(rule.kind, shape), what):
            stacked = len(keys) > 3 and keys[-2] == "experts"
            sources[keys] = Source(shape, dtype, _whole(tensors, name, rule.kind, shape, dtype, stacked))

    skipped_layers = set()
    extra = []
    for key in tensors.ckpt.keys():
        if key in used or key.endswith(SKIPPED_SUFFIXES):
            continue
        match = tables.LAYER_KEY.match(key)
        if match and int(match.group(1)) >= config_model.num_layers and fam.extra_layers_note:
            skipped_layers.add(int(match.group(1)))
            continue
        if key == "lm_head.weight" and config_model.tie_embeddings:
            print("moejax.hf: lm_head.weight skipped: the config ties the output head to the embedding",
                  file=sys.stderr)
            continue
        extra.append(key)
    if skipped_layers:
        print(f"moejax.hf: skipped checkpoint layers {sorted(skipped_layers)} past num_hidden_layers="
              f"{config_model.num_layers} ({model_type} {fam.extra_layers_note}; moejax has no such layers)",
              file=sys.stderr)
    problems = []
    for title, items in (("missing tensors", missing), ("mis-shaped tensors", misshaped),
                         ("tensors the model has no parameter for", sorted(extra)),
                         ("moejax parameters the family table does not name", unknown)):
        if items:
            shown = "\n    ".join(items[:12]) + (f"\n    ... ({len(items)} in all)" if len(items) > 12 else "")
            problems.append(f"  {title}:\n    {shown}")
    if problems:
        raise CheckpointError(f"the {model_type} checkpoint in {tensors.ckpt.directory} does not fit the model its "
                              f"config.json describes:\n" + "\n".join(problems))
    return sources


def _whole(tensors: Tensors, name: str, kind: str, shape: tuple[int, ...], dtype: Any, stacked: bool):
    whole: list[np.ndarray] = []  # the parameter read once while its shards are placed (Source.done drops it)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if stacked:  # experts stacked in the checkpoint: read only this shard's experts
            array = tables.to_moejax(kind, tensors.read(name, index[0], dtype), shape)
            return array[(slice(None), *index[1:])]
        if not whole:
            whole.append(tables.to_moejax(kind, tensors.read(name, None, dtype), shape))
        return whole[0][index]

    read.clear = whole.clear
    return read


def _per_expert(tensors: Tensors, names: list[str], kind: str, one: tuple[int, ...], dtype: Any):
    def read(index: tuple[slice, ...]) -> np.ndarray:
        experts = range(len(names))[index[0]]
        out = None
        for row, j in enumerate(experts):  # stacked as read: one expert's tensor at a time besides the shard
            array = tables.to_moejax(kind, tensors.read(names[j], None, dtype), one)[index[1:]]
            if out is None:
                out = np.empty((len(experts), *array.shape), array.dtype)
            out[row] = array
        return out

    return read


# ----------------------------------------------------------------------------------------------- load / save


def abstract_variables(config_model) -> dict[str, Any]:
    """The shapes and dtypes of {'params', 'moe_state'} of Transformer(config_model), without allocating them."""
    import jax
    import jax.numpy as jnp

    from moejax import model

    module = model.Transformer(config_model)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return {"params": shapes["params"], "moe_state": shapes.get("moe_state") or {}}


def _current_mesh():
    import jax

    mesh = jax.sharding.get_mesh()
    return None if mesh.empty else mesh


def load(path: str | pathlib.Path, *, mesh=None, dtype: str | None = None):
    """(config, variables) of the transformers checkpoint directory at path: config.json and model.safetensors (or
    shards with model.safetensors.index.json).

    config: configs/base.get_config() with ``model`` from config.json (data / train defaults; ``data.tokenizer`` is
    ``'hf:<path>'`` when the directory has a tokenizer.json, so data pipelines and moejax.evaluate encode text with
    the model's own tokenizer). variables:
    {'params', 'moe_state'} for ``moejax.model.Transformer(config.model).apply(variables, tokens)`` (with
    ``Transformer(config.model, mesh)`` on a mesh). dtype: 'float32' | 'bfloat16' for parameters and compute
    (default: the checkpoint's dtype; float16 checkpoints load as float32). mesh: place every parameter with its
    sharding on this mesh (default: the mesh set with jax.set_mesh, else the default device).

    Raises HFConfigError for a config field moejax cannot represent, CheckpointError naming missing, mis-shaped or
    unused tensors.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from moejax import checks, model, parallel

    directory = pathlib.Path(path)
    raw = _read_json(directory / "config.json")
    config = read_config(raw, dtype)
    model_type = raw["model_type"]
    try:
        model.validate(config.model)
    except checks.ConfigError as e:
        raise HFConfigError(f"the {model_type} config in {directory} converts to a moejax config moejax refuses: "
                            f"{e}") from e
    quantization = raw.get("quantization_config") or None
    if quantization is not None and quantization.get("quant_method") not in QUANT_METHODS:
        raise HFConfigError(f"{model_type} config field quantization_config.quant_method="
                            f"{quantization.get('quant_method')!r} cannot be represented in moejax: it dequantises "
                            f"{' and '.join(repr(q) for q in QUANT_METHODS)} checkpoints on load")
    tensors = Tensors(io.Checkpoint(directory), quantization)
    abstract = abstract_variables(config.model)
    sources = plan(config.model, tensors, model_type, abstract)

    mesh = mesh if mesh is not None else _current_mesh()
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = {keys: device for keys in sources}
    else:
        param_sh = _flatten(parallel.param_shardings(abstract["params"], mesh))
        replicated = NamedSharding(mesh, PartitionSpec())
        shardings = {keys: param_sh[keys[1:]] if keys[0] == "params" else replicated for keys in sources}
    placed = {}
    for keys in list(sources):
        source = sources.pop(keys)
        source.expect(list(shardings[keys].addressable_devices_indices_map(source.shape).values()))
        placed[keys] = jax.make_array_from_callback(source.shape, shardings[keys], source.read)
        # the copies to the devices run asynchronously, each holding its host array: wait for them, so that the
        # host holds one parameter's arrays at a time instead of those of every parameter still in flight
        placed[keys].block_until_ready()
        source.done()
    variables = _unflatten(placed)
    variables.setdefault("moe_state", {})
    if (directory / "tokenizer.json").is_file():
        config.data.tokenizer = f"hf:{directory}"
    return config, variables


def _host(array: Any) -> np.ndarray:
    import jax

    return np.asarray(jax.device_get(array))


def save(config, variables: dict[str, Any], out_dir: str | pathlib.Path, *, model_type: str | None = None,
         max_shard_bytes: int = MAX_SHARD_BYTES) -> pathlib.Path:
    """Writes config.json and model.safetensors (shards with an index past max_shard_bytes) that
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) loads as the same model.

    config: a full moejax config or its ``model`` section. model_type: the family (default: the first family
    that can express the model, in families.SAVE_ORDER). Per-expert tensors are written in the hub layout
    (experts.{j}.w1/w2/w3 for Mixtral, experts.{j}.gate_proj/up_proj/down_proj elsewhere; GPT-OSS's packed
    interleaved gate_up_proj with biases); each tensor keeps its parameter's dtype. Parameters are fetched to the
    host one at a time. Raises HFConfigError for a model the family cannot express.
    """
    m = config.model if "model" in config else config
    hf_config = config_to_hf(m, model_type)
    model_type = hf_config["model_type"]
    top, layer = tables.tables(model_type)
    abstract = abstract_variables(m)
    flat = _flatten({"params": variables["params"]})
    if variables.get("moe_state"):
        flat.update(_flatten({"moe_state": variables["moe_state"]}))
    else:  # the model then routes with zero selection biases
        flat.update({keys: np.zeros(leaf.shape, leaf.dtype)
                     for keys, leaf in _flatten({"moe_state": abstract["moe_state"]}).items()})
    expected = {keys: tuple(leaf.shape) for keys, leaf in _flatten(abstract).items()}
    got = {keys: tuple(np.shape(leaf)) for keys, leaf in flat.items()}
    if expected.keys() != got.keys() or expected != got:
        diff = sorted({_path(k) for k in expected.keys() ^ got.keys()}
                      | {f"{_path(k)} {list(got[k])} (expected {list(expected[k])})"
                         for k in expected.keys() & got.keys() if expected[k] != got[k]})
        raise HFConfigError("the variables do not match the model of the config: " + "; ".join(diff[:12]))

    cache: dict[tuple[str, ...], np.ndarray] = {}

    def host(keys: tuple[str, ...]) -> np.ndarray:
        if keys not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[keys] = _host(flat[keys])
        return cache[keys]

    entries: list[io.Entry] = []
    packed: dict[str, dict[str, tuple[str, ...]]] = {}
    for keys, leaf in flat.items():
        found = rule_for(keys[1:], top, layer)
        if found is None:
            raise HFConfigError(f"moejax parameter {_path(keys)} has no place in a {model_type} checkpoint")
        rule, i = found
        dtype = np.dtype(leaf.dtype)
        if rule.kind == "zeros":
            if np.any(_host(leaf)):
                raise HFConfigError(f"moejax {_path(keys)} is not zero, and {model_type} has no selection bias: "
                                    f"the saved model would route differently")
            continue
        if rule.kind in ("even", "odd"):
            parts = packed.setdefault(rule.hf.format(i=i), {})
            parts[rule.kind] = keys
            if len(parts) == 2:
                name, pair = rule.hf.format(i=i), (parts["even"], parts["odd"])
                shape = tables.hf_shape("even", tuple(leaf.shape))
                entries.append((name, shape, dtype, lambda pair=pair: tables.to_hf(
                    "even", [host(pair[0]), host(pair[1])])))
            continue
        if rule.per_expert:
            one = tables.hf_shape(rule.kind, tuple(leaf.shape[1:]))
            for j in range(leaf.shape[0]):
                entries.append((rule.hf.format(i=i, j=j), one, dtype, lambda keys=keys, j=j, kind=rule.kind:
                                tables.to_hf(kind, [host(keys)[j]])))
            continue
        entries.append((rule.hf.format(i=i), tables.hf_shape(rule.kind, tuple(leaf.shape)), dtype,
                        lambda keys=keys, kind=rule.kind: tables.to_hf(kind, [host(keys)])))

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / io.INDEX_FILE]:
        if stale.exists():
            stale.unlink()
    io.write_checkpoint(out, entries, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out
