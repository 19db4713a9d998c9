"""Expert pruning and merging (moejax/posthoc/prune.py, merge.py, on the core of compress.py).

Pruning is checked against the original model with a router bias of -inf on the pruned experts (router/bias in
the params, and the selection bias in moe_state): that model never routes to them, which is what pruning claims to
compute. Merging is checked by its invariants: a neuron-permuted copy of an expert merges back into the expert,
weight matching recovers a known permutation, groups of one expert are the identity, and the merged models apply.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import checks, model, moe
from moejax.moe import experts as experts_lib
from moejax.moe import routers
from moejax.posthoc import compress, importance, merge, prune
from moejax.posthoc.trace import Trace
from tests.helpers_posthoc import VOCAB, random_model
from tests.reference import minus_inf_bias

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)), jnp.int32)


# ------------------------------------------------------------------------------------------------------ pruning

PRUNE_CASES = {
    # dense first layer, shared expert with its gate; unequal kept sets per layer
    "unrolled_shared": (dict(num_layers=3, first_dense=1, num_shared=1, shared_gate=True),
                        {1: [0, 2, 5, 7], 2: [1, 2, 3, 6]}),
    # scanned units of (MoE, dense) blocks, GPT-OSS experts (biases), Chain-of-Experts (a second router)
    "scanned_gpt_oss_chain": (dict(num_layers=4, moe_every=2, scan=True, expert_kind="gpt_oss", chain_iterations=2),
                              {0: [1, 3, 4, 6, 7], 2: [0, 1, 2, 5, 6]}),
    # top_k 4 > 3 kept: clamped to 3 (the reference routes its 4th slot to a pruned expert with weight 0)
    "top_k_clamped": (dict(top_k=4, router=dict(norm_topk_prob=True)), {0: [2, 4, 6], 1: [0, 1, 7]}),
    # AdaMoE: the 2 null-expert columns after the real ones survive
    "adamoe_null_columns": (dict(num_null_experts=2, top_k=3, router=dict(kind="adamoe")),
                            {0: [0, 3, 4, 5], 1: [1, 2, 6, 7]}),
    # DeepSeek-V3 group-limited routing, 4 groups of 2, top-2 groups: whole groups pruned -> 3 groups
    "groups_whole": (dict(router=dict(score="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum",
                                      norm_topk_prob=True, routed_scaling_factor=2.5)),
                     {0: [0, 1, 2, 3, 6, 7], 1: [2, 3, 4, 5, 6, 7]}),
    # DeepSeek-V2 group-limited routing: one expert kept from every group -> 4 groups of 1
    "groups_one_each": (dict(router=dict(num_groups=4, topk_groups=2, group_score="max", routed_scaling_factor=4.0)),
                        {0: [0, 3, 4, 7], 1: [1, 2, 5, 6]}),
}


@pytest.mark.parametrize("case", sorted(PRUNE_CASES))
def test_pruned_model_is_the_original_with_minus_inf_router_bias(case):
    fields, keep = PRUNE_CASES[case]
    config, variables = random_model(**fields)
    apply = jax.jit(model.Transformer(config.model).apply)
    before = jax.tree.map(np.array, variables)
    new_config, new_variables = prune.prune(config, variables, keep)

    kept = len(next(iter(keep.values())))
    assert new_config.model.moe.num_experts == kept
    assert new_config.model.moe.top_k == min(config.model.moe.top_k, kept + config.model.moe.num_null_experts)
    assert config.model.moe.num_experts == 8  # the input config is not modified
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)  # nor the variables
    assert new_variables["params"]["embed"]["embedding"] is variables["params"]["embed"]["embedding"]

    pruned = jax.jit(model.Transformer(new_config.model).apply)(new_variables, TOKENS)
    reference = apply(minus_inf_bias(config, variables, keep), TOKENS)
    original = apply(variables, TOKENS)
    assert np.isfinite(np.asarray(pruned)).all()
    np.testing.assert_allclose(pruned, reference, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(original) - np.asarray(reference)).max() > 1e-3  # the pruned experts were routed to


def test_pruned_tree_slices_every_expert_tensor():
    config, variables = random_model(num_layers=4, moe_every=2, scan=True, expert_kind="gpt_oss",
                                     num_null_experts=1, router=dict(kind="adamoe"))
    variables = jax.tree.map(np.asarray, variables)  # numpy variables (moejax.training.checkpoint.load_checkpoint)
    keep = {0: [1, 3, 4], 2: [0, 5, 6]}
    _, new = prune.prune(config, variables, keep)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(new))
    old_ffn, new_ffn = variables["params"]["blocks"]["block_0"]["ffn"], new["params"]["blocks"]["block_0"]["ffn"]
    for unit, ids in enumerate(keep.values()):
        for name, value in old_ffn[moe.EXPERTS].items():
            np.testing.assert_array_equal(new_ffn[moe.EXPERTS][name][unit], np.asarray(value[unit])[ids])
        columns = ids + [8]  # the null expert's column follows
        np.testing.assert_array_equal(new_ffn["router"]["kernel"][unit], np.asarray(old_ffn["router"]["kernel"][unit])
                                      [:, columns])
        np.testing.assert_array_equal(new_ffn["router"]["bias"][unit], np.asarray(old_ffn["router"]["bias"][unit])
                                      [columns])
        old_bias = variables["moe_state"]["blocks"]["block_0"]["ffn"][moe.ROUTER_BIAS][unit]
        np.testing.assert_array_equal(new["moe_state"]["blocks"]["block_0"]["ffn"][moe.ROUTER_BIAS][unit],
                                      np.asarray(old_bias)[ids])


def small_config(**router):
    """A config whose MoE layers are 0 and 1 (no variables needed: the errors come before any array is read)."""
    config = base.get_config()
    config.model.update(num_layers=2, moe_every=1)
    config.model.moe.update(num_experts=8, top_k=2)
    config.model.moe.router.update(router)
    return config


@pytest.mark.parametrize("keep, message", [
    ({0: [0, 1], 2: [0, 1]}, "MoE layers"),
    ({0: [0, 0], 1: [0, 1]}, "distinct expert ids"),
    ({0: [0, 8], 1: [0, 1]}, "distinct expert ids"),
])
def test_prune_refuses_bad_keep(keep, message):
    with pytest.raises(ValueError, match=message):
        prune.prune(small_config(), {"params": {}}, keep)


def test_group_limited_routing_that_cannot_survive_names_the_field():
    grouped = dict(num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match=r"model\.moe\.router\.num_groups=4 cannot survive"):
        prune.prune(small_config(**grouped), {"params": {}}, {0: [0, 1, 2, 4], 1: [0, 1, 2, 4]})  # 2, 1, 1 per group
    with pytest.raises(ValueError, match=r"model\.moe\.router\.num_groups=4 cannot survive.*different numbers"):
        prune.prune(small_config(**grouped), {"params": {}}, {0: [0, 1, 2, 3], 1: [0, 2, 4, 6]})  # 2 vs 4 groups
    with pytest.raises(checks.ConfigError, match=r"model\.moe\.router\.topk_groups"):  # 1 group of 1 < top_k 2
        prune.prune(small_config(num_groups=4, topk_groups=1), {"params": {}}, {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]})


def test_device_groups():
    config = small_config()
    config.model.moe.update(device_groups=4, balance_loss="deepseek", device_balance_coef=0.1)
    keep = {0: [0, 1, 2, 4], 1: [0, 1, 2, 4]}
    with pytest.raises(ValueError, match=r"model\.moe\.device_groups=4 cannot survive"):
        prune.prune(config, {"params": {}}, keep)
    config.model.moe.device_balance_coef = 0.0  # no loss uses the groups: reset to 1
    assert compress.compressed_config(config, keep).model.moe.device_groups == 1
    assert compress.compressed_config(config, {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}).model.moe.device_groups == 4


def test_hash_routing_is_refused():
    config = small_config(kind="hash")
    config.model.moe.top_k = 1
    with pytest.raises(ValueError, match="hash"):
        prune.prune(config, {"params": {}}, {0: [0, 1], 1: [0, 1]})


def test_a_registered_router_is_pruned_as_its_facts_say(monkeypatch):
    """Pruning asks the router's RouterSpec, not its name: the same rule registered with expert ids computed from E
    is refused, registered without is pruned."""
    monkeypatch.setattr(routers, "ROUTERS", dict(routers.ROUTERS))
    routers.register("ids_from_e", ids_depend_on_num_experts=True)(routers.topk)
    routers.register("ids_from_scores")(routers.topk)
    keep = {0: [1, 2, 5, 6], 1: [0, 3, 4, 7]}
    with pytest.raises(ValueError, match=r"kind='ids_from_e' computes its expert ids from model\.moe\.num_experts"):
        prune.prune(small_config(kind="ids_from_e"), {"params": {}}, keep)
    config, variables = random_model(router=dict(kind="ids_from_scores"))
    new_config, new_variables = prune.prune(config, variables, keep)
    assert new_config.model.moe.num_experts == 4 and new_config.model.moe.router.kind == "ids_from_scores"
    np.testing.assert_array_equal(new_variables["params"]["layers_1"]["ffn"]["router"]["kernel"],
                                  np.asarray(variables["params"]["layers_1"]["ffn"]["router"]["kernel"])[:, keep[1]])


# ----------------------------------------------------------------------------------------- selection helpers

def synthetic_trace(layers=(0, 1), num_experts=8, tokens=300, top_k=2, seed=0):
    """A trace with skewed routing, some null slots (id E) and random weights."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(num_experts + 1) * 0.5, size=len(layers))
    experts = np.stack([rng.choice(num_experts + 1, size=(tokens, top_k), p=row) for row in p]).astype(np.int32)
    return Trace(experts=experts, weights=rng.random(experts.shape).astype(np.float32),
                 token_ids=rng.integers(0, 64, tokens), layers=list(layers), num_experts=num_experts)


def test_importance_frequency_and_soft_count():
    trace = synthetic_trace(layers=(1, 3))
    frequency, soft = importance.from_trace(trace, "frequency"), importance.from_trace(trace, "soft_count")
    for layer in range(2):
        for e in range(8):
            slots = trace.experts[layer] == e
            assert frequency[layer, e] == slots.sum()
            np.testing.assert_allclose(soft[layer, e], trace.weights[layer][slots].astype(np.float64).sum(),
                                       rtol=1e-12)
    assert frequency.sum() == (trace.experts < 8).sum()  # null slots left out
    keep = prune.keep_by_score(frequency, 3, layers=trace.layers)  # keyed by the model's layer index
    assert list(keep) == [1, 3] and keep[3] == sorted(np.argsort(-frequency[1], kind="stable")[:3].tolist())
    for criterion in ("reap", "easy_ep"):
        with pytest.raises(ValueError, match=f"{criterion}.*moejax.posthoc.importance"):
            importance.from_trace(trace, criterion)
    with pytest.raises(ValueError, match="frequency"):
        importance.from_trace(trace, "magnitude")


def test_keep_by_score_and_keep_global():
    scores = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert prune.keep_by_score(scores, 2) == {0: [1, 2], 1: [0, 1]}  # ties to the lower id
    assert prune.keep_by_score(scores, 1, layers=[1, 3]) == {1: [1], 3: [0]}
    # global: each layer's best, then the best of the rest over the model (layer 0's 3.0 beats layer 1's 2.0)
    assert prune.keep_global(scores, 4, layers=np.array([1, 3])) == {1: [1, 2], 3: [0, 1]}
    assert prune.keep_global(scores, 3, layers=np.array([1, 3])) == {1: [1, 2], 3: [0]}
    assert prune.keep_global(scores, 5) == {0: [1, 2], 1: [0, 1, 2]}  # 2.0 of layer 1 beats 1.0 of layer 0
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        prune.keep_global(scores, 9)
    with pytest.raises(ValueError, match="n=5"):
        prune.keep_by_score(scores, 5)


# ------------------------------------------------------------------------------------------------------ merging

def random_expert(kind, d=16, f=32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = experts_lib.EXPERT_KINDS[kind]().param_shapes(1, d, f)
    return {name: rng.normal(size=shape[1:]).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("kind", ["glu", "gpt_oss"])
def test_align_permutation_recovers_a_known_permutation(kind):
    weights = random_expert(kind)
    perm = np.random.default_rng(1).permutation(32)
    permuted = merge.permute_expert(weights, perm)
    np.testing.assert_array_equal(merge.align_permutation(weights, permuted, kind), np.argsort(perm))
    noisy = {name: value + 1e-2 * np.random.default_rng(2).normal(size=value.shape).astype(np.float32)
             for name, value in permuted.items()}
    np.testing.assert_array_equal(merge.align_permutation(weights, noisy, kind), np.argsort(perm))


@pytest.mark.parametrize("kind", ["glu", "gpt_oss"])
def test_merging_an_expert_with_permuted_copies_gives_it_back(kind):
    weights = random_expert(kind)
    rng = np.random.default_rng(3)
    copies = [weights] + [merge.permute_expert(weights, rng.permutation(32)) for _ in range(2)]
    expert = experts_lib.EXPERT_KINDS[kind]()
    x = jnp.asarray(rng.normal(size=(10, 16)), jnp.float32)
    for dominant in range(3):
        merged = merge.merge_group(copies, [3.0, 1.0, 2.0], dominant)
        for name in weights:  # exactly the dominant copy
            np.testing.assert_array_equal(merged[name], copies[dominant][name])
        out, expected = expert.apply_one(x, **merged), expert.apply_one(x, **weights)
        if dominant == 0:
            np.testing.assert_array_equal(out, expected)
        else:  # the same function; the sums over the hidden neurons run in another order
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_merge_group_weights_by_frequency():
    a, b = random_expert("glu", seed=0), random_expert("glu", seed=1)
    merged = merge.merge_group([a, b], [3.0, 1.0], 0, align=False)
    a64, b64 = ({name: v.astype(np.float64) for name, v in w.items()} for w in (a, b))
    np.testing.assert_allclose(merged["wo"], 0.75 * a64["wo"] + 0.25 * b64["wo"], rtol=0, atol=1e-7)
    uniform = merge.merge_group([a, b], [0.0, 0.0], 1, align=False)
    np.testing.assert_allclose(uniform["wi_0"], 0.5 * (a64["wi_0"] + b64["wi_0"]), rtol=0, atol=1e-7)
    assert merged["wo"].dtype == np.float32


def test_mcsmoe_groups_join_the_most_similar_dominant():
    rng = np.random.default_rng(0)
    columns = rng.normal(size=(6, 6))
    columns[:, 1] = 5.0 * columns[:, 2] + 0.1 * rng.normal(size=6)  # cosine, not dot product: scale is irrelevant
    columns[:, 4] = columns[:, 3] + 0.1 * rng.normal(size=6)
    columns[:, 5] = 0.2 * columns[:, 0] + 0.01 * rng.normal(size=6)
    # dominants: 0 (10 slots), 3 (9), then 2 rather than 5 (8 each: the lower id)
    similarity = merge.similarity_from_router_weights(columns)
    groups = merge.mcsmoe_groups(similarity, np.array([10, 0, 8, 9, 0, 8]), 3)
    assert groups == [[0, 5], [1, 2], [3, 4]]
    np.testing.assert_allclose(np.diag(similarity), 1.0)


def test_hcsmoe_groups_find_the_clusters():
    rng = np.random.default_rng(0)
    centres = 10.0 * rng.normal(size=(3, 8))
    labels = np.array([2, 0, 1, 0, 2, 1, 1, 0])
    outputs = centres[labels] + 0.1 * rng.normal(size=(8, 8))
    assert merge.hcsmoe_groups(outputs, 3) == [[0, 4], [1, 3, 7], [2, 5, 6]]
    assert merge.hcsmoe_groups(outputs, 8) == [[e] for e in range(8)]


def test_hcsmoe_on_scanned_layers_binds_and_keeps_the_router():
    # bfloat16 experts: merged in float64, stored back in bfloat16
    config, variables = random_model(num_layers=4, moe_every=2, scan=True, param_dtype="bfloat16",
                                     expert_kind="gpt_oss")
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(2, 8, 16))
    frequencies = rng.integers(1, 20, size=(2, 8)).astype(np.float64)
    new_config, new_variables = merge.hcsmoe(config, variables, outputs, 3, frequencies=frequencies, align=True)
    old = model.moe_layer_variables(config.model, variables)
    new = model.moe_layer_variables(new_config.model, new_variables)
    for row, layer in enumerate((0, 2)):
        mapping = new_config.model.moe.expert_map[layer]
        np.testing.assert_array_equal(new[layer][0]["router"]["kernel"], old[layer][0]["router"]["kernel"])
        for j, members in enumerate(merge.hcsmoe_groups(outputs[row], 3)):
            assert {mapping[e] for e in members} == {j}
            weights = frequencies[row, members] / frequencies[row, members].sum()
            bo = np.asarray(old[layer][0][moe.EXPERTS]["bo"], np.float64)[members].T @ weights  # no hidden axis
            assert new[layer][0][moe.EXPERTS]["bo"].dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(new[layer][0][moe.EXPERTS]["bo"][j], np.float64), bo, rtol=1e-2)
    logits = jax.jit(model.Transformer(new_config.model).apply)(new_variables, TOKENS)
    assert logits.shape == (2, 8, 64) and np.isfinite(np.asarray(logits)).all()
