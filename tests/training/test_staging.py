"""Innovator's staged upcycling (moejax/training/staging.py, moejax/data/mixing.py): during the routing warm-up
the non-router parameters do not move and the routers move as AdamW on the routers alone moves them; afterwards
everything trains. The data stages give each batch the rows of each corpus a plain-Python largest-remainder
schedule gives, resume bit-identically, and bad fields are refused naming the field."""
from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from moejax.configs import base

from moejax import checks, model
from moejax.data import mixing
from moejax.training import config as config_lib
from moejax.training import optim, staging
from tests import helpers_steps


def moe_config(**train):
    config = base.get_config()
    config.model.update(d_model=32, num_heads=2, ffn_dim=64, num_layers=2, vocab_size=256)
    config.model.moe.update(num_experts=4, top_k=2, expert_ffn=32)
    config.train.update(steps=10, warmup_steps=0, schedule="constant", learning_rate=1e-2, **train)
    return config


def split(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    routers = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat if staging.is_router_path(p)}
    others = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat if not staging.is_router_path(p)}
    return routers, others


@pytest.fixture(scope="module")
def warmup_run():
    """Parameters before and after each of 3 steps with train.router_warmup_steps=2, and the batches."""
    config = moe_config(router_warmup_steps=2)
    module = model.Transformer(config.model)
    state = helpers_steps.initial_state(config, module, seq_len=16)
    step = jax.jit(helpers_steps.train_step(config, module))
    metrics = helpers_steps.empty_metrics(config)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(1, 256, (4, 17)), jnp.int32) for _ in range(3)]
    params = [state.params]
    for batch in batches:
        state, metrics, _ = step(state, metrics, batch)
        params.append(state.params)
    return config, module, params, batches


def test_router_warmup_freezes_everything_but_the_routers(warmup_run):
    _, _, params, _ = warmup_run
    routers0, others0 = split(params[0])
    assert len(routers0) == 2 and all("router" in k for k in routers0)  # one router kernel per MoE layer
    for i in (1, 2):  # warm-up steps: the others bit-identical, every router moved
        routers, others = split(params[i])
        assert all(np.array_equal(others[k], others0[k]) for k in others0)
        assert all(not np.array_equal(routers[k], routers0[k]) for k in routers0)
    _, others3 = split(params[3])  # after the warm-up: everything trains
    assert sum(not np.array_equal(others3[k], others0[k]) for k in others0) == len(others0)


def test_warmup_updates_are_adamw_on_the_routers_alone(warmup_run):
    """The routers after two warm-up steps equal clip + AdamW (optax) applied to the router gradients alone, with
    the rest of the model held at its initialisation."""
    config, module, params, batches = warmup_run
    t = config.train
    from moejax.training import objectives

    objective = objectives.from_config(config, module, jax.random.key(0))
    moe_state = helpers_steps.initial_state(config, module, seq_len=16).moe_state
    reference = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                            optax.adamw(t.learning_rate, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                                        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params[0])
    is_router = [staging.is_router_path(path) for path, _ in leaves]
    current = [x for _, x in leaves]
    routers = {i: x for i, x in enumerate(current) if is_router[i]}
    opt_state = reference.init(routers)
    grad = jax.jit(jax.grad(lambda p, b, s: objective(p, moe_state, b, s)[0]))
    for step in range(2):
        full = jax.tree_util.tree_unflatten(treedef, current)
        grads = grad(full, batches[step], jnp.asarray(step, jnp.int32))
        flat_grads = jax.tree.leaves(grads)
        updates, opt_state = reference.update({i: flat_grads[i] for i in routers}, opt_state, routers)
        routers = optax.apply_updates(routers, updates)
        current = [routers.get(i, x) for i, x in enumerate(current)]
    got = jax.tree.leaves(params[2])
    for i in routers:
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(routers[i]), rtol=2e-5, atol=1e-7)


def _rows_reference(weights, batch):
    """Hamilton's largest-remainder apportionment in exact fractions: quotas w_i / sum(w) * batch, floors first,
    the rest one each by decreasing remainder (ties to the lower index)."""
    w = [fractions.Fraction(str(x)) for x in weights]
    quotas = [x / sum(w) * batch for x in w]
    out = [q.numerator // q.denominator for q in quotas]
    by_remainder = sorted(range(len(w)), key=lambda i: (out[i] - quotas[i], i))
    for i in by_remainder[:batch - sum(out)]:
        out[i] += 1
    return out


@pytest.mark.parametrize("weights,batch", [((1.0, 1.0), 8), ((0.0, 1.0), 5), ((0.7, 0.3), 5), ((1, 1, 1), 8),
                                           ((0.25, 0.25, 0.5), 6), ((3, 1), 7), ((0.1, 0.2, 0.3, 0.4), 9)])
def test_rows_per_source_follow_largest_remainder(weights, batch):
    assert mixing.rows(weights, batch) == _rows_reference(weights, batch)
    assert sum(mixing.rows(weights, batch)) == batch


def test_stage_weights_follow_the_schedule():
    stages = ((3, 0.0, 1.0), (5, 0.5, 0.5), (9, 1.0, 0.0))
    want = [(0.0, 1.0)] * 3 + [(0.5, 0.5)] * 2 + [(1.0, 0.0)] * 6
    assert [mixing.stage_weights(stages, s) for s in range(11)] == want


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    """Two 'text:' corpora whose bytes tell them apart: one of 'a'-only files, one of 'b'-only files."""
    root = tmp_path_factory.mktemp("mix")
    for name in "ab":
        (root / name).mkdir()
        for i in range(6):
            (root / name / f"{name}{i}.txt").write_text(name * (300 + 37 * i))
    return root


def mixed_config(root, stages, **data):
    config = base.get_config()
    config.data.update(name=f"text:{root}/a/*.txt", mix=(f"text:{root}/b/*.txt",), mix_stages=stages,
                       dir=str(root / "cache"), val_fraction=0.2, **data)
    config.train.update(batch_size=5, seq_len=16, steps=12)
    return config


def test_mixed_batches_follow_the_stages_and_resume(two_corpora):
    from moejax import data

    stages = ((3, 0.0, 1.0), (6, 0.6, 0.4), (12, 1.0, 0.0))
    config = mixed_config(two_corpora, stages)
    it = data.train_iterator(config)
    for step in range(12):
        batch = next(it)
        assert batch.shape == (5, 17)
        weights = [w for until, *w in stages if step < until][0]
        a_rows = [row for row in batch if set(row.tolist()) <= {ord("a"), 0}]
        b_rows = [row for row in batch if set(row.tolist()) <= {ord("b"), 0}]
        assert [len(a_rows), len(b_rows)] == _rows_reference(weights, 5)
        if step == 4:
            saved = it.get_state()
            rest = [next(it) for _ in range(4)]
            resumed = data.train_iterator(config)
            resumed.set_state(saved)
            assert all(np.array_equal(next(resumed), r) for r in rest)
            it = data.train_iterator(config)
            it.set_state(saved)


@pytest.mark.parametrize("fields,words", [
    ({"mix_stages": ((3, 1.0, 0.0),), "mix": ()}, "data.mix_stages"),
    ({"mix_stages": ()}, "at least one stage"),
    ({"mix_stages": ((3, 1.0),)}, "3 numbers"),
    ({"mix_stages": ((3, 1.0, 0.0), (3, 0.5, 0.5))}, "above the previous"),
    ({"mix_stages": ((3, -1.0, 0.0),)}, "weights must be numbers >= 0"),
    ({"mix_stages": ((3, 0.0, 0.0),)}, "not all 0"),
    ({"mix_stages": ((3, 1.0, 1.0),), "tokenizer": "bpe:300"}, "bpe:300"),
    ({"mix": ("nope",), "mix_stages": ((3, 1.0, 1.0),)}, "'nope' is not a corpus"),
])
def test_bad_mixing_is_refused(two_corpora, fields, words):
    config = mixed_config(two_corpora, ((3, 1.0, 1.0),))
    config.data.update(fields)
    with pytest.raises(checks.ConfigError, match="data.mix") as e:
        mixing.validate(config)
    assert words in str(e.value)


@pytest.mark.parametrize("change,words", [
    ({"train.router_warmup_steps": -1}, "train.router_warmup_steps=-1"),
    ({"train.router_warmup_steps": 11}, "<= train.steps=10"),
    ({"model.moe_every": 0}, "no MoE layer"),
    ({"model.moe.router.frozen": True}, "model.moe.router.frozen=True"),
    ({"model.lora.targets": ("attn/q",)}, "LoRA"),
])
def test_bad_router_warmup_is_refused(change, words):
    config = moe_config(router_warmup_steps=2)
    for field, value in change.items():
        *parents, name = field.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[name] = value
    with pytest.raises(checks.ConfigError, match="train.router_warmup_steps") as e:
        staging.validate(config)
    assert words in str(e.value)
    with pytest.raises(checks.ConfigError, match="train.router_warmup_steps"):  # the run's config checks call it
        config_lib.validate(config)


def test_without_warmup_the_optimizer_is_unchanged():
    config = moe_config()
    tx = optim.make_optimizer(config)
    assert not isinstance(tx.init({"w": jnp.zeros((2, 2))}), staging.WarmupState)


def test_innovator_preset_stages_the_moe_run_and_not_the_dense_one():
    from moejax import upcycle
    from tests import helpers_configs

    config = helpers_configs.load("upcycling", "innovator")
    assert config.train.router_warmup_steps == 20 and config.data.name == "stdlib"
    assert config.data.mix_stages == ((20, 0.0, 1.0), (config.train.steps, 1.0, 1.0))
    assert config.data.mix[0].startswith("text:") and config.data.mix[0].endswith("/test/test_*.py")
    assert config.model.moe.num_shared * config.model.moe.expert_ffn == config.model.ffn_dim  # the fine split
    config_lib.validate(config)
    dense = upcycle.dense_config(config)
    assert dense.train.router_warmup_steps == 0 and dense.data.mix == () and dense.data.mix_stages == ()
    config_lib.validate(dense)
