"""Sampled speculative decoding (moejax/speculative_accept.py, moejax/speculative.py): the acceptance rule of arXiv
2211.17192 / 2302.01318 against a numpy transcription with the same uniforms (the same accepted counts and tokens),
and the tokens of a whole decoding distributed as the target's plain sampling (chi-square against the exact
distribution of the first three tokens, computed from the target's full forward)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base
from scipy import stats as scipy_stats

from moejax import checks, model, speculative
from moejax import speculative_accept as accept


def draw_np(weights, u):
    """The first token whose cumulative weight exceeds u * total."""
    cumulative = np.cumsum(weights)
    return min(int(np.sum(cumulative <= u * cumulative[-1])), len(weights) - 1)


def accept_np(p, q, proposals, u_accept, u_fix):
    """Leviathan et al. Algorithm 1 for one row: accept x_i while u_i < p_i(x_i) / q_i(x_i); at the first rejection
    draw from norm(max(0, p_i - q_i)); after gamma acceptances the bonus draw from p_{gamma+1}."""
    gamma = len(proposals)
    for i, x in enumerate(proposals):
        if not u_accept[i] < p[i, x] / q[i, x]:
            residual = np.maximum(p[i] - q[i], 0.0)
            return i, draw_np(residual if residual.sum() > 0 else p[i], u_fix)
    return gamma, draw_np(p[gamma], u_fix)


def distributions(rng, shape, zeros):
    d = rng.dirichlet(np.full(shape[-1], 0.7), shape[:-1])
    d[..., :zeros] = 0.0  # tokens outside a top-k cut
    return (d / d.sum(-1, keepdims=True)).astype(np.float32)


def test_the_acceptance_rule_is_the_papers():
    rng = np.random.default_rng(0)
    batch, gamma, vocab = 200, 3, 7
    p = distributions(rng, (batch, gamma + 1, vocab), 1)
    q = distributions(rng, (batch, gamma, vocab), 2)
    proposals = np.array([[rng.choice(vocab, p=q[b, i] / q[b, i].sum()) for i in range(gamma)] for b in range(batch)])
    u_accept, u_fix = rng.random((batch, gamma), np.float32), rng.random(batch, np.float32)
    accepted, fix = accept.accept_sampled(jnp.asarray(p), jnp.asarray(q), jnp.asarray(proposals, jnp.int32),
                                          jnp.asarray(u_accept), jnp.asarray(u_fix))
    want = [accept_np(p[b].astype(np.float64), q[b].astype(np.float64), proposals[b], u_accept[b], u_fix[b])
            for b in range(batch)]
    np.testing.assert_array_equal(np.asarray(accepted), [a for a, _ in want])
    np.testing.assert_array_equal(np.asarray(fix), [t for _, t in want])
    assert set(np.asarray(accepted).tolist()) == set(range(gamma + 1))  # every branch taken
    assert not np.any(np.asarray(fix) == 0)  # p gives token 0 no mass: never drawn
    n, new = accept.next_tokens(accepted, fix, jnp.asarray(proposals, jnp.int32))
    padded = np.concatenate([proposals, np.asarray(fix)[:, None]], 1)
    np.testing.assert_array_equal(np.asarray(new), np.where(np.asarray(accepted) > int(n), padded[:, int(n)],
                                                            np.asarray(fix)))


def test_greedy_rule_keeps_the_agreeing_prefix():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 5)), jnp.float32)
    greedy = np.asarray(jnp.argmax(logits, -1))
    proposals = greedy[:, :3].copy()
    proposals[1, 1] = (proposals[1, 1] + 1) % 5
    proposals[2, 0] = (proposals[2, 0] + 1) % 5
    accepted, fix = accept.accept_greedy(logits, jnp.asarray(proposals, jnp.int32))
    np.testing.assert_array_equal(np.asarray(accepted), [3, 1, 0])
    np.testing.assert_array_equal(np.asarray(fix), [greedy[0, 3], greedy[1, 1], greedy[2, 0]])


VOCAB = 4


def tiny(seed, layers, sharpen):
    config = base.get_config()
    config.model.update(vocab_size=VOCAB, d_model=32, num_layers=layers, num_heads=2, ffn_dim=64, moe_every=0)
    variables = model.Transformer(config.model).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    params = dict(variables["params"])
    params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * sharpen}  # distinct, uneven distributions
    return config, {"params": params}


def exact_joint(config, variables, prompt, steps):
    """P(x_1 .. x_steps | prompt) of plain sampling at temperature 1, from one full forward of every sequence
    (causal: position t's logits see only the tokens up to t)."""
    sequences = list(itertools.product(range(VOCAB), repeat=steps))
    batch = np.array([list(prompt) + list(seq[:-1]) for seq in sequences])
    logits = jax.jit(model.Transformer(config.model).apply)(variables, jnp.asarray(batch, jnp.int32))
    probs = np.asarray(jax.nn.softmax(logits[:, len(prompt) - 1:]), np.float64)  # [N, steps, V]
    return {seq: float(np.prod([probs[n, t, x] for t, x in enumerate(seq)])) for n, seq in enumerate(sequences)}


def test_sampled_decoding_is_distributed_as_plain_sampling():
    target, target_vars = tiny(0, 2, 60.0)
    # the draft: the target with a flatter head, close enough that whole rounds are often kept
    params = dict(target_vars["params"])
    params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * 0.6}
    draft, draft_vars = target, {**target_vars, "params": params}
    prompt, steps, rows, calls = [1, 3, 2], 3, 8, 200
    joint = exact_joint(target, target_vars, prompt, steps)
    counts = dict.fromkeys(itertools.product(range(VOCAB), repeat=steps), 0)
    kept = proposed = 0
    for call in range(calls):
        tokens, stats = speculative.generate(target, target_vars, draft, draft_vars, np.tile(prompt, (rows, 1)),
                                             max_new_tokens=steps, gamma=2, temperature=1.0,
                                             rng=jax.random.key(call))
        for row in tokens[:, len(prompt):]:
            counts[tuple(row)] += 1
        kept, proposed = kept + stats["accepted"], proposed + stats["proposed"]
    cells = sorted(counts)
    expected = np.array([joint[c] for c in cells]) * rows * calls
    observed = np.array([counts[c] for c in cells])
    assert observed[expected == 0].sum() == 0
    big = expected >= 5  # pool the rare cells into one
    f_obs = np.append(observed[big], observed[~big].sum())
    f_exp = np.append(expected[big], expected[~big].sum())
    f_exp *= f_obs.sum() / f_exp.sum()  # float rounding of the exact probabilities
    assert scipy_stats.chisquare(f_obs, f_exp).pvalue > 1e-3, (f_obs, f_exp)
    assert 0 < kept < proposed  # rounds kept some proposals and rejected others


def test_sampling_needs_a_key():
    config, variables = tiny(0, 1, 1.0)
    with pytest.raises(checks.ConfigError, match="rng=None"):
        speculative.generate(config, variables, config, variables, np.zeros((1, 2), int), max_new_tokens=2,
                             temperature=0.5)
    with pytest.raises(checks.ConfigError, match="top_p=0"):
        speculative.generate(config, variables, config, variables, np.zeros((1, 2), int), max_new_tokens=2,
                             temperature=0.5, top_p=0, rng=jax.random.key(0))
