"""Fine-tuning from a released checkpoint: ``python -m moejax.main --config=configs/finetune.py
--config.init_from=hf:<dir>`` on a tiny random Mixtral-layout checkpoint written by ``moejax.hf.save`` (no torch)
with its own tokenizer.json.

Covered: the run takes the checkpoint's model (except initialise.RUN_FIELDS) and tokenizer; its step-0 evaluation
equals the cross-entropy of the checkpoint's weights computed here with numpy; a second invocation resumes; the
result exported with ``moejax.hf.save`` loads back with ``moejax.hf.load`` to identical arrays; a bad init_from is
refused by name before anything is written.
"""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

import moejax
from moejax import checks, data, hf, model
from moejax.data import tokenizers
from moejax.training import initialise, loop
from tests.helpers_configs import REPO
from tests.helpers_hf import flat
from tests.reference import cross_entropy

READ_CONFIG = hf.read_config

STEPS = ["--config.train.warmup_steps=1", "--config.train.batch_size=4", "--config.train.seq_len=32",
         "--config.data.eval_batches=2", "--config.train.log_every=1", "--config.checkpoint.every_steps=2"]


def finetune(release, workdir, env, steps):
    directory, corpus = release
    args = [sys.executable, "-m", "moejax.main", "--config=configs/finetune.py", f"--config.init_from=hf:{directory}",
            f"--config.data.name=text:{corpus}/*.py", f"--config.data.dir={corpus.parent / 'cache'}",
            f"--config.train.steps={steps}", *STEPS, f"--workdir={workdir}"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_finetune_starts_from_the_release_resumes_and_exports(bpe_release, env, tmp_path):
    directory, _ = bpe_release
    workdir = tmp_path / "run"
    out = finetune(bpe_release, workdir, env, steps=2)
    assert f"from the mixtral checkpoint in {directory}" in out

    config, _ = moejax.load(workdir)
    assert config.data.tokenizer == f"hf:{directory}"
    released, run_model = hf.read_config(directory).model.to_dict(), config.model.to_dict()
    assert run_model["moe"].pop("balance_coef") == 1e-3 and released["moe"].pop("balance_coef") == 0.01  # RUN_FIELDS
    assert run_model == released
    assert (workdir / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()
    assert tokenizers.for_workdir(workdir).eos_id == 1

    # step 0: the released weights (their loss on the run's own eval batches, computed here)
    _, variables = hf.load(directory)
    apply = jax.jit(model.Transformer(config.model).apply)
    losses = [cross_entropy(apply(variables, jnp.asarray(b[:, :-1])), b[:, 1:]) for b in data.eval_batches(config)]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    (first,) = [r for r in records if r["kind"] == "eval" and r["step"] == 0]
    assert abs(first["loss"] - float(np.mean(losses))) < 1e-5
    assert json.loads((workdir / "summary.json").read_text())["corpus"]["tokenizer"]["vocab_size"] == 300

    assert "resuming from the checkpoint at step 2" in finetune(bpe_release, workdir, env, steps=4)
    config, variables = moejax.load(workdir)
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 4
    exported = hf.save(config, variables, tmp_path / "export")
    tokenizers.for_workdir(workdir).save(exported)
    reloaded, trained = flat(hf.load(exported)[1]), flat(variables)
    assert reloaded.keys() == trained.keys()
    for key, array in trained.items():
        np.testing.assert_array_equal(reloaded[key], array, err_msg=key)
    assert any(not np.array_equal(trained[k], v) for k, v in flat(hf.load(directory)[1]).items())  # it trained
    assert tokenizers.from_spec(f"hf:{exported}").encode("def f(): pass") == \
        tokenizers.from_spec(f"hf:{directory}").encode("def f(): pass")


def test_resolve_takes_the_release_model_and_tokenizer(bpe_release):
    directory, _ = bpe_release
    config = base.get_config()
    config.init_from = f"hf:{directory}"
    config.model.moe.dispatch, config.model.remat = "capacity", True  # RUN_FIELDS: kept
    config.model.num_layers = 9  # the checkpoint's wins
    resolved = initialise.resolve(config)
    assert resolved.model.num_layers == 1 and resolved.model.vocab_size == 320
    assert resolved.model.moe.dispatch == "capacity" and resolved.model.remat
    assert resolved.data.tokenizer == f"hf:{directory}" and config.data.tokenizer == "bytes"  # a copy
    assert initialise.resolve(resolved).to_json() == resolved.to_json()
    config.data.tokenizer = "bpe:400"  # set by the user: kept
    assert initialise.resolve(config).data.tokenizer == "bpe:400"
    assert initialise.source_name(resolved) == "hf"


def test_a_command_reads_the_release_config_once(bpe_release, monkeypatch, tmp_path):
    """main resolves once and the loop's entry points take the resolved config as it is: the release's
    config.json is read (and its warnings printed) once per command, not once per entry point."""
    directory, _ = bpe_release
    reads = []
    monkeypatch.setattr(hf, "read_config", lambda path: reads.append(path) or READ_CONFIG(path))
    config = base.get_config()
    config.init_from = f"hf:{directory}"
    resolved = initialise.resolve(config)
    assert initialise.resolve(resolved) is resolved
    assert loop.report_finished(resolved, tmp_path / "run") is None
    assert len(reads) == 1
    assert initialise.resolve(config) is not resolved and len(reads) == 2  # the unresolved config is read again


def test_print_config_shows_the_model_the_run_will_train(bpe_release, env, tmp_path):
    directory, _ = bpe_release
    args = [sys.executable, "-m", "moejax.main", "--config=configs/finetune.py", f"--config.init_from=hf:{directory}",
            f"--workdir={tmp_path / 'run'}", "--print_config"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    released = json.loads((directory / "config.json").read_text())
    assert (printed["model"]["d_model"], printed["model"]["moe"]["num_experts"], printed["model"]["vocab_size"]) == (
        released["hidden_size"], released["num_local_experts"], released["vocab_size"])
    assert printed["data"]["tokenizer"] == f"hf:{directory}" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value,why", [
    ("{dir}", r"allowed: '' \(the model's own initialisation\) or 'hf:<dir>'"),
    ("hf:{dir}/missing", r"is not a transformers checkpoint directory; allowed: ''"),
    ("hf:<dir>", r"<dir> is not a transformers checkpoint directory"),  # configs/finetune.py's placeholder
    ("hf:{dir}|upcycle", r"cannot be combined with upcycle.enabled=True"),
])
def test_bad_init_from_is_refused_before_anything_is_written(bpe_release, tmp_path, value, why):
    directory, _ = bpe_release
    value, _, upcycle = value.format(dir=directory).partition("|")
    config = base.get_config()
    config.init_from, config.upcycle.enabled = value, bool(upcycle)
    with pytest.raises(checks.ConfigError, match=rf"config field init_from={value!r} is invalid: .*{why}"):
        loop.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_release_without_a_tokenizer_needs_data_tokenizer(bpe_release, tmp_path):
    directory, _ = bpe_release
    bare = tmp_path / "bare"
    shutil.copytree(directory, bare)
    (bare / "tokenizer.json").unlink()
    config = base.get_config()
    config.init_from = f"hf:{bare}"
    with pytest.raises(checks.ConfigError, match=r"init_from=.*has no tokenizer.json; set data.tokenizer"):
        initialise.resolve(config)
    config.data.tokenizer = f"hf:{directory}"
    assert initialise.resolve(config).data.tokenizer == f"hf:{directory}"
