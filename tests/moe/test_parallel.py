"""Tests of moejax.parallel and moejax.moe.expert_parallel: the expert-parallel MoE layer equals the single-device
layer on every mesh (output, gradients and statistics), a2a buffer overflow is counted and matches a numpy
reference, parameters get logical axes and shardings, and a train step on an expert-parallel mesh gives the
single-device loss."""
import functools
import json
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import checks, model, parallel
from moejax.moe import expert_parallel, layer
from moejax.training import config as config_lib
from moejax.training import loop
from tests import helpers_configs, helpers_env, helpers_moe, helpers_multiprocess, helpers_steps, reference
from tests.helpers_configs import REPO
from tests.helpers_moe import D, loss_and_grads, mesh_of, token_sharding

E, K = 8, 2  # helpers_configs.moe's experts and top-k
MESHES = [  # (ep_mode, (data, fsdp, expert, tensor))
    ("a2a", (4, 1, 2, 1)), ("a2a", (1, 2, 4, 1)), ("a2a", (1, 1, 8, 1)), ("a2a", (1, 1, 4, 2)), ("a2a", (2, 2, 2, 1)),
    ("ring", (2, 1, 4, 1)), ("ring", (1, 1, 8, 1)), ("ring", (1, 2, 2, 2)),
]


def layer_inputs(seed=0, one_expert=False, cfg=None):
    """(x [8, 4, D], params, moe_state) of MoE(cfg) (default helpers_configs.moe()) at its default init; with
    one_expert, a selection bias that sends every token's first slot to expert 3."""
    cfg = helpers_configs.moe() if cfg is None else cfg
    bias = helpers_moe.one_expert_bias(cfg.num_experts) if one_expert else None
    _, x, params, state = helpers_moe.init(cfg, seed, bias, shape=(8, 4, D), std=0.02)
    return x, params, state


def assert_same_layer(got, want, what=""):
    """(y, grads, moe_aux) of two layers: output, every gradient and the statistics equal."""
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5, err_msg=f"{what} output")
    helpers_moe.assert_trees_close(got[1], want[1], what=f"{what} grad")
    a, b = helpers_moe.lone_stats(got[2]), helpers_moe.lone_stats(want[2])
    for name in ("tokens_per_expert", "dropped", "routed_slots", "balance_loss", "z_loss", "router_entropy"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-6, err_msg=f"{what} {name}")
    assert float(a.overflow) == 0.0


CASES = [dict(), dict(dispatch="capacity", capacity_factor=1.0),
         dict(dispatch="capacity", capacity_factor=1.0, drop_policy="probs"),
         dict(dispatch="capacity", capacity_factor=0.5, eval_capacity_factor=2.0)]


@functools.cache
def single_device(case_index, one_expert):
    x, params, state = layer_inputs(one_expert=one_expert)
    return loss_and_grads(layer.MoE(helpers_configs.moe(**CASES[case_index])), params, state, x)


# The meshes of one routing share one pytest-xdist worker (pytest.ini: --dist loadgroup), so that each single-device
# reference (functools.cache, per process) is compiled once in the session rather than on each worker.
@pytest.mark.parametrize("mode, shape", MESHES, ids=[f"{m}-{'x'.join(map(str, s))}" for m, s in MESHES])
@pytest.mark.parametrize("one_expert", [pytest.param(False, marks=pytest.mark.xdist_group("meshes_random")),
                                        pytest.param(True, marks=pytest.mark.xdist_group("meshes_one_expert"))],
                         ids=["random", "one_expert"])
def test_expert_parallel_layer_equals_single_device(mode, shape, one_expert):
    """Dropless and capacity modes (both drop policies, eval capacity unused in training) on meshes of
    expert = 2, 4, 8 with data / fsdp / tensor; 'one_expert' sends every token to expert 3 (capacity drops)."""
    x, params, state = layer_inputs(one_expert=one_expert)
    mesh = mesh_of(shape)
    for index, case in enumerate(CASES):
        cfg = helpers_configs.moe(**case, ep_mode=mode)
        got = loss_and_grads(layer.MoE(cfg, mesh=mesh), params, state, x, token_sharding(mesh))
        assert_same_layer(got, single_device(index, one_expert), what=str(case))
        if one_expert and case.get("dispatch") == "capacity":  # the crafted routing really overflows capacity
            assert float(helpers_moe.lone_stats(got[2]).drop_fraction) > 0.1


@pytest.mark.parametrize("mode", ["a2a", "ring"])
def test_experts_not_a_multiple_of_the_expert_axis_are_padded(mode):
    """6 experts on mesh.expert = 4: padded to 8 zero-weight experts that are never routed to; still exact."""
    cfg = helpers_configs.moe(num_experts=6)
    x, params, state = layer_inputs(seed=5, cfg=cfg)
    want = loss_and_grads(layer.MoE(cfg), params, state, x)
    cfg.ep_mode = mode
    mesh = mesh_of((2, 1, 4, 1))
    assert_same_layer(loss_and_grads(layer.MoE(cfg, mesh=mesh), params, state, x, token_sharding(mesh)), want)
    spec = parallel.param_shardings(params, mesh)["experts"]["wi_0"].spec
    assert spec == P(None, "fsdp", "tensor")  # 6 experts do not split over 4 devices: kept whole


def test_a2a_overflow_is_counted_and_drops_exactly_the_overflowing_slots():
    """With ep_buffer_factor sizing the a2a blocks below the worst case, a numpy loop over the token shards finds
    the slots beyond R per (source, destination) block; the layer must add nothing for exactly those."""
    shape, factor = (1, 1, 4, 1), 0.6
    x, params, state = layer_inputs(seed=3, one_expert=True)
    mesh = mesh_of(shape)
    cfg = helpers_configs.moe(ep_mode="a2a", ep_buffer_factor=factor)
    y, _, aux = loss_and_grads(layer.MoE(cfg, mesh=mesh), params, state, x, token_sharding(mesh))

    tokens, ids, weights, _ = helpers_moe.decisions(cfg, params, x, state["router_bias"], train=True)
    ep, shards = shape[2], math.prod(shape[:3])
    local, per_device = E // ep, len(tokens) // shards
    rows = math.ceil(factor * per_device * K / ep)
    fits = np.zeros(ids.shape, bool)
    for shard in range(shards):
        used = [0] * ep
        for t in range(shard * per_device, (shard + 1) * per_device):
            for j in range(K):
                dest = int(ids[t, j]) // local
                fits[t, j] = used[dest] < rows
                used[dest] += int(fits[t, j])
    overflow = int((~fits).sum())
    assert overflow > 0
    record = helpers_moe.lone_stats(aux)
    assert float(record.overflow) == overflow and float(record.dropped) == 0.0
    np.testing.assert_allclose(float(record.overflow_fraction), overflow / ids.size, rtol=1e-6)
    np.testing.assert_allclose(float(record.drop_fraction), overflow / ids.size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), reference.moe_layer(tokens, params, ids, weights, fits),
                               atol=1e-5, rtol=1e-5)


def test_a2a_rows_and_bytes_accounting():
    # worst case: a token sends at most min(k, E_local) slots to one device
    assert expert_parallel.a2a_rows(100, 6, 64, 8, 0.0) == 100 * 6
    assert expert_parallel.a2a_rows(100, 6, 64, 32, 0.0) == 100 * 2
    assert expert_parallel.a2a_rows(100, 6, 64, 8, 1.25) == math.ceil(1.25 * 100 * 6 / 8)
    # buffer factor 1: R = ceil(100 * 6 / 8) = 75 rows per block; 7 of 8 blocks leave the device, twice (dispatch,
    # combine) forward and twice backward, plus int32 ids with the dispatch
    rows = 75
    expected = 2 * (2 * 7 * rows * 32 * 2 + 7 * rows * 4)
    assert expert_parallel.a2a_bytes_per_step(100, 6, 64, 8, 32, 2, 1.0) == expected
    assert expert_parallel.a2a_bytes_per_step(100, 6, 64, 8, 32, 2, 1.0, train=False) == expected // 2


def test_placement_notes():
    config = helpers_configs.tiny(overrides={"mesh.data": 2, "mesh.expert": 4})
    (note,) = expert_parallel.placement_notes(config)
    assert "8 routed experts over mesh.expert=4, 2 per device (a2a)" in note
    config.model.moe.num_experts = 6
    (note,) = expert_parallel.placement_notes(config)
    assert "num_experts=6 is not a multiple of mesh.expert=4" in note and "pads the experts to 8" in note
    config.mesh.update(data=-1, expert=1)
    assert expert_parallel.placement_notes(config) == []


@pytest.mark.parametrize("preset_or_scan", ["tiny", "scan"])
def test_every_parameter_has_logical_axes_and_experts_split_over_expert(preset_or_scan):
    config = helpers_configs.load("deepseekmoe", "tiny")
    config.model.update(d_model=32, num_heads=2, ffn_dim=64, num_layers=3, first_dense_layers=1, tie_embeddings=False)
    config.model.moe.update(num_experts=8, top_k=2, expert_ffn=16, shared_gate=True)
    if preset_or_scan == "scan":
        config.model.scan_layers = True
    config.mesh.update(data=2, fsdp=1, expert=4, tensor=1)
    module = model.Transformer(config.model)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    axes = parallel.param_logical_axes(params)
    flat = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(
        axes, is_leaf=lambda x: isinstance(x, tuple))}
    assert all(len(a) == len(leaf.shape) for a, leaf in zip(flat.values(), jax.tree.leaves(params), strict=True))
    expert_leaves = [k for k in flat if "'experts'" in k]
    assert expert_leaves and all("expert" in flat[k] for k in expert_leaves)
    mesh = parallel.make_mesh(config)
    shardings = parallel.param_shardings(params, mesh)
    for (path, sh), leaf in zip(jax.tree_util.tree_leaves_with_path(shardings), jax.tree.leaves(params), strict=True):
        shard = sh.shard_shape(leaf.shape)
        if "'experts'" in jax.tree_util.keystr(path):
            lead = 1 if preset_or_scan == "scan" else 0
            assert shard[lead] == leaf.shape[lead] // 4
        elif "router" in jax.tree_util.keystr(path):
            assert shard == leaf.shape


def test_unknown_parameter_names_the_path():
    with pytest.raises(ValueError, match="mystery/kernel has no logical axis names"):
        parallel.param_logical_axes({"mystery": {"kernel": jnp.zeros((2, 2))}})


def test_logical_rules_use_each_mesh_axis_once():
    assert parallel.logical_to_spec(("expert", "embed", "mlp")) == P("expert", "fsdp", "tensor")
    assert parallel.logical_to_spec(("batch", "expert")) == P(("data", "fsdp", "expert"), None)


@pytest.mark.parametrize("overrides, field, allowed", [
    ({"model.moe.ep_mode": "ragged_a2a", "mesh.expert": 2}, "model.moe.ep_mode='ragged_a2a'", "use 'a2a' or 'ring'"),
    ({"model.moe.ep_mode": "alltoall"}, "model.moe.ep_mode='alltoall'", "a2a"),
    ({"mesh.tensor": 4, "model.moe.expert_ffn": 30}, "mesh.tensor=4", "must divide model.moe.expert_ffn=30"),
    ({"model.moe.ep_buffer_factor": -1.0}, "model.moe.ep_buffer_factor=-1.0", "must be a number >= 0"),
])
def test_bad_parallel_config(overrides, field, allowed):
    config = helpers_configs.tiny(overrides=overrides)
    with pytest.raises(checks.ConfigError) as error:
        config_lib.validate(config)
    assert field in str(error.value) and allowed in str(error.value)


def train_steps(config, mesh, steps=2):
    """Losses of `steps` train steps of config's model on mesh (None: the single-device layer, no shard_map)."""
    module = model.Transformer(config.model, mesh=mesh)

    def init():
        return helpers_steps.initial_state(config, module, seq_len=config.train.seq_len)

    abstract = jax.eval_shape(init)
    metrics = helpers_steps.empty_metrics(config)
    kwargs = {}
    if mesh is not None:
        shardings, replicated = parallel.state_shardings(abstract, mesh), NamedSharding(mesh, P())
        kwargs = dict(in_shardings=(shardings, replicated, parallel.batch_sharding(mesh)),
                      out_shardings=(shardings, replicated, replicated))
    state = jax.jit(init, out_shardings=kwargs["in_shardings"][0] if kwargs else None)()
    step = jax.jit(helpers_steps.train_step(config, module), **kwargs)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = jnp.asarray(rng.integers(1, 256, (config.train.batch_size, config.train.seq_len + 1)), jnp.int32)
        state, metrics, health = step(state, metrics, batch)
        losses.append(float(health[0]))
    return losses


def capacity_config():
    return helpers_configs.tiny(overrides={"model.moe.dispatch": "capacity", "model.moe.capacity_factor": 1.0})


@functools.cache
def single_device_losses():
    """The reference of both meshes below, computed once per process (the two tests share an xdist group)."""
    return train_steps(capacity_config(), None)


@pytest.mark.xdist_group("train_steps_on_a_mesh")
@pytest.mark.parametrize("mesh_fields", [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)])
def test_train_steps_on_an_expert_parallel_mesh_give_the_single_device_loss(mesh_fields):
    reference = single_device_losses()
    config = capacity_config()
    config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    config.mesh.update(mesh_fields)
    config.mesh.data = -1
    losses = train_steps(config, parallel.make_mesh(config))
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5)


def test_per_device_state_bytes_fall_with_the_expert_axis():
    config = helpers_configs.tiny()
    sizes = []
    for expert in (1, 2, 4, 8):
        config.mesh.update(data=-1, fsdp=1, expert=expert, tensor=1)
        mesh = parallel.make_mesh(config)

        def init(module=model.Transformer(config.model, mesh=mesh)):  # noqa: B008
            return helpers_steps.initial_state(config, module).replace(moe_state={})

        abstract = jax.eval_shape(init)
        state = jax.jit(init, out_shardings=parallel.state_shardings(abstract, mesh))()
        sizes.append(parallel.bytes_per_device(state))
        expert_bytes = sum(x.size * x.dtype.itemsize for p, x in jax.tree_util.tree_leaves_with_path(abstract.params)
                           if "experts" in jax.tree_util.keystr(p))
    # Adam's mu and nu follow the parameters: 3 copies of the expert weights shrink by the expert axis
    for expert, size in zip((2, 4, 8), sizes[1:], strict=True):
        assert sizes[0] - size == pytest.approx(3 * expert_bytes * (1 - 1 / expert), rel=1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_on_a_mesh_spanning_both(tmp_path):
    """`python -m moejax.main` as 2 processes x 4 CPU devices (MOEJAX_COORDINATOR, gloo) trains on a data=2 x
    expert=4 mesh spanning both and ends with the losses of the same run in one process with 8 devices."""
    data_dir = tmp_path / "data"
    config = helpers_multiprocess.get_config()
    config.data.dir = str(data_dir)
    reference = loop.train_and_evaluate(config, tmp_path / "one")
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=helpers_env.xla_flags(4), MOEJAX_COORDINATOR=f"localhost:{port}",
               MOEJAX_NUM_PROCESSES="2", MOEJAX_CPU_COLLECTIVES="gloo",
               JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision))
    command = [sys.executable, "-m", "moejax.main", f"--config={REPO / 'tests' / 'helpers_multiprocess.py'}",
               f"--config.data.dir={data_dir}", f"--workdir={tmp_path / 'two'}"]
    procs = [subprocess.Popen(command, cwd=REPO, env=dict(env, MOEJAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1} == reference["mesh"]
    np.testing.assert_allclose(summary["val_loss"], reference["val_loss"], rtol=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    train_loss = [(m["step"], m["loss"]) for m in lines if m.get("kind") == "train"]
    ref_loss = [(m["step"], m["loss"]) for m in ref_lines if m.get("kind") == "train"]
    assert train_loss and len(train_loss) == len(ref_loss)
    np.testing.assert_allclose(np.array(train_loss), np.array(ref_loss), rtol=1e-5)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_index_groups=None):
    """jax.lax.ragged_all_to_all as its docstring defines it, built from all_to_all (XLA:CPU lacks the real one):
    operand[input_offsets[d]:+send_sizes[d]] lands in device d's output at output_offsets[d]."""
    del recv_sizes, axis_index_groups
    ep, rows = input_offsets.shape[0], operand.shape[0]
    idx = jnp.arange(rows)
    chunks = jnp.stack([operand[jnp.minimum(input_offsets[d] + idx, rows - 1)] for d in range(ep)])
    valid = jnp.stack([idx < send_sizes[d] for d in range(ep)])
    targets = jnp.where(valid, output_offsets[:, None] + idx[None, :], output.shape[0])
    chunks, targets = (jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True) for a in (chunks, targets))
    return output.at[targets.reshape(-1)].set(chunks.reshape(-1, *operand.shape[1:]), mode="drop")


@pytest.mark.parametrize("one_expert", [False, True], ids=["random", "one_expert"])
def test_ragged_a2a_layout_with_the_documented_collective(monkeypatch, one_expert):
    """XLA:CPU cannot run ragged_all_to_all, so this checks the 'ragged_a2a' offsets and sizes against an
    emulation of its documented semantics; the layer must still equal the single-device layer."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    x, params, state = layer_inputs(one_expert=one_expert)
    cfg = helpers_configs.moe()
    want = loss_and_grads(layer.MoE(cfg), params, state, x)
    cfg.ep_mode = "ragged_a2a"
    mesh = mesh_of((2, 1, 4, 1))
    assert_same_layer(loss_and_grads(layer.MoE(cfg, mesh=mesh), params, state, x, token_sharding(mesh)), want)


@pytest.mark.parametrize("router", [dict(kind="expert_choice"), dict(kind="top_p", top_p=0.5),
                                    dict(kind="adamoe")], ids=["expert_choice", "top_p", "adamoe"])
def test_routers_with_variable_slots_under_expert_parallelism(router):
    """Expert choice (E slots per token), top-p and AdaMoE (null slots) keep the single-device result."""
    extra = dict(num_null_experts=4, top_k=3) if router["kind"] == "adamoe" else {}
    cfg = helpers_configs.moe(router, **extra)
    x, params, state = layer_inputs(seed=7, cfg=cfg)
    want = loss_and_grads(layer.MoE(cfg), params, state, x)
    mesh = mesh_of((2, 1, 4, 1))
    assert_same_layer(loss_and_grads(layer.MoE(cfg, mesh=mesh), params, state, x, token_sharding(mesh)), want)
