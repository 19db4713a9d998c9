"""moejax.generate against independent references: cached decoding gives the full forward's logits at every
position (every attention variant, every router kind that decodes); greedy continuations equal transformers'
``generate`` tokens of the committed golden fixtures; the samplers' distributions equal a numpy reference (exact
support, chi-square); ragged prompts give each row what it gets alone; a mesh with expert=4 gives the
single-device tokens; bad arguments are named; where the decoding chunks end changes no token, and Ctrl-C (even
arriving inside a stream callback) stops decoding between two chunks. The CLI's flags: checked before anything
loads, one line and status 2, and --help shows every flag's help and default."""
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base
from scipy import stats as scipy_stats

from moejax import cli, generate, hf, kv_cache, model, parallel, sampling
from moejax.checks import ConfigError
from tests import helpers_hf
from tests.helpers_configs import REPO, load, small_model


def tiny(**fields):
    cfg = base.get_config().model
    cfg.update(vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=48,
               first_dense_layers=1)
    cfg.moe.update(num_experts=4, top_k=2, expert_ffn=16, dispatch="dropless")
    for key, value in fields.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    model.validate(cfg)
    return cfg


def init(cfg, seed=0):
    return model.Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))


def cached_logits(cfg, variables, tokens, prefill, chunk=1):
    """Prefill tokens[:, :prefill], then feed the rest ``chunk`` tokens at a time; the logits of every position."""
    module = model.Transformer(generate.decode_config(cfg))
    batch, seq = tokens.shape
    start = jnp.zeros((batch,), jnp.int32)
    apply = jax.jit(lambda v, t, c: module.apply(v, t, cache=c, mutable=["cache"]))
    outs, cache_vars = [], {}
    for lo, hi in [(0, prefill)] + [(t, min(t + chunk, seq)) for t in range(prefill, seq, chunk)]:
        logits, cache_vars = apply({**variables, **cache_vars}, tokens[:, lo:hi],
                                   kv_cache.Cache(seq, jnp.int32(lo), start))
        outs.append(logits)
    return np.asarray(jnp.concatenate(outs, axis=1)), cache_vars


ATTENTION_VARIANTS = {
    "gqa": {},
    "qk_norm_proj_bias": dict(qk_norm=True, qk_norm_scope="proj", qkv_bias=True, o_bias=True),
    "qk_norm_head_yarn_interleaved": dict(qk_norm=True, rope_interleave=True, rope_scaling=dict(
        kind="yarn", factor=4.0, original_max_position_embeddings=8)),
    "sliding_sinks": dict(attention_sinks=True, layer_types=("sliding", "full", "sliding"), sliding_window=3),
    "mla_sliding_scanned": dict(attention="mla", num_kv_heads=0, scan_layers=True, sliding_window=3,
                                layer_types=("full", "sliding", "sliding"),
                                mla=dict(q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                         v_head_dim=6)),
    "mla_scanned": dict(attention="mla", num_kv_heads=0, scan_layers=True,
                        mla=dict(q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                 v_head_dim=6)),
    "mla_qlora_yarn": dict(attention="mla", num_kv_heads=0, mla=dict(q_lora_rank=10, kv_lora_rank=12,
                                                                     qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                                     v_head_dim=6),
                           rope_scaling=dict(kind="yarn", factor=4.0, original_max_position_embeddings=8,
                                             mscale=1.0, mscale_all_dim=1.0)),
}


def full_logits(cfg, variables, tokens):
    return np.asarray(jax.jit(model.Transformer(generate.decode_config(cfg)).apply)(variables, tokens))


@pytest.mark.parametrize("variant", sorted(ATTENTION_VARIANTS))
def test_cached_decoding_equals_the_full_forward(variant):
    cfg = tiny(**ATTENTION_VARIANTS[variant])
    variables = init(cfg)
    if cfg.attention_sinks:  # zeros at init: give the sinks values that matter
        variables = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 2.0 if "sinks" in jax.tree_util.keystr(path) else x, variables)
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
    got, _ = cached_logits(cfg, variables, tokens, prefill=5)
    np.testing.assert_allclose(got, full_logits(cfg, variables, tokens), atol=1e-5, rtol=0)


def test_mla_cache_holds_the_latent_only():
    cfg = tiny(**ATTENTION_VARIANTS["mla_scanned"])
    _, cache_vars = cached_logits(cfg, init(cfg), jnp.zeros((2, 6), jnp.int32), prefill=6)
    mla = cfg.mla
    assert kv_cache.bytes_per_token(cache_vars["cache"]) == cfg.num_layers * (mla.kv_lora_rank +
                                                                              mla.qk_rope_head_dim) * 4
    gqa = tiny()
    _, cache_vars = cached_logits(gqa, init(gqa), jnp.zeros((2, 6), jnp.int32), prefill=6)
    assert kv_cache.bytes_per_token(cache_vars["cache"]) == gqa.num_layers * 2 * gqa.num_kv_heads * 8 * 4


@pytest.mark.parametrize("prefill,chunk", [(1, 1), (2, 2), (3, 4), (7, 2), (11, 1)])
def test_sliding_layers_keep_a_ring_of_window_slots(prefill, chunk):
    """Prefills shorter and longer than the window, chunks that wrap the ring: the full forward's logits, with a
    sliding layer's cache holding W = 3 entries where a full layer holds all 11."""
    cfg = tiny(**ATTENTION_VARIANTS["sliding_sinks"])
    variables = init(cfg, seed=4)
    tokens = jax.random.randint(jax.random.key(6), (2, 11), 0, cfg.vocab_size)
    got, cache_vars = cached_logits(cfg, variables, tokens, prefill=prefill, chunk=chunk)
    np.testing.assert_allclose(got, full_logits(cfg, variables, tokens), atol=1e-5, rtol=0)
    slots = {name: layer["attn"]["cached_key"]["slots"].shape[1] for name, layer in cache_vars["cache"].items()}
    assert slots == {"layers_0": 3, "layers_1": 11, "layers_2": 3}
    per_slot = 2 * cfg.num_kv_heads * 8 * 4  # keys and values of one token in one layer, float32
    assert kv_cache.total_bytes(cache_vars["cache"]) == 2 * (3 + 11 + 3) * per_slot
    assert kv_cache.bytes_per_token(cache_vars["cache"]) == cfg.num_layers * per_slot


# every router kind (the zoo config that uses it), at test width
# (plain top-k softmax routing: the other tests' tiny model; deepseek_v3: sigmoid, groups and the selection bias)
ROUTER_CONFIGS = ["top_p", "adamoe", "hash", "expert_choice", "smoe_dropout", "thor", "chain_of_experts",
                  "deepseek_v3"]


@pytest.mark.parametrize("name", ROUTER_CONFIGS)
def test_cached_decoding_equals_the_full_forward_for_every_router(name):
    config = small_model(load(name), num_layers=2, vocab_size=61)
    cfg = config.model
    variables = init(cfg, seed=2)
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
    got, _ = cached_logits(cfg, variables, tokens, prefill=4)
    np.testing.assert_allclose(got, full_logits(cfg, variables, tokens), atol=1e-5, rtol=0)


def naive_greedy(cfg, variables, prompt, steps):
    """Greedy decoding by recomputing the full forward pass for every new token (over the whole final-length
    buffer: the causal mask makes the unwritten tail irrelevant, and one shape compiles once)."""
    width = prompt.shape[1]
    ids = np.zeros((prompt.shape[0], width + steps), np.int32)
    ids[:, :width] = prompt
    forward = jax.jit(model.Transformer(generate.decode_config(cfg)).apply)
    for t in range(width, width + steps):
        ids[:, t] = np.argmax(np.asarray(forward(variables, jnp.asarray(ids)))[:, t - 1], axis=-1)
    return ids


def test_greedy_equals_recomputing_the_forward():
    cfg = tiny(moe=dict(dispatch="capacity", capacity_factor=0.5))  # capacity would drop: decoding is dropless
    variables = init(cfg)
    prompts = np.asarray(jax.random.randint(jax.random.key(4), (3, 5), 0, cfg.vocab_size))
    np.testing.assert_array_equal(generate.generate(cfg, variables, prompts, max_new_tokens=7),
                                  naive_greedy(cfg, variables, prompts, 7))


FAMILY_CASES = [case for case in helpers_hf.CASES if case.endswith("_a")]  # one per family (test_hf: all, no cache)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_greedy_matches_transformers_generate(case):
    golden = np.load(helpers_hf.golden_dir(case) / "golden.npz")
    config, variables = hf.load(helpers_hf.golden_dir(case))
    tokens = generate.generate(config, variables, golden["prompt"], max_new_tokens=golden["greedy"].shape[1])
    np.testing.assert_array_equal(tokens[:, golden["prompt"].shape[1]:], golden["greedy"])


def test_ragged_prompts_give_each_row_what_it_gets_alone():
    cfg = tiny(**ATTENTION_VARIANTS["sliding_sinks"])
    variables = init(cfg)
    prompts = np.asarray(jax.random.randint(jax.random.key(5), (3, 6), 1, cfg.vocab_size))
    lengths = np.array([6, 2, 4])
    got = generate.generate(cfg, variables, prompts, max_new_tokens=5, prompt_lengths=lengths)
    for row, n in enumerate(lengths):
        alone = generate.generate(cfg, variables, prompts[row:row + 1, :n], max_new_tokens=5)[0]
        np.testing.assert_array_equal(got[row, :n + 5], alone)
        assert (got[row, n + 5:] == 0).all()


def test_rows_stop_at_eos():
    cfg = tiny()
    variables = init(cfg)
    prompts = np.asarray(jax.random.randint(jax.random.key(6), (4, 3), 0, cfg.vocab_size))
    free = naive_greedy(cfg, variables, prompts, 6)
    eos = int(free[0, 4])  # row 0 emits it as its second new token
    got = generate.generate(cfg, variables, prompts, max_new_tokens=6, eos_id=eos)
    for row in range(4):
        new = free[row, 3:]
        stop = int(np.argmax(new == eos)) if (new == eos).any() else len(new)
        np.testing.assert_array_equal(got[row, :3 + stop + 1][:len(free[row])], free[row, :3 + stop + 1])
        assert (got[row, 3 + stop:] == eos).all() or stop == len(new)


def reference_distribution(logits, temperature, top_k, top_p):
    """numpy: softmax(logits / T) restricted to the top_k largest, then to the nucleus of what remains (transformers'
    warper order), renormalised."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    order = np.argsort(-z, kind="stable")
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p = p / p.sum()
    if top_p < 1:
        mass, nucleus = 0.0, np.zeros_like(keep)
        for i in order:
            if mass >= top_p:
                break
            nucleus[i] = True
            mass += p[i]
        keep &= nucleus
    q = np.where(keep, np.exp(z - z.max()), 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.6)])
def test_sampler_matches_a_numpy_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(12,)).astype(np.float32) * 1.5
    expected = reference_distribution(logits, temperature, top_k, top_p)
    draws = 40_000
    keys = jax.random.split(jax.random.key(7), draws)
    tokens = jax.jit(jax.vmap(lambda k: sampling.sample(jnp.asarray(logits)[None], k, temperature, top_k,
                                                        top_p)[0]))(keys)
    counts = np.bincount(np.asarray(tokens), minlength=len(logits))
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(expected > 0))  # exactly the reference's support
    support = expected > 0
    chi2 = scipy_stats.chisquare(counts[support], expected[support] * draws)
    assert chi2.pvalue > 1e-3, (counts, expected * draws)


def test_sampling_is_reproducible_and_differs_by_key():
    cfg = tiny()
    variables = init(cfg)
    prompts = np.zeros((2, 3), np.int32)
    def draw(seed):
        return generate.generate(cfg, variables, prompts, max_new_tokens=12, temperature=1.0, rng=jax.random.key(seed))

    np.testing.assert_array_equal(draw(0), draw(0))
    assert (draw(0) != draw(1)).any()


def test_expert_parallel_mesh_gives_the_single_device_tokens():
    config = base.get_config()
    config.model = tiny(moe=dict(num_experts=8))
    config.mesh.update(data=2, expert=4)
    mesh = parallel.make_mesh(config)
    variables = init(config.model)
    prompts = np.asarray(jax.random.randint(jax.random.key(8), (3, 4), 0, config.model.vocab_size))
    one = generate.generate(config, variables, prompts, max_new_tokens=6)
    np.testing.assert_array_equal(generate.generate(config, variables, prompts, max_new_tokens=6, mesh=mesh), one)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=3, top_p=0.0), "top_p"),
    (dict(max_new_tokens=3, top_k=1000), "top_k"),
    (dict(max_new_tokens=3, temperature=1.0), "rng"),
    (dict(max_new_tokens=3, prompt_lengths=[9, 1]), "prompt_lengths"),
])
def test_bad_arguments_are_named(kwargs, field):
    cfg = tiny()
    with pytest.raises(ConfigError, match=field):
        generate.generate(cfg, init(cfg), np.zeros((2, 3), np.int32), **kwargs)


def test_stream_sees_every_new_token_in_order():
    cfg = tiny()
    variables = init(cfg)
    prompts = np.asarray(jax.random.randint(jax.random.key(9), (2, 3), 0, cfg.vocab_size))
    seen = []
    tokens = generate.generate(cfg, variables, prompts, max_new_tokens=5, stream=lambda t: seen.append(t.copy()))
    np.testing.assert_array_equal(np.stack(seen, axis=1), tokens[:, 3:])


def naive_contrast(cfg, variables, prompt, steps, weak, alpha, beta, strong=None):
    """SCMoE by two full forward passes per new token, combined in numpy (float64)."""
    width = prompt.shape[1]
    ids = np.zeros((prompt.shape[0], width + steps), np.int32)
    ids[:, :width] = prompt
    module = model.Transformer(generate.decode_config(cfg))
    forward = jax.jit(lambda v, t, iv: module.apply(v, t, intervention=iv))
    for t in range(width, width + steps):
        z_strong = np.asarray(forward(variables, jnp.asarray(ids), strong), np.float64)[:, t - 1]
        z_weak = np.asarray(forward(variables, jnp.asarray(ids), weak), np.float64)[:, t - 1]
        plausible = z_strong >= np.log(alpha) + z_strong.max(-1, keepdims=True)
        ids[:, t] = np.argmax(np.where(plausible, (1 + beta) * z_strong - beta * z_weak, -np.inf), axis=-1)
    return ids


def test_self_contrast_equals_two_forward_passes_combined():
    from moejax.moe import intervention

    cfg = tiny(init_std=0.5)  # weights large enough that the routing changes the tokens
    variables = init(cfg, seed=4)
    prompts = np.asarray(jax.random.randint(jax.random.key(10), (2, 4), 0, cfg.vocab_size))
    plain = generate.generate(cfg, variables, prompts, max_new_tokens=6)
    for alpha, beta in ((0.1, 0.5),):  # the defaults (the plausibility cut and beta both change tokens here)
        contrast = generate.SelfContrast(rank=2, alpha=alpha, beta=beta)
        got = generate.generate(cfg, variables, prompts, max_new_tokens=6, contrast=contrast)
        want = naive_contrast(cfg, variables, prompts, 6, intervention.rank_only(cfg, 2), alpha, beta)
        np.testing.assert_array_equal(got, want)
        assert (got != plain).any()
    beta0 = generate.generate(cfg, variables, prompts, max_new_tokens=6, contrast=generate.SelfContrast(beta=0.0))
    np.testing.assert_array_equal(beta0, plain)


def test_an_intervention_applies_to_every_decoding_step():
    from moejax.moe import intervention

    cfg = tiny(init_std=0.5)
    variables = init(cfg, seed=5)
    prompts = np.asarray(jax.random.randint(jax.random.key(11), (2, 4), 0, cfg.vocab_size))
    masked = intervention.mask_experts(cfg, {1: [0, 1], 2: [3]})
    got = generate.generate(cfg, variables, prompts, max_new_tokens=6, intervention=masked)
    module = model.Transformer(generate.decode_config(cfg))
    forward = jax.jit(lambda v, t: module.apply(v, t, intervention=masked))
    ids = np.zeros((2, 10), np.int32)
    ids[:, :4] = prompts
    for t in range(4, 10):
        ids[:, t] = np.argmax(np.asarray(forward(variables, jnp.asarray(ids)))[:, t - 1], axis=-1)
    np.testing.assert_array_equal(got, ids)
    assert (got != generate.generate(cfg, variables, prompts, max_new_tokens=6)).any()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_where_the_decoding_chunks_end_changes_no_token(temperature, monkeypatch):
    cfg = tiny()
    variables = init(cfg, seed=3)
    prompts = np.asarray(jax.random.randint(jax.random.key(12), (2, 3), 0, cfg.vocab_size))
    kwargs = dict(max_new_tokens=9, temperature=temperature, rng=jax.random.key(4))
    monkeypatch.setattr(generate, "CHUNK_SECONDS", 0.0)  # a chunk of one step each
    one_by_one = generate.generate(cfg, variables, prompts, **kwargs)
    monkeypatch.setattr(generate, "CHUNK_SECONDS", 1e9)  # chunks of 1, 2, 4, then the rest
    np.testing.assert_array_equal(generate.generate(cfg, variables, prompts, **kwargs), one_by_one)


def test_ctrl_c_inside_a_stream_callback_stops_decoding_between_chunks(monkeypatch):
    """On CPU the stream callback runs on the thread that dispatched the decoding (here the main thread, where
    SIGINT lands): a Ctrl-C arriving there is raised between two chunks, as KeyboardInterrupt, and the handler
    is Python's again afterwards. The test starts from Python's handler (generate only takes over from it), whatever
    the test process had installed."""
    monkeypatch.setattr(generate, "CHUNK_SECONDS", 0.0)
    cfg = tiny()
    seen = []

    def stream(tokens):
        seen.append(tokens)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate.generate(cfg, init(cfg), np.zeros((1, 2), np.int32), max_new_tokens=50, stream=stream)
        assert 3 <= len(seen) <= 4 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("flag,message", [
    ("--max_new_tokens=0", "--max_new_tokens=0: must be an integer >= 1"),
    ("--temperature=-1", "--temperature=-1.0: must be a number >= 0 (0: greedy)"),
    ("--top_p=2", "--top_p=2.0: must be a number in (0, 1] (1: no nucleus cut)"),
    ("--top_k=-3", "--top_k=-3: must be an integer >= 0 (0: no top-k cut)"),
])
def test_cli_checks_its_flags_before_loading(flag, message, env, tmp_path):
    """A bad flag beside a --checkpoint that does not exist: the flag is named (the checkpoint was never opened)."""
    result = subprocess.run([sys.executable, "-m", "moejax.generate", f"--checkpoint={tmp_path / 'missing'}", flag],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [f"error: {message}"], result.stderr
    assert result.stdout == ""


def test_cli_help_shows_every_flag_with_its_help_and_default(capsys):
    assert all(action.help for action in generate.parser()._actions)
    with pytest.raises(SystemExit) as exited:
        generate.main(["--help"])
    assert exited.value.code == 0
    options = " ".join(capsys.readouterr().out.split()).split("options:")[1]
    for flag, default in (("max_new_tokens", 200), ("temperature", 0.0), ("top_k", 0), ("top_p", 1.0), ("seed", 0)):
        assert f"(default: {default})" in options.split(f"--{flag} {flag.upper()}")[1].split(" --")[0], flag
    with pytest.raises(cli.UsageError, match="unrecognized arguments: --topk=3"):
        generate.main(["--checkpoint=x", "--topk=3"])
