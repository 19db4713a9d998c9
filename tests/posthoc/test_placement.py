"""Expert placement with replicas (moejax/moe/placement.py, moejax/posthoc/placement.py).

References: brute force over every replica count vector (the replication's min-max optimality), a plain-Python loop
of EPLB's balanced packing, the plan's own invariants (every expert placed, the maps inverse to each other, whole
groups on one node), and the model without a placement (replicas are copies: the placed model computes the same, on
one device and expert-parallel).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checks, generate, model, moe, parallel
from moejax.posthoc import placement
from tests.helpers_posthoc import VOCAB, random_model

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)), jnp.int32)


def test_replication_minimises_the_largest_load_per_replica():
    rng = np.random.default_rng(0)
    for _ in range(20):
        weight = rng.gamma(0.5, size=(1, 4)) * 10
        phy2log, rank, count = placement.replicate_experts(weight, 7)
        best = min(max(weight[0] / np.array(c)) for c in itertools.product(range(1, 5), repeat=4) if sum(c) == 7)
        assert max(weight[0] / count[0]) == pytest.approx(best)
        np.testing.assert_array_equal(np.bincount(phy2log[0], minlength=4), count[0])
        for e in range(4):  # replica ranks 0..c-1 of each expert
            assert sorted(rank[0][phy2log[0] == e].tolist()) == list(range(count[0, e]))


def naive_packing(weights, num_packs):
    """EPLB's balanced_packing loop, item by item."""
    per_pack = len(weights) // num_packs
    loads, items, pack_of = [0.0] * num_packs, [0] * num_packs, {}
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        pack = min((p for p in range(num_packs) if items[p] < per_pack), key=lambda p: loads[p])
        pack_of[item] = pack
        loads[pack] += weights[item]
        items[pack] += 1
    return [pack_of[i] for i in range(len(weights))]


def test_balanced_packing_is_eplbs_loop():
    rng = np.random.default_rng(1)
    weight = rng.gamma(0.7, size=(5, 12))
    pack, rank = placement.balanced_packing(weight, 4)
    for row in range(5):
        assert pack[row].tolist() == naive_packing(weight[row].tolist(), 4)
        assert np.bincount(pack[row], minlength=4).tolist() == [3] * 4
        for p in range(4):
            assert sorted(rank[row][pack[row] == p].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("groups,nodes", [(1, 1), (4, 2), (3, 2)])  # (3, 2): not divisible, the global policy
def test_a_plan_places_every_expert_and_balances_the_devices(groups, nodes):
    rng = np.random.default_rng(2)
    load = rng.gamma(0.4, size=(3, 12)) * 100
    phy2log, log2phy, count = placement.rebalance_experts(load, 16, num_groups=groups, num_nodes=nodes, num_gpus=4)
    assert phy2log.shape == (3, 16)
    for layer in range(3):
        np.testing.assert_array_equal(np.bincount(phy2log[layer], minlength=12), count[layer])
        for e in range(12):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert len(slots) == count[layer, e] and (phy2log[layer, slots] == e).all()
        if groups % nodes == 0 and nodes > 1:  # hierarchical: a group's experts all live on one node's devices
            node_of = np.arange(16) // (16 // nodes)
            for g in range(groups):
                members = range(g * 3, (g + 1) * 3)
                assert len({int(node_of[p]) for e in members for p in np.flatnonzero(phy2log[layer] == e)}) == 1
    before = placement.imbalance(placement.device_loads(load, np.tile(np.arange(12), (3, 1)), 4))
    after = placement.imbalance(placement.device_loads(load, phy2log, 4))
    assert (after <= before + 1e-9).all() and after.mean() < before.mean()
    np.testing.assert_allclose(placement.device_loads(load, phy2log, 4).sum(-1), load.sum(-1))


@pytest.mark.parametrize("fields", [dict(num_layers=3, first_dense=1, num_shared=1),
                                    dict(num_layers=4, moe_every=2, scan=True, expert_kind="gpt_oss")])
def test_a_placed_model_computes_what_it_computed(fields):
    config, variables = random_model(**fields)
    load = np.random.default_rng(3).gamma(0.5, size=(2, 8)) * 100
    phy2log, _, count = placement.rebalance_experts(load, 12, num_gpus=4)
    placed_config, placed = placement.place(config, variables, phy2log)
    for params, _ in model.moe_layer_variables(placed_config.model, placed).values():
        assert params[moe.EXPERTS]["wo"].shape[0] == 12
    want = np.asarray(model.Transformer(config.model).apply(variables, TOKENS))
    np.testing.assert_array_equal(np.asarray(model.Transformer(placed_config.model).apply(placed, TOKENS)), want)
    back_config, back = placement.unplaced(placed_config, placed)
    assert back_config.model.moe.expert_placement == ()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back["params"]),
                 jax.tree.map(np.asarray, variables["params"]))


def test_a_placed_model_generates_expert_parallel_like_one_device():
    config, variables = random_model(num_layers=2)
    load = np.random.default_rng(4).gamma(0.3, size=(2, 8)) * 100
    phy2log, _, _ = placement.rebalance_experts(load, 12, num_gpus=4)
    placed_config, placed = placement.place(config, variables, phy2log)
    prompts = np.asarray(np.random.default_rng(5).integers(0, VOCAB, (4, 3)))
    want = generate.generate(config, variables, prompts, max_new_tokens=5)
    for mode in ("a2a", "ring"):
        cfg = placed_config.copy_and_resolve_references()
        cfg.model.moe.ep_mode = mode
        cfg.mesh.update(data=2, expert=4)
        got = generate.generate(cfg, placed, prompts, max_new_tokens=5, mesh=parallel.make_mesh(cfg))
        np.testing.assert_array_equal(got, want, err_msg=mode)


def test_bad_placements_are_named():
    config, _ = random_model()
    config.model.moe.expert_placement = ((0, 1, 2), (0,) * 8)
    with pytest.raises(checks.ConfigError, match=r"model.moe.expert_placement\[0\]"):
        model.validate(config.model)
    config.model.moe.expert_placement = (tuple(range(8)) + (0,), tuple(range(8)))
    with pytest.raises(checks.ConfigError, match="same number of physical slots"):
        model.validate(config.model)
    with pytest.raises(ValueError, match="num_replicas=6"):
        placement.rebalance_experts(np.ones((2, 8)), 6)
    with pytest.raises(ValueError, match="placement"):
        from moejax.posthoc import prune
        placed_config, placed = placement.place(*random_model(), np.tile(np.arange(8), (2, 1)))
        prune.prune(placed_config, placed, {0: [0, 1], 1: [2, 3]})


def test_place_command_writes_a_placed_model_that_computes_the_same(release, tmp_path):
    import json

    import moejax
    from moejax.posthoc import __main__ as cli

    out = tmp_path / "placed"
    result = cli.main(["place", *release[1], "--devices", "2", "--redundant", "2", "--out", str(out)])
    config, variables = moejax.load(out)
    source_config, source = moejax.load(release[0])
    assert config.model.moe.expert_placement and json.loads((out / "placement.json").read_text())["devices"] == 2
    tokens = jnp.asarray(np.arange(16, dtype=np.int32)[None] % config.model.vocab_size)
    np.testing.assert_allclose(np.asarray(model.Transformer(config.model).apply(variables, tokens)),
                               np.asarray(model.Transformer(source_config.model).apply(source, tokens)),
                               rtol=1e-6, atol=1e-6)
    assert max(result["max_over_mean_after"]) <= max(result["max_over_mean_before"]) + 1e-9
    with pytest.raises(ValueError, match="--redundant=1"):
        cli.main(["place", *release[1], "--devices", "2", "--redundant", "1", "--out", str(tmp_path / "x")])
