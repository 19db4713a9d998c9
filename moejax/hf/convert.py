"""Loading and saving a transformers checkpoint directory: config.json, the safetensors weights and the tokenizer.

``load`` maps config.json through its family (moejax/hf/families/), checks the tokenizer beside it against the
vocabulary, plans a read of every parameter (tensors.sources) and places each one on the mesh with its sharding,
straight from the memory-mapped files (``mesh=``, else the mesh set with ``jax.set_mesh``, else the default device;
routed experts split over ``mesh.expert`` by moejax.parallel.param_shardings). ``save`` writes the config.json of the
family that expresses the model, the weights in the hub layout (tensors.entries, streamed by io.write_checkpoint)
and the config's tokenizer.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from moejax.hf import io, mtp, quantised, tensors
from moejax.hf.config import HFConfigError
from moejax.hf.families import config_from_hf, config_to_hf, family
from moejax.hf.io import CheckpointError
from moejax.moe import expert_map, placement

if TYPE_CHECKING:
    from moejax.data.tokenizers import Tokenizer

MAX_SHARD_BYTES = 5 * 2**30
QUANT_METHODS = ("fp8", "mxfp4")  # quantization_config.quant_method values dequantised on load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what a saved tokenizer is (Tokenizer.save)


def is_hf_dir(path: str | pathlib.Path) -> bool:
    """Whether path holds a transformers config.json (with a model_type) and safetensors weights."""
    directory = pathlib.Path(path)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "model_type" in raw and (
        (directory / io.INDEX_FILE).is_file() or any(directory.glob("*.safetensors")))


def read_config(path: str | pathlib.Path | dict[str, Any], dtype: str | None = None):
    """The moejax config (configs/base.py defaults, ``model`` from config.json) of a transformers directory or
    config dict, without reading weights (a directory's tensor names are read: multi-token-prediction layers that
    config.json counts and the weights lack are left out, as ``load`` leaves them out)."""
    raw = path if isinstance(path, dict) else _read_json(pathlib.Path(path) / "config.json")
    config, _ = config_from_hf(raw)
    if dtype is not None:
        config.model.param_dtype = config.model.dtype = dtype
    if not isinstance(path, dict) and is_hf_dir(path):
        _without_absent_mtp(config, io.Checkpoint(pathlib.Path(path)).keys(), pathlib.Path(path))
    return config


def _without_absent_mtp(config, keys, directory: pathlib.Path) -> None:
    """mtp_depth 0 when config.json counts multi-token-prediction layers that the weights lack (transformers saves
    DeepSeek-V3 and GLM-4.5 without them: it has no MTP modules)."""
    if config.model.get("mtp_depth", 0) and not mtp.present(keys, config.model.num_layers):
        print(f"moejax.hf: {directory} has no layer {config.model.num_layers} for num_nextn_predict_layers="
              f"{config.model.mtp_depth}: loaded without multi-token-prediction modules", file=sys.stderr)
        config.model.mtp_depth = 0


def _read_json(file: pathlib.Path) -> dict[str, Any]:
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return raw


def abstract_variables(config_model) -> dict[str, Any]:
    """The shapes and dtypes of {'params', 'moe_state'} of Transformer(config_model), without allocating them."""
    import jax
    import jax.numpy as jnp

    from moejax import model

    module = model.Transformer(config_model)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return {"params": shapes["params"], "moe_state": shapes.get("moe_state") or {}}


def _check_vocabulary(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """Refuses a tokenizer with ids past the embedding's rows (fewer ids is normal: released models pad their
    embedding)."""
    if tokenizer.vocab_size > vocab_size:
        raise HFConfigError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids, more than the model's "
                            f"vocab_size={vocab_size} embedding rows (ids from {vocab_size} on have no embedding)")


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

    Raises HFConfigError for a config field moejax cannot represent or a tokenizer with more ids than vocab_size,
    CheckpointError naming missing, mis-shaped or unused tensors, or a tokenizer.json it cannot read.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from moejax import checks, model, parallel
    from moejax.data import tokenizers

    directory = pathlib.Path(path)
    raw = _read_json(directory / "config.json")
    config = read_config(raw, dtype)
    model_type = raw["model_type"]
    try:
        model.validate(config.model)
    except checks.ConfigError as e:
        raise HFConfigError(f"the {model_type} config in {directory} converts to a moejax config moejax refuses: "
                            f"{e}") from e
    if (directory / "tokenizer.json").is_file():
        config.data.tokenizer = f"hf:{directory}"
        try:
            tokenizer = tokenizers.from_spec(config.data.tokenizer)
        except ValueError as e:
            raise CheckpointError(f"cannot read the tokenizer in {directory}: {e}") from e
        _check_vocabulary(tokenizer, config.model.vocab_size, f"{directory} (tokenizer.json, config.json)")
    quantization = raw.get("quantization_config") or None
    if quantization is not None and quantization.get("quant_method") not in QUANT_METHODS:
        raise HFConfigError(f"{model_type} config field quantization_config.quant_method="
                            f"{quantization.get('quant_method')!r} cannot be represented in moejax: it dequantises "
                            f"{' and '.join(repr(q) for q in QUANT_METHODS)} checkpoints on load")
    checkpoint = tensors.Tensors(io.Checkpoint(directory), quantization)
    _without_absent_mtp(config, checkpoint.ckpt.keys(), directory)
    abstract = abstract_variables(config.model)
    sources = tensors.sources(config.model, checkpoint, family(model_type), abstract)

    mesh = mesh if mesh is not None else _current_mesh()
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = {keys: device for keys in sources}
    else:
        param_sh = tensors.flatten(parallel.param_shardings(abstract["params"], mesh))
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
    variables = tensors.unflatten(placed)
    variables.setdefault("moe_state", {})
    return config, variables


def save(config, variables: dict[str, Any], out_dir: str | pathlib.Path, *, model_type: str | None = None,
         max_shard_bytes: int = MAX_SHARD_BYTES, quantisation: str | None = None) -> pathlib.Path:
    """Writes config.json and model.safetensors (shards with an index past max_shard_bytes) that
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) loads as the same model, and the tokenizer of a
    full config's ``data.tokenizer`` (tokenizer.json and tokenizer_config.json; none for 'bytes').

    config: a full moejax config or its ``model`` section. model_type: the family (default: the first family
    that can express the model, newest first). Per-expert tensors are written in the hub layout
    (experts.{j}.w1/w2/w3 for Mixtral, experts.{j}.gate_proj/up_proj/down_proj elsewhere; GPT-OSS's packed
    interleaved gate_up_proj with biases); each tensor keeps its parameter's dtype. Parameters are fetched to the
    host one at a time. quantisation: 'fp8' (DeepSeek-V3's FP8 with 128x128 block scales; 'fp8/<b0>x<b1>' for
    other blocks) or 'mxfp4' (GPT-OSS's MXFP4 routed experts): the tensors moejax/hf/quantised.py names are written
    quantised, with config.json's quantization_config; ``load`` reads them back dequantised. A 'bpe:' tokenizer is
    the one built for the config's corpus (moejax.data.tokenizers.for_config, which builds it first when it is
    missing). Raises HFConfigError for a model the family cannot
    express or a tokenizer with more ids than model.vocab_size; nothing is written then.
    """
    from moejax.data import tokenizers

    try:
        scheme = quantised.parse(quantisation)
    except ValueError as e:
        raise HFConfigError(str(e)) from e
    m = config.model if "model" in config else config
    if expert_map.has_map(m.moe) or placement.has_placement(m.moe):
        # replicas dropped; bound experts written as copies of their merge (exact); removed ones refused
        from moejax.posthoc import compress
        from moejax.posthoc import placement as plan

        wrapped = config if "model" in config else ml_collections.ConfigDict({"model": config})
        try:
            wrapped, variables = compress.unmapped(*plan.unplaced(wrapped, variables))
        except ValueError as e:
            raise HFConfigError(f"model.moe.expert_map: {e}") from e
        config = wrapped if "model" in config else wrapped.model
        m = config.model if "model" in config else config
    hf_config = config_to_hf(m, model_type)
    fam = family(hf_config["model_type"])
    quantised.check(scheme, hf_config["model_type"])
    tokenizer = None
    if "model" in config and tokenizers.spec_of(config) != "bytes":
        tokenizer = tokenizers.for_config(config)
        _check_vocabulary(tokenizer, m.vocab_size, f"config.data.tokenizer={tokenizer.spec!r}")
    abstract = abstract_variables(m)
    flat = tensors.flatten({"params": variables["params"]})
    if variables.get("moe_state"):
        flat.update(tensors.flatten({"moe_state": variables["moe_state"]}))
    else:  # the model then routes with zero selection biases
        flat.update({keys: np.zeros(leaf.shape, leaf.dtype)
                     for keys, leaf in tensors.flatten({"moe_state": abstract["moe_state"]}).items()})
    expected = {keys: tuple(leaf.shape) for keys, leaf in tensors.flatten(abstract).items()}
    got = {keys: tuple(np.shape(leaf)) for keys, leaf in flat.items()}
    if expected.keys() != got.keys() or expected != got:
        diff = sorted({tensors.keypath(k) for k in expected.keys() ^ got.keys()}
                      | {f"{tensors.keypath(k)} {list(got[k])} (expected {list(expected[k])})"
                         for k in expected.keys() & got.keys() if expected[k] != got[k]})
        raise HFConfigError("the variables do not match the model of the config: " + "; ".join(diff[:12]))
    writer = None if scheme is None else quantised.Writer(scheme)
    entries = tensors.entries(flat, fam, None if writer is None else writer.entry, model=m)
    if writer is not None:
        hf_config["quantization_config"] = writer.config()

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / io.INDEX_FILE, *(out / name for name in TOKENIZER_FILES)]:
        if stale.exists():
            stale.unlink()
    io.write_checkpoint(out, entries, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out
