"""Tests of moejax.training and moejax.main: a real run and its outputs, config validation, the workdir check,
divergence, kill -9 then resume, a corrupt checkpoint, SIGTERM, the aux-loss-free bias update, the optimizer
(schedules, frozen routers) and the metrics.

Every run trains the tiny config of tests/helpers_train.py; a persistent compilation cache shared with the
subprocesses lets each run after the first load the compiled steps instead of compiling them again.
"""
import contextlib
import fcntl
import functools
import io
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache
from tensorboardX.proto import event_pb2

from moejax import checks, main
from moejax.moe import stats
from moejax.training import checkpoint, loop, metrics, optim
from moejax.training import config as config_lib
from tests import helpers_configs
from tests.helpers_configs import REPO

# One worker runs the module: its tests share the module fixtures' trainings (split over the two pytest-xdist
# workers, each would train them).
pytestmark = pytest.mark.xdist_group("train_runs")

CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A directory shared by this session's pytest-xdist workers (each runs this module's fixtures itself)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "moejax_train"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def locked(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def cache_dir(shared):
    path = shared / "jax_cache"
    old = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
    for name, value in CACHE_OPTIONS.items():
        jax.config.update(name, value)
    compilation_cache.set_cache_dir(str(path))
    compilation_cache.reset_cache()
    yield path
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.set_cache_dir(None)
    compilation_cache.reset_cache()


def run(config, workdir):
    """loop.run (what moejax.main calls) with its console output: (result, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = loop.run(config, workdir)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def trained(shared, cache_dir, data_dir):
    """One uninterrupted in-process run of the tiny config, shared by the workers: (workdir, summary, stdout)."""
    workdir, stdout = shared / "trained", shared / "trained.stdout"
    with locked(shared / "trained.lock"):
        if not stdout.exists():
            _, out = run(helpers_configs.tiny(data_dir), workdir)
            stdout.write_text(out)
    return workdir, json.loads((workdir / "summary.json").read_text()), stdout.read_text()


def command(workdir, data_dir):
    return [sys.executable, "-m", "moejax.main", f"--config={REPO / 'tests' / 'helpers_train.py'}",
            f"--config.data.dir={data_dir}", f"--workdir={workdir}"]


def subprocess_env(cache_dir):
    """This process's jax settings (8 host devices, matmul precision) and the shared compilation cache."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision))
    env.update({name.upper(): str(value) for name, value in CACHE_OPTIONS.items()})
    return env


def start_and_signal(workdir, data_dir, cache_dir, sig):
    """Starts `python -m moejax.main`, sends sig once a checkpoint is saved; (returncode, output)."""
    proc = subprocess.Popen(command(workdir, data_dir), cwd=REPO, env=subprocess_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out


def assert_same_leaves(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def read_scalars(path):
    """{tag: [(step, value)]} of a TensorBoard event file (TFRecord framing of Event protos)."""
    blob, pos, scalars = path.read_bytes(), 0, {}
    while pos < len(blob):
        (length,) = struct.unpack("<Q", blob[pos:pos + 8])
        event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# ------------------------------------------------------------------ a real run


def test_run_writes_checkpoints_logs_and_summary(trained):
    workdir, summary, out = trained
    config = helpers_configs.tiny()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [32, 36, 40]
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32

    assert summary["steps"] == 40 and summary["trained_steps_this_invocation"] == 40
    assert summary["val_loss"] < math.log(256) - 0.5  # well below the uniform byte distribution
    assert summary["val_bits_per_byte"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["train_tokens_per_s"] > 0 and summary["compile_seconds"] > 0
    assert summary["params_total"] > summary["params_activated"] > 0
    assert set(summary["moe_layers"]) == {"layers_0", "layers_1"}
    for layer in summary["moe_layers"].values():
        assert set(layer) == {*stats.LAYER_STATS, "maxvio_global"}
        assert 0 <= layer["maxvio_global"] <= layer["maxvio"] + 1e-6  # summed loads are no less even than each batch's
        assert 1 <= layer["max_over_mean_load"] <= config.model.moe.num_experts / config.model.moe.top_k
        assert layer["maxvio"] == pytest.approx(layer["max_over_mean_load"] - 1)
        assert layer["drop_fraction"] == 0 and layer["overflow_fraction"] == 0  # dropless, one device
        assert layer["experts_per_token"] == 2 and layer["balance_loss"] > 0 and layer["z_loss"] > 0
    assert summary["corpus"]["name"] == "stdlib" and len(summary["corpus"]["sha256"]) == 64

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(4, 41, 4))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [20, 40]
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 1.0
    for name in ("aux_loss", "grad_norm", "learning_rate", "layers_1_drop_fraction", "layers_1_max_over_mean_load"):
        assert np.isfinite(train_records[-1][name])
    schedule = optim.learning_rate_schedule(config.train)  # the rate of each interval's last update
    assert [r["learning_rate"] for r in train_records] == pytest.approx([float(schedule(r["step"] - 1))
                                                                         for r in train_records])
    assert sorted(train_records[-1]["expert_load"]) == ["layers_0", "layers_1"]
    assert sum(train_records[-1]["expert_load"]["layers_0"]) == pytest.approx(1.0, abs=1e-5)

    (events,) = workdir.glob("events.out.tfevents.*")
    scalars = read_scalars(events)
    assert [step for step, _ in scalars["train/loss"]] == list(range(4, 41, 4))
    assert scalars["train/loss"][-1][1] == pytest.approx(train_records[-1]["loss"])
    assert [step for step, _ in scalars["eval/loss"]] == [20, 40]
    assert "train/learning_rate" in scalars and "eval/layers_0_max_over_mean_load" in scalars

    assert "compiling train step..." in out and "step 40/40" in out and "tokens/s" in out and "ETA" in out
    assert "eval at step 20" in out and "bits/byte" in out
    assert "tensorflow" not in sys.modules


def test_bias_update_moves_router_bias(trained):
    workdir, _, _ = trained
    state, _ = checkpoint.load_checkpoint(workdir)
    rate = helpers_configs.tiny().model.moe.bias_update_rate
    for layer in ("layers_0", "layers_1"):
        bias = state["moe_state"][layer]["ffn"]["router_bias"]
        assert bias.shape == (8,) and np.any(bias != 0)
        assert np.all(np.abs(bias) <= 40 * rate + 1e-6)  # at most one step of `rate` per update


def routed_stats(layers, loads, dropped):
    """A RoutedStats stacked [L] with these layer indices, loads [L, E] and dropped slots [L] (4 tokens, top-2)."""
    loads = jnp.asarray(loads, jnp.float32)
    zeros = jnp.zeros(len(layers), jnp.float32)
    return stats.RoutedStats(layer=jnp.asarray(layers, jnp.int32), tokens_per_expert=loads,
                             dropped=jnp.asarray(dropped, jnp.float32), overflow=zeros,
                             routed_slots=loads.sum(-1), num_tokens=zeros + 4, router_entropy=zeros + 0.5,
                             balance_loss=zeros + 1.0, device_balance_loss=zeros, z_loss=zeros + 2.0)


def test_metrics_average_each_moe_layer_under_its_own_index():
    """The train metrics name each MoE layer by the index its records store (layers_1, layers_3 here: a dense layer
    first), average LAYER_STATS over steps and sum the loads into each layer's share per expert."""
    collection = metrics.metrics_collection(True, num_layers=2, num_experts=4)
    first = collection.single_from_model_output(
        loss=jnp.float32(3.0), aux_loss=jnp.float32(0.1), grad_norm=jnp.float32(1.0),
        layer_stats=routed_stats([1, 3], [[4, 2, 1, 1], [2, 2, 2, 2]], [0, 2]))
    second = collection.single_from_model_output(
        loss=jnp.float32(1.0), aux_loss=jnp.float32(0.3), grad_norm=jnp.float32(3.0),
        layer_stats=routed_stats([1, 3], [[2, 2, 2, 2], [8, 0, 0, 0]], [0, 0]))
    values = metrics.computed(collection.empty().merge(first).merge(second))
    assert values["loss"] == pytest.approx(2.0) and values["aux_loss"] == pytest.approx(0.2)
    assert values["grad_norm"] == pytest.approx(2.0)
    assert metrics.layer_names(values) == ["layers_1", "layers_3"]
    assert values["layers_1_max_over_mean_load"] == pytest.approx((4 / 2 + 2 / 2) / 2)
    assert values["layers_3_maxvio"] == pytest.approx((0 + 3) / 2)
    assert values["layers_3_drop_fraction"] == pytest.approx((2 / 8 + 0) / 2)
    assert values["layers_1_experts_per_token"] == pytest.approx(2.0)
    assert values["layers_3_z_loss"] == pytest.approx(2.0)
    # MaxVio_global: of the summed loads (6, 4, 3, 3) and (10, 2, 2, 2)
    assert values["layers_1_maxvio_global"] == pytest.approx(6 / 4 - 1)
    assert values["layers_3_maxvio_global"] == pytest.approx(10 / 4 - 1)
    # two steps overloading different experts: each step's MaxVio is 1, the summed load (4, 4, 4, 4) is balanced
    steps = [collection.single_from_model_output(
        loss=jnp.float32(1.0), aux_loss=jnp.float32(0.0), grad_norm=jnp.float32(1.0),
        layer_stats=routed_stats([1, 3], [load, load], [0, 0])) for load in ([4, 0, 2, 2], [0, 4, 2, 2])]
    balanced = metrics.computed(collection.empty().merge(steps[0]).merge(steps[1]))
    assert balanced["layers_1_maxvio"] == pytest.approx(1.0)
    assert balanced["layers_1_maxvio_global"] == pytest.approx(0.0)
    assert values["expert_load"] == {"layers_1": pytest.approx([6 / 16, 4 / 16, 3 / 16, 3 / 16]),
                                     "layers_3": pytest.approx([10 / 16, 2 / 16, 2 / 16, 2 / 16])}
    assert "expert_load" not in metrics.computed(collection.empty().merge(first), with_load=False)
    evaluation = metrics.metrics_collection(False).single_from_model_output(loss=jnp.float32(2.5))
    assert metrics.computed(evaluation) == {"loss": 2.5}


def test_default_workdir():
    assert main.default_workdir("configs/deepseekmoe.py:tiny") == os.path.join("runs", "deepseekmoe_tiny")
    assert main.default_workdir("configs/deepseekmoe.py") == os.path.join("runs", "deepseekmoe")


def test_learning_rate_schedules():
    t = helpers_configs.tiny().train
    t.steps, t.warmup_steps, t.learning_rate = 100, 10, 1.0
    t.schedule, t.step_decay_at, t.step_decay_factor = "step", (0.8, 0.9), 0.5
    lr = optim.learning_rate_schedule(t)
    assert [float(lr(s)) for s in (0, 5, 10, 79, 80, 89, 90, 99)] == pytest.approx(
        [0, 0.5, 1, 1, 0.5, 0.5, 0.25, 0.25])
    t.schedule, t.min_lr_ratio = "cosine", 0.1
    lr = optim.learning_rate_schedule(t)
    assert [float(lr(s)) for s in (10, 55, 100)] == pytest.approx([1, 0.55, 0.1])


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_routers_are_an_optimizer_partition(frozen):
    """With model.moe.router.frozen (SMoE-Dropout) every router kernel (Chain-of-Experts' router_{c} too) keeps its
    value through an update, weight decay included, while every other parameter moves; unfrozen, they all move."""
    config = helpers_configs.tiny(overrides={"train.weight_decay": 0.1, "train.warmup_steps": 0,
                                             "model.moe.router.frozen": frozen})
    rng = np.random.default_rng(0)
    shapes = {"embed": {"embedding": (16, 4)},
              "layers_0": {"ffn_norm": {"scale": (4,)},
                           "ffn": {"router": {"kernel": (4, 8)}, "router_1": {"kernel": (4, 8)},
                                   "experts": {"wi_0": (8, 4, 2), "wi_1": (8, 4, 2), "wo": (8, 2, 4)}}}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    labels = optim.frozen_labels(params)
    assert labels["layers_0"]["ffn"]["router"]["kernel"] == labels["layers_0"]["ffn"]["router_1"]["kernel"] == "frozen"
    assert {labels["embed"]["embedding"], labels["layers_0"]["ffn"]["experts"]["wo"]} == {"trained"}
    tx = optim.make_optimizer(config)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for path, old in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        new_leaf = functools.reduce(lambda node, key: node[key.key], path, new)
        unchanged = np.array_equal(np.asarray(new_leaf), np.asarray(old))
        assert unchanged == (frozen and "router" in name), name
    # no gradient at all: only weight decay moves a matrix, and a frozen router not even that way
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    kernel = params["layers_0"]["ffn"]["router"]["kernel"]
    moved = optax.apply_updates(params, updates)["layers_0"]["ffn"]["router"]["kernel"]
    assert np.array_equal(np.asarray(moved), np.asarray(kernel)) == frozen


# ------------------------------------------------------------------ bad input


BAD_CONFIGS = [
    ({"train.batch_size": 12}, "train.batch_size=12", "data-parallel device count 8"),
    ({"train.schedule": "linear"}, "train.schedule='linear'", "'cosine', 'step', 'constant'"),
    ({"train.warmup_steps": 50}, "train.warmup_steps=50", "<= train.steps=40"),
    ({"train.learning_rate": -1e-3}, "train.learning_rate=-0.001", "> 0"),
    ({"train.eval_every": -5}, "train.eval_every=-5", ">= 0"),
    ({"train.b2": 1.0}, "train.b2=1.0", "[0, 1)"),
    ({"train.step_decay_at": (0.9, 0.8)}, "train.step_decay_at=(0.9, 0.8)", "increasing"),
    ({"mesh.data": 3}, "mesh={'data': 3, 'fsdp': 1, 'expert': 1, 'tensor': 1}", "device count 8"),
    ({"mesh.fsdp": -1}, "mesh.fsdp=-1", "at most one mesh axis may be -1"),
    ({"mesh.expert": 16}, "mesh={'data': -1, 'fsdp': 1, 'expert': 16, 'tensor': 1}", "must divide"),
    ({"data.name": "hf:wikitext"}, "data.name='hf:wikitext'", "'stdlib'"),
    ({"data.val_fraction": 1.5}, "data.val_fraction=1.5", "(0, 1)"),
    ({"data.eval_batches": 0}, "data.eval_batches=0", ">= 1"),
    ({"checkpoint.keep": 0}, "checkpoint.keep=0", ">= 1"),
    ({"model.vocab_size": 128}, "model.vocab_size=128", ">= 256"),
    ({"model.moe.top_k": 9}, "model.moe.top_k=9", "<= model.moe.num_experts=8"),
    ({"model.moe.expert_kind": "mlp"}, "model.moe.expert_kind='mlp'", "'glu'"),
    ({"train.consistency_coef": 1.0}, "train.consistency_coef=1.0", "'thor']"),
]


@pytest.mark.parametrize("overrides, field_and_value, allowed", BAD_CONFIGS,
                         ids=[next(iter(o)) + f"={next(iter(o.values()))}" for o, _, _ in BAD_CONFIGS])
def test_bad_config_fails_before_anything_is_written(overrides, field_and_value, allowed, data_dir, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(checks.ConfigError) as error:
        loop.train_and_evaluate(helpers_configs.tiny(data_dir, overrides), workdir)
    assert field_and_value in str(error.value) and allowed in str(error.value)
    assert not workdir.exists()


def test_workdir_with_a_different_config_is_refused(trained, data_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(trained[0] / "config.json", workdir / "config.json")
    with pytest.raises(checkpoint.WorkdirError) as error:
        loop.train_and_evaluate(helpers_configs.tiny(data_dir, {"train.learning_rate": 1e-2, "model.moe.top_k": 1}),
                                 workdir)
    message = str(error.value)
    assert "train.learning_rate: 0.003 in the workdir, 0.01 now" in message
    assert "model.moe.top_k: 2 in the workdir, 1 now" in message
    assert "new --workdir" in message and f"delete {workdir}" in message
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]


def test_workdir_fields_that_may_differ(trained, data_dir, tmp_path):
    changed = {"train.steps": 80, "train.log_every": 1, "train.eval_every": 0, "checkpoint.every_steps": 0,
               "checkpoint.keep": 7, "data.dir": str(tmp_path)}
    config_lib.check_workdir_config(helpers_configs.tiny(data_dir, changed), trained[0])  # no error

    workdir = tmp_path / "run"  # end to end: the finished run is re-evaluated with other logging settings
    shutil.copytree(trained[0], workdir)
    result, out = run(helpers_configs.tiny(data_dir, {"train.log_every": 8, "checkpoint.keep": 5}), workdir)
    assert "resuming from the checkpoint at step 40" in out
    assert result["val_loss"] == trained[1]["val_loss"] and result["trained_steps_this_invocation"] == 0


# ------------------------------------------------------------------ faults


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cache_dir, data_dir, tmp_path, monkeypatch):
    schedule = optim.learning_rate_schedule

    def exploding(t):  # the update of step 6 (count 5) uses an infinite learning rate
        return lambda count: jnp.where(count < 5, schedule(t)(count), jnp.inf)

    monkeypatch.setattr(optim, "learning_rate_schedule", exploding)
    workdir = tmp_path / "run"
    with pytest.raises(metrics.DivergenceError) as error:
        run(helpers_configs.tiny(data_dir), workdir)
    message = str(error.value)
    assert "at step 7" in message and "the last good checkpoint (step 4) stays the newest" in message
    assert "train.learning_rate" in message and "model.moe.z_loss_coef" in message and "train.grad_clip" in message
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["4"]
    state, meta = checkpoint.load_checkpoint(workdir)
    assert meta["step"] == 4 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    assert not (workdir / "summary.json").exists()


def test_kill9_then_rerun_is_bit_identical(trained, cache_dir, data_dir, tmp_path):
    workdir = tmp_path / "run"
    returncode, out = start_and_signal(workdir, data_dir, cache_dir, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, out
    assert not (workdir / "summary.json").exists()

    rerun = subprocess.run(command(workdir, data_dir), cwd=REPO, env=subprocess_env(cache_dir),
                           capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed = int(rerun.stdout.split("resuming from the checkpoint at step ")[1].split()[0])
    assert 0 < resumed < 40
    assert_same_leaves(checkpoint.load_checkpoint(trained[0])[0], checkpoint.load_checkpoint(workdir)[0])
    assert json.loads((workdir / "summary.json").read_text())["val_loss"] == trained[1]["val_loss"]


def flip_a_byte_of_the_largest_file(step_dir):
    """Array data: orbax itself would restore the garbage; the checksums catch it."""
    damaged = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    damaged.write_bytes(bytes(blob))


def truncate_the_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("{")


@pytest.mark.parametrize("damage", [flip_a_byte_of_the_largest_file, truncate_the_metadata])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(damage, trained, data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    damage(workdir / "checkpoints" / "40")

    result, out = run(helpers_configs.tiny(data_dir), workdir)
    assert "WARNING: checkpoint at step 40" in out and "falling back to step 36" in out
    assert "resuming from the checkpoint at step 36" in out
    assert result["trained_steps_this_invocation"] == 4
    assert_same_leaves(checkpoint.load_checkpoint(trained[0])[0], checkpoint.load_checkpoint(workdir)[0])


def test_sigterm_saves_and_exits_cleanly(cache_dir, data_dir, tmp_path):
    workdir = tmp_path / "run"
    returncode, out = start_and_signal(workdir, data_dir, cache_dir, signal.SIGTERM)
    assert returncode == 0, out
    step = int(out.split("SIGTERM received: saved a checkpoint at step ")[1].split()[0])
    assert 0 < step < 40
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir()) == step
    assert checkpoint.load_checkpoint(workdir)[1]["data"][0]["step"] == step
    assert not (workdir / "summary.json").exists()
