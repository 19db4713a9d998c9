"""The method zoo: each paper config's defining property against an independent reference, and each config trains
20 steps on CPU at a reduced width: one through ``python -m moejax.main`` itself, the others through the function it
calls after parsing its flags, all in one tests/zoo_runner.py process (so the suite stays fast)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import model
from moejax.moe import layer, routers, stats
from moejax.training import config as config_lib
from moejax.training import metrics as metrics_lib
from moejax.training import objectives
from tests import helpers_env, helpers_moe, helpers_steps, reference
from tests.helpers_configs import CONFIG_NAMES, CONFIGS, REPO, load, module_of, small_model

# The zoo is every config file (tests/helpers_configs.CONFIG_NAMES) but these, each with why.
NOT_IN_THE_ZOO = {
    "base": "every field's default, the start of the paper configs (moejax.main's config list leaves it out too)",
    "dense": "the dense baseline: no MoE method and no paper to cite (tests/test_configs.py checks its shapes)",
    "finetune": "cannot run alone: it starts from the released checkpoint init_from names "
                "(tests/training/test_finetune.py runs it on a tiny one)",
}
ZOO = [name for name in CONFIG_NAMES if name not in NOT_IN_THE_ZOO]


def test_the_zoo_exclusions_are_config_files():
    assert set(NOT_IN_THE_ZOO) <= set(CONFIG_NAMES) and ZOO


@pytest.mark.parametrize("name", ZOO)
def test_zoo_configs_validate_and_cite_their_paper(name):
    """The default and every preset of the config file validate; its docstring cites the paper."""
    for preset in (None, *module_of(name).PRESETS):
        config_lib.validate(load(name, preset))
    assert "arXiv" in (CONFIGS / f"{name}.py").read_text().split('"""')[1]


def router_logits(name, seed=0, tokens=64):
    cfg = load(name).model.moe
    return cfg, np.random.default_rng(seed).normal(size=(tokens, cfg.num_experts)).astype(np.float32)


def test_mixtral_routes_like_the_released_code():
    cfg, logits = router_logits("mixtral")
    got = routers.route(jnp.asarray(logits), cfg)
    for t, row in enumerate(logits):
        idx, w = reference.mixtral(row)
        np.testing.assert_array_equal(np.asarray(got.experts[t]), idx)
        np.testing.assert_allclose(np.asarray(got.weights[t]), w, rtol=1e-5)


def test_deepseek_v3_routes_like_the_released_code():
    cfg, logits = router_logits("deepseek_v3")
    bias = np.random.default_rng(1).normal(size=cfg.num_experts).astype(np.float32) * 0.1
    got = routers.route(jnp.asarray(logits), cfg, bias=jnp.asarray(bias))
    for t, row in enumerate(logits):
        idx, w = reference.deepseek_v3(row, bias)
        np.testing.assert_array_equal(np.asarray(got.experts[t]), idx)
        np.testing.assert_allclose(np.asarray(got.weights[t]), w, rtol=1e-5)


def test_qwen3_moe_routes_top8_renormalised_and_norms_queries_and_keys():
    cfg, logits = router_logits("qwen3_moe")
    got = routers.route(jnp.asarray(logits), cfg)
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
    got = routers.route(jnp.asarray(logits), cfg)
    counts = []
    for t, row in enumerate(logits):
        probs = reference.softmax(row)
        chosen = reference.top_p_experts(probs, cfg.router.top_p, cfg.top_k)
        ids = np.asarray(got.experts[t])
        np.testing.assert_array_equal(ids[:len(chosen)], chosen)
        assert (ids[len(chosen):] == cfg.num_experts).all()
        np.testing.assert_allclose(np.asarray(got.weights[t])[:len(chosen)], probs[chosen], rtol=1e-5)
        counts.append(len(chosen))
    assert 1 in counts and max(counts) > 1  # really dynamic


def weighted_term(moe_aux, cfg, coef):
    """What the objective's router losses gain from the coefficient field ``coef`` of cfg (as set)."""
    without = cfg.copy_and_resolve_references()
    without[coef] = 0.0
    return float(objectives.router_losses(moe_aux, cfg)) - float(objectives.router_losses(moe_aux, without))


def test_top_p_layer_reports_experts_per_token_and_the_entropy_loss():
    cfg, logits, moe_aux = moe_forward("top_p")
    probs = np.array([reference.softmax(row) for row in logits])
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    record = helpers_moe.lone_stats(moe_aux)
    np.testing.assert_allclose(float(record.router_entropy), entropy, rtol=1e-4)
    np.testing.assert_allclose(weighted_term(moe_aux, cfg, "entropy_loss_coef"), 1e-4 * entropy, rtol=1e-3)
    expected = [len(reference.top_p_experts(row, cfg.router.top_p, cfg.top_k)) for row in probs]
    np.testing.assert_allclose(float(record.experts_per_token), np.mean(expected), rtol=1e-6)


def test_adamoe_null_experts_cost_nothing_and_pool_in_the_balance_loss():
    """A numpy reference of the whole AdaMoE layer: top-k' over real + null experts, weights renormalised over the
    real ones, null slots add nothing; the balance loss pools the null experts' f."""
    cfg = load("adamoe").model.moe
    cfg.expert_ffn = 16
    n, m, k = cfg.num_experts, cfg.num_null_experts, cfg.top_k
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    module = layer.MoE(cfg)
    p = module.init(jax.random.key(1), x)["params"]
    y, aux = module.apply({"params": p}, x, train=True, mutable=["moe_aux"])
    tokens = np.asarray(x, np.float64).reshape(-1, 32)
    logits = tokens @ np.asarray(p["router"]["kernel"], np.float64)
    assert logits.shape[1] == n + m
    probs = np.array([reference.softmax(row) for row in logits])
    ids = np.array([reference.top_indices(row, k) for row in probs])  # ids >= n: null experts
    weights = np.array([[row[i] / sum(row[j] for j in chosen if j < n) if i < n else 0.0 for i in chosen]
                        for row, chosen in zip(probs, ids, strict=True)])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), reference.moe_layer(tokens, p, ids, weights),
                               atol=2e-5, rtol=1e-4)
    real_per_token = (ids < n).sum(1)
    record = helpers_moe.lone_stats(aux["moe_aux"])
    np.testing.assert_allclose(float(record.experts_per_token), np.mean(real_per_token), rtol=1e-6)
    assert 0 < np.mean(real_per_token) < k  # some slots went to null experts: FLOPs saved
    f = np.bincount(ids.reshape(-1), minlength=n + m) / (k * len(logits))
    f[n:] = f[n:].mean()
    balance = (n + m) * (f * probs.mean(0)).sum()
    np.testing.assert_allclose(float(record.balance_loss), balance, rtol=1e-4)
    np.testing.assert_allclose(weighted_term(aux["moe_aux"], cfg, "balance_coef"), 1e-2 * balance, rtol=1e-4)


def test_hash_routes_each_token_id_to_one_fixed_expert_whatever_its_context():
    """Two different contexts holding the same byte ids: every position goes to the expert of its id, which equals
    the documented hash computed in numpy with Python integers."""
    config = small_model(load("hash"), num_layers=2)
    config.model.moe.expert_ffn = 16
    module = model.Transformer(config.model)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 24))
    b = np.stack([rng.permutation(row) for row in a])  # the same ids in other positions and contexts
    params = module.init(jax.random.key(0), jnp.asarray(a))["params"]  # without init's own statistics
    loads = []
    for tokens in (a, b):
        _, aux = module.apply({"params": params}, jnp.asarray(tokens), mutable=["moe_aux"])
        loads.append(np.asarray(stats.by_layer(stats.collect(aux["moe_aux"])).tokens_per_expert))
    expected = np.zeros(16)
    for token in a.reshape(-1):
        expected[reference.hash_expert(token, 16, config.model.moe.router.hash_seed)] += 1
    for load_ in [*loads[0], *loads[1]]:
        np.testing.assert_array_equal(load_, expected)
    got = routers.route(jnp.zeros((a.size, 16)), config.model.moe, token_ids=jnp.asarray(a.reshape(-1)))
    np.testing.assert_array_equal(np.asarray(got.weights), 1.0)
    assert (expected > 0).sum() > 8  # the hash spreads bytes over the experts


def test_expert_choice_each_expert_takes_its_top_c_tokens_and_eval_is_causal():
    cfg, logits = router_logits("expert_choice", tokens=64)
    got = routers.route(jnp.asarray(logits), cfg, train=True)
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
    evaluated = routers.route(jnp.asarray(logits), cfg, train=False)
    head = routers.route(jnp.asarray(logits[:10]), cfg, train=False)
    np.testing.assert_array_equal(np.asarray(evaluated.experts)[:10], np.asarray(head.experts))
    for t in range(64):
        np.testing.assert_array_equal(np.asarray(evaluated.experts[t]), reference.top_indices(probs[t], cfg.top_k))


def moe_forward(name, seed=0):
    """One train-mode forward pass of config `name`'s MoE layer: (its model.moe section, router logits [T, E],
    moe_aux)."""
    cfg = load(name).model.moe
    x = jax.random.normal(jax.random.key(seed), (2, 16, 32))
    module = layer.MoE(cfg)
    params = module.init(jax.random.key(seed + 1), x)["params"]
    _, aux = module.apply({"params": params}, x, train=True, mutable=["moe_aux"], rngs={"jitter": jax.random.key(2)})
    kernel = np.asarray(params["router"]["kernel"], np.float64)
    return cfg, np.asarray(x, np.float64).reshape(-1, 32) @ kernel, aux["moe_aux"]


def test_st_moe_z_loss_is_the_paper_formula():
    cfg, logits, moe_aux = moe_forward("st_moe")
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(float(helpers_moe.lone_stats(moe_aux).z_loss), z, rtol=1e-4)
    np.testing.assert_allclose(weighted_term(moe_aux, cfg, "z_loss_coef"), 1e-3 * z, rtol=1e-3)


def test_loss_free_bias_follows_the_sign_rule_and_adds_no_loss():
    config = small_model(load("loss_free"), num_layers=1)
    config.model.moe.expert_ffn = 16
    module = model.Transformer(config.model)
    batch = jnp.asarray(np.random.default_rng(0).integers(1, 256, (4, 17)), jnp.int32)
    state = helpers_steps.initial_state(config, module, seq_len=16)
    _, aux = module.apply({"params": state.params, "moe_state": state.moe_state}, batch[:, :-1], train=True,
                          mutable=["moe_aux"])
    record = helpers_moe.lone_stats(aux["moe_aux"]["layers_0"]["ffn"])
    load_ = np.asarray(record.tokens_per_expert)
    assert float(record.balance_loss) == 0.0 and float(objectives.router_losses(aux["moe_aux"], config.model.moe)) == 0
    step = jax.jit(helpers_steps.train_step(config, module))  # jitted as in the loop
    new, metrics, _ = step(state, helpers_steps.empty_metrics(config), batch)
    expected = 1e-3 * np.sign(load_.mean() - load_)
    np.testing.assert_allclose(np.asarray(new.moe_state["layers_0"]["ffn"]["router_bias"]), expected, atol=1e-9)
    logged = metrics_lib.computed(metrics)
    np.testing.assert_allclose(logged["layers_0_maxvio"], load_.max() / load_.mean() - 1, rtol=1e-5)
    np.testing.assert_allclose(logged["expert_load"]["layers_0"], load_ / load_.sum(), atol=1e-6)
    assert logged["aux_loss"] == 0.0


def test_smoe_dropout_k_grows_linearly_with_softmax_over_the_selected():
    """k(t) = k_start + round((k_max - k_start) t / T); the slots are the top-k(t) logits with softmax weights over
    them, the rest null; evaluation uses every expert."""
    cfg, logits = router_logits("smoe_dropout", tokens=32)
    for progress in (0.0, 0.3, 0.6, 0.97, 1.0):
        k_now = 8 + int(np.floor(8 * progress + 0.5))
        got = routers.route(jnp.asarray(logits), cfg, train=True, progress=jnp.float32(progress))
        for t, row in enumerate(logits):
            ids = reference.top_indices(row, k_now)
            experts, weights = np.asarray(got.experts[t]), np.asarray(got.weights[t])
            np.testing.assert_array_equal(experts[:k_now], ids)
            np.testing.assert_allclose(weights[:k_now], reference.softmax(row[ids]), rtol=1e-5)
            assert (experts[k_now:] == cfg.num_experts).all() and (weights[k_now:] == 0).all()
    evaluated = routers.route(jnp.asarray(logits), cfg, train=False)
    assert (np.sort(np.asarray(evaluated.experts), axis=1) == np.arange(16)).all()


def test_smoe_dropout_router_stays_frozen_while_k_grows_in_the_train_step():
    """The router is frozen by the optimizer (no update, and no weight decay although the config decays every
    matrix); with router.frozen=False the same steps move it."""
    config = small_model(load("smoe_dropout"), num_layers=1)
    config.model.moe.expert_ffn = 4
    config.train.update(steps=4, warmup_steps=1, weight_decay=0.1)
    module = model.Transformer(config.model)
    batch = jnp.asarray(np.random.default_rng(0).integers(1, 256, (4, 17)), jnp.int32)
    for frozen in (True, False):
        config.model.moe.router.frozen = frozen
        state = helpers_steps.initial_state(config, module, seq_len=16)
        before = state.params["layers_0"]["ffn"]
        step = jax.jit(helpers_steps.train_step(config, module))
        per_token = []
        for _ in range(3):
            state, metrics, _ = step(state, helpers_steps.empty_metrics(config), batch)
            per_token.append(metrics_lib.computed(metrics)["layers_0_experts_per_token"])
        assert per_token == [8.0, 10.0, 12.0]  # k(t) at steps 0, 1, 2 of 4
        after = state.params["layers_0"]["ffn"]
        router_same = np.array_equal(np.asarray(before["router"]["kernel"]), np.asarray(after["router"]["kernel"]))
        assert router_same == frozen
        assert not np.array_equal(np.asarray(before["experts"]["wo"]), np.asarray(after["experts"]["wo"]))


def test_thor_sends_each_pass_to_one_random_expert_and_evaluates_the_ensemble():
    cfg = load("thor").model.moe
    cfg.expert_ffn = 16
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    module = layer.MoE(cfg)
    variables = module.init(jax.random.key(1), x)
    variables = {"params": variables["params"], "moe_state": variables["moe_state"]}  # no init-time statistics
    p = variables["params"]
    tokens = np.asarray(x, np.float64).reshape(-1, 32)
    apply = jax.jit(lambda v, x, key: module.apply(v, x, train=True, mutable=["moe_aux"], rngs={"routing": key}))
    draws = []
    for seed in range(40):
        y, aux = apply(variables, x, jax.random.key(seed))
        load_ = np.asarray(helpers_moe.lone_stats(aux["moe_aux"]).tokens_per_expert)
        assert sorted(load_.tolist()) == [0.0, 32.0]  # the whole batch on one expert
        expert = int(load_.argmax())
        draws.append(expert)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), reference.expert(p, expert, tokens), atol=1e-5)
    assert 10 <= sum(draws) <= 30  # both experts drawn, about evenly (Binomial(40, 1/2))
    y = module.apply(variables, x)
    ensemble = (reference.expert(p, 0, tokens) + reference.expert(p, 1, tokens)) / 2
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), ensemble, atol=1e-5)


def test_thor_consistency_loss_is_the_symmetric_kl():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
    p, q = reference.softmax(a), reference.softmax(b)
    expected = 0.5 * ((p * np.log(p / q)).sum(-1) + (q * np.log(q / p)).sum(-1)).mean()
    np.testing.assert_allclose(float(objectives.consistency_kl(jnp.asarray(a), jnp.asarray(b))), expected, rtol=1e-5)


@pytest.mark.parametrize("residual,shared_router", [("inner", False), ("outer", False), ("inner_outer", False),
                                                    ("inner", True)])
def test_chain_of_experts_layer_matches_a_numpy_chain(residual, shared_router):
    """x_c = [x_{c-1} +] sum_i s_i^c E_i(x_{c-1}) + Shared(x_{c-1}) with router c's softmax top-k, the experts shared
    across the passes; 'inner_outer' returns x_C - x_0 for the block to add."""
    cfg = load("chain_of_experts").model.moe
    cfg.update(num_experts=8, top_k=2, expert_ffn=16, chain_residual=residual, chain_shared_router=shared_router)
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    module = layer.MoE(cfg)
    p = module.init(jax.random.key(1), x)["params"]
    y, aux = module.apply({"params": p}, x, train=True, mutable=["moe_aux"])
    assert ("router_1" in p) != shared_router
    kernels = [p["router"]["kernel"], p["router"]["kernel"] if shared_router else p["router_1"]["kernel"]]
    x0 = np.asarray(x, np.float64).reshape(-1, 32)
    state, loads = x0, []
    for kernel in kernels:  # each pass: router c's softmax top-2 over the same experts, plus the shared GLU
        ids, weights = reference.route_tokens(state @ np.asarray(kernel, np.float64), cfg)
        loads.append(np.bincount(ids.reshape(-1), minlength=8))
        out = reference.moe_layer(state, p, ids, weights)
        state = out if residual == "outer" else state + out
    expected = state - x0 if residual == "inner_outer" else state
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), expected, atol=5e-5, rtol=1e-4)
    passes = aux["moe_aux"][stats.STATS]
    assert len(passes) == 2 and [int(r.layer) for r in passes] == [0, 0]
    for record, load_ in zip(passes, loads, strict=True):
        np.testing.assert_array_equal(record.tokens_per_expert, load_)
    combined = helpers_moe.lone_stats(aux["moe_aux"])  # the passes summed (each adds its losses to the objective)
    np.testing.assert_array_equal(combined.tokens_per_expert, loads[0] + loads[1])
    assert float(combined.num_tokens) == 16


def test_chain_of_experts_inner_residual_replaces_the_residual_stream():
    """The released code's quirk: with chain_residual='inner' the block's output is the MoE output x_C;
    'inner_outer' adds x_C - x_0 to the block input instead."""
    config = small_model(load("chain_of_experts")).model
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


# The short training of every zoo config, at a reduced width (the same for all: --config.<field> overrides).
SMALL = {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4, "model.ffn_dim": 64,
         "model.moe.expert_ffn": 32, "train.steps": 20, "train.warmup_steps": 5, "train.batch_size": 8,
         "train.seq_len": 32, "train.eval_every": 0, "train.log_every": 10, "data.eval_batches": 1,
         "checkpoint.every_steps": 0}
# This one trains through the command line itself; the others through tests/zoo_runner.py (the function the command
# calls after parsing its flags), all of them in one process so that they share one interpreter and jax import.
THROUGH_THE_COMMAND = "deepseekmoe"


def zoo_overrides(name: str, data_dir) -> dict:
    overrides = {**SMALL, "data.dir": str(data_dir)}
    if load(name).model.num_kv_heads:
        overrides["model.num_kv_heads"] = 2
    if load(name).model.layer_types:  # one attention kind per layer (GPT-OSS): the first two for the 2 layers here
        overrides["model.layer_types"] = tuple(load(name).model.layer_types[:2])
    if name == "upcycling":  # whole copies of the 64-wide dense FFN, after 6 dense steps
        overrides.update({"model.moe.expert_ffn": 64, "upcycle.dense_steps": 6})
    return overrides


@pytest.fixture(scope="module")
def zoo_workdirs(data_dir, tmp_path_factory):
    """The zoo's short trainings (all but THROUGH_THE_COMMAND) run by one tests/zoo_runner.py process on one
    device; each test below reads its config's workdir."""
    root = tmp_path_factory.mktemp("zoo")
    names = [name for name in ZOO if name != THROUGH_THE_COMMAND]
    spec = [{"name": name, "config": str(CONFIGS / f"{name}.py"), "overrides": zoo_overrides(name, data_dir),
             "workdir": str(root / name)} for name in names]
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, XLA_FLAGS=helpers_env.xla_flags())  # one device
    result = subprocess.run([sys.executable, "-m", "tests.zoo_runner", str(root / "spec.json")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=3000)
    return {name: root / name for name in names}, result


@pytest.mark.xdist_group("zoo_runs")  # one worker: the module fixture's one process runs every config once
@pytest.mark.parametrize("name", ZOO)
def test_zoo_config_trains_20_steps_through_main(name, data_dir, tmp_path, request):
    if name == THROUGH_THE_COMMAND:
        overrides = [f"--config.{field}={value}" for field, value in zoo_overrides(name, data_dir).items()]
        command = [sys.executable, "-m", "moejax.main", f"--config={CONFIGS / f'{name}.py'}",
                   f"--workdir={tmp_path / name}", *overrides]
        env = dict(os.environ, XLA_FLAGS=helpers_env.xla_flags())  # one device
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        workdir = tmp_path / name
    else:
        workdirs, result = request.getfixturevalue("zoo_workdirs")
        workdir = workdirs[name]
        error = workdir / "error.txt"
        assert not error.exists(), error.read_text()[-3000:]
        assert result.returncode == 0 or (workdir / "summary.json").exists(), result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 20 and np.isfinite(summary["val_loss"]) and summary["val_loss"] < 5.55
    assert all("maxvio" in layer for layer in summary["moe_layers"].values())
    if name == "upcycling":  # the dense stage ran first; renormalised top-2 over copies computes the dense function
        dense = json.loads((workdir / "dense" / "summary.json").read_text())
        assert dense["steps"] == 6 and not dense["moe_layers"]
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        step0 = [r for r in records if r["kind"] == "eval" and r["step"] == 0]
        assert len(step0) == 1
        np.testing.assert_allclose(step0[0]["loss"], dense["val_loss"], rtol=1e-5)
