"""moejax parameters <-> checkpoint tensors, by a family's rule tables (rules.py), both ways.

Loading: ``sources`` makes a ``Source`` per parameter, after checking every tensor the tables name against the
checkpoint (``Tensors``: its tensors as float arrays, FP8 and MXFP4 ones dequantised). A Source reads the slice of
the parameter one device's shard holds: an expert parameter is built from the per-expert tensors of the experts
that shard holds (or the rows of a stacked tensor), so host memory stays near one tensor group. Saving: ``entries``
gives the checkpoint tensors of the variables, each computed when the writer asks for it.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from moejax.hf import io, mtp, quant, rules
from moejax.hf.config import HFConfigError
from moejax.hf.io import CheckpointError
from moejax.hf.registry import Family
from moejax.hf.rules import Rule

SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved; transformers ignores them too


def keypath(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, (*prefix, str(key))))
        return out
    return {prefix: tree}


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for keys, value in flat.items():
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def rule_for(keys: tuple[str, ...], fam: Family, num_layers: int = 0) -> tuple[Rule, int | None] | None:
    """The rule of parameter path keys (collection excluded), and its layer index (a multi-token-prediction module
    ``mtp_k``'s is num_layers + k - 1: moejax/hf/mtp.py)."""
    if mtp.depth_of(keys[0]) is not None:
        return mtp.rule_for(keys, fam.layer_rules, num_layers)
    if keys[0].startswith("layers_"):
        rule = fam.layer_rules.get(keypath(keys[1:]))
        return None if rule is None else (rule, int(keys[0][len("layers_"):]))
    rule = rules.TOP_RULES.get(keypath(keys))
    return None if rule is None else (rule, None)


# ----------------------------------------------------------------------------------------------- loading


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


def sources(config_model, tensors: Tensors, fam: Family, abstract: dict[str, Any]) -> dict[tuple[str, ...], Source]:
    """A Source per leaf of the abstract variables {'params', 'moe_state'}; every missing, mis-shaped or unused
    checkpoint tensor is reported (all of them) before anything is read."""
    found_sources: dict[tuple[str, ...], Source] = {}
    used: set[str] = set()
    missing, misshaped, unknown = [], [], []
    num_experts = config_model.moe.num_experts
    leaves = flatten(abstract)
    checked: dict[str, bool] = {}  # fused tensors: checked once for the parameters that share them

    def check(key: str, shape: tuple[int, ...], what: str) -> bool:
        if key in checked:
            return checked[key]
        checked[key] = _check(key, shape, what)
        return checked[key]

    def _check(key: str, shape: tuple[int, ...], what: str) -> bool:
        found = tensors.shape(key)
        if found is None:
            missing.append(f"{key} (expected shape {list(shape)}, for {what})")
            return False
        used.update(found[1])
        if tuple(found[0]) != tuple(shape):
            misshaped.append(f"{key} has shape {list(found[0])}, expected {list(shape)} (for {what})")
            return False
        return True

    for keys, leaf in leaves.items():
        shape, dtype = tuple(leaf.shape), leaf.dtype
        what = f"moejax parameter {keypath(keys)} {list(shape)}"
        found = rule_for(keys[1:], fam, config_model.num_layers)
        if found is None:
            unknown.append(what)
            continue
        rule, i = found
        if rule.fused:
            blocks = _fused_blocks(rule, fam, {p: leaves.get((*keys[:2], *p.split("/"))) for p in rule.fused})
            own = rule.fused.index(keypath(keys[2:]))
            name, offset = rule.name(i), sum(b[0] for b in blocks[:own])
            if check(name, (sum(b[0] for b in blocks), *blocks[0][1:]), f"moejax parameters {', '.join(rule.fused)}"
                                                                        f" of layers_{i}"):
                found_sources[keys] = Source(shape, dtype, _rows(tensors, name, rule.kind, shape, dtype,
                                                                 slice(offset, offset + blocks[own][0])))
            continue
        if rule.kind == "zeros":
            found_sources[keys] = Source(shape, dtype, lambda index, shape=shape: np.zeros(shape)[index])
            continue
        if rule.per_expert:
            names = [rule.name(i, j=j) for j in range(num_experts)]
            one = rules.hf_shape(rule.kind, shape[1:])
            if all([check(name, one, what) for name in names]):
                found_sources[keys] = Source(shape, dtype, _per_expert(tensors, names, rule.kind, shape[1:], dtype))
            continue
        name = rule.name(i)
        if check(name, rules.hf_shape(rule.kind, shape), what):
            stacked = len(keys) > 3 and keys[-2] == "experts"
            found_sources[keys] = Source(shape, dtype, _whole(tensors, name, rule.kind, shape, dtype, stacked))

    if config_model.get("mtp_depth", 0):
        used |= mtp.check_copies(tensors, config_model.num_layers, config_model.mtp_depth,
                                 config_model.tie_embeddings)
    skipped_layers, skipped_tensors = set(), []
    extra = []
    for key in tensors.ckpt.keys():
        if key in used or key.endswith(SKIPPED_SUFFIXES):
            continue
        if fam.skipped_prefixes and key.startswith(fam.skipped_prefixes):
            skipped_tensors.append(key)
            continue
        match = rules.LAYER_KEY.match(key)
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
              f"{config_model.num_layers} ({fam.model_type} {fam.extra_layers_note}; moejax has no such layers)",
              file=sys.stderr)
    if skipped_tensors:
        print(f"moejax.hf: skipped {len(skipped_tensors)} checkpoint tensors transformers' {fam.model_type} skips "
              f"too ({', '.join(sorted(skipped_tensors)[:3])}, ...): moejax has no such parameters", file=sys.stderr)
    problems = []
    for title, items in (("missing tensors", missing), ("mis-shaped tensors", misshaped),
                         ("tensors the model has no parameter for", sorted(extra)),
                         ("moejax parameters the family table does not name", unknown)):
        if items:
            shown = "\n    ".join(items[:12]) + (f"\n    ... ({len(items)} in all)" if len(items) > 12 else "")
            problems.append(f"  {title}:\n    {shown}")
    if problems:
        raise CheckpointError(f"the {fam.model_type} checkpoint in {tensors.ckpt.directory} does not fit the model "
                              f"its config.json describes:\n" + "\n".join(problems))
    return found_sources


def _whole(tensors: Tensors, name: str, kind: str, shape: tuple[int, ...], dtype: Any, stacked: bool):
    whole: list[np.ndarray] = []  # the parameter read once while its shards are placed (Source.done drops it)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if stacked:  # experts stacked in the checkpoint: read only this shard's experts
            array = rules.to_moejax(kind, tensors.read(name, index[0], dtype), shape)
            return array[(slice(None), *index[1:])]
        if not whole:
            whole.append(rules.to_moejax(kind, tensors.read(name, None, dtype), shape))
        return whole[0][index]

    read.clear = whole.clear
    return read


def _fused_blocks(rule: Rule, fam: Family, parts: dict[str, Any]) -> list[tuple[int, ...]]:
    """The checkpoint shape of each part of a fused tensor (rule.fused order), from the parts' moejax leaves."""
    missing = [path for path, leaf in parts.items() if leaf is None]
    if missing:
        raise HFConfigError(f"{fam.model_type} stores {', '.join(rule.fused)} as one tensor {rule.hf}, and the model "
                            f"lacks {', '.join(missing)}")
    return [rules.hf_shape(fam.layer_rules[path].kind, tuple(parts[path].shape)) for path in rule.fused]


def _rows(tensors: Tensors, name: str, kind: str, shape: tuple[int, ...], dtype: Any, rows: slice):
    whole: list[np.ndarray] = []  # this parameter's rows of the fused tensor (Source.done drops them)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not whole:
            whole.append(rules.to_moejax(kind, tensors.read(name, None, dtype)[rows], shape))
        return whole[0][index]

    read.clear = whole.clear
    return read


def _per_expert(tensors: Tensors, names: list[str], kind: str, one: tuple[int, ...], dtype: Any):
    def read(index: tuple[slice, ...]) -> np.ndarray:
        experts = range(len(names))[index[0]]
        out = None
        for row, j in enumerate(experts):  # stacked as read: one expert's tensor at a time besides the shard
            array = rules.to_moejax(kind, tensors.read(names[j], None, dtype), one)[index[1:]]
            if out is None:
                out = np.empty((len(experts), *array.shape), array.dtype)
            out[row] = array
        return out

    return read


# ----------------------------------------------------------------------------------------------- saving


def _host(array: Any) -> np.ndarray:
    import jax

    return np.asarray(jax.device_get(array))


def entries(flat: dict[tuple[str, ...], Any], fam: Family, quantise: Callable | None = None,
            model: Any = None) -> list[io.Entry]:
    """The checkpoint tensors (io.Entry: name, shape, dtype, a function computing it) of the flattened variables
    {'params', 'moe_state'}; a tensor made from several parameters (GPT-OSS's packed gate_up_proj) comes once both
    are seen. Each parameter is fetched to the host when a tensor needs it (the last two kept). ``quantise(keys,
    entry, kind)`` (moejax/hf/quantised.py) gives the entries that store each tensor instead of it. model: the model
    section, for its multi-token-prediction modules (their layer indices and embedding / head copies: mtp.py)."""
    num_layers, depth = (0, 0) if model is None else (model.num_layers, model.get("mtp_depth", 0))
    cache: dict[tuple[str, ...], np.ndarray] = {}
    out: list[io.Entry] = []

    def add(keys: tuple[str, ...], entry: io.Entry, kind: str) -> None:
        out.extend([entry] if quantise is None else quantise(keys, entry, kind))

    def fetch(keys: tuple[str, ...]) -> np.ndarray:
        if keys not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[keys] = _host(flat[keys])
        return cache[keys]

    packed: dict[str, dict[str, tuple[str, ...]]] = {}
    for keys, leaf in flat.items():
        found = rule_for(keys[1:], fam, num_layers)
        if found is None:
            raise HFConfigError(f"moejax parameter {keypath(keys)} has no place in a {fam.model_type} checkpoint")
        rule, i = found
        dtype = np.dtype(leaf.dtype)
        if rule.kind == "zeros":
            if np.any(_host(leaf)):
                raise HFConfigError(f"moejax {keypath(keys)} is not zero, and {fam.model_type} has no selection "
                                    f"bias: the saved model would route differently")
            continue
        if rule.fused:  # one checkpoint tensor of several parameters' rows, once all of them are seen
            parts = packed.setdefault(rule.name(i), {})
            parts[keypath(keys[2:])] = keys
            if len(parts) == len(rule.fused):
                ordered = [parts[path] for path in rule.fused]
                kinds = [fam.layer_rules[path].kind for path in rule.fused]
                blocks = [rules.hf_shape(k, tuple(flat[p].shape)) for k, p in zip(kinds, ordered, strict=True)]
                out.append((rule.name(i), (sum(b[0] for b in blocks), *blocks[0][1:]), dtype,
                            lambda ordered=ordered, kinds=kinds: np.concatenate(
                                [rules.to_hf(k, [fetch(p)]) for k, p in zip(kinds, ordered, strict=True)], axis=0)))
            continue
        if rule.kind in rules.PAIRS:  # GPT-OSS's interleaved / Llama 4's concatenated gate_up_proj
            parts = packed.setdefault(rule.name(i), {})
            parts[rule.kind] = keys
            if len(parts) == 2:
                lead = rules.PAIRS[rule.kind][0]
                name, pair = rule.name(i), tuple(parts[k] for k in rules.PAIRS[rule.kind])
                shape = rules.hf_shape(lead, tuple(leaf.shape))
                add(pair[0], (name, shape, dtype, lambda pair=pair, lead=lead: rules.to_hf(
                    lead, [fetch(pair[0]), fetch(pair[1])])), lead)
            continue
        if rule.per_expert:
            one = rules.hf_shape(rule.kind, tuple(leaf.shape[1:]))
            for j in range(leaf.shape[0]):
                add(keys, (rule.name(i, j=j), one, dtype, lambda keys=keys, j=j, kind=rule.kind:
                           rules.to_hf(kind, [fetch(keys)[j]])), rule.kind)
            continue
        add(keys, (rule.name(i), rules.hf_shape(rule.kind, tuple(leaf.shape)), dtype,
                   lambda keys=keys, kind=rule.kind: rules.to_hf(kind, [fetch(keys)])), rule.kind)
    if depth:
        out.extend(mtp.copy_entries(flat, num_layers, depth, model.tie_embeddings, fetch))
    return out
