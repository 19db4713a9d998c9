"""Self-speculative decoding with the model's multi-token-prediction module (moejax/speculative_mtp.py): greedy tokens
equal plain greedy decoding, the proposals are the MTP chain computed without a cache, sampling runs, and the
command line's --speculative=mtp. (The MTP logits of released checkpoints against vLLM's forward:
tests/hf/test_hf_mtp.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import checks, generate, kv_cache, model, speculative, speculative_mtp
from tests.helpers_hf import GOLDEN

PROMPTS = np.random.default_rng(0).integers(0, 64, (3, 5))


@pytest.fixture(scope="module")
def mtp_model():
    config = base.get_config()
    config.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, ffn_dim=64, moe_every=0, mtp_depth=1,
                        init_std=0.2)  # a wide init: uneven logits, so proposals are sometimes kept
    variables = model.Transformer(config.model).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))
    return config, {"params": variables["params"]}


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_tokens_are_plain_greedy(mtp_model, gamma):
    config, variables = mtp_model
    want = generate.generate(config, variables, PROMPTS, max_new_tokens=11, eos_id=9)
    got, stats = speculative.generate_mtp(config, variables, PROMPTS, max_new_tokens=11, gamma=gamma, eos_id=9)
    np.testing.assert_array_equal(got, want)
    assert stats["target_passes"] <= 11 and stats["draft_passes"] == 1 + (stats["target_passes"] - 1) * gamma


def test_proposals_are_the_mtp_chain(mtp_model):
    """The first round's proposals equal the chain computed in one uncached pass: the MTP module over the prompt's
    rows (h_t, token t + 1) then, one position on, its own output hidden state with the previous proposal."""
    config, variables = mtp_model
    cfg = kv_cache.decode_config(config)
    prompts = jnp.asarray(PROMPTS, jnp.int32)
    logits, mutated = model.Transformer(cfg).apply(variables, prompts, mutable=[model.HIDDEN_COLLECTION])
    hidden = mutated[model.HIDDEN_COLLECTION]["last"][0]
    token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    gamma, width = 3, PROMPTS.shape[1]
    drafter = speculative_mtp.Drafter(cfg, variables, width + 8, gamma, (0.0, 0, 1.0), {})
    drafter.start(prompts, token, hidden)
    proposals, q = drafter.propose(token, width, jax.random.key(0))
    assert q is None
    mtp = speculative_mtp.MTPDraft(cfg)
    mtp_vars = speculative_mtp.variables_of(variables)
    rows_h, rows_t = hidden, jnp.concatenate([prompts[:, 1:], token[:, None]], 1)
    want = []
    for _ in range(gamma):  # each step: the whole chain so far, recomputed from slot 0 without a cache
        length = rows_t.shape[1]
        cache = kv_cache.Cache(length, jnp.asarray(0, jnp.int32), jnp.zeros((PROMPTS.shape[0],), jnp.int32))
        (out_logits, out_h), _ = mtp.apply(mtp_vars, rows_h, rows_t, cache, mutable=[kv_cache.COLLECTION])
        nxt = jnp.argmax(out_logits[:, -1], -1).astype(jnp.int32)
        want.append(np.asarray(nxt))
        rows_h = jnp.concatenate([rows_h, out_h[:, -1:]], 1)
        rows_t = jnp.concatenate([rows_t, nxt[:, None]], 1)
    np.testing.assert_array_equal(np.asarray(proposals), np.stack(want, 1))


def test_sampled_mtp_decoding_runs(mtp_model):
    config, variables = mtp_model
    tokens, stats = speculative.generate_mtp(config, variables, PROMPTS, max_new_tokens=6, gamma=2,
                                             temperature=0.8, top_k=10, rng=jax.random.key(1))
    assert tokens.shape == (3, 11) and (tokens >= 0).all() and (tokens < 64).all()
    np.testing.assert_array_equal(tokens[:, :5], PROMPTS)
    assert 0 <= stats["acceptance_rate"] <= 1


def test_a_model_without_mtp_modules_is_refused():
    config = base.get_config()
    config.model.update(vocab_size=64, d_model=32, num_layers=1, num_heads=2, ffn_dim=64, moe_every=0)
    with pytest.raises(checks.ConfigError, match="model.mtp_depth=0"):
        speculative.generate_mtp(config, {"params": {}}, PROMPTS, max_new_tokens=4)


def test_the_generate_command_decodes_with_the_mtp_module(capsys):
    """The command's tokens are generate_mtp's (which equal plain greedy decoding: above, tests/hf/test_hf_mtp.py)."""
    from moejax import hf

    directory = str(GOLDEN / "glm4_moe_a")
    tokens = generate.main([f"--checkpoint={directory}", "--speculative=mtp", "--gamma=2", "--max_new_tokens=5"])
    assert "target passes, acceptance" in capsys.readouterr().err
    config, variables = hf.load(directory)
    want, _ = speculative.generate_mtp(config, variables, tokens[:, :-5], max_new_tokens=5, gamma=2)
    np.testing.assert_array_equal(tokens, want)
