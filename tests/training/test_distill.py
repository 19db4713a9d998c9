"""Recovering a compressed model: ``init_from='run:<dir>[@<step>]'`` (a run starts from another moejax run's
checkpoint, or from a model ``python -m moejax.posthoc prune|merge --out`` wrote) and the distillation objective
(``distill.*``: MC-SMoE's ce_weight * CE + weight * KL(p_T || q_T) to a frozen teacher's logits).

Covered: the KL against a numpy re-implementation of the authors' ``nn.KLDivLoss(reduction='batchmean')`` on random
logits (temperature 2.5, with and without masked positions); a weight-0 distillation step equals the plain step; a
student identical to its teacher has KL 0 and a loss equal to its CE; init_from starts from exactly the source's
arrays (newest or chosen step) with the source's model section; the teacher is read into the run's shardings from
a run or a transformers directory; bad values are refused by name before a workdir is left behind; and
``python -m moejax.main`` distils a pruned model (4 of 8 experts per layer, built by ``moejax.posthoc.prune``) from
its tiny trained source, logging the CE and the KL.
"""
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

import moejax
from moejax import checks, hf, model, parallel
from moejax.posthoc import prune
from moejax.training import checkpoint, hooks, initialise, loop, metrics, objectives, optim, step
from tests import helpers_configs, helpers_steps
from tests.helpers_configs import REPO

# One worker runs the module: its tests share the module fixtures' trainings (split over the two pytest-xdist
# workers, each would train them).
pytestmark = pytest.mark.xdist_group("distill_sources")

TRAIN_FLAGS = ["--config.train.batch_size=8", "--config.train.seq_len=32", "--config.train.log_every=2",
               "--config.train.eval_every=0", "--config.checkpoint.every_steps=2", "--config.data.eval_batches=2"]


def main_run(workdir, corpus, env, *flags):
    """python -m moejax.main on the tiny config (tests/helpers_train.py) and the text corpus: its stdout."""
    args = [sys.executable, "-m", "moejax.main", f"--config={REPO / 'tests' / 'helpers_train.py'}",
            f"--config.data.name=text:{corpus}/*.py", f"--config.data.dir={corpus.parent / 'cache'}", *TRAIN_FLAGS,
            *flags, f"--workdir={workdir}"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def source(stdlib_corpus, env):
    """(workdir, corpus): the tiny config trained 4 steps on the text corpus, checkpoints at steps 2 and 4."""
    workdir = stdlib_corpus.parent / "source"
    main_run(workdir, stdlib_corpus, env, "--config.train.steps=4")
    return workdir, stdlib_corpus


@pytest.fixture(scope="module")
def pruned(source):
    """The source pruned to 4 experts per MoE layer, saved as ``python -m moejax.posthoc prune --out`` saves a
    moejax-format model (checkpoint.save_variables)."""
    workdir, _ = source
    config, variables = moejax.load(workdir)
    new_config, new_variables = prune.prune(config, variables, {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]})
    return checkpoint.save_variables(workdir.parent / "pruned", new_config, new_variables), new_variables


def tiny(corpus=None, **overrides):
    config = helpers_configs.tiny(overrides=overrides)
    if corpus is not None:
        config.data.name, config.data.dir = f"text:{corpus}/*.py", str(corpus.parent / "cache")
    return config


def flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_arrays(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------------------------- the loss


def authors_kd(student, teacher, temperature):
    """MC-SMoE (mcsmoe/models/switch_transformers.py, SwitchTransformersWrapperForDistillation.forward):
    nn.KLDivLoss(reduction='batchmean')(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1)): the sum over
    every element of target * (log target - input), divided by the first dimension (the batch)."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    target, log_input = np.exp(log_softmax(teacher / temperature)), log_softmax(student / temperature)
    pointwise = np.where(target > 0, target * (np.log(np.where(target > 0, target, 1.0)) - log_input), 0.0)
    return pointwise.sum() / student.shape[0], pointwise.sum(-1)


def test_kd_loss_is_the_authors_kl_divergence():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (3, 5, 11)), rng.normal(0, 3, (3, 5, 11))
    temperature = 2.5
    expected, per_position = authors_kd(student, teacher, temperature)
    s, t = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    np.testing.assert_allclose(float(objectives.distillation_kl(s, t, temperature, "batchmean")), expected, rtol=1e-5)
    np.testing.assert_allclose(float(objectives.distillation_kl(s, t, temperature)), expected * 3 / 15, rtol=1e-5)
    assert expected != pytest.approx(authors_kd(student, teacher, 1.0)[0])  # the temperature matters
    assert expected != pytest.approx(authors_kd(teacher, student, temperature)[0])  # KL(teacher || student)

    mask = rng.random((3, 5)) < 0.6  # positions that count; the others are left out of the sum and the mean
    masked = (per_position * mask).sum()
    np.testing.assert_allclose(float(objectives.distillation_kl(s, t, temperature, "batchmean", jnp.asarray(mask))),
                               masked / 3, rtol=1e-5)
    np.testing.assert_allclose(float(objectives.distillation_kl(s, t, temperature, "token", jnp.asarray(mask))),
                               masked / mask.sum(), rtol=1e-5)

    # the objective: ce_weight * CE + weight * KL + the router losses (none recorded here); the report keeps both
    targets = rng.integers(0, 11, (3, 5))
    value, report = objectives.distillation_loss(
        lambda key: (s, {}), jnp.asarray(targets), jax.random.key(0), teacher_logits=t,
        moe_cfg=base.get_config().model.moe, weight=0.2, temperature=temperature, ce_weight=0.5,
        reduction="batchmean")
    log_probs = student - student.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    np.testing.assert_allclose(float(report.loss), ce, rtol=1e-5)
    np.testing.assert_allclose(float(report.kd_loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(value), 0.5 * ce + 0.2 * expected, rtol=1e-5)


SMALL = {"train.batch_size": 2, "train.seq_len": 8, "model.num_layers": 1}  # one MoE layer: a quicker compile


def distill_config(**overrides):
    config = tiny(**{**SMALL, **overrides})
    config.distill.teacher = "run:<teacher>"  # the objective only asks whether there is one
    return config


def teacher_step(config, module, teacher_module):
    """The train step as the loop jits it for a distilling config, the teacher's variables its last argument."""
    tx = optim.make_optimizer(config)
    objective = objectives.from_config(config, module, jax.random.key(0), teacher_module)
    return jax.jit(lambda s, m, b, t: step.train_step(s, m, b, objective=objective, tx=tx,
                                                      hooks=hooks.from_config(config), teacher=t))


def test_weight_zero_distillation_step_is_the_plain_step():
    config = distill_config(**{"distill.weight": 0.0})
    plain = tiny(**SMALL)
    module = model.Transformer(config.model)
    teacher_cfg = config.model.copy_and_resolve_references()
    teacher_cfg.moe.num_experts, teacher_cfg.init_std = 4, 0.5  # another model: its KL to the student is far from 0
    teacher = model.Transformer(teacher_cfg)
    teacher_vars = teacher.init(jax.random.key(7), jnp.zeros((1, 8), jnp.int32))
    state = helpers_steps.initial_state(config, module)
    batch = jax.random.randint(jax.random.key(3), (2, 9), 0, 256)

    new_plain, metrics_plain, health_plain = jax.jit(helpers_steps.train_step(plain, module))(
        state, helpers_steps.empty_metrics(plain), batch)
    empty = metrics.metrics_collection(True, 1, 8, distill=True).empty()
    new, computed, health = teacher_step(config, module, teacher)(state, empty, batch, teacher_vars)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(health), np.asarray(health_plain), rtol=1e-6)
    values, plain_values = metrics.computed(computed), metrics.computed(metrics_plain)
    assert values["loss"] == pytest.approx(plain_values["loss"], rel=1e-6) and values["kd_loss"] > 0.01
    assert "kd_loss" not in plain_values


def test_a_student_identical_to_its_teacher_has_kl_zero_and_its_ce_as_loss():
    config = distill_config(**{"model.moe.balance_coef": 0.0})  # no router loss: the loss is CE + weight * KL
    module = model.Transformer(config.model)
    state = helpers_steps.initial_state(config, module)
    batch = jax.random.randint(jax.random.key(3), (2, 9), 0, 256)
    objective = objectives.from_config(config, module, jax.random.key(0), module)
    value, report = jax.jit(lambda *args: objective(*args))(state.params, state.moe_state, batch, state.step,
                                       {"params": state.params, "moe_state": state.moe_state})
    assert abs(float(report.kd_loss)) < 1e-6 and float(report.aux_loss) == 0
    assert float(value) == pytest.approx(float(report.loss), abs=1e-6)
    assert float(report.loss) == pytest.approx(float(objectives.cross_entropy(
        module.apply({"params": state.params, "moe_state": state.moe_state}, batch[:, :-1]), batch[:, 1:])),
        rel=1e-6)


# ----------------------------------------------------------------------------------------------- init_from='run:'


def start_of(config, workdir):
    """The first state initialise gives config (resolved) in a new workdir, built as the loop builds it."""
    config = initialise.resolve(config)
    module, tx = model.Transformer(config.model), optim.make_optimizer(config)
    ctx = initialise.InitContext(config, workdir, fresh=lambda: helpers_steps.initial_state(config, module, tx),
                                 place=lambda p, ms: initialise.new_state(p, ms, tx))
    return config, initialise.INIT_SOURCES[initialise.source_name(config)](ctx)


def test_init_from_a_run_starts_from_its_arrays_and_takes_its_model(source, tmp_path):
    workdir, corpus = source
    config = tiny(corpus, **{"model.d_model": 48, "model.moe.num_experts": 4, "model.remat": True})
    config.init_from = f"run:{workdir}@2"
    resolved, start = start_of(config, tmp_path / "run")
    source_config, newest = moejax.load(workdir)
    run_model, source_model = resolved.model.to_dict(), source_config.model.to_dict()
    assert run_model.pop("remat") and not source_model.pop("remat")  # a 'compute' field: the config's value
    assert run_model == source_model and resolved.model.d_model == 32 and resolved.model.moe.num_experts == 8
    assert resolved.data.tokenizer == "bytes" and initialise.source_name(resolved) == "run"
    assert config.model.d_model == 48  # resolve returns a copy

    saved, meta = checkpoint.load_checkpoint(workdir, 2)
    assert meta["step"] == 2 and start.evaluate_first and "from the checkpoint at step 2" in start.message
    assert_same_arrays(start.state.params, saved["params"])
    assert_same_arrays(start.state.moe_state, saved["moe_state"])
    assert int(start.state.step) == 0 and all(not np.any(x) for x in jax.tree.leaves(start.state.opt_state[0]))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved["params"]),
                                                        jax.tree.leaves(newest["params"]), strict=True))

    config.init_from = f"run:{workdir}"  # the newest checkpoint
    _, start = start_of(config, tmp_path / "run")
    assert_same_arrays(start.state.params, newest["params"])
    assert_same_arrays(start.state.moe_state, newest["moe_state"])


def test_the_teacher_is_read_into_the_run_shardings(source, bpe_release):
    workdir, corpus = source
    config = initialise.resolve(tiny(corpus, **{"distill.teacher": f"run:{workdir}@2"}))
    mesh = parallel.make_mesh(config)
    teacher = initialise.load_teacher(config, mesh)
    assert_same_arrays(teacher.variables, {k: v for k, v in checkpoint.load_checkpoint(workdir, 2)[0].items()
                                           if k in ("params", "moe_state")})
    assert "the checkpoint at step 2" in teacher.message and "0.2 * KL(teacher || student)" in teacher.message
    assert all(x.sharding == s for x, s in zip(jax.tree.leaves(teacher.variables), jax.tree.leaves(teacher.shardings),
                                               strict=True))

    directory, _ = bpe_release  # a transformers checkpoint as teacher, of the student's model and tokenizer
    config = initialise.resolve(tiny(corpus, init_from=f"hf:{directory}", **{"distill.teacher": f"hf:{directory}"}))
    teacher = initialise.load_teacher(config, parallel.make_mesh(config))
    assert teacher.module.cfg.to_dict() == config.model.to_dict()
    assert_same_arrays(teacher.variables, hf.load(directory)[1])


def zeros_model(directory, **model_fields):
    """A moejax model directory (byte tokenizer) of the tiny config with model_fields, its weights zeros."""
    config = tiny(**{f"model.{name}": value for name, value in model_fields.items()})
    shapes = jax.eval_shape(model.Transformer(config.model).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return checkpoint.save_variables(directory, config, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                                     dict(shapes)))


@pytest.mark.parametrize("field,value,why", [
    ("init_from", "run:{source}@99", r"{source} has no checkpoint at step 99: it has steps \[2, 4\]"),
    ("init_from", "run:{source}@last", r"'@last' is not a checkpoint step"),
    ("init_from", "run:{tmp}/missing", r"{tmp}/missing is not a moejax run directory: it has no config.json; "
                                       r"allowed: '' \(the model's own initialisation\) or 'hf:<dir>'"),
    ("init_from", "run:{tmp}/empty", r"{tmp}/empty has no checkpoint \(nothing in {tmp}/empty/checkpoints\)"),
    ("init_from", "{source}", r"allowed: .*'run:<dir>\[@<step>\]'.*did you mean 'run:{source}'\?"),
    ("init_from", "hf:{source}", r"{source} is not a transformers checkpoint directory"),
    ("distill.teacher", "{source}", r"allowed: '' \(no distillation\) or 'hf:<dir>'.*did you mean 'run:{source}'"),
    ("distill.teacher", "run:{source}@3", r"has no checkpoint at step 3"),
    ("distill.teacher", "run:{vocab300}", r"the teacher's model.vocab_size=300 is not the student's "
                                          r"model.vocab_size=256: the teacher and the student must share"),
    ("distill.weight", -1.0, r"must be a number >= 0"),
    ("distill.temperature", 0.0, r"must be a number > 0"),
    ("distill.reduction", "sum", r"allowed values are 'token', 'batchmean'"),
])
def test_bad_values_are_refused_by_name_before_a_workdir_is_left(source, tmp_path, field, value, why):
    workdir, corpus = source
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((workdir / "config.json").read_text())
    names = {"source": workdir, "tmp": tmp_path, "vocab300": tmp_path / "vocab300"}
    escaped = {name: re.escape(str(path)) for name, path in names.items()}
    if "vocab300" in str(value):
        zeros_model(names["vocab300"], vocab_size=300)
    value = value.format(**names) if isinstance(value, str) else value
    config = tiny(corpus, **{field: value})
    if field.startswith("distill.") and field != "distill.teacher":
        config.distill.teacher = f"run:{workdir}"
    with pytest.raises(checks.ConfigError, match=rf"config field {re.escape(field)}={re.escape(repr(value))} is "
                                                 rf"invalid: .*{why.format(**escaped)}"):
        loop.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_other_tokenizers_and_unfitting_checkpoints_are_refused_before_a_workdir_is_left(source, bpe_release,
                                                                                        tmp_path):
    workdir, corpus = source
    directory, _ = bpe_release  # vocab 320, a BPE tokenizer: the student's model.vocab_size, not its tokenizer
    config = tiny(corpus, **{"model.vocab_size": 320, "distill.teacher": f"hf:{directory}"})
    with pytest.raises(checks.ConfigError, match=r"distill.teacher=.* the teacher's tokenizer \(hf:.*vocabulary 300, "
                                                 r"eos id 1.*\) is not the run's data.tokenizer='bytes' \(bytes, "
                                                 r"vocabulary 256\): they must share the tokenizer"):
        loop.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()

    bytes_320 = zeros_model(tmp_path / "bytes_320", vocab_size=320)  # a byte-level model with a padded embedding
    config = tiny(corpus, init_from=f"run:{bytes_320}", **{"data.tokenizer": f"hf:{directory}"})
    with pytest.raises(checks.ConfigError, match=r"init_from=.* init_from's tokenizer \(bytes, vocabulary 256, "
                                                 r"from .*\) is not the run's data.tokenizer='hf:.*vocabulary 300"):
        loop.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()

    # a run directory whose checkpoint does not fit its config: the first state fails, the new workdir goes
    broken = tmp_path / "broken"
    saved = json.loads((workdir / "config.json").read_text())
    saved["model"]["moe"]["num_experts"] = 4
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(saved))
    (broken / "checkpoints").symlink_to(workdir / "checkpoints")
    with pytest.raises(checkpoint.WorkdirError, match=r"the params of the checkpoint at step 4 in .*broken do not "
                                                      r"fit the model of its config: .*arrays of another shape"):
        loop.run(tiny(corpus, init_from=f"run:{broken}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- end to end


def test_main_distils_a_pruned_model_from_its_source(source, pruned, env, tmp_path):
    """The recovery recipe: the pruned model (4 experts per layer, a model section unlike the config file's 8)
    trains from its own arrays, distilled from the 8-expert source it was pruned from."""
    workdir, corpus = source
    out_dir, pruned_variables = pruned
    student = tmp_path / "student"
    flags = [f"--config.init_from=run:{out_dir}", f"--config.distill.teacher=run:{workdir}",
             "--config.distill.temperature=2.0", "--config.train.steps=4"]
    out = main_run(student, corpus, env, *flags)
    assert f"from the checkpoint at step 0 in {out_dir} (4 routed experts per MoE layer" in out
    assert f"distilling from the checkpoint at step 4 in {workdir} (8 routed experts" in out
    assert "step 4/4 | loss " in out and " | kd " in out

    config, _ = moejax.load(student)
    assert config.model.moe.num_experts == 4 and config.init_from == f"run:{out_dir}"
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["kd_loss"]) and r["kd_loss"] >= 0 for r in train)
    (first,) = [r for r in records if r["kind"] == "eval" and r["step"] == 0]  # the pruned model, before training
    pruned_config, _ = moejax.load(out_dir)
    evaluation = jax.jit(model.Transformer(pruned_config.model).apply)
    from moejax import data
    losses = [objectives.cross_entropy(evaluation(pruned_variables, jnp.asarray(b[:, :-1])), jnp.asarray(b[:, 1:]))
              for b in data.eval_batches(config)]
    assert first["loss"] == pytest.approx(float(np.mean(losses)), abs=1e-5)
    summary = json.loads((student / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["params_total"] < json.loads(
        (workdir / "summary.json").read_text())["params_total"]

    again = main_run(student, corpus, env, *flags)  # the same command: the finished run, its config unchanged
    assert "holds a finished run of this config" in again


def test_a_merged_model_with_uneven_stored_experts_trains_on_a_mesh_and_resumes(source, tmp_path, capsys):
    """A model with expert maps (merged experts bound, uneven stored counts per layer) trains expert-parallel from
    its own arrays (the session's 8 host devices: data=4 x expert=2), resumes, and keeps its map; the stored
    experts change, the bindings do not."""
    from moejax.moe import expert_map
    from moejax.posthoc import merge

    workdir, corpus = source
    config, variables = moejax.load(workdir)
    groups = {0: [[0, 1], [2, 3], [4, 5], [6, 7]], 1: [[0, 1, 2, 3], [4, 5, 6], [7]]}
    merged_config, merged = merge.average(config, variables, groups)
    merged_dir = checkpoint.save_variables(tmp_path / "merged", merged_config, merged)
    student = tmp_path / "student"
    fields = {"mesh.data": 4, "mesh.expert": 2, "train.warmup_steps": 1, "train.log_every": 2,
              "train.eval_every": 0, "checkpoint.every_steps": 2}
    loop.run(tiny(corpus, init_from=f"run:{merged_dir}", **{**fields, "train.steps": 2}), student)
    loop.run(tiny(corpus, init_from=f"run:{merged_dir}", **{**fields, "train.steps": 4}), student)
    assert "resum" in capsys.readouterr().out.lower()
    trained_config, trained = moejax.load(student)
    assert expert_map.rows(trained_config.model.moe) == expert_map.rows(merged_config.model.moe)
    stored = model.moe_layer_variables(trained_config.model, trained)
    assert [p["experts"]["wo"].shape[0] for p, _ in stored.values()] == [4, 3]
    before = model.moe_layer_variables(merged_config.model, merged)
    assert not np.allclose(np.asarray(stored[0][0]["experts"]["wo"]), np.asarray(before[0][0]["experts"]["wo"]))
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
