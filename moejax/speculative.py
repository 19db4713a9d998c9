"""Speculative decoding (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318): a drafter
proposes ``gamma`` tokens, the target model reads the last token and the proposals in one cached forward pass, and
the acceptance rule (moejax/speculative_accept.py) keeps a prefix of the proposals and adds one token of its own,
so every round yields 1 to gamma + 1 tokens for one target pass. Two drafters:

* a smaller moejax model sharing the vocabulary (``generate``), proposing one token per pass;
* the model's own multi-token-prediction module (``generate_mtp``; model.mtp_depth >= 1, moejax/speculative_mtp.py):
  self-speculative decoding with no second model.

    tokens, stats = speculative.generate(config, variables, draft_config, draft_variables, prompts,
                                         max_new_tokens=64, gamma=4)
    tokens, stats = speculative.generate_mtp(config, variables, prompts, max_new_tokens=64, gamma=2,
                                             temperature=0.7, rng=jax.random.key(0))
    stats  # {'target_passes', 'draft_passes', 'accepted', 'proposed', 'acceptance_rate', 'tokens_per_pass'}

Greedy (temperature 0, the default), the tokens are the target's greedy decoding (up to floating-point differences
between a one-token and a multi-token cached forward, which only matter at an exact tie of two logits). With a
temperature (and top-k, top-p), the proposals are drawn from the drafter's distribution and the tokens are
distributed as the target's own sampling at those settings.

Rows of a batch advance together by the fewest proposals any row kept (each row's next token is then its own kept
proposal or its own correction: speculative_accept.next_tokens). The caches are written past the kept tokens by the
proposals; the next round writes over those slots, and a query never reads a slot after its own (moejax/kv_cache.py),
so nothing is rolled back. Sliding-window and chunked (ring) caches would lose the overwritten keys and are refused;
prompts are full rows (no ragged batches), one device. ``acceptance_rate`` counts the proposals the batch kept over
those made.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import checks, kv_cache, linear_attention, model, sampling, speculative_mtp
from moejax import speculative_accept as accept
from moejax.kv_cache import decode_config


def _check(cfg: ml_collections.ConfigDict, length: int, field: str) -> None:
    linear_attention.rewind_problem(cfg, field)
    windows = [model.attention_window(cfg, i) or model.attention_chunk(cfg, i) for i in range(cfg.num_layers)]
    if any(0 < w < length for w in windows):  # a chunked layer's cache is a ring of one chunk
        checks.fail(field, f"sliding windows or chunks {sorted(set(w for w in windows if w))}", f"speculative "
                    f"decoding rolls its caches back by overwriting slots, which a ring of fewer than {length} "
                    f"slots cannot: decode this model with moejax.generate")


def _forward(module: model.Transformer, length: int, hidden: bool = False):
    """run(variables, caches, tokens [B, S], index) -> (logits [B, S, V], the last block's output [B, S, D] or
    None, caches)."""
    collections = [kv_cache.COLLECTION, model.HIDDEN_COLLECTION] if hidden else [kv_cache.COLLECTION]

    def run(variables, caches, tokens, index):
        cache = kv_cache.Cache(length, jnp.asarray(index, jnp.int32), jnp.zeros((tokens.shape[0],), jnp.int32))
        logits, mutated = module.apply({**variables, **caches}, tokens, cache=cache, mutable=collections)
        last = mutated.pop(model.HIDDEN_COLLECTION)["last"][0] if hidden else None
        return logits, last, {kv_cache.COLLECTION: mutated[kv_cache.COLLECTION]}
    return run


def _build_target(cfg: ml_collections.ConfigDict, length: int, sampling_args: tuple, hidden: bool):
    run = _forward(model.Transformer(cfg), length, hidden)
    pick = accept.picker(*sampling_args)
    temperature, top_k, top_p = sampling_args

    def prefill(variables, prompts, rng):
        logits, last, cache = run(variables, {}, prompts, 0)
        return pick(logits[:, -1], rng)[0], last, cache

    def verify(variables, cache, tokens, index, proposals, q, rng):
        """The target's pass over [token, proposals] and the acceptance rule -> (n, next tokens [B], accepted [B],
        hidden, cache)."""
        logits, last, cache = run(variables, cache, tokens, index)
        if temperature == 0:
            accepted, fix = accept.accept_greedy(logits, proposals)
        else:
            p = accept.probabilities(logits, temperature, top_k, top_p)
            u_accept, u_fix = jax.random.uniform(rng, (2, *proposals.shape))
            accepted, fix = accept.accept_sampled(p, q, proposals, u_accept, u_fix[:, 0])
        n, new = accept.next_tokens(accepted, fix, proposals)
        return n, new, accepted, last, cache

    return jax.jit(prefill), jax.jit(verify)


class _DraftModel:
    """A smaller model as the drafter: gamma proposals after ``token`` (at slot index); it reads token and the
    gamma proposals (gamma + 1 passes) so that its cache holds every slot a round can keep."""

    def __init__(self, cfg, variables, length: int, gamma: int, sampling_args: tuple, built: dict):
        key = ("draft", cfg.to_json(), length, gamma, sampling_args)
        if key not in built:
            run = _forward(model.Transformer(cfg), length)
            pick = accept.picker(*sampling_args)

            def prefill(variables, prompts):
                return run(variables, {}, prompts, 0)[2]

            def propose(variables, cache, token, index, rng):
                def body(carry, inputs):
                    cache, current = carry
                    j, key = inputs
                    logits, _, cache = run(variables, cache, current[:, None], index + j)
                    nxt, dist = pick(logits[:, -1], key)
                    return (cache, nxt), (nxt, dist)

                keys = jax.random.split(rng, gamma + 1)
                (cache, _), (proposals, dists) = jax.lax.scan(body, (cache, token), (jnp.arange(gamma + 1), keys))
                q = None if dists is None else jnp.swapaxes(dists[:gamma], 0, 1)
                return proposals[:gamma].T, q, cache

            built[key] = (jax.jit(prefill), jax.jit(propose))
        self.prefill_fn, self.propose_fn = built[key]
        self.variables = variables
        self.passes = gamma + 1  # draft passes per round

    def start(self, prompts, token, hidden) -> None:
        self.cache = self.prefill_fn(self.variables, prompts)

    def propose(self, token, index: int, rng):
        proposals, q, self.cache = self.propose_fn(self.variables, self.cache, token, index, rng)
        return proposals, q

    def after(self, hidden, proposals, new, n: int, index: int) -> None:
        pass


_BUILT: dict[Any, Any] = {}


def _variables(variables: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in variables.items() if k in ("params", "moe_state")}


def _checked_prompts(prompts: Any, vocab: int) -> np.ndarray:
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer) or prompts.shape[1] < 1:
        checks.fail("prompts", f"array of shape {prompts.shape}", "must be a [batch, prompt_length] integer array")
    if prompts.min() < 0 or prompts.max() >= vocab:
        checks.fail("prompts", f"ids in [{prompts.min()}, {prompts.max()}]",
                    f"must be token ids in [0, model.vocab_size={vocab})")
    return prompts


def _check_args(max_new_tokens, gamma, temperature, top_k, top_p, rng, vocab) -> None:
    for name, value in (("max_new_tokens", max_new_tokens), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            checks.fail(name, value, "must be an integer >= 1")
    problem = sampling.sampling_problem(int(max_new_tokens), temperature, top_k, top_p, vocab)
    if problem is not None:
        checks.fail(*problem)
    if temperature > 0 and rng is None:
        checks.fail("rng", rng, f"sampling at temperature={temperature} needs a jax.random key")


def decode(target_cfg: ml_collections.ConfigDict, variables: dict[str, Any], drafter_of, prompts: np.ndarray, *,
           max_new_tokens: int, gamma: int, eos_id: int | None, sampling_args: tuple, rng: Any,
           hidden: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """The rounds of speculative decoding with the drafter ``drafter_of(length)`` (start, propose, after)."""
    batch, width = prompts.shape
    length = width + max_new_tokens + gamma + 1
    _check(target_cfg, length, "config.model")
    key = ("target", target_cfg.to_json(), length, sampling_args, hidden)
    if key not in _BUILT:
        _BUILT[key] = _build_target(target_cfg, length, sampling_args, hidden)
    prefill, verify = _BUILT[key]
    drafter = drafter_of(length)
    rng = jax.random.key(0) if rng is None else rng
    target_vars = _variables(variables)
    prompts_j = jnp.asarray(prompts, jnp.int32)
    rng, first = jax.random.split(rng)
    token, last, cache = prefill(target_vars, prompts_j, first)
    drafter.start(prompts_j, token, last)
    out = [np.asarray(token)[:, None]]
    produced, index = 1, width
    passes = accepted = proposed = 0
    while produced < max_new_tokens:
        rng, draft_key, verify_key = jax.random.split(rng, 3)
        proposals, q = drafter.propose(token, index, draft_key)
        n, new, _, last, cache = verify(target_vars, cache, jnp.concatenate([token[:, None], proposals], 1),
                                        jnp.asarray(index, jnp.int32), proposals, q, verify_key)
        n = int(n)
        out.append(np.concatenate([np.asarray(proposals)[:, :n], np.asarray(new)[:, None]], axis=1))
        drafter.after(last, proposals, new, n, index)
        passes, accepted, proposed = passes + 1, accepted + n, proposed + gamma
        produced += n + 1
        index += n + 1
        token = new
    tokens = np.concatenate([prompts.astype(np.int32), np.concatenate(out, axis=1)[:, :max_new_tokens]], axis=1)
    if eos_id is not None:
        new_tokens = tokens[:, width:]
        after = np.cumsum(new_tokens == eos_id, axis=1) > 0
        stopped = np.concatenate([np.zeros((batch, 1), bool), after[:, :-1]], axis=1)
        tokens[:, width:] = np.where(stopped, eos_id, new_tokens)
    stats = {"target_passes": passes + 1, "draft_passes": passes * drafter.passes + 1, "accepted": accepted,
             "proposed": proposed, "acceptance_rate": accepted / proposed if proposed else None,
             "tokens_per_pass": max_new_tokens / (passes + 1)}
    return tokens, stats


def generate(config: ml_collections.ConfigDict, variables: dict[str, Any], draft_config: ml_collections.ConfigDict,
             draft_variables: dict[str, Any], prompts: Any, *, max_new_tokens: int, gamma: int = 4,
             eos_id: int | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """prompts [B, P] -> (tokens [B, P + max_new_tokens] int32, statistics) with a draft model sharing the
    vocabulary. After a row emits ``eos_id`` its later tokens are eos_id. ``gamma``: proposals per round (>= 1).
    temperature > 0 (with top_k, top_p, and a jax.random key ``rng``): sampled speculative decoding."""
    target_cfg, draft_cfg = decode_config(config), decode_config(draft_config)
    prompts = _checked_prompts(prompts, target_cfg.vocab_size)
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        checks.fail("draft_config.model.vocab_size", draft_cfg.vocab_size,
                    f"must equal the target's model.vocab_size={target_cfg.vocab_size} (one tokenizer)")
    _check_args(max_new_tokens, gamma, temperature, top_k, top_p, rng, target_cfg.vocab_size)
    args = (float(temperature), int(top_k), float(top_p))

    def drafter_of(length):
        _check(draft_cfg, length, "draft_config.model")
        return _DraftModel(draft_cfg, _variables(draft_variables), length, gamma, args, _BUILT)

    return decode(target_cfg, variables, drafter_of, prompts, max_new_tokens=max_new_tokens, gamma=gamma,
                  eos_id=eos_id, sampling_args=args, rng=rng, hidden=False)


def generate_mtp(config: ml_collections.ConfigDict, variables: dict[str, Any], prompts: Any, *,
                 max_new_tokens: int, gamma: int = 1, eos_id: int | None = None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, rng: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``generate`` with the model's own multi-token-prediction module as the drafter (model.mtp_depth >= 1;
    moejax/speculative_mtp.py)."""
    target_cfg = decode_config(config)
    if target_cfg.get("mtp_depth", 0) < 1:
        checks.fail("model.mtp_depth", target_cfg.get("mtp_depth", 0), "must be >= 1: self-speculative decoding "
                    "drafts with the model's multi-token-prediction module")
    prompts = _checked_prompts(prompts, target_cfg.vocab_size)
    _check_args(max_new_tokens, gamma, temperature, top_k, top_p, rng, target_cfg.vocab_size)
    args = (float(temperature), int(top_k), float(top_p))

    def drafter_of(length):
        return speculative_mtp.Drafter(target_cfg, _variables(variables), length, gamma, args, _BUILT)

    return decode(target_cfg, variables, drafter_of, prompts, max_new_tokens=max_new_tokens, gamma=gamma,
                  eos_id=eos_id, sampling_args=args, rng=rng, hidden=True)


def command(args: Any, config: Any, variables: Any, ids: list[int], tokenizer: Any) -> np.ndarray:
    """``python -m moejax.generate --draft=DIR`` or ``--speculative=mtp``: speculative decoding, printed when done,
    with its acceptance statistics."""
    import argparse
    import sys
    import time

    from moejax import cli

    if args.gamma < 1:
        raise cli.flag_error("gamma", args.gamma, "must be an integer >= 1")
    if args.draft is not None and args.speculative is not None:
        raise cli.flag_error("speculative", args.speculative, "drafts with the model's own MTP module: leave out "
                                                               "--draft")
    if args.speculative == "mtp" and not config.model.get("mtp_depth", 0):
        raise cli.flag_error("speculative", args.speculative, "needs a model with multi-token-prediction modules "
                                                               f"(model.mtp_depth={config.model.get('mtp_depth', 0)})")
    options = dict(max_new_tokens=args.max_new_tokens, gamma=args.gamma, eos_id=tokenizer.eos_id,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   rng=jax.random.key(args.seed) if args.temperature > 0 else None)
    began = time.perf_counter()
    if args.draft is not None:
        draft = cli.open_checkpoint(argparse.Namespace(checkpoint=args.draft, step=None))
        tokens, stats = generate(config, variables, draft.config, draft.variables, np.asarray([ids]), **options)
    else:
        tokens, stats = generate_mtp(config, variables, np.asarray([ids]), **options)
    print(args.prompt + tokenizer.decode(tokens[0, len(ids):].tolist()))
    print(f"[{args.max_new_tokens} tokens in {time.perf_counter() - began:.2f}s, {stats['target_passes']} target "
          f"passes, acceptance {stats['acceptance_rate']:.2f}]", file=sys.stderr)
    return tokens
