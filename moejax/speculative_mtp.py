"""Self-speculative drafting with the model's own multi-token-prediction (MTP) module (DeepSeek-V3, arXiv 2412.19437,
section 2.2; model.mtp_depth >= 1, trained by moejax or loaded from a DeepSeek-V3 / GLM-4.5 checkpoint): the MTP
module drafts, the main model verifies (moejax/speculative.py runs the rounds).

The MTP module at position s reads the main model's last hidden state h_s (before the final norm) and the embedding
of the token at s + 1, and predicts the token at s + 2: enorm / hnorm, eh_proj of [enorm(e); hnorm(h)], one decoder
block (with its own KV cache), its norm and the shared output head (moejax.model.MTPModule). Drafting follows
vLLM's MTP proposer (an EAGLE-style chain): after the main model verified the tokens up to slot s (the next token,
at s + 1, known), the module reads the verified rows (h_t, token t + 1) for the slots t of the round and proposes
the token at s + 2 from row s; each further proposal feeds the module its own output hidden state of the previous
step with the embedding of the previous proposal, one slot on. The first module drafts every proposal (vLLM cycles
through num_nextn_predict_layers modules; the released models have one).

Cache bookkeeping is the draft model's (moejax/speculative.py): rows the round does not keep are overwritten before
any query reads them. The catch-up rows of a round are padded to gamma + 1 (one compiled shape); the padding rows
lie past the kept ones and are overwritten by the chain or the next round.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import kv_cache, model
from moejax import speculative_accept as accept
from moejax.adapters import lora


class MTPDraft(nn.Module):
    """(hidden [B, R, D], next tokens [B, R]) -> (logits [B, R, V] float32, the module's output hidden [B, R, D]);
    its parameters are the model's own ``embed``, ``mtp_1`` and ``lm_head`` (``variables_of``)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, hidden: jax.Array, tokens: jax.Array, cache: kv_cache.Cache) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype, name="embed")
        out, normed = model.MTPModule(cfg, None, cfg.num_layers, name="mtp_1")(
            hidden, embed(tokens), tokens, False, None, cache)
        if cfg.tie_embeddings:
            logits = embed.attend(normed)
        else:
            logits = lora.Dense(cfg.vocab_size, use_bias=cfg.lm_head_bias, dtype=dtype, param_dtype=param_dtype,
                                lora=lora.spec(cfg), name="lm_head")(normed)
        return logits.astype(jnp.float32), out


def variables_of(variables: dict[str, Any]) -> dict[str, Any]:
    """The model variables MTPDraft reads."""
    params = variables["params"]
    out = {"params": {key: params[key] for key in ("embed", "mtp_1", "lm_head") if key in params}}
    state = (variables.get("moe_state") or {}).get("mtp_1")
    if state is not None:
        out["moe_state"] = {"mtp_1": state}
    return out


def build(cfg: ml_collections.ConfigDict, length: int, gamma: int, sampling: tuple[float, int, float]):
    """The jitted drafting round: propose(mtp_vars, cache, rows_hidden [B, R, D], earlier [B, R - 1], new [B], first
    slot, last kept row r, rng) -> (proposals [B, gamma], q [B, gamma, V] or None, cache). Row t of the rows is slot
    first + t and reads the token after it: earlier[:, t] for t < r, new for t = r (later rows are padding);
    sampling: (temperature, top_k, top_p) of the proposals (accept.picker)."""
    module = MTPDraft(cfg)
    pick = accept.picker(*sampling)

    def run(variables, cache, hidden, tokens, index):
        where = kv_cache.Cache(length, jnp.asarray(index, jnp.int32), jnp.zeros((tokens.shape[0],), jnp.int32))
        (logits, out), mutated = module.apply({**variables, **cache}, hidden, tokens, where,
                                              mutable=[kv_cache.COLLECTION])
        return logits, out, mutated

    def propose(variables, cache, rows_hidden, earlier, new, first, last, rng):
        rows_tokens = jnp.concatenate([earlier, new[:, None]], axis=1).at[:, last].set(new)
        logits, out, cache = run(variables, cache, rows_hidden, rows_tokens, first)
        keys = jax.random.split(rng, gamma)
        token, dist = pick(logits[:, last], keys[0])
        hidden = out[:, last]
        tokens, dists = [token], [dist]
        for j in range(1, gamma):
            logits, out, cache = run(variables, cache, hidden[:, None], token[:, None], first + last + j)
            token, dist = pick(logits[:, 0], keys[j])
            hidden = out[:, 0]
            tokens.append(token)
            dists.append(dist)
        q = None if dists[0] is None else jnp.stack(dists, axis=1)
        return jnp.stack(tokens, axis=1), q, cache

    return jax.jit(propose)


class Drafter:
    """The MTP drafter of speculative.decode: start, propose, after (the verified round)."""

    def __init__(self, cfg: ml_collections.ConfigDict, variables: dict[str, Any], length: int, gamma: int,
                 sampling: tuple[float, int, float], built: dict[Any, Any]):
        key = ("mtp", cfg.to_json(), length, gamma, sampling)
        if key not in built:
            built[key] = build(cfg, length, gamma, sampling)
        self.propose_fn = built[key]
        self.variables = variables_of(variables)
        self.passes = gamma  # draft passes per round: the catch-up rows, then gamma - 1 chained steps

    def start(self, prompts: jax.Array, token: jax.Array, hidden: jax.Array) -> None:
        self.cache: dict[str, Any] = {}
        self.rows = (hidden, prompts[:, 1:], 0, prompts.shape[1] - 1)

    def propose(self, token: jax.Array, index: int, rng: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        hidden, earlier, first, last = self.rows
        proposals, q, self.cache = self.propose_fn(self.variables, self.cache, hidden, earlier, token, first, last,
                                                   rng)
        return proposals, q

    def after(self, hidden: jax.Array, proposals: jax.Array, new: jax.Array, n: int, index: int) -> None:
        """The verified rows of the round: slots index .. index + n (hidden of the target's pass over [token,
        proposals]), each with the token after it (proposals 1..n, then the new token, which propose receives);
        the rest padding."""
        self.rows = (hidden, proposals, index, n)
