"""moejax.evaluate: on a trained workdir it reproduces the training loop's own evaluation on the same batches
(loss and the per-layer MoE statistics); its loss equals a numpy cross-entropy of the model's logits; bits per
byte follow from the tokenizer's bytes; a transformers directory is evaluated with its own tokenizer; the
``python -m moejax.generate`` CLI streams a continuation that equals moejax.generate's tokens, warns when asked past
the training length and stops at Ctrl-C with status 130 and one line. The CLIs' checkpoint errors are one line
before loading, and a transformers directory's evaluation needs --out (nothing is written into the current
directory)."""
import json
import math
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import moejax
from moejax import checks, cli, data, evaluate, generate, hf, model
from moejax.data import tokenizers
from moejax.training import loop
from tests import helpers_train
from tests.helpers_configs import REPO
from tests.reference import cross_entropy

# One worker runs the module: its tests share the module fixtures' trainings (split over the two pytest-xdist
# workers, each would train them).
pytestmark = pytest.mark.xdist_group("evaluate_trained")


@pytest.fixture(scope="module")
def trained(bpe_release, tmp_path_factory):
    """A tiny workdir trained 6 steps on the release's corpus with the byte tokenizer."""
    _, corpus = bpe_release
    config = helpers_train.get_config()
    config.data.name = f"text:{corpus}/*.py"
    config.data.dir = str(corpus.parent / "cache")
    config.train.update(steps=6, eval_every=6, log_every=3)
    config.checkpoint.every_steps = 6
    workdir = tmp_path_factory.mktemp("evaluate") / "run"
    loop.train_and_evaluate(config, workdir)
    return workdir


def logged_eval(workdir, step):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "eval" and r["step"] == step)


def test_evaluate_reproduces_the_training_loops_evaluation(trained, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate.main([f"--checkpoint={trained}", f"--out={out}"])
    logged = logged_eval(trained, 6)
    assert result["loss"] == pytest.approx(logged["loss"], abs=1e-6)
    for layer in ("layers_0", "layers_1"):
        for stat in ("router_entropy", "experts_per_token", "max_over_mean_load"):
            assert result[f"{layer}_{stat}"] == pytest.approx(logged[f"{layer}_{stat}"], abs=1e-5)
    assert json.loads(out.read_text())["loss"] == result["loss"]
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-9)  # one byte per token
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)


def test_evaluate_loss_is_the_cross_entropy_of_the_logits(trained):
    config, variables = moejax.load(trained)
    batches = data.eval_batches(config)
    result = evaluate.evaluate(config, variables, batches)
    forward = jax.jit(model.Transformer(config.model).apply)
    losses = [cross_entropy(forward(variables, jnp.asarray(b[:, :-1])), b[:, 1:]) for b in batches]
    assert result["loss"] == pytest.approx(float(np.mean(losses)), abs=1e-5)
    assert result["tokens"] == sum(b[:, 1:].size for b in batches)


def test_one_evaluator_compiles_once_and_takes_the_intervention(trained):
    """Evaluator: two interventions of one model reuse one compiled step; each result is the numpy cross-entropy of
    the model's logits under that intervention, and token_losses are that cross-entropy per position."""
    from moejax.moe import intervention as iv_lib

    config, variables = moejax.load(trained)
    batches = data.eval_batches(config)[:2]
    evaluator = evaluate.Evaluator(config)
    forward = jax.jit(lambda v, t, iv: model.Transformer(config.model).apply(v, t, intervention=iv))
    for experts in ({0: [0]}, {0: [1], 1: [2]}):
        iv = iv_lib.mask_experts(config.model, experts)
        result = evaluator(variables, batches, intervention=iv)
        logits = [np.asarray(forward(variables, jnp.asarray(b[:, :-1]), iv)) for b in batches]
        expected_loss = np.mean([cross_entropy(x, b[:, 1:]) for x, b in zip(logits, batches, strict=True)])
        assert result["loss"] == pytest.approx(expected_loss, abs=1e-5)
        shifted = logits[0] - logits[0].max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        expected = -np.take_along_axis(log_probs, batches[0][:, 1:, None], -1)[..., 0]
        np.testing.assert_allclose(evaluator.token_losses(variables, batches[0], iv), expected, atol=1e-5)
    assert evaluator._step._cache_size() == 1


def test_a_transformers_directory_is_evaluated_with_its_own_tokenizer(bpe_release, tmp_path):
    directory, corpus = bpe_release
    result = evaluate.main([f"--checkpoint={directory}", f"--data=text:{corpus}/*.py", "--batch_size=2",
                            "--seq_len=16", "--max_tokens=64", f"--data_dir={corpus.parent / 'cache'}",
                            f"--out={tmp_path / 'e.json'}"])
    assert result["tokenizer"] == f"hf:{directory}" and result["tokens"] == 64
    tok = tokenizers.from_spec(f"hf:{directory}")
    config, variables = hf.load(directory)
    config.data.update(name=f"text:{corpus}/*.py", dir=str(corpus.parent / "cache"), eval_batches=2)
    config.train.update(batch_size=2, seq_len=16)
    batches = data.eval_batches(config)
    expected_bytes = sum(tok.token_bytes(int(i)) for b in batches for i in b[:, 1:].ravel())
    assert result["text_bytes"] == expected_bytes
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * 64 / (expected_bytes * math.log(2)))
    forward = jax.jit(model.Transformer(config.model).apply)
    losses = [cross_entropy(forward(variables, jnp.asarray(b[:, :-1])), b[:, 1:]) for b in batches]
    assert result["loss"] == pytest.approx(float(np.mean(losses)), abs=1e-5)


def test_generate_cli_streams_the_greedy_continuation(trained, capsys):
    tokens = generate.main([f"--checkpoint={trained}", "--prompt=def f(x):", "--max_new_tokens=12"])
    config, variables = moejax.load(trained)
    prompt = np.asarray([list(b"def f(x):")], np.int32)
    expected = generate.generate(config, variables, prompt, max_new_tokens=12, eos_id=0)
    np.testing.assert_array_equal(tokens, expected)
    captured = capsys.readouterr()
    new = [t for t in expected[0, prompt.shape[1]:].tolist()]
    new = new[:new.index(0)] if 0 in new else new
    assert captured.out.startswith("def f(x):" + bytes(new).decode("utf-8", errors="replace").rstrip("\ufffd"))
    assert "tokens/s" in captured.err
    assert "warning" not in captured.err  # 9 + 12 tokens: within the 32 of train.seq_len


def test_generate_cli_stops_at_ctrl_c(trained, env):
    """SIGINT while decoding 100,000 tokens: the decoding stops at once, status 130, a warning that 100,000 tokens
    pass the training length and one line with what was decoded; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "moejax.generate", f"--checkpoint={trained}", "--prompt=def",
                             "--max_new_tokens=100000"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    streamed = proc.stdout.read(8)  # the prompt and the first decoded characters
    proc.send_signal(signal.SIGINT)
    signalled = time.perf_counter()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert time.perf_counter() - signalled < 30 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: --max_new_tokens=100000 after a prompt of 3 tokens runs "
                                                   "to 100003 tokens, past the 32 the model was trained on"), err
    stopped = re.fullmatch(r"error: stopped by Ctrl-C: (\d+) new tokens; loading .* tokens/s", lines[1])
    assert stopped and 1 <= int(stopped.group(1)) < 100000 and (streamed + out).startswith("def")


@pytest.mark.parametrize("case,error,message", [
    ("missing", cli.UsageError, r"--checkpoint='.*missing': does not exist"),
    ("no checkpoint yet", cli.RunError, r"has no checkpoint yet"),
    ("unknown step", cli.UsageError, r"--step=999: .* has the checkpoints of steps 6$"),
    ("neither", cli.UsageError, r"is neither a moejax workdir"),
])
@pytest.mark.parametrize("command", [evaluate, generate])
def test_cli_checkpoint_errors(command, case, error, message, trained, tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text((trained / "config.json").read_text())
    paths = {"missing": tmp_path / "missing", "no checkpoint yet": started, "unknown step": trained,
             "neither": tmp_path / "empty"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(error, match=message):
        command.main([f"--checkpoint={paths[case]}", *(["--step=999"] if case == "unknown step" else [])])


def test_evaluate_needs_out_for_a_transformers_directory(bpe_release, env, tmp_path):
    """Nothing is written into the current directory: --out is asked for before anything loads (status 2)."""
    result = subprocess.run([sys.executable, "-m", "moejax.evaluate", f"--checkpoint={bpe_release[0]}"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: --out is required for a transformers checkpoint directory ({bpe_release[0]}): the evaluation of a "
        f"workdir goes to <workdir>/eval_<data>.json, that of a transformers directory to the JSON file --out names"]
    assert list(tmp_path.iterdir()) == []


def test_a_bpe_run_reads_another_corpus_with_its_own_tokenizer(bpe_release, tmp_path):
    """A run trained with 'bpe:N' and read on another corpus (evaluate, and the post-hoc calibration batches)
    tokenizes it with the run's tokenizer.json, not with a BPE trained afresh on that corpus: the batches decode, with
    the run's tokenizer, to text of the new corpus, and the loss is the cross-entropy of the logits on them."""
    from moejax.posthoc import capture

    _, corpus = bpe_release
    config = helpers_train.get_config()
    config.data.update(name=f"text:{corpus}/*.py", dir=str(tmp_path / "cache"), tokenizer="bpe:300")
    config.model.vocab_size = 300
    config.train.update(steps=2, warmup_steps=1, eval_every=2, log_every=1)
    config.checkpoint.every_steps = 2
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, workdir)
    other = pathlib.Path(json.__file__).parent  # the json package's sources: another corpus
    flags = dict(data=f"text:{other}/*.py", max_tokens=64, batch_size=2, seq_len=16, data_dir=str(tmp_path / "cache"))
    result = evaluate.main([f"--checkpoint={workdir}", *(f"--{k}={v}" for k, v in flags.items()),
                            f"--out={tmp_path / 'e.json'}"])
    assert result["tokenizer"] == f"hf:{workdir}"
    run_config, variables = moejax.load(workdir)
    _, inputs, tok = capture.calibration_batches(run_config, workdir, split="validation", **flags)
    assert tok.spec == f"hf:{workdir}"
    text = "".join(path.read_text() for path in other.glob("*.py"))
    for row in np.concatenate(inputs):
        assert tok.decode(row.tolist()) in text  # a BPE trained afresh on json/ would decode to other text
    config = ml_collections.ConfigDict(run_config.to_dict())
    config.data.update(name=flags["data"], dir=flags["data_dir"], tokenizer=f"hf:{workdir}", eval_batches=2)
    config.train.update(batch_size=2, seq_len=16)
    batches = data.eval_batches(config)
    np.testing.assert_array_equal(np.concatenate([b[:, :-1] for b in batches]), np.concatenate(inputs))
    forward = jax.jit(model.Transformer(run_config.model).apply)
    losses = [cross_entropy(forward(variables, jnp.asarray(b[:, :-1])), b[:, 1:]) for b in batches]
    assert result["loss"] == pytest.approx(float(np.mean(losses)), abs=1e-5)


@pytest.mark.parametrize("argv,field", [(["--max_tokens=-1"], "--max_tokens"), (["--batch_size=-2"], "--batch_size")])
def test_bad_flags_are_named(trained, argv, field):
    with pytest.raises(Exception, match=field):
        evaluate.main([f"--checkpoint={trained}", *argv])


def test_training_loop_bits_per_byte_use_the_tokenizers_bytes(bpe_release, trained):
    directory, corpus = bpe_release
    logged = logged_eval(trained, 6)
    assert logged["bits_per_byte"] == pytest.approx(logged["loss"] / math.log(2), rel=1e-9)  # bytes: 1 per token
    config, _ = hf.load(directory)
    config.data.update(name=f"text:{corpus}/*.py", dir=str(corpus.parent / "cache"), eval_batches=2)
    config.train.update(batch_size=2, seq_len=16)
    batches = data.eval_batches(config)
    tok = tokenizers.from_spec(f"hf:{directory}")
    targets = [int(i) for b in batches for i in b[:, 1:].ravel()]
    expected = sum(tok.token_bytes(i) for i in targets) / len(targets)
    assert loop._bytes_per_token(config, batches) == pytest.approx(expected, rel=1e-12) and expected > 1.2


def naive_drop_fraction(experts_per_token, capacity_factor, num_experts):
    """Drop by position: each expert keeps its first C = ceil(cf * T * k / E) slots of the batch; the rest drop."""
    tokens, k = experts_per_token.shape
    cap = max(1, math.ceil(capacity_factor * tokens * k / num_experts))
    counts = np.bincount(experts_per_token.reshape(-1), minlength=num_experts)
    return np.maximum(counts - cap, 0).sum() / (tokens * k)


def test_set_evaluates_the_same_weights_with_another_dispatch(trained):
    """The fixture trains dropless; --set evaluates it at a small capacity factor: every layer's drop fraction is the
    count of slots past each expert's capacity (a numpy count over the layer's routing), and the loss rises."""
    from moejax.posthoc import capture

    plain = evaluate.main([f"--checkpoint={trained}"])
    sets = ["--set", "model.moe.dispatch=capacity", "--set", "model.moe.eval_capacity_factor=0.5"]
    capped = evaluate.main([f"--checkpoint={trained}", *sets])
    written = sorted(p.name for p in trained.glob("eval_*.json"))  # the plain evaluation's file is kept
    assert len(written) == 2 and written[1] == written[0][:-len(".json")] + (
        "_model_moe_dispatch_capacity_model_moe_eval_capacity_factor_0_5.json")
    assert capped["set"] == ["model.moe.dispatch=capacity", "model.moe.eval_capacity_factor=0.5"]
    config, variables = moejax.load(trained)
    config.model.moe.update(dispatch="capacity", eval_capacity_factor=0.5)
    batches = data.eval_batches(config)
    routed = list(capture.stream(config, variables, [b[:, :-1] for b in batches],
                                 lambda c: [layer.routing.experts for layer in c.layers]))
    for i, layer in enumerate(("layers_0", "layers_1")):
        naive = np.mean([naive_drop_fraction(np.asarray(r[i]), 0.5, 8) for r in routed])
        assert capped[f"{layer}_drop_fraction"] == pytest.approx(naive, abs=1e-6)
        assert plain[f"{layer}_drop_fraction"] == 0
    assert capped["layers_0_drop_fraction"] > 0.2  # at most half the slots fit
    assert capped["loss"] > plain["loss"]


@pytest.mark.parametrize("assignment,match", [
    ("model.num_layers=3", "--set.*model.num_layers=3.*FIELD one of model.moe.dispatch"),
    ("model.moe.dispatch", "--set.*FIELD=VALUE"),
    ("model.moe.dispatch=sometimes", "model.moe.dispatch.*sometimes.*dropless"),
    ("model.moe.capacity_factor=lots", "--set.*capacity_factor takes a float"),
    ("model.moe.capacity_factor=-1", "model.moe.capacity_factor.*-1"),
])
def test_bad_set_is_named(trained, assignment, match, monkeypatch):
    if "FIELD" in match or "takes a" in match:  # the flag's form and the value's type: checked before loading
        monkeypatch.setattr(cli, "open_checkpoint", lambda args: pytest.fail("--set is checked before loading"))
    with pytest.raises(checks.ConfigError, match=match):
        evaluate.main([f"--checkpoint={trained}", "--set", assignment])
