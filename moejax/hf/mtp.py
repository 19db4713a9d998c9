"""Multi-token-prediction (MTP) layers of DeepSeek-V3 and GLM-4.5 checkpoints, loaded into and saved from moejax's
``MTPModule``s (model.mtp_depth; moejax/model.py).

The released checkpoints store MTP module k (config.json ``num_nextn_predict_layers`` of them) as layer
``L + k - 1`` past the ``L = num_hidden_layers`` decoder layers (DeepSeek-V3's README_WEIGHTS.md; vLLM's
deepseek_mtp.py and glm4_moe_mtp.py read them so):

    model.layers.{i}.enorm.weight                 the embedding's RMSNorm          mtp_k/enorm/scale
    model.layers.{i}.hnorm.weight                 the hidden state's RMSNorm        mtp_k/hnorm/scale
    model.layers.{i}.eh_proj.weight  [D, 2D]      [enorm(e); hnorm(h)] -> D         mtp_k/eh_proj/kernel [2D, D]
    model.layers.{i}.<decoder layer>              a full decoder block              mtp_k/block/... (the family's
                                                                                    layer rules)
    model.layers.{i}.shared_head.norm.weight      the norm before the output head   mtp_k/norm/scale
    model.layers.{i}.shared_head.head.weight      a copy of lm_head.weight          (moejax shares lm_head)
    model.layers.{i}.embed_tokens.weight          a copy of model.embed_tokens      (moejax shares embed)

The two copies: DeepSeek-V3 shares the embedding and the output head between the main model and its MTP modules
(arXiv 2412.19437, section 2.2), and moejax's MTPModule reads the main model's. On load, the embedding copy is taken
from the main model without being read, as vLLM does (its EAGLE/MTP proposer replaces the MTP embedding by the
target's); vLLM computes the MTP logits with the layer's own ``shared_head.head``, so that copy is read and must
equal ``lm_head.weight`` (else an error: moejax would compute other logits than vLLM). Either copy may be absent. On
save both are written as copies of the main tensors.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from moejax.hf.config import HFConfig
from moejax.hf.io import CheckpointError
from moejax.hf.rules import Rule

_LAYER = "model.layers.{i}."
RULES = {
    "enorm/scale": Rule(_LAYER + "enorm.weight"),
    "hnorm/scale": Rule(_LAYER + "hnorm.weight"),
    "eh_proj/kernel": Rule(_LAYER + "eh_proj.weight", "linear"),
    "norm/scale": Rule(_LAYER + "shared_head.norm.weight"),
}
EMBED_COPY = _LAYER + "embed_tokens.weight"
HEAD_COPY = _LAYER + "shared_head.head.weight"
CHUNK_ROWS = 8192  # rows of the head compared at a time


def read(hf: HFConfig, m: ml_collections.ConfigDict) -> None:
    """config.json's num_nextn_predict_layers -> model.mtp_depth."""
    depth = hf.get("num_nextn_predict_layers") or 0
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        hf.refuse("num_nextn_predict_layers", depth, "an integer >= 0 (the multi-token-prediction layers)")
    m.mtp_depth = depth
    hf.used.add("num_mtp_layers")  # an older spelling transformers ignores


def write(m: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"num_nextn_predict_layers": int(m.get("mtp_depth", 0))}


def depth_of(key: str) -> int | None:
    """k of a moejax top-level key ``mtp_k``, else None."""
    if key.startswith("mtp_") and key[4:].isdigit():
        return int(key[4:])
    return None


def rule_for(keys: tuple[str, ...], layer_rules: dict[str, Rule], num_layers: int) -> tuple[Rule, int] | None:
    """The rule of a parameter path ``mtp_k/...`` (collection excluded) and its checkpoint layer L + k - 1."""
    depth = depth_of(keys[0])
    if depth is None or len(keys) < 2:
        return None
    path = "/".join(keys[2:] if keys[1] == "block" else keys[1:])
    rule = layer_rules.get(path) if keys[1] == "block" else RULES.get(path)
    return None if rule is None else (rule, num_layers + depth - 1)


def check_copies(tensors: Any, num_layers: int, depth: int, tied: bool) -> set[str]:
    """The checkpoint keys of the embedding and head copies of the MTP layers (all present ones: they count as
    read). Each head copy is compared with the main head, CHUNK_ROWS rows at a time; CheckpointError when one
    differs."""
    main = "model.embed_tokens.weight" if tied else "lm_head.weight"
    used = set()
    for k in range(1, depth + 1):
        i = num_layers + k - 1
        embed, head = EMBED_COPY.format(i=i), HEAD_COPY.format(i=i)
        if tensors.shape(embed) is not None:
            used.update(tensors.shape(embed)[1])
        found = tensors.shape(head)
        if found is None:
            continue
        used.update(found[1])
        want = tensors.shape(main)
        if want is None or tuple(want[0]) != tuple(found[0]):
            raise CheckpointError(f"{head} {list(found[0])} is not a copy of {main} "
                                  f"{None if want is None else list(want[0])}")
        for start in range(0, found[0][0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            if not np.array_equal(tensors.read(head, rows), tensors.read(main, rows)):
                raise CheckpointError(f"{head} differs from {main} (rows from {start}): moejax's multi-token-"
                                      f"prediction module {k} reads the main output head, as DeepSeek-V3 shares "
                                      f"it, and vLLM reads this copy, so the two would compute different logits")
    return used


def copy_entries(flat: dict[tuple[str, ...], Any], num_layers: int, depth: int, tied: bool,
                 fetch: Any) -> list[tuple[str, tuple[int, ...], Any, Any]]:
    """The io.Entry records of the embedding and head copies of each MTP layer, computed from the main tensors
    (fetch(keys) gives a parameter on the host)."""
    embed_keys = ("params", "embed", "embedding")
    head_keys = embed_keys if tied else ("params", "lm_head", "kernel")
    out = []
    for k in range(1, depth + 1):
        i = num_layers + k - 1
        embed, head = flat[embed_keys], flat[head_keys]
        out.append((EMBED_COPY.format(i=i), tuple(embed.shape), np.dtype(embed.dtype),
                    lambda: np.asarray(fetch(embed_keys))))
        shape = tuple(head.shape) if tied else tuple(head.shape[::-1])
        out.append((HEAD_COPY.format(i=i), shape, np.dtype(head.dtype),
                    (lambda: np.asarray(fetch(head_keys))) if tied else (lambda: np.asarray(fetch(head_keys)).T)))
    return out


def present(keys: Any, num_layers: int) -> bool:
    """Whether the checkpoint has any tensor of layer num_layers (the first MTP layer)."""
    prefix = f"model.layers.{num_layers}."
    return any(key.startswith(prefix) for key in keys)
