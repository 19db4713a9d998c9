"""Speculative decoding with a draft model (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv
2302.01318), greedy: a small moejax model (the draft) proposes ``gamma`` tokens one at a time, the target model reads
the last accepted token and the proposals in one cached forward pass, and the longest prefix of proposals that
equals the target's own greedy choices is kept, followed by the target's token after it. The output is the target's
greedy decoding (up to floating-point differences between a one-token and a multi-token cached forward, which only
matter at an exact tie of two logits), produced with fewer target passes when the draft agrees with the target.

    tokens, stats = speculative.generate(config, variables, draft_config, draft_variables, prompts,
                                         max_new_tokens=64, gamma=4)
    stats  # {'target_passes', 'draft_passes', 'accepted', 'proposed', 'acceptance_rate', 'tokens_per_pass'}

Rows of a batch advance together: a round keeps the fewest proposals any row accepted (every row's kept tokens are
still its target's greedy tokens). Both caches are written past the accepted tokens by the proposals; the next
round writes over those slots, and a query never reads a slot after its own (moejax/kv_cache.py), so nothing is
rolled back. Sliding-window (ring) caches would lose the overwritten keys and are refused; prompts are full rows
(no ragged batches), one device, greedy only.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checks, kv_cache, model
from moejax.kv_cache import decode_config


def _check(cfg: ml_collections.ConfigDict, length: int, field: str) -> None:
    windows = [model.attention_window(cfg, i) for i in range(cfg.num_layers)]
    if any(0 < w < length for w in windows):
        checks.fail(field, f"sliding windows {sorted(set(w for w in windows if w))}", f"speculative decoding rolls "
                    f"its caches back by overwriting slots, which a sliding-window ring of fewer than {length} "
                    f"slots cannot: decode this model with moejax.generate")


def _forward(module: model.Transformer, length: int):
    def run(variables, caches, tokens, index):
        cache = kv_cache.Cache(length, jnp.asarray(index, jnp.int32), jnp.zeros((tokens.shape[0],), jnp.int32))
        logits, mutated = module.apply({**variables, **caches}, tokens, cache=cache, mutable=[kv_cache.COLLECTION])
        return logits, mutated
    return run


def _build(target_cfg: ml_collections.ConfigDict, draft_cfg: ml_collections.ConfigDict, length: int, gamma: int):
    target = _forward(model.Transformer(target_cfg), length)
    draft = _forward(model.Transformer(draft_cfg), length)

    def prefill(target_vars, draft_vars, prompts):
        logits, target_cache = target(target_vars, {}, prompts, 0)
        _, draft_cache = draft(draft_vars, {}, prompts, 0)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), target_cache, draft_cache

    def propose(draft_vars, draft_cache, token, index):
        """gamma proposals after ``token`` (at slot index); the draft reads token and the gamma proposals (gamma + 1
        passes) so that its cache holds every slot a round can accept."""
        def body(carry, j):
            cache, current = carry
            logits, cache = draft(draft_vars, cache, current[:, None], index + j)
            nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            return (cache, nxt), nxt

        (cache, _), proposals = jax.lax.scan(body, (draft_cache, token), jnp.arange(gamma + 1))
        return proposals[:gamma].T, cache

    def verify(target_vars, target_cache, tokens, index):
        logits, cache = target(target_vars, target_cache, tokens, index)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    return jax.jit(prefill), jax.jit(propose), jax.jit(verify)


_BUILT: dict[Any, Any] = {}


def generate(config: ml_collections.ConfigDict, variables: dict[str, Any], draft_config: ml_collections.ConfigDict,
             draft_variables: dict[str, Any], prompts: Any, *, max_new_tokens: int, gamma: int = 4,
             eos_id: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """prompts [B, P] -> (tokens [B, P + max_new_tokens] int32, statistics), the target's greedy continuation.
    After a row emits ``eos_id`` its later tokens are eos_id. ``gamma``: proposals per round (>= 1)."""
    target_cfg, draft_cfg = decode_config(config), decode_config(draft_config)
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer) or prompts.shape[1] < 1:
        checks.fail("prompts", f"array of shape {prompts.shape}", "must be a [batch, prompt_length] integer array")
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        checks.fail("draft_config.model.vocab_size", draft_cfg.vocab_size,
                    f"must equal the target's model.vocab_size={target_cfg.vocab_size} (one tokenizer)")
    if prompts.min() < 0 or prompts.max() >= target_cfg.vocab_size:
        checks.fail("prompts", f"ids in [{prompts.min()}, {prompts.max()}]",
                    f"must be token ids in [0, model.vocab_size={target_cfg.vocab_size})")
    for name, value in (("max_new_tokens", max_new_tokens), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            checks.fail(name, value, "must be an integer >= 1")
    batch, width = prompts.shape
    length = width + max_new_tokens + gamma + 1
    _check(target_cfg, length, "config.model")
    _check(draft_cfg, length, "draft_config.model")
    key = (target_cfg.to_json(), draft_cfg.to_json(), length, gamma)
    if key not in _BUILT:
        _BUILT[key] = _build(target_cfg, draft_cfg, length, gamma)
    prefill, propose, verify = _BUILT[key]
    target_vars = {k: v for k, v in variables.items() if k in ("params", "moe_state")}
    draft_vars = {k: v for k, v in draft_variables.items() if k in ("params", "moe_state")}
    token, target_cache, draft_cache = prefill(target_vars, draft_vars, jnp.asarray(prompts, jnp.int32))
    out = [np.asarray(token)[:, None]]
    produced, index = 1, width
    passes = drafts = accepted = proposed = 0
    while produced < max_new_tokens:
        proposals, draft_cache = propose(draft_vars, draft_cache, token, index)
        greedy, target_cache = verify(target_vars, target_cache, jnp.concatenate([token[:, None], proposals], 1),
                                      index)
        proposals, greedy = np.asarray(proposals), np.asarray(greedy)
        agree = np.cumprod(proposals == greedy[:, :gamma], axis=1).sum(1)
        n = int(agree.min())
        new = np.concatenate([proposals[:, :n], greedy[:, n:n + 1]], axis=1)
        out.append(new)
        passes, drafts = passes + 1, drafts + gamma + 1
        accepted, proposed = accepted + n, proposed + gamma
        produced += n + 1
        index += n + 1
        token = jnp.asarray(greedy[:, n], jnp.int32)
    tokens = np.concatenate([prompts.astype(np.int32), np.concatenate(out, axis=1)[:, :max_new_tokens]], axis=1)
    if eos_id is not None:
        new = tokens[:, width:]
        after = np.cumsum(new == eos_id, axis=1) > 0
        stopped = np.concatenate([np.zeros((batch, 1), bool), after[:, :-1]], axis=1)
        tokens[:, width:] = np.where(stopped, eos_id, new)
    stats = {"target_passes": passes + 1, "draft_passes": drafts + 1, "accepted": accepted, "proposed": proposed,
             "acceptance_rate": accepted / proposed if proposed else None,
             "tokens_per_pass": max_new_tokens / (passes + 1)}
    return tokens, stats


def command(args: Any, config: Any, variables: Any, ids: list[int], tokenizer: Any) -> np.ndarray:
    """``python -m moejax.generate --draft=DIR``: ``generate``, printed when done, with its acceptance statistics."""
    import argparse
    import sys
    import time

    from moejax import cli

    if args.temperature > 0 or args.gamma < 1:
        raise cli.flag_error(*(("temperature", args.temperature, "--draft decodes greedily: 0") if args.temperature > 0
                               else ("gamma", args.gamma, "must be an integer >= 1")))
    draft = cli.open_checkpoint(argparse.Namespace(checkpoint=args.draft, step=None))
    began = time.perf_counter()
    tokens, stats = generate(config, variables, draft.config, draft.variables, np.asarray([ids]),
                                         max_new_tokens=args.max_new_tokens, gamma=args.gamma,
                                         eos_id=tokenizer.eos_id)
    print(args.prompt + tokenizer.decode(tokens[0, len(ids):].tolist()))
    print(f"[{args.max_new_tokens} tokens in {time.perf_counter() - began:.2f}s, {stats['target_passes']} target "
          f"passes, acceptance {stats['acceptance_rate']:.2f}]", file=sys.stderr)
    return tokens
