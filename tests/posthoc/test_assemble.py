"""Assembling an MoE from dense models (moejax/posthoc/assemble.py).

References: the source model itself (an assembled model whose every token goes to expert i computes source i when the
sources share their other parameters), a regularised least-squares solve in numpy for DUME's ridge router, and the
mean MoE input for FlexOlmo's domain embeddings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import model, moe
from moejax.moe import intervention
from moejax.posthoc import assemble, capture

VOCAB = 256  # byte tokens (the command test reads text)


def dense(seed, shared=None):
    config = base.get_config()
    config.model.update(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, ffn_dim=24, moe_every=0,
                        init_std=0.3)
    variables = jax.tree.map(np.asarray, model.Transformer(config.model).init(jax.random.key(seed),
                                                                               jnp.zeros((1, 4), jnp.int32)))
    if shared is not None:  # every parameter but the FFNs taken from ``shared``
        params = jax.tree.map(np.copy, shared["params"])
        for i in range(2):
            params[f"layers_{i}"]["ffn"] = variables["params"][f"layers_{i}"]["ffn"]
        variables = {"params": params}
    return config, {"params": variables["params"]}


def domain_batches(low, high, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, (4, 16)) for _ in range(2)]


@pytest.fixture(scope="module")
def sources():
    first = dense(0)
    return [first, dense(1, first[1]), dense(2, first[1])]


def test_every_token_sent_to_expert_i_computes_source_i(sources):
    config, variables = assemble.assemble(sources, "btx")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 8)), jnp.int32)
    layers = model.moe_layers(config.model)
    assert layers == [0, 1] and config.model.moe.num_experts == 3
    for i, (source_config, source) in enumerate(sources):
        forced = intervention.force_experts(config, {layer: [i] for layer in layers})
        cfg = config.copy_and_resolve_references()
        cfg.model.moe.top_k = 1
        cfg.model.moe.router.update(softmax_before_topk=False, norm_topk_prob=False)
        got = model.Transformer(cfg.model).apply(variables, tokens, intervention=forced)
        want = model.Transformer(source_config.model).apply(source, tokens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_dume_router_is_the_ridge_solution_and_separates_the_domains(sources):
    domains = [domain_batches(0, 80, 1), domain_batches(80, 160, 2), domain_batches(160, 256, 3)]
    config, variables = assemble.assemble(sources, "dume", domains, lam=1e-2)
    assert config.model.moe.top_k == 1 and config.model.moe.router.bias
    for layer in (0, 1):
        rows, targets = [], []
        for source, batches in enumerate(domains):  # the inputs each domain gives with its expert forced
            forced = intervention.force_experts(config, {layer_: [source] for layer_ in (0, 1)})
            for inputs in capture.stream(config, variables, batches, lambda c, layer=layer: c.layers[layer].inputs,
                                         intervention=forced):
                x = np.asarray(inputs, np.float64)
                rows.append(np.concatenate([x, np.ones((len(x), 1))], 1))
                targets.append(np.eye(3)[np.full(len(x), source)])
        xb, y = np.concatenate(rows), np.concatenate(targets)
        d = xb.shape[1]
        w = np.linalg.lstsq(np.concatenate([xb, np.sqrt(1e-2) * np.eye(d)]),
                            np.concatenate([y, np.zeros((d, 3))]), rcond=None)[0]  # min |XW - Y|^2 + lam |W|^2
        norm = np.linalg.norm(w[:-1], axis=0)
        router = variables["params"][f"layers_{layer}"]["ffn"][moe.ROUTER]
        np.testing.assert_allclose(router["kernel"], w[:-1] / norm, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(router["bias"], w[-1] / norm, rtol=2e-3, atol=2e-4)
        # each domain's calibration tokens go to their own source far more often than chance (1/3) would
        logits = xb[:, :-1] @ router["kernel"] + router["bias"]
        assert (np.argmax(logits, 1) == np.argmax(y, 1)).mean() > 0.4


def test_flexolmo_router_rows_are_the_domains_mean_inputs(sources):
    domains = [domain_batches(0, 128, 1), domain_batches(128, 256, 2), domain_batches(0, 256, 3)]
    config, variables = assemble.assemble(sources, "flexolmo", domains)
    forced = intervention.force_experts(config, {0: [1], 1: [1]})
    x = np.concatenate([np.asarray(inputs, np.float64) for inputs in capture.stream(
        config, variables, domains[1], lambda c: c.layers[0].inputs, intervention=forced)])
    mean = x.mean(0)
    kernel = variables["params"]["layers_0"]["ffn"][moe.ROUTER]["kernel"]
    np.testing.assert_allclose(kernel[:, 1], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)
    assert "bias" not in variables["params"]["layers_0"]["ffn"][moe.ROUTER]


def test_bad_sources_and_recipes_are_named(sources):
    with pytest.raises(ValueError, match="recipe='merge'"):
        assemble.assemble(sources, "merge")
    with pytest.raises(ValueError, match="needs domains"):
        assemble.assemble(sources, "dume")
    with pytest.raises(ValueError, match="at least 2"):
        assemble.assemble(sources[:1], "btx")
    other = dense(4)
    other[0].model.ffn_dim = 32
    with pytest.raises(ValueError, match="ffn_dim"):
        assemble.assemble([sources[0], other], "btx")


def test_assemble_command_writes_a_model_that_loads(sources, tmp_path):
    import json

    import moejax
    from moejax.posthoc import __main__ as cli
    from moejax.training import checkpoint

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    dirs = []
    for i, (config, variables) in enumerate(sources[:2]):
        (corpus / f"d{i}.txt").write_text(("abc " if i == 0 else "xyz ") * 400)
        config = config.copy_and_resolve_references()
        config.data.name = f"text:{corpus}/d{i}.txt"
        dirs.append(checkpoint.save_variables(tmp_path / f"source{i}", config, variables))
    out = tmp_path / "assembled"
    cli.main(["assemble", f"--sources={dirs[0]},{dirs[1]}", "--recipe=dume", "--domain_tokens=256",
              "--batch_size=2", "--seq_len=16", f"--data_dir={tmp_path / 'cache'}", f"--out={out}"])
    config, variables = moejax.load(out)
    assert config.model.moe.num_experts == 2 and json.loads((out / "posthoc.json").read_text())["recipe"] == "dume"
    logits = model.Transformer(config.model).apply(variables, jnp.zeros((1, 8), jnp.int32))
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="--domains="):
        cli.main(["assemble", f"--sources={dirs[0]},{dirs[1]}", "--domains=stdlib", f"--out={tmp_path / 'x'}"])
