"""The method zoo: each paper config's defining property against an independent reference, and each config trains
20 steps through ``python -m moejax.main`` on CPU (at a reduced width so the suite stays fast)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import model, routing, train
from tests import helpers_env, reference
from tests.test_configs import load
from tests.test_routing import deepseek_v3, mixtral

REPO = pathlib.Path(__file__).resolve().parents[1]
ZOO = ["switch", "st_moe", "loss_free", "deepseek_v3", "mixtral", "qwen3_moe", "top_p", "adamoe", "hash",
       "expert_choice", "smoe_dropout", "thor", "chain_of_experts", "upcycling"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_configs_validate_and_cite_their_paper(name):
    train.validate(load(name))
    assert "arXiv" in (REPO / "configs" / f"{name}.py").read_text().split('"""')[1]


def router_logits(name, seed=0, tokens=64):
    cfg = load(name).model.moe
    return cfg, np.random.default_rng(seed).normal(size=(tokens, cfg.num_experts)).astype(np.float32)


def test_mixtral_routes_like_the_released_code():
    cfg, logits = router_logits("mixtral")
    got = routing.route(jnp.asarray(logits), cfg)
    for t, row in enumerate(logits):
        idx, w = mixtral(row)
        np.testing.assert_array_equal(np.asarray(got.experts[t]), idx)
        np.testing.assert_allclose(np.asarray(got.weights[t]), w, rtol=1e-5)


def test_deepseek_v3_routes_like_the_released_code():
    cfg, logits = router_logits("deepseek_v3")
    bias = np.random.default_rng(1).normal(size=cfg.num_experts).astype(np.float32) * 0.1
    got = routing.route(jnp.asarray(logits), cfg, bias=jnp.asarray(bias))
    for t, row in enumerate(logits):
        idx, w = deepseek_v3(row, bias)
        np.testing.assert_array_equal(np.asarray(got.experts[t]), idx)
        np.testing.assert_allclose(np.asarray(got.weights[t]), w, rtol=1e-5)


def test_qwen3_moe_routes_top8_renormalised_and_norms_queries_and_keys():
    cfg, logits = router_logits("qwen3_moe")
    got = routing.route(jnp.asarray(logits), cfg)
    for t, row in enumerate(logits):
        probs = reference.softmax(row)
        idx = reference.top_indices(probs, 8)
        np.testing.assert_array_equal(np.asarray(got.experts[t]), idx)
        np.testing.assert_allclose(np.asarray(got.weights[t]), probs[idx] / probs[idx].sum(), rtol=1e-5)
    m = load("qwen3_moe").model
    params = jax.eval_shape(lambda: model.Transformer(m).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    head_dim = m.d_model // m.num_heads
    attn = params["params"]["layers_0"]["attn"]
    assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (head_dim,)


def test_qk_norm_gives_unit_rms_queries():
    """With qk_norm the attention's queries and keys have RMS 1 per head (scale 1 at init), whatever the input."""
    m = load("qwen3_moe").model
    attn = model.Attention(m, jnp.float32, jax.nn.initializers.normal(1.0))
    x = jax.random.normal(jax.random.key(0), (2, 8, m.d_model)) * 7.0
    variables = attn.init(jax.random.key(1), x)
    _, inter = attn.apply(variables, x, capture_intermediates=True)
    q = np.asarray(inter["intermediates"]["q_norm"]["__call__"][0])
    np.testing.assert_allclose(np.sqrt((q ** 2).mean(-1)), 1.0, rtol=1e-4)


def test_top_p_takes_the_fewest_experts_reaching_p():
    """A numpy loop: walk the experts by descending probability, adding them until the mass reaches p."""
    cfg, logits = router_logits("top_p", tokens=256)
    logits *= 3.0  # a spread of confident and unsure tokens
    got = routing.route(jnp.asarray(logits), cfg)
    counts = []
    for t, row in enumerate(logits):
        probs = reference.softmax(row)
        chosen, mass = [], 0.0
        for i in reference.top_indices(probs, cfg.num_experts):
            if mass >= cfg.router.top_p or len(chosen) == cfg.top_k:
                break
            chosen.append(i)
            mass += probs[i]
        ids = np.asarray(got.experts[t])
        np.testing.assert_array_equal(ids[:len(chosen)], chosen)
        assert (ids[len(chosen):] == cfg.num_experts).all()
        np.testing.assert_allclose(np.asarray(got.weights[t])[:len(chosen)], probs[chosen], rtol=1e-5)
        counts.append(len(chosen))
    assert 1 in counts and max(counts) > 1  # really dynamic


def test_top_p_layer_reports_experts_per_token_and_the_entropy_loss():
    logits, aux = moe_forward("top_p")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    np.testing.assert_allclose(float(aux["entropy_loss"][0]), 1e-4 * entropy, rtol=1e-4)
    cfg = load("top_p").model.moe
    expected = []
    for row in probs:
        order, mass, n = np.argsort(-row, kind="stable"), 0.0, 0
        while mass < cfg.router.top_p and n < cfg.top_k:
            mass += row[order[n]]
            n += 1
        expected.append(n)
    np.testing.assert_allclose(float(aux["experts_per_token"][0]), np.mean(expected), rtol=1e-6)


def test_adamoe_null_experts_cost_nothing_and_pool_in_the_balance_loss():
    """A numpy reference of the whole AdaMoE layer: top-k' over real + null experts, weights renormalised over the
    real ones, null slots add nothing; the balance loss pools the null experts' f."""
    from moejax import moe

    cfg = load("adamoe").model.moe
    cfg.expert_ffn = 16
    n, m, k = cfg.num_experts, cfg.num_null_experts, cfg.top_k
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    layer = moe.MoE(cfg)
    variables = layer.init(jax.random.key(1), x)
    y, aux = layer.apply(variables, x, train=True, mutable=["moe_aux"])
    aux, p = aux["moe_aux"], variables["params"]
    tokens = np.asarray(x, np.float64).reshape(-1, 32)
    logits = tokens @ np.asarray(p["router"]["kernel"], np.float64)
    assert logits.shape[1] == n + m
    expected, f, real_per_token = np.zeros_like(tokens), np.zeros(n + m), []
    for t, row in enumerate(logits):
        probs = reference.softmax(row)
        chosen = reference.top_indices(probs, k)
        f[chosen] += 1
        real = [i for i in chosen if i < n]
        real_per_token.append(len(real))
        for i in real:
            w = {name: np.asarray(p["experts"][name], np.float64)[i] for name in ("wi_0", "wi_1", "wo")}
            h = tokens[t] @ w["wi_0"]
            expected[t] += probs[i] / sum(probs[j] for j in real) * ((h / (1 + np.exp(-h)) * (tokens[t] @ w["wi_1"]))
                                                                     @ w["wo"])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), expected, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(float(aux["experts_per_token"][0]), np.mean(real_per_token), rtol=1e-6)
    assert 0 < np.mean(real_per_token) < k  # some slots went to null experts: FLOPs saved
    f /= k * len(logits)
    f[n:] = f[n:].mean()
    probs = np.array([reference.softmax(row) for row in logits])
    np.testing.assert_allclose(float(aux["balance_loss"][0]), 1e-2 * (n + m) * (f * probs.mean(0)).sum(), rtol=1e-4)


def test_hash_routes_each_token_id_to_one_fixed_expert_whatever_its_context():
    """Two different contexts holding the same byte ids: every position goes to the expert of its id, which equals
    the documented hash computed in numpy with Python integers."""
    config = load("hash")
    config.model.update(d_model=32, num_heads=2, ffn_dim=64, num_layers=2)
    config.model.moe.expert_ffn = 16
    module = model.Transformer(config.model)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 24))
    b = np.stack([rng.permutation(row) for row in a])  # the same ids in other positions and contexts
    variables = module.init(jax.random.key(0), jnp.asarray(a))
    loads = []
    for tokens in (a, b):
        _, aux = module.apply(variables, jnp.asarray(tokens), mutable=["moe_aux"])
        loads.append([np.asarray(aux["moe_aux"][f"layers_{i}"]["ffn"]["tokens_per_expert"][0]) for i in range(2)])
    expected = np.zeros(16)
    for token in a.reshape(-1):
        expected[(((int(token) + 0) * 2654435761) % 2**32 >> 16) % 16] += 1
    for load_ in loads[0] + loads[1]:
        np.testing.assert_array_equal(load_, expected)
    got = routing.route(jnp.zeros((a.size, 16)), config.model.moe, token_ids=jnp.asarray(a.reshape(-1)))
    np.testing.assert_array_equal(np.asarray(got.weights), 1.0)
    assert (expected > 0).sum() > 8  # the hash spreads bytes over the experts


def test_expert_choice_each_expert_takes_its_top_c_tokens_and_eval_is_causal():
    cfg, logits = router_logits("expert_choice", tokens=64)
    got = routing.route(jnp.asarray(logits), cfg, train=True)
    probs = np.array([reference.softmax(row) for row in logits])
    capacity = int(np.ceil(cfg.router.ec_capacity * 64 / cfg.num_experts))
    ids, weights = np.asarray(got.experts), np.asarray(got.weights)
    for e in range(cfg.num_experts):
        expected = set(reference.top_indices(probs[:, e], capacity))
        chosen = {t for t in range(64) if ids[t, e] == e}
        assert chosen == expected
        np.testing.assert_allclose(weights[sorted(chosen), e], probs[sorted(chosen), e], rtol=1e-5)
    per_token = (ids < cfg.num_experts).sum(1)
    assert per_token.mean() == capacity * cfg.num_experts / 64 and per_token.min() != per_token.max()
    # evaluation: token choice, a token's experts depend on its own scores only (no look-ahead)
    evaluated = routing.route(jnp.asarray(logits), cfg, train=False)
    head = routing.route(jnp.asarray(logits[:10]), cfg, train=False)
    np.testing.assert_array_equal(np.asarray(evaluated.experts)[:10], np.asarray(head.experts))
    for t in range(64):
        np.testing.assert_array_equal(np.asarray(evaluated.experts[t]), reference.top_indices(probs[t], cfg.top_k))


def moe_forward(name, seed=0):
    """One train-mode forward pass of config `name`'s first MoE layer: (router logits [T, E], moe_aux)."""
    cfg = load(name).model.moe
    from moejax import moe

    x = jax.random.normal(jax.random.key(seed), (2, 16, 32))
    layer = moe.MoE(cfg)
    variables = layer.init(jax.random.key(seed + 1), x)
    _, aux = layer.apply(variables, x, train=True, mutable=["moe_aux"], rngs={"jitter": jax.random.key(2)})
    kernel = np.asarray(variables["params"]["router"]["kernel"], np.float64)
    return np.asarray(x, np.float64).reshape(-1, 32) @ kernel, aux["moe_aux"]


def test_st_moe_z_loss_is_the_paper_formula():
    logits, aux = moe_forward("st_moe")
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(aux["z_loss"][0]), 1e-3 * np.mean(lse ** 2), rtol=1e-4)


def test_loss_free_bias_follows_the_sign_rule_and_adds_no_loss():
    config = load("loss_free")
    config.model.update(d_model=32, num_heads=2, ffn_dim=64, num_layers=1)
    config.model.moe.expert_ffn = 16
    module = model.Transformer(config.model)
    tx = train.make_optimizer(config.train)
    batch = jnp.asarray(np.random.default_rng(0).integers(1, 256, (4, 17)), jnp.int32)
    variables = module.init(jax.random.key(0), batch[:, :-1])
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                             opt_state=tx.init(variables["params"]), moe_state=variables["moe_state"])
    _, aux = module.apply(variables, batch[:, :-1], train=True, mutable=["moe_aux"])
    load_ = np.asarray(aux["moe_aux"]["layers_0"]["ffn"]["tokens_per_expert"][0])
    assert float(aux["moe_aux"]["layers_0"]["ffn"]["balance_loss"][0]) == 0.0
    metrics = train.metrics_collection(["layers_0"], True, config.model.moe.num_experts).empty()
    step = jax.jit(lambda s, m, b: train.train_step(s, m, b, module=module, tx=tx,  # jitted as in train.py
                                                    schedule=train.learning_rate_schedule(config.train),
                                                    train_key=jax.random.key(0), bias_update_rate=1e-3))
    new, metrics, _ = step(state, metrics, batch)
    expected = 1e-3 * np.sign(load_.mean() - load_)
    np.testing.assert_allclose(np.asarray(new.moe_state["layers_0"]["ffn"]["router_bias"]), expected, atol=1e-9)
    maxvio = float(metrics.compute()["layers_0_maxvio"])
    np.testing.assert_allclose(maxvio, load_.max() / load_.mean() - 1, rtol=1e-5)
    logged = train.computed(metrics, ["layers_0"])["expert_load"]["layers_0"]
    np.testing.assert_allclose(logged, load_ / load_.sum(), atol=1e-6)


def numpy_glu(x, w0, w1, wo):
    """SiLU GLU of rows x in float64: (silu(x @ w0) * (x @ w1)) @ wo."""
    h = x @ w0
    return (h / (1 + np.exp(-h)) * (x @ w1)) @ wo


def numpy_expert(p, i, x):
    return numpy_glu(x, *(np.asarray(p["experts"][name], np.float64)[i] for name in ("wi_0", "wi_1", "wo")))


def test_smoe_dropout_k_grows_linearly_with_softmax_over_the_selected():
    """k(t) = k_start + round((k_max - k_start) t / T); the slots are the top-k(t) logits with softmax weights over
    them, the rest null; evaluation uses every expert."""
    cfg, logits = router_logits("smoe_dropout", tokens=32)
    for progress in (0.0, 0.3, 0.6, 0.97, 1.0):
        k_now = 8 + int(np.floor(8 * progress + 0.5))
        got = routing.route(jnp.asarray(logits), cfg, train=True, progress=jnp.float32(progress))
        for t, row in enumerate(logits):
            ids = reference.top_indices(row, k_now)
            experts, weights = np.asarray(got.experts[t]), np.asarray(got.weights[t])
            np.testing.assert_array_equal(experts[:k_now], ids)
            np.testing.assert_allclose(weights[:k_now], reference.softmax(row[ids]), rtol=1e-5)
            assert (experts[k_now:] == cfg.num_experts).all() and (weights[k_now:] == 0).all()
    evaluated = routing.route(jnp.asarray(logits), cfg, train=False)
    assert (np.sort(np.asarray(evaluated.experts), axis=1) == np.arange(16)).all()


def test_smoe_dropout_router_stays_frozen_while_k_grows_in_the_train_step():
    config = load("smoe_dropout")
    config.model.update(d_model=32, num_layers=1, num_heads=2, ffn_dim=64)
    config.model.moe.expert_ffn = 4
    config.train.update(steps=4, warmup_steps=1)
    module = model.Transformer(config.model)
    batch = jnp.asarray(np.random.default_rng(0).integers(1, 256, (4, 17)), jnp.int32)
    variables = module.init(jax.random.key(0), batch[:, :-1])
    moe_state = variables["moe_state"]
    for frozen in (True, False):
        tx = train.make_optimizer(config.train, frozen_router=frozen)
        config.model.moe.router.frozen = frozen
        module = model.Transformer(config.model)
        state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                 opt_state=tx.init(variables["params"]), moe_state=moe_state)
        per_token = []
        for _ in range(3):
            metrics = train.metrics_collection(["layers_0"], True, 16).empty()
            state, metrics, _ = train.train_step(state, metrics, batch, module=module, tx=tx,
                                                 schedule=train.learning_rate_schedule(config.train),
                                                 train_key=jax.random.key(0), bias_update_rate=0.0, total_steps=4)
            per_token.append(float(metrics.compute()["layers_0_experts_per_token"]))
        assert per_token == [8.0, 10.0, 12.0]  # k(t) at steps 0, 1, 2 of 4
        before = variables["params"]["layers_0"]["ffn"]
        after = state.params["layers_0"]["ffn"]
        router_same = np.array_equal(np.asarray(before["router"]["kernel"]), np.asarray(after["router"]["kernel"]))
        assert router_same == frozen
        assert not np.array_equal(np.asarray(before["experts"]["wo"]), np.asarray(after["experts"]["wo"]))


def test_thor_sends_each_pass_to_one_random_expert_and_evaluates_the_ensemble():
    from moejax import moe

    cfg = load("thor").model.moe
    cfg.expert_ffn = 16
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    layer = moe.MoE(cfg)
    variables = layer.init(jax.random.key(1), x)
    variables = {"params": variables["params"], "moe_state": variables["moe_state"]}  # no init-time statistics
    p = variables["params"]
    tokens = np.asarray(x, np.float64).reshape(-1, 32)
    apply = jax.jit(lambda v, x, key: layer.apply(v, x, train=True, mutable=["moe_aux"], rngs={"routing": key}))
    draws = []
    for seed in range(40):
        y, aux = apply(variables, x, jax.random.key(seed))
        load_ = np.asarray(aux["moe_aux"]["tokens_per_expert"][0])
        assert sorted(load_.tolist()) == [0.0, 32.0]  # the whole batch on one expert
        expert = int(load_.argmax())
        draws.append(expert)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), numpy_expert(p, expert, tokens), atol=1e-5)
    assert 10 <= sum(draws) <= 30  # both experts drawn, about evenly (Binomial(40, 1/2))
    y = layer.apply(variables, x)
    ensemble = (numpy_expert(p, 0, tokens) + numpy_expert(p, 1, tokens)) / 2
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), ensemble, atol=1e-5)


def test_thor_consistency_loss_is_the_symmetric_kl():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
    p, q = reference.softmax(a), reference.softmax(b)
    expected = 0.5 * ((p * np.log(p / q)).sum(-1) + (q * np.log(q / p)).sum(-1)).mean()
    np.testing.assert_allclose(float(train.consistency_kl(jnp.asarray(a), jnp.asarray(b))), expected, rtol=1e-5)


@pytest.mark.parametrize("residual,shared_router", [("inner", False), ("outer", False), ("inner_outer", False),
                                                    ("inner", True)])
def test_chain_of_experts_layer_matches_a_numpy_chain(residual, shared_router):
    """x_c = [x_{c-1} +] sum_i s_i^c E_i(x_{c-1}) + Shared(x_{c-1}) with router c's softmax top-k, the experts shared
    across the passes; 'inner_outer' returns x_C - x_0 for the block to add."""
    from moejax import moe

    cfg = load("chain_of_experts").model.moe
    cfg.update(num_experts=8, top_k=2, expert_ffn=16, chain_residual=residual, chain_shared_router=shared_router)
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    layer = moe.MoE(cfg)
    variables = layer.init(jax.random.key(1), x)
    variables = {"params": variables["params"], "moe_state": variables["moe_state"]}  # no init-time statistics
    y, aux = layer.apply(variables, x, train=True, mutable=["moe_aux"])
    p = variables["params"]
    assert ("router_1" in p) != shared_router
    kernels = [p["router"]["kernel"], p["router"]["kernel"] if shared_router else p["router_1"]["kernel"]]
    shared = [np.asarray(p["shared"][name], np.float64) for name in ("wi_0", "wi_1", "wo")]
    x0 = np.asarray(x, np.float64).reshape(-1, 32)
    state = x0
    for kernel in kernels:
        logits = state @ np.asarray(kernel, np.float64)
        out = numpy_glu(state, *shared)
        for t, row in enumerate(logits):
            ids, w = reference.route_token(row, k=2)
            out[t] += sum(wi * numpy_expert(p, i, state[t]) for i, wi in zip(ids, w, strict=True))
        state = out if residual == "outer" else state + out
    expected = state - x0 if residual == "inner_outer" else state
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), expected, atol=5e-5, rtol=1e-4)
    assert len(aux["moe_aux"]["balance_loss"]) == 2 and len(aux["moe_aux"]["tokens_per_expert"]) == 2


def test_chain_of_experts_inner_residual_replaces_the_residual_stream():
    """The released code's quirk: with chain_residual='inner' the block's output is the MoE output x_C;
    'inner_outer' adds x_C - x_0 to the block input instead."""
    config = load("chain_of_experts").model
    config.update(d_model=32, num_heads=2)
    config.moe.update(num_experts=8, top_k=2, expert_ffn=16)
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    block = model.Block(config, use_moe=True)
    variables = block.init(jax.random.key(1), x)
    y, inter = block.apply(variables, x, capture_intermediates=True)
    ffn_out = inter["intermediates"]["ffn"]["__call__"][0]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ffn_out))
    config.moe.chain_residual = "inner_outer"
    y, inter = model.Block(config, use_moe=True).apply(variables, x, capture_intermediates=True)
    attn_out = x + inter["intermediates"]["attn"]["__call__"][0]
    np.testing.assert_allclose(np.asarray(y), np.asarray(attn_out + inter["intermediates"]["ffn"]["__call__"][0]),
                               atol=1e-6)


SMALL = ["--config.model.d_model=64", "--config.model.num_layers=2", "--config.model.num_heads=4",
         "--config.model.ffn_dim=64",
         "--config.model.moe.expert_ffn=32", "--config.train.steps=20", "--config.train.warmup_steps=5",
         "--config.train.batch_size=8",
         "--config.train.seq_len=32", "--config.train.eval_every=0", "--config.train.log_every=10",
         "--config.data.eval_batches=1", "--config.checkpoint.every_steps=0"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_config_trains_20_steps_through_main(name, data_dir, tmp_path):
    overrides = list(SMALL)
    if load(name).model.num_kv_heads:
        overrides.append("--config.model.num_kv_heads=2")
    if name == "upcycling":  # whole copies of the 64-wide dense FFN, after 6 dense steps
        overrides += ["--config.model.moe.expert_ffn=64", "--config.upcycle.dense_steps=6"]
    command = [sys.executable, "-m", "moejax.main", f"--config={REPO / 'configs' / f'{name}.py'}",
               f"--config.data.dir={data_dir}", f"--workdir={tmp_path / name}", *overrides]
    env = dict(os.environ, XLA_FLAGS=helpers_env.xla_flags())  # one device
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["steps"] == 20 and np.isfinite(summary["val_loss"]) and summary["val_loss"] < 5.55
    assert all("maxvio" in layer for layer in summary["moe_layers"].values())
    if name == "upcycling":  # the dense stage ran first; renormalised top-2 over copies computes the dense function
        dense = json.loads((tmp_path / name / "dense" / "summary.json").read_text())
        assert dense["steps"] == 6 and not dense["moe_layers"]
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        step0 = [r for r in records if r["kind"] == "eval" and r["step"] == 0]
        assert len(step0) == 1
        np.testing.assert_allclose(step0[0]["loss"], dense["val_loss"], rtol=1e-5)
