"""Capture on a device mesh (``mesh=`` of moejax/posthoc/capture.py, importance.py, super_experts.py): on the
suite's 8 forced host CPU devices (tests/conftest.py), with the parameters placed as training places them (the routed
experts split over 'expert') and each batch's rows over the token axes, the routing trace (the selected experts
exactly), every importance criterion and the super-expert profile equal the one-device results, on two meshes: data
x expert (a2a exchange; shared experts, scanned layers) and fsdp x expert x tensor (ring exchange; GPT-OSS experts
with output biases, which the tensor shards split).
"""
import jax
import numpy as np
import pytest

from moejax import model, moe, parallel
from moejax.posthoc import capture, importance, read_trace, super_experts
from tests.helpers_posthoc import VOCAB, random_model

pytestmark = pytest.mark.xdist_group("posthoc_capture_mesh")  # multi-device: one worker compiles them

CASES = {
    "data2_expert4_a2a": ((2, 1, 4, 1), dict(num_layers=3, first_dense=1, num_shared=1, scan=True, ep_mode="a2a")),
    "fsdp2_expert2_tensor2_ring": ((1, 2, 2, 2), dict(num_layers=2, expert_kind="gpt_oss", ep_mode="ring")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_capture_on_a_mesh_equals_one_device(case, tmp_path):
    shape, fields = CASES[case]
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    config, variables = random_model(**fields)
    mesh = jax.make_mesh(shape, parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    rng = np.random.default_rng(3)
    batches = [rng.integers(1, VOCAB, (8, 12)).astype(np.int32) for _ in range(2)]

    placed = capture.place_variables(variables, mesh)
    layer_params, _ = model.moe_layer_variables(config.model, placed)[model.moe_layers(config.model)[0]]
    assert layer_params[moe.EXPERTS]["wi_0"].sharding.spec[0] == "expert"  # the experts are split, not replicated

    one = read_trace(capture.record(config, variables, batches, tmp_path / "one", with_scores=True))
    sharded = read_trace(capture.record(config, variables, batches, tmp_path / "mesh", with_scores=True, mesh=mesh))
    np.testing.assert_array_equal(sharded.experts, one.experts)
    np.testing.assert_allclose(sharded.weights, one.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded.scores, one.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sharded.token_ids, one.token_ids)

    criteria = list(importance.CRITERIA)
    want = importance.from_forward(config, variables, batches, criteria)
    got = importance.from_forward(config, placed, batches, criteria, mesh=mesh)
    for name in criteria:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6, err_msg=name)

    want = super_experts.profile(config, variables, batches)
    got = super_experts.profile(config, variables, batches, mesh=mesh)
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.channel, want.channel)
    for name in ("max_output", "residual_max", "residual_median", "shared_max_output"):
        if getattr(want, name) is None:
            assert getattr(got, name) is None
            continue
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=2e-5, atol=1e-6, err_msg=name)
    if fields.get("num_shared"):
        np.testing.assert_array_equal(got.shared_channel, want.shared_channel)


def test_a_batch_that_does_not_split_over_the_mesh_is_refused():
    config, variables = random_model(num_layers=1)
    mesh = jax.make_mesh((2, 1, 4, 1), parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with pytest.raises(ValueError, match=r"batch 0: 6 rows do not split over the mesh's token axes .* = 8"):
        next(capture.stream(config, variables, [np.ones((6, 4), np.int32)], mesh=mesh))
    with pytest.raises(ValueError, match="MESH_AXES|axes"):
        capture.place_variables(variables, jax.make_mesh((8,), ("data",)))
