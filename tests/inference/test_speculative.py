"""Speculative decoding with a draft model (moejax/speculative.py): its tokens are the target's plain greedy decoding
(moejax.generate, one token per pass) whatever the draft, the draft only changes how many target passes it takes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import checks, generate, model, speculative


def tiny(layers, seed, **moe):
    config = base.get_config()
    config.model.update(vocab_size=64, d_model=32, num_layers=layers, num_heads=2, ffn_dim=64)
    config.model.moe.update(num_experts=4, top_k=2, expert_ffn=16, **moe)
    variables = model.Transformer(config.model).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return config, variables


@pytest.fixture(scope="module")
def target():
    return tiny(2, 0)


PROMPTS = np.random.default_rng(0).integers(0, 64, (3, 5))


def test_a_perfect_draft_accepts_every_proposal(target):
    config, variables = target
    want = generate.generate(config, variables, PROMPTS, max_new_tokens=17)
    got, stats = speculative.generate(config, variables, config, variables, PROMPTS, max_new_tokens=17, gamma=4)
    np.testing.assert_array_equal(got, want)
    assert stats["acceptance_rate"] == 1.0 and stats["target_passes"] == 1 + 4  # 1 + 4 rounds of 5 tokens >= 16


@pytest.mark.parametrize("gamma", [1, 3])
def test_another_draft_gives_the_targets_greedy_tokens(target, gamma):
    config, variables = target
    draft_config, draft_variables = tiny(1, 7, num_shared=1)
    want = generate.generate(config, variables, PROMPTS, max_new_tokens=12, eos_id=9)
    got, stats = speculative.generate(config, variables, draft_config, draft_variables, PROMPTS, max_new_tokens=12,
                                      gamma=gamma, eos_id=9)
    np.testing.assert_array_equal(got, want)
    assert stats["target_passes"] <= 12 and 0 <= stats["acceptance_rate"] <= 1


def test_bad_inputs_are_named(target):
    config, variables = target
    other, other_variables = tiny(1, 1)
    other.model.vocab_size = 32
    with pytest.raises(checks.ConfigError, match="draft_config.model.vocab_size=32"):
        speculative.generate(config, variables, other, other_variables, PROMPTS, max_new_tokens=4)
    with pytest.raises(checks.ConfigError, match="gamma=0"):
        speculative.generate(config, variables, config, variables, PROMPTS, max_new_tokens=4, gamma=0)


def test_the_generate_command_decodes_with_a_draft(bpe_release, capsys):
    directory = bpe_release[0]
    tokens = generate.main([f"--checkpoint={directory}", f"--draft={directory}", "--prompt=def f(x):",
                            "--max_new_tokens=6", "--gamma=2"])
    want = generate.main([f"--checkpoint={directory}", "--prompt=def f(x):", "--max_new_tokens=6"])
    np.testing.assert_array_equal(tokens, want)
    assert "acceptance 1.00" in capsys.readouterr().err
    sampled = generate.main([f"--checkpoint={directory}", f"--draft={directory}", "--prompt=def f(x):",
                             "--max_new_tokens=3", "--gamma=2", "--temperature=0.5", "--seed=1"])
    assert sampled.shape == (1, tokens.shape[1] - 3)
    with pytest.raises(ValueError, match="--speculative='mtp': needs a model with multi-token-prediction modules"):
        generate.main([f"--checkpoint={directory}", "--speculative=mtp", "--max_new_tokens=3"])
