"""Expert maps (moejax/moe/expert_map.py, posthoc/compress.bind) and the merges and pruning built on them.

References: a model whose bound logical experts are stored as E copies (the plain layout, no map), which is what a
bound model claims to compute; the original model with -inf router and selection biases on removed experts (what
removal claims to compute); and a numpy transcription of the MC-SMoE authors' grouping and merging loop
(UNITES-Lab/MC-SMoE ``merging/grouping_mixtral.py``).
"""
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checks, generate, model, moe, parallel
from moejax.moe import expert_map
from moejax.posthoc import compress, merge, prune
from moejax.posthoc.trace import Trace
from tests.helpers_posthoc import VOCAB, random_model
from tests.reference import minus_inf_bias

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)), jnp.int32)


def copies_reference(config, variables, rows):
    """The original variables with logical expert i of each layer replaced by a copy of the first logical expert
    bound to the same stored expert (numpy): the plain-layout model a binding of representatives computes."""
    ref = jax.tree.map(np.array, variables)
    sites = model.moe_layer_paths(config.model)
    for layer, row in rows.items():
        site = sites[layer]
        stacked = functools.reduce(operator.getitem, site.path, ref["params"])[moe.EXPERTS]
        reps = np.array([int(np.flatnonzero(row == s)[0]) for s in range(row.max() + 1)])
        for name in stacked:
            if site.unit is None:
                stacked[name] = stacked[name][reps[row]]
            else:
                stacked[name][site.unit] = stacked[name][site.unit][reps[row]]
    return ref


def representatives_binding(config, variables, rows):
    trees = model.moe_layer_variables(config.model, variables)
    out = {}
    for layer, row in rows.items():
        reps = [int(np.flatnonzero(row == s)[0]) for s in range(row.max() + 1)]
        out[layer] = compress.Binding(row, {n: np.asarray(v)[reps] for n, v in trees[layer][0][moe.EXPERTS].items()})
    return out


BIND_CASES = {
    "unrolled_shared": (dict(num_layers=3, first_dense=1, num_shared=1, shared_gate=True),
                        {1: [0, 0, 1, 1, 2, 2, 3, 3], 2: [0, 1, 2, 0, 1, 2, 0, 1]}),
    "scanned_gpt_oss_padded": (dict(num_layers=4, moe_every=2, scan=True, expert_kind="gpt_oss"),
                               {0: [0, 1, 1, 2, 3, 4, 4, 0], 2: [0, 0, 0, 0, 1, 1, 1, 1]}),
    "sigmoid_groups": (dict(router=dict(score="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum",
                                        norm_topk_prob=True, routed_scaling_factor=2.5)),
                       {0: [0, 0, 1, 2, 3, 3, 2, 1], 1: [0, 1, 2, 3, 4, 5, 6, 6]}),
}


@pytest.mark.parametrize("case", sorted(BIND_CASES))
def test_bound_model_equals_the_copies_model(case):
    fields, rows = BIND_CASES[case]
    rows = {layer: np.array(row) for layer, row in rows.items()}
    config, variables = random_model(**fields)
    new_config, new_variables = compress.bind(config, variables, representatives_binding(config, variables, rows))
    got = model.Transformer(new_config.model).apply(new_variables, TOKENS)
    want = model.Transformer(config.model).apply(copies_reference(config, variables, rows), TOKENS)
    # equal up to rounding: two slots bound to one stored expert run it once with their summed weight
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # the router is the same arrays; stored experts per layer (scanned layers padded to the widest)
    for layer, (params, state) in model.moe_layer_variables(new_config.model, new_variables).items():
        old_params, old_state = model.moe_layer_variables(config.model, variables)[layer]
        assert params["router"]["kernel"] is old_params["router"]["kernel"] or \
            np.array_equal(params["router"]["kernel"], old_params["router"]["kernel"])
        np.testing.assert_array_equal(state[moe.ROUTER_BIAS], old_state[moe.ROUTER_BIAS])
        stored = params[moe.EXPERTS]["wo"].shape[0]
        expected = max(r.max() + 1 for r in rows.values()) if config.model.scan_layers else rows[layer].max() + 1
        assert stored == expected
    assert new_config.model.moe.num_experts == 8


def test_uneven_pruning_equals_minus_inf_biases_and_stores_fewer_experts():
    config, variables = random_model(num_layers=3, first_dense=1, num_shared=1)
    keep = {1: [0, 2, 5], 2: [1, 2, 3, 4, 6, 7]}
    new_config, new_variables = prune.prune(config, variables, keep)
    got = model.Transformer(new_config.model).apply(new_variables, TOKENS)
    want = model.Transformer(config.model).apply(minus_inf_bias(config, variables, keep), TOKENS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    stored = {layer: p[moe.EXPERTS]["wi_0"].shape[0]
              for layer, (p, _) in model.moe_layer_variables(new_config.model, new_variables).items()}
    assert stored == {1: 3, 2: 6}
    assert expert_map.row(new_config.model.moe, 1).tolist() == [0, -1, 1, -1, -1, 2, -1, -1]
    # pruning again, now through the map: logical ids stay the router's
    again_config, again = prune.prune(new_config, new_variables, {1: [0, 5], 2: [2, 3, 4, 6, 7]})
    got = model.Transformer(again_config.model).apply(again, TOKENS)
    want = model.Transformer(config.model).apply(minus_inf_bias(config, variables, {1: [0, 5], 2: [2, 3, 4, 6, 7]}),
                                                 TOKENS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already removes|removed"):
        prune.prune(new_config, new_variables, {1: [0, 1], 2: [1, 2]})


def test_merging_groups_of_exact_copies_changes_nothing():
    config, variables = random_model(num_layers=2)
    variables = jax.tree.map(np.array, variables)
    groups = {0: [[0, 3], [1, 2, 5], [4], [6, 7]], 1: [[0, 1], [2, 3], [4, 5], [6, 7]]}
    for layer, (params, _) in model.moe_layer_variables(config.model, variables).items():
        for members in groups[layer]:
            for value in params[moe.EXPERTS].values():
                value[members] = value[members[0]]  # the members are copies of one expert
    before = model.Transformer(config.model).apply(variables, TOKENS)
    # mean outputs equal within a group of copies, apart between groups: HC-SMoE finds the groups
    rng = np.random.default_rng(1)
    outputs = np.zeros((2, 8, 4))
    for layer in (0, 1):
        for members in groups[layer]:
            outputs[layer, members] = rng.normal(size=4)
    for name, (new_config, new_variables) in {
            "average": merge.average(config, variables, groups),
            "hcsmoe": merge.hcsmoe(config, variables, outputs, 4, frequencies=rng.integers(1, 9, (2, 8)))}.items():
        for layer in (0, 1):
            assert sorted(_partition(expert_map.row(new_config.model.moe, layer))) == sorted(groups[layer]), name
        after = model.Transformer(new_config.model).apply(new_variables, TOKENS)
        np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-6, atol=1e-6, err_msg=name)
    kernel = model.moe_layer_variables(new_config.model, new_variables)[0][0]["router"]["kernel"]
    assert kernel.shape[-1] == 8


# ------------------------------------------------------------------------- MC-SMoE against the authors' loop


def authors_mcsmoe(frequencies, logits, experts, average):
    """A numpy transcription of MC-SMoE's ``ExpertsGrouperForMixtral`` (compute_all_usages ->
    _assign_num_groups_per_layer -> group_experts_globally_from_dominant_experts with router-logits similarity) and
    ``_merge_mlp_experts_by_usage_frequency_weighting``: returns {layer: (labels [E], merged {name: [E, ...]} where
    every member holds its group's merged weights)}."""
    layers = sorted(frequencies)
    num_experts = len(frequencies[layers[0]])
    usage = {layer: frequencies[layer] / frequencies[layer].sum() for layer in layers}
    modified = {}
    for layer in layers:
        row = usage[layer].copy()
        row[np.argmax(row)] = 1.0
        modified[layer] = row
    pooled = np.sort(np.concatenate([modified[layer] for layer in layers]))[::-1]
    total = average * len(layers) - (1 if average == num_experts else 0)
    threshold = pooled[total]
    result = {}
    for layer in layers:
        num_groups = int(sum(1 for v in modified[layer] if v > threshold))
        sim = np.zeros((num_experts, num_experts))
        for i in range(num_experts):
            for j in range(i + 1, num_experts):
                a, b = logits[layer][:, i], logits[layer][:, j]
                cos = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-7 ** 2)
                sim[i, j] = sim[j, i] = (cos + 1) / 2
        order = np.argsort(-usage[layer], kind="stable")
        labels = np.zeros(num_experts, int)
        cores = order[:num_groups]
        for i in range(num_groups):
            labels[order[i]] = i
        for i in range(num_groups, num_experts):
            core = cores[np.argmax(sim[order[i], cores])]
            labels[order[i]] = labels[core]
        merged = {name: np.array(value, np.float64) for name, value in experts[layer].items()}
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            f = usage[layer][members]
            for name, value in experts[layer].items():
                avg = sum(value[e].astype(np.float64) * f[k] for k, e in enumerate(members)) / (f.sum() + 1e-7)
                merged[name][members] = avg
        result[layer] = (labels, merged)
    return result


def test_mcsmoe_equals_the_authors_loop_with_uneven_groups_and_binding():
    config, variables = random_model(num_layers=3)
    rng = np.random.default_rng(3)
    layers = model.moe_layers(config.model)
    skew = [np.array([40, 30, 1, 1, 1, 1, 1, 1]), np.array([9, 8, 8, 7, 7, 6, 6, 5]), np.array([50, 1, 1, 1, 1, 1,
                                                                                                 1, 1])]
    experts = np.stack([np.stack([rng.choice(8, size=2, replace=False, p=s / s.sum()) for _ in range(400)])
                        for s in skew]).astype(np.int32)
    trace = Trace(experts=experts, weights=np.ones(experts.shape, np.float32),
                  token_ids=rng.integers(0, VOCAB, 400), layers=layers, num_experts=8)
    logits = {layer: rng.normal(size=(300, 8)).astype(np.float32) for layer in layers}
    new_config, new_variables = merge.mcsmoe(config, variables, trace, 3, align="none", router_logits=logits)

    freq = {layer: np.bincount(experts[i].reshape(-1), minlength=8).astype(np.float64)
            for i, layer in enumerate(layers)}
    old = model.moe_layer_variables(config.model, variables)
    expected = authors_mcsmoe(freq, {k: v.astype(np.float64) for k, v in logits.items()},
                              {layer: {n: np.asarray(v) for n, v in old[layer][0][moe.EXPERTS].items()}
                               for layer in layers}, 3)
    counts = set()
    new = model.moe_layer_variables(new_config.model, new_variables)
    for layer in layers:
        labels, merged = expected[layer]
        row = expert_map.row(new_config.model.moe, layer)
        # the same partition of logical experts, each member bound to one stored expert
        assert sorted(map(sorted, _partition(row))) == sorted(map(sorted, _partition(labels)))
        counts.add(len(set(labels.tolist())))
        for name, value in new[layer][0][moe.EXPERTS].items():
            np.testing.assert_allclose(np.asarray(value)[row], merged[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new[layer][0]["router"]["kernel"], old[layer][0]["router"]["kernel"])
    assert len(counts) > 1  # uneven group counts per layer
    assert sum(len(set(expected[layer][0].tolist())) for layer in layers) <= 3 * 3
    logits_out = model.Transformer(new_config.model).apply(new_variables, TOKENS)
    assert np.isfinite(np.asarray(logits_out)).all()


def _partition(labels):
    labels = np.asarray(labels)
    return [np.flatnonzero(labels == v).tolist() for v in np.unique(labels[labels >= 0])]


def test_mcsmoe_needs_router_logits_or_the_weight_variant():
    config, variables = random_model()
    trace = Trace(experts=np.zeros((2, 10, 2), np.int32), weights=np.ones((2, 10, 2), np.float32),
                  token_ids=np.zeros(10, np.int64), layers=[0, 1], num_experts=8)
    with pytest.raises(ValueError, match="router_logits"):
        merge.mcsmoe(config, variables, trace, 4)
    with pytest.raises(ValueError, match="align"):
        merge.mcsmoe(config, variables, trace, 4, align="sideways", similarity="router_weight")


def test_global_counts_follow_the_threshold_rule():
    frequencies = {0: np.array([5, 1, 1, 1.0]), 1: np.array([1, 1, 1, 1.0]), 2: np.array([3, 3, 1, 1.0])}
    counts = merge.mcsmoe_group_counts(frequencies, 2)
    # modified usages: [1, .125, .125, .125], [1, .25, .25, .25], [1, .375, .125, .125]; pooled sorted, threshold at
    # position 6: .25 -> counts 1, 1, 2: ties at the threshold give 4 groups, not 6, as in the authors' code
    assert counts == {0: 1, 1: 1, 2: 2}


# ----------------------------------------------------------------------------- through the model's machinery


def test_a_mapped_model_generates_on_a_mesh_like_its_copies_model():
    config, variables = random_model(num_layers=2)
    rows = {0: np.array([0, 0, 1, 1, 2, 2, 3, 3]), 1: np.array([0, 1, 2, 3, 3, 2, 1, 0])}
    new_config, new_variables = compress.bind(config, variables, representatives_binding(config, variables, rows))
    reference = copies_reference(config, variables, rows)
    prompts = np.asarray(np.random.default_rng(2).integers(0, VOCAB, (4, 3)))
    want = generate.generate(config, reference, prompts, max_new_tokens=5)
    np.testing.assert_array_equal(generate.generate(new_config, new_variables, prompts, max_new_tokens=5), want)
    for mode in ("a2a", "ring"):
        cfg = new_config.copy_and_resolve_references()
        cfg.model.moe.ep_mode = mode
        cfg.mesh.update(data=2, expert=4)
        mesh = parallel.make_mesh(cfg)
        np.testing.assert_array_equal(generate.generate(cfg, new_variables, prompts, max_new_tokens=5, mesh=mesh),
                                      want, err_msg=mode)


def test_bad_maps_are_named():
    config, _ = random_model()
    config.model.moe.expert_map = ((0, 1), ())
    with pytest.raises(checks.ConfigError, match=r"model.moe.expert_map\[0\]"):
        model.validate(config.model)
    config.model.moe.expert_map = ((0, 2, 2, 2, 2, 2, 2, 2), ())
    with pytest.raises(checks.ConfigError, match="0..S-1"):
        model.validate(config.model)
    config.model.moe.expert_map = ((0,) * 8,)
    with pytest.raises(checks.ConfigError, match="one row per model layer"):
        model.validate(config.model)
    config.model.moe.expert_map = ((0, -1, -1, -1, -1, -1, -1, -1), ())
    with pytest.raises(checks.ConfigError, match="model.moe.top_k"):
        model.validate(config.model)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_capture_and_importance_of_a_mapped_model_match_its_copies_model(on_mesh):
    from moejax.posthoc import importance, super_experts

    config, variables = random_model(num_layers=3, first_dense=1, num_shared=1)
    rows = {1: np.array([0, 0, 1, 1, 2, 2, 3, 3]), 2: np.array([0, 1, 2, 3, 3, 2, 1, 0])}
    new_config, new_variables = compress.bind(config, variables, representatives_binding(config, variables, rows))
    reference = copies_reference(config, variables, rows)
    batches = [np.asarray(np.random.default_rng(5).integers(0, VOCAB, (8, 8)))]
    mesh = jax.make_mesh((2, 1, 4, 1), parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4) \
        if on_mesh else None
    criteria = list(importance.CRITERIA)
    got = importance.from_forward(new_config, new_variables, batches, criteria, mesh=mesh)
    want = importance.from_forward(config, reference, batches, criteria)
    for name in criteria:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(importance.expert_mean_outputs(new_config, new_variables, batches, mesh=mesh),
                               importance.expert_mean_outputs(config, reference, batches), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(super_experts.profile(new_config, new_variables, batches, mesh=mesh).max_output,
                               super_experts.profile(config, reference, batches).max_output, rtol=2e-5, atol=1e-6)
    # removal: the captured routing never selects a removed logical expert
    keep = {1: [0, 2, 5], 2: [1, 2, 3, 4, 6, 7]}
    pruned_config, pruned = prune.prune(config, variables, keep)
    frequency = importance.from_forward(pruned_config, pruned, batches, "frequency", mesh=mesh)
    for row, layer in enumerate((1, 2)):
        assert frequency[row][np.setdiff1d(np.arange(8), keep[layer])].sum() == 0


# -------------------------------------------------------------------------- MC-SMoE's compress stage


def authors_losparse(weight_torch, rank, density):
    """The authors' low_rank_decomposition + one 'row'/'mean' structured prune of the remainder, in numpy, on a
    torch-layout [out, in] matrix (importance |S|)."""
    u, s, vh = np.linalg.svd(weight_torch, full_matrices=False)
    left = u @ np.sqrt(np.diag(s)[:, :rank])
    right = np.sqrt(np.diag(s)[:rank, :]) @ vh
    sparse = weight_torch - left @ right
    rows = np.abs(sparse).mean(axis=1, keepdims=True).repeat(sparse.shape[1], axis=1)
    threshold = np.sort(rows[:, 0])[::-1][int(np.ceil(density * sparse.shape[0])) - 1]
    return left @ right + sparse * (rows >= threshold)


def test_compress_stage_equals_the_authors_decomposition_and_keeps_the_map():
    from moejax.posthoc import lowrank

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 24))  # moejax layout [in, out]
    got, count = lowrank.low_rank_plus_sparse(w, 3, 0.25)
    np.testing.assert_allclose(got, authors_losparse(w.T, 3, 0.25).T, rtol=1e-10, atol=1e-10)
    assert count == 3 * (16 + 24) + 6 * 16
    np.testing.assert_allclose(lowrank.low_rank_plus_sparse(w, 3, 1.0)[0], w, atol=1e-10)  # all of S kept
    full_rank = lowrank.low_rank_plus_sparse(w, 16, 0.0)[0]
    np.testing.assert_allclose(full_rank, w, atol=1e-9)  # rank min(in, out): the low-rank part is W

    config, variables = random_model(num_layers=4, moe_every=2, scan=True)
    rows = {0: np.array([0, 0, 1, 1, 2, 2, 3, 3]), 2: np.array([0, 1, 0, 1, 0, 1, 0, 1])}
    bound_config, bound = compress.bind(config, variables, representatives_binding(config, variables, rows))
    new_config, new_variables, report = lowrank.compress_experts(bound_config, bound, rank=2, density=0.5)
    assert new_config.model.moe.expert_map == bound_config.model.moe.expert_map
    assert 0 < report["ratio"] < 1
    old = model.moe_layer_variables(bound_config.model, bound)
    new = model.moe_layer_variables(new_config.model, new_variables)
    for layer in (0, 2):
        for j in range(rows[layer].max() + 1):
            np.testing.assert_allclose(np.asarray(new[layer][0][moe.EXPERTS]["wo"][j]), lowrank.low_rank_plus_sparse(
                np.asarray(old[layer][0][moe.EXPERTS]["wo"][j]), 2, 0.5)[0], rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(model.Transformer(new_config.model).apply(new_variables, TOKENS))).all()


def test_groups_of_one_are_the_identity_and_overlapping_groups_are_refused():
    config, variables = random_model(num_layers=3, first_dense=1, num_shared=1)
    apply = model.Transformer(config.model).apply
    singletons = {1: [[e] for e in range(8)], 2: [[e] for e in range(8)]}
    new_config, new_variables = merge.average(config, variables, singletons)
    assert new_config.model.moe.expert_map == ()  # the identity everywhere: no map is written
    np.testing.assert_array_equal(np.asarray(model.Transformer(new_config.model).apply(new_variables, TOKENS)),
                                  np.asarray(apply(variables, TOKENS)))
    with pytest.raises(ValueError, match="disjoint"):
        merge.average(config, variables, {1: [[0, 1], [1, 2]], 2: [[0], [1]]})
