"""Sparse upcycling from a released dense model (``init_from='upcycle:hf:<dir>'``, moejax/upcycle_hf.py): the
MoE model built from a transformers golden fixture (tests/hf/golden/, logits written by transformers) gives the
fixture's golden logits where the recipe promises the dense function (whole copies with renormalised top-2
weights; one copy's slices under zero routers, top_k = m, routed_scaling_factor = m), and differs where it does
not; the run's model takes the release's shapes and the run's MoE layout; bad sources and layouts are named; and
``python -m moejax.main`` (in process) upcycles olmo2_a and trains 2 steps."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

import moejax
from moejax import checks, data, hf, model, upcycle, upcycle_hf
from moejax.training import loop
from tests.helpers_hf import golden_dir, release_with_tokenizer
from tests.reference import cross_entropy

TOL = 1e-4


def upcycling_config(granularity=1, num_experts=4, top_k=2, num_shared=0, router_init="normal", **router):
    config = base.get_config()
    config.model.update(moe_every=1)
    config.model.moe.update(num_experts=num_experts, top_k=top_k, num_shared=num_shared, dispatch="dropless")
    config.model.moe.router.update(router)
    config.upcycle.update(granularity=granularity, router_init=router_init)
    return config


def upcycled_logits(case, config):
    """The logits of the golden tokens under the MoE upcycled from the case's checkpoint, and the golden logits."""
    directory = golden_dir(case)
    golden = np.load(directory / "golden.npz")
    m = upcycle_hf.moe_model(hf.read_config(directory).model, config, directory)
    with config.unlocked():
        config.model = m
    _, variables = hf.load(directory)
    tokens = jnp.asarray(golden["tokens"], jnp.int32)
    module = model.Transformer(m)
    fresh = module.init(jax.random.key(1), tokens)
    params = jax.tree.map(jnp.asarray, upcycle.upcycle_params(jax.device_get(variables["params"]), fresh["params"],
                                                              config))
    logits = np.asarray(module.apply({"params": params, "moe_state": fresh["moe_state"]}, tokens))
    return logits, golden["logits"], m


@pytest.mark.parametrize("case", ["llama_b", "olmo2_a", "phi3_a", "qwen2_a"])
def test_whole_copies_with_renormalised_top2_give_the_release_logits(case):
    config = upcycling_config(norm_topk_prob=True)
    logits, golden, m = upcycled_logits(case, config)
    assert m.moe.expert_ffn == m.ffn_dim == 48 and len(model.moe_layers(m)) == m.num_layers
    assert float(np.abs(logits - golden).max()) <= TOL


def test_one_copys_slices_under_zero_routers_give_the_release_logits():
    """m = 4 slices of 12, 8 experts: zero routers pick experts 0..3 (slices 0..3 of copy 0) with 1/4 each, times 4."""
    config = upcycling_config(granularity=4, num_experts=8, top_k=4, router_init="zeros", norm_topk_prob=True,
                              routed_scaling_factor=4.0)
    logits, golden, m = upcycled_logits("qwen3_a", config)
    assert m.moe.expert_ffn == 12
    assert float(np.abs(logits - golden).max()) <= TOL
    # control: random routers mix slices of different copies, so the dense function is not promised
    config = upcycling_config(granularity=4, num_experts=8, top_k=4, router_init="normal")
    logits, golden, _ = upcycled_logits("qwen3_a", config)
    assert float(np.abs(logits - golden).max()) > 100 * TOL


def test_the_shared_expert_takes_the_whole_dense_ffn_and_layers_left_dense_are_copied():
    """Innovator's fine-grained layout (shared expert = the dense FFN), MoE from layer 1 on (layer 0 stays dense)."""
    config = upcycling_config(granularity=4, num_experts=8, top_k=2, num_shared=4)
    config.model.update(first_dense_layers=1)
    directory = golden_dir("llama_b")
    m = upcycle_hf.moe_model(hf.read_config(directory).model, config, directory)
    with config.unlocked():
        config.model = m
    _, variables = hf.load(directory)
    fresh = model.Transformer(m).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    params = upcycle.upcycle_params(jax.device_get(variables["params"]), fresh["params"], config)
    dense = jax.device_get(variables["params"])
    assert model.moe_layers(m) == [1, 2]
    np.testing.assert_array_equal(params["layers_0"]["ffn"]["wi_0"], dense["layers_0"]["ffn"]["wi_0"])
    for i in (1, 2):
        np.testing.assert_array_equal(params[f"layers_{i}"]["ffn"]["shared"]["wo"], dense[f"layers_{i}"]["ffn"]["wo"])
        slices = np.split(np.asarray(dense[f"layers_{i}"]["ffn"]["wi_1"]), 4, axis=1)
        for e in range(8):
            np.testing.assert_array_equal(params[f"layers_{i}"]["ffn"]["experts"]["wi_1"][e], slices[e % 4])


@pytest.mark.parametrize("case, change, field, match", [
    ("mixtral_a", {}, "init_from", r"holds a mixtral model with MoE layers \[0, 1\]: upcycling starts from a dense "
                                   r"model"),
    ("llama_a", {"upcycle.granularity": 5}, "upcycle.granularity", r"upcycle.granularity=5 is invalid: must divide "
                                                                    r"the FFN width 48"),
    ("llama_a", {"model.moe.num_experts": 6, "upcycle.granularity": 4}, "model.moe.num_experts",
     r"model.moe.num_experts=6 is invalid: must be a multiple of upcycle.granularity=4"),
    ("llama_a", {"model.moe.num_shared": 1, "upcycle.granularity": 4}, "model.moe.num_shared",
     r"model.moe.num_shared=1 is invalid: the shared expert takes the whole dense FFN"),
    ("llama_a", {"model.moe_every": 0}, "model.moe_every", r"model.moe_every=0 is invalid: upcycling needs MoE layers"),
])
def test_bad_sources_and_layouts_are_named(case, change, field, match):
    config = upcycling_config()
    directory = golden_dir(case)
    config.init_from = f"upcycle:hf:{directory}"
    for path, value in change.items():
        *parents, name = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[name] = value
    with pytest.raises(checks.ConfigError, match=match):
        upcycle_hf.moe_model(hf.read_config(directory).model, config, directory)


# ----------------------------------------------------------------------------------------------- the run


def run_config(init_from, corpus, **upcycle_fields):
    config = upcycling_config(norm_topk_prob=True)
    config.init_from = init_from
    config.upcycle.update(upcycle_fields)
    config.data.update(name=f"text:{corpus}/*.py", dir=str(corpus.parent / "cache"), eval_batches=1)
    config.train.update(steps=2, batch_size=8, seq_len=16, warmup_steps=1, log_every=1, eval_every=0)
    config.checkpoint.every_steps = 2
    return config


def test_main_upcycles_a_dense_release_and_trains(stdlib_corpus, tmp_path):
    """init_from='upcycle:hf:<olmo2_a with a tokenizer>', whole copies with renormalised top-2: the run's model is
    the release's in 4-expert MoE layers; its step-0 evaluation is the release's own loss on the same batch (the
    dense model evaluated here), then 2 steps train."""
    directory = release_with_tokenizer("olmo2_a", tmp_path / "release", stdlib_corpus)
    config = run_config(f"upcycle:hf:{directory}", stdlib_corpus)
    workdir = tmp_path / "run"
    loop.run(config, workdir)
    trained_config, trained = moejax.load(workdir)
    m = trained_config.model
    assert (m.norm_position, m.moe.num_experts, m.moe.expert_ffn, model.moe_layers(m)) == ("post", 4, 48, [0, 1])
    assert trained_config.data.tokenizer == f"hf:{directory}"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["loss"] for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [0, 2]
    dense_config, variables = hf.load(directory)
    dense_config.data.update(trained_config.data.to_dict())
    dense_config.train.update(trained_config.train.to_dict())
    apply = jax.jit(model.Transformer(dense_config.model).apply)
    (batch,) = list(data.eval_batches(dense_config))
    dense_loss = cross_entropy(apply(variables, jnp.asarray(batch[:, :-1])), batch[:, 1:])
    assert abs(evals[0] - float(dense_loss)) < 1e-4
    assert trained["params"]["layers_0"]["ffn"]["experts"]["wi_0"].shape == (4, 32, 48)


def test_bad_upcycling_sources_are_refused_by_name(stdlib_corpus, tmp_path):
    with pytest.raises(checks.ConfigError, match=r"init_from='upcycle:hf:.*/missing' is invalid: .*missing is not a "
                                                 r"transformers checkpoint directory"):
        loop.run(run_config(f"upcycle:hf:{tmp_path / 'missing'}", stdlib_corpus), tmp_path / "a")
    with pytest.raises(checks.ConfigError, match=r"cannot be combined with upcycle.enabled=True"):
        loop.run(run_config(f"upcycle:hf:{golden_dir('llama_a')}", stdlib_corpus, enabled=True), tmp_path / "b")
    with pytest.raises(checks.ConfigError, match=r"holds a mixtral model with MoE layers"):
        loop.run(run_config(f"upcycle:hf:{golden_dir('mixtral_a')}", stdlib_corpus), tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")
