"""Keyword experts of experiments/posthoc_routing.py (its docstring, step 2, says how they are chosen): whole-word
keyword masks on byte windows, the trace with a keyword's bytes marked, the nPMI choice of each keyword's experts
(``step_keywords``, stored in the study's result cache) and the bits per byte on a keyword's bytes under an
intervention (``keyword_bits``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments.posthoc_common import ResultCache


def keyword_ids(tokenizer: Any, keyword: str) -> list[int] | None:
    """With a subword tokenizer (vocabulary above 256 ids): the ids whose text is the keyword, with or without
    surrounding whitespace (a BPE splits words at their start, so such a token is the whole word, e.g. 'def' and
    ' def'); None with the byte tokenizer (a keyword is then several tokens: ``keyword_mask``'s regex)."""
    if tokenizer is None or getattr(tokenizer, "vocab_size", 256) <= 256:
        return None
    return [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).strip() == keyword]


def keyword_mask(rows: np.ndarray, keyword: str, ids: Sequence[int] | None = None) -> np.ndarray:
    """bool like rows [n, S]: with ``ids`` (a subword tokenizer's, ``keyword_ids``) the positions holding one of
    them; else the bytes of every whole-word occurrence of ``keyword`` inside each row (the previous and next bytes
    are not [A-Za-z0-9_]; an occurrence cut by the row's edge counts when the edge falls where a boundary is allowed,
    i.e. it is found in the row's bytes as they are)."""
    if ids is not None:
        return np.isin(np.asarray(rows), np.asarray(ids, np.int64))
    pattern = re.compile(rb"(?<![A-Za-z0-9_])" + re.escape(keyword.encode()) + rb"(?![A-Za-z0-9_])")
    mask = np.zeros(rows.shape, bool)
    for i, row in enumerate(np.asarray(rows)):
        text = bytes(np.clip(row, 0, 255).astype(np.uint8))
        for match in pattern.finditer(text):
            mask[i, match.start():match.end()] = True
    return mask


def marked_trace(trace: Any, keyword: str, seq_len: int, marker_id: int,
                 keyword_token_ids: Sequence[int] | None = None) -> tuple[Any, int]:
    """The trace with the token id of every position of the keyword's whole-word occurrences (``keyword_mask``)
    replaced by marker_id (rows of seq_len tokens, the layout ``record`` wrote the batches in), and the number of
    positions marked."""
    ids = np.asarray(trace.token_ids)
    mask = keyword_mask(ids.reshape(-1, seq_len), keyword, keyword_token_ids).reshape(-1)
    return dataclasses.replace(trace, token_ids=np.where(mask, marker_id, ids)), int(mask.sum())


def step_keywords(cache: ResultCache, trace: Any, keywords: Sequence[str], seq_len: int, vocab: int,
                  say: Callable[[str], None], tokenizer: Any = None) -> dict[str, Any]:
    """Per keyword: occurrences, the top-1/top-2 experts by the event marker, per-layer best nPMI, the
    alternative's top 2 (nPMI averaged over the keyword's distinct bytes, or over its token ids with a subword
    tokenizer), and the top tokens of the top-1 expert."""
    from moejax.posthoc import analysis, steer

    record = cache.get("keywords") or {}
    for keyword in keywords:
        if keyword in record:
            continue
        started = time.perf_counter()
        token_ids = keyword_ids(tokenizer, keyword)
        marked, marked_bytes = marked_trace(trace, keyword, seq_len, vocab, token_ids)
        if not marked_bytes:
            record[keyword] = {"occurrences": 0}
            cache.put("keywords", record)
            say(f"keyword {keyword!r}: no whole-word occurrence in the trace, skipped")
            continue
        tops = {n: steer.marker_experts(marked, [vocab], n=n) for n in (1, 2)}
        scores = tops[1].npmi  # [L, E]
        best = [[int(layer), int(np.argmax(scores[li])), float(scores[li].max())]
                for li, layer in enumerate(trace.layers)]
        ranked = np.argsort(-scores.ravel(), kind="stable")[:5]
        top5 = [[int(trace.layers[i // scores.shape[1]]), int(i % scores.shape[1]), float(scores.ravel()[i])]
                for i in ranked]
        by_bytes = steer.marker_experts(trace, token_ids or list(keyword.encode()), n=2)
        layer, expert = top5[0][0], top5[0][1]
        ids, values = analysis.top_tokens_per_expert(trace, int(np.flatnonzero(trace.layers == layer)[0]), n=6,
                                                     min_count=20)
        record[keyword] = {
            "occurrences": marked_bytes if token_ids else marked_bytes // len(keyword),
            "marked_bytes": marked_bytes, "token_ids": token_ids,
            "top1": tops[1].to_json()["experts"], "top2": tops[2].to_json()["experts"], "top5": top5,
            "best_per_layer": best,
            "bytes_top2": [[int(layer), int(e), float(v)] for layer, es in by_bytes.experts.items()
                           for e, v in zip(es, by_bytes.scores[layer], strict=True)],
            "top1_top_bytes": [[int(i), float(v)] for i, v in zip(ids[expert], values[expert], strict=True)
                               if i >= 0],
            "seconds": time.perf_counter() - started}
        cache.put("keywords", record)
        say(f"keyword {keyword!r}: {record[keyword]['occurrences']} occurrences; top-2 experts "
            f"{record[keyword]['top2']} (nPMI {[round(t[2], 3) for t in top5[:2]]})")
    return record


def keyword_bits(evaluator: Any, variables: dict[str, Any], windows: list[np.ndarray],
                 masks: dict[str, list[np.ndarray]], intervention: Any,
                 bytes_table: np.ndarray | None = None) -> dict[str, Any]:
    """Bits per byte of the model under the intervention on the evaluation windows: overall (``evaluator``, a
    ``moejax.evaluate.Evaluator``), and from its per-position cross-entropy (``token_losses``) over every position
    ('bits_per_byte_pass2') and over each keyword's target positions (masks: per keyword, per window [B, S]),
    divided by their text bytes (``bytes_table``: bytes per token id; None: one byte per token)."""
    started = time.perf_counter()
    result = evaluator(variables, windows, intervention=intervention)
    sums = {kw: 0.0 for kw in masks}
    size = {kw: 0.0 for kw in masks}
    total, total_bytes = 0.0, 0.0
    for i, window in enumerate(windows):
        nll = evaluator.token_losses(variables, window, intervention)
        nbytes = np.ones(nll.shape) if bytes_table is None else np.asarray(bytes_table)[np.asarray(window)[:, 1:]]
        total += float(nll.sum())
        total_bytes += float(nbytes.sum())
        for kw, kw_masks in masks.items():
            sums[kw] += float(nll[kw_masks[i]].sum())
            size[kw] += float(nbytes[kw_masks[i]].sum())
    ln2 = math.log(2)
    return {"bits_per_byte": float(result["bits_per_byte"]), "loss": float(result["loss"]),
            "bits_per_byte_pass2": total / (total_bytes * ln2),
            "keyword_bits_per_byte": {kw: sums[kw] / (max(size[kw], 1.0) * ln2) for kw in masks},
            "seconds": time.perf_counter() - started}
