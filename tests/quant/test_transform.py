"""Rules over parameter paths, quantisation as a model transform and its compact form, per-expert mixed precision."""
import jax
import ml_dtypes
import numpy as np
import pytest

from moejax import model
from moejax.quant import formats, mixed, rules, transform
from tests.helpers_posthoc import random_model


@pytest.fixture(scope="module")
def unrolled():
    return random_model(num_layers=4, moe_every=2, num_shared=1)


@pytest.fixture(scope="module")
def scanned():
    return random_model(num_layers=4, moe_every=2, scan=True, param_dtype="bfloat16")


def _leaves(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_targets_and_matrix_views(unrolled, scanned):
    by_name = {m.name: m for m in rules.matrices(unrolled[0], unrolled[1]["params"])}
    assert {m.target for m in by_name.values()} == set(rules.TARGETS) - {"dense"} | {"dense"}
    o = by_name["layers_0/attn/o/kernel"]  # [H, Dh, D]: two input axes
    assert (o.target, o.batch_ndim, o.k, o.n) == ("attention", 0, 16, 16)
    wo = by_name["layers_2/ffn/experts/wo"]
    assert (wo.batch_ndim, wo.k, wo.n, wo.layers, wo.experts) == (1, 8, 16, (2,) * 8, tuple(range(8)))
    assert by_name["layers_1/ffn/wi_0"].target == "dense" and by_name["layers_0/ffn/shared/wo"].target == "shared"
    assert not any("embed" in name or "norm" in name or "bias" in name for name in by_name)
    stacked = {m.name: m for m in rules.matrices(scanned[0], scanned[1]["params"])}
    wi = stacked["blocks/block_0/ffn/experts/wi_0"]  # [U, E, D, F]: units hold layers 0 and 2
    assert wi.batch == 16 and wi.layers == (0,) * 8 + (2,) * 8 and wi.experts == tuple(range(8)) * 2
    assert stacked["blocks/block_1/attn/q/kernel"].layers == (1, 3)


def test_the_first_matching_rule_decides_per_layer(scanned):
    config, variables = scanned
    chosen = rules.assign(config, variables["params"], [
        rules.Rule("experts", "none", layers=(2,)), rules.Rule("experts", "int4/g8"),
        rules.Rule("re:blocks/block_1/attn/(q|k)/kernel", "fp8"), rules.Rule("attention", "int8", layers=(0, 3))])
    _, experts = chosen["blocks/block_0/ffn/experts/wo"]
    assert [f and f.name for f in experts] == ["int4/g8"] * 8 + [None] * 8
    assert [f and f.name for f in chosen["blocks/block_1/attn/q/kernel"][1]] == ["fp8", "fp8"]
    assert [f and f.name for f in chosen["blocks/block_1/attn/v/kernel"][1]] == [None, "int8"]
    assert [f and f.name for f in chosen["blocks/block_0/attn/v/kernel"][1]] == ["int8", None]
    assert "blocks/block_0/ffn/router/kernel" not in chosen


@pytest.mark.parametrize("rule,match", [
    (rules.Rule("mlp", "int4"), r"rules\[0\].target='mlp' is invalid: allowed are attention, experts"),
    (rules.Rule("experts", "int12"), r"rules\[0\].format='int12' is not a weight format: allowed are int<b>"),
    (rules.Rule("experts", "int4", layers=()), r"rules\[0\].layers=\(\) is invalid"),
    (rules.Rule("re:(", "int4"), r"rules\[0\].target='re:\(' is not a regular expression"),
    (rules.Rule("experts", "int4", layers=(7,)), r"rules\[0\]=.* matches no quantisable matrix .* model layers"),
    (rules.Rule("re:.*/embedding", "int8"), r"rules\[0\]=.* matches no quantisable matrix"),
    ("experts=int4", r"rules\[0\]='experts=int4' is not a moejax.quant.Rule")])
def test_bad_rules_are_named(unrolled, rule, match):
    with pytest.raises(ValueError, match=match):
        rules.assign(unrolled[0], unrolled[1]["params"], [rule])


def test_rules_parse_from_the_command_line():
    parsed = rules.parse("experts=int4/g128; attention=fp8@0,2-3 ;re:.*/o/kernel=none")
    assert parsed == [rules.Rule("experts", "int4/g128"), rules.Rule("attention", "fp8", (0, 2, 3)),
                      rules.Rule("re:.*/o/kernel", "none")]
    for text, match in (("experts", "is not TARGET=FORMAT"), ("experts=int4@a", "has layers 'a'"),
                        ("", "holds no rule"), ("router=fp4", r"rules\[0\].format='fp4'")):
        with pytest.raises(ValueError, match=match):
            rules.parse(text)


@pytest.mark.parametrize("which", ["unrolled", "scanned"])
def test_fake_quantisation_and_the_compact_form_agree_exactly(which, request, tmp_path):
    config, variables = request.getfixturevalue(which)
    rule_list = rules.parse("experts=int4/g8@0;experts=mxfp4;attention=fp8;router=int8;lm_head=int3")
    new, tensors = transform.quantize(config, variables, rule_list)
    before, after = _leaves(variables["params"]), _leaves(new["params"])
    assert {k: (v.shape, v.dtype) for k, v in before.items()} == {k: (v.shape, v.dtype) for k, v in after.items()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == set(tensors) and not any("norm" in k or "embed" in k for k in changed)
    path = transform.save_tensors(tensors, tmp_path / "q.safetensors", metadata={"method": "rtn"})
    loaded = transform.load_tensors(path)
    assert transform.tensors_metadata(path) == {"method": "rtn"}
    for source in (tensors, loaded):
        rebuilt = _leaves(transform.materialise(variables["params"], source))
        assert all(np.array_equal(rebuilt[k], after[k]) and rebuilt[k].dtype == after[k].dtype for k in after)
    experts = [t for name, t in tensors.items() if name.endswith("experts/wi_0")]
    formats_used = sorted({p.format.name for t in experts for p in t.parts})
    assert formats_used == ["int4/g8", "mxfp4"]
    tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
    logits = jax.jit(model.Transformer(config.model).apply)(new, tokens)  # the unchanged model, the new weights
    assert np.all(np.isfinite(np.asarray(logits)))


def test_bfloat16_parameters_stay_bfloat16(scanned):
    config, variables = scanned
    new, tensors = transform.quantize(config, variables, [rules.Rule("experts", "int8")])
    wi = new["params"]["blocks"]["block_0"]["ffn"]["experts"]["wi_0"]
    assert wi.dtype == ml_dtypes.bfloat16 and tensors["blocks/block_0/ffn/experts/wi_0"].dtype == "bfloat16"
    original = np.asarray(variables["params"]["blocks"]["block_0"]["ffn"]["experts"]["wi_0"])
    expected = formats.fake_quantize(original.reshape(16, 16, 8), formats.parse("int8"), ml_dtypes.bfloat16)
    assert np.array_equal(wi, expected.reshape(wi.shape))


def test_allocate_gives_the_important_experts_more_bits_within_the_budget():
    importance = np.array([[8.0, 4.0, 2.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    bits = mixed.allocate(importance, [2, 4, 8], budget=4.0)
    assert bits.mean() <= 4.0 and set(bits.ravel()) <= {2, 4, 8}
    assert list(bits[0]) == sorted(bits[0], reverse=True) and bits[0, 0] == 8 and bits[0, 5] == 2
    per_layer = mixed.allocate(importance, [2, 4, 8], budget=4.0, per_layer=True)
    assert np.all(per_layer.mean(1) <= 4.0) and list(per_layer[1]) == [4] * 6  # equal scores: equal bits
    assert mixed.allocate(importance, [3, 16], budget=16).tolist() == [[16] * 4 + [3] * 2, [16] * 6]
    assert np.all(mixed.allocate(importance, [2, 4], budget=2) == 2)
    errors = np.zeros((2, 6, 3))
    errors[..., 0] = 1.0  # 4 and 8 bits equally good: no expert is given 8
    assert mixed.allocate(importance, [2, 4, 8], budget=8.0, errors=errors).tolist() == [[4] * 4 + [2] * 2, [4] * 6]


@pytest.mark.parametrize("kwargs,match", [
    ({"choices": [1, 4]}, r"choices=\[1, 4\] is invalid"), ({"budget": 1}, "budget=1 is invalid"),
    ({"importance": np.array([[-1.0, 1.0]])}, "importance of shape"),
    ({"errors": np.zeros((1, 2, 5))}, "errors of shape")])
def test_bad_allocations_are_named(kwargs, match):
    arguments = {"importance": np.ones((1, 2)), "choices": [2, 4], "budget": 3.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        mixed.allocate(arguments.pop("importance"), arguments.pop("choices"), arguments.pop("budget"), **arguments)


def test_expert_bits_set_each_experts_format(unrolled):
    config, variables = unrolled
    expert_bits = {0: [2, 3, 4, 8, 16, 4, 4, 4], 2: [8] * 8}
    new, tensors = transform.quantize(config, variables, [rules.Rule("experts", "int4/g8")], expert_bits=expert_bits)
    parts = {p.format.name: p.index.tolist() for p in tensors["layers_0/ffn/experts/wo"].parts}
    assert parts == {"int2/g8": [0], "int3/g8": [1], "int4/g8": [2, 5, 6, 7], "int8/g8": [3]}
    kept = np.asarray(variables["params"]["layers_0"]["ffn"]["experts"]["wo"][4])
    assert np.array_equal(np.asarray(new["params"]["layers_0"]["ffn"]["experts"]["wo"][4]), kept)
    errors = mixed.expert_errors(config, variables, [2, 4, 16], group_size=8)
    assert errors.shape == (2, 8, 3) and np.all(errors[..., 0] > errors[..., 1]) and np.all(errors[..., 2] == 0)
    chosen = mixed.from_importance(config, variables, np.arange(16.0).reshape(2, 8), [2, 4, 8], 4.0, group_size=8)
    assert set(chosen) == {0, 2} and np.mean([chosen[0], chosen[2]]) <= 4.0
    with pytest.raises(ValueError, match="per-expert bits replace an int format"):
        transform.quantize(config, variables, [rules.Rule("experts", "fp8")], expert_bits=expert_bits)
    with pytest.raises(ValueError, match=r"expert_bits\[0\]\[0\]=9 is invalid: int bits in 2..8, or 16"):
        transform.quantize(config, variables, [rules.Rule("experts", "int4")], expert_bits={0: [9] * 8})
