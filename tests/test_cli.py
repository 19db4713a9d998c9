"""Tests of ``python -m moejax.main`` as a user runs it: real subprocesses on the tiny config of tests/helpers_train.py
over a small ``text:`` corpus (tests/conftest.py's stdlib_corpus, built once for the module).

Covered: SIGINT and SIGTERM stop the run at the next step with a checkpoint, a message and exit status 0; every
expected failure is a few lines without a traceback, with exit status 2 (the command is wrong) or 1 (the run cannot
go on); a failed init_from leaves no workdir; a corrupt newest checkpoint is one warning line (the library noise goes
to workdir/restore.log); a finished run run again changes nothing; on resume metrics.jsonl and TensorBoard hold every
step once; --help and --print_config; text: files that are not UTF-8; moejax.load. The front door every command
shares (moejax/cli.py): the exit policy of ``cli.run``, a closed output pipe, ``open_checkpoint``'s refusals and
``removed_on_failure``.

The subprocesses share a persistent compilation cache, so only the first run of each program compiles it. All tests
stay in one pytest-xdist worker (they share the finished run of the module fixture).
"""
import argparse
import hashlib
import json
import os
import pathlib
import queue
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import moejax
from moejax import checks, cli, data, model
from moejax.training import checkpoint, loop
from tests import helpers_train
from tests.helpers_configs import REPO

pytestmark = pytest.mark.xdist_group("cli")

TIMEOUT = 240
# Long enough that a signal always arrives mid-run; nothing saved or evaluated on the way.
LONG_RUN = ["--config.train.steps=100000", "--config.train.log_every=10", "--config.checkpoint.every_steps=0",
            "--config.train.eval_every=0"]


def command(corpus, workdir, *extra):
    return [sys.executable, "-m", "moejax.main", f"--config={REPO / 'tests' / 'helpers_train.py'}",
            f"--config.data.name=text:{corpus}/*.py", f"--config.data.dir={corpus.parent / 'data_cache'}",
            f"--workdir={workdir}", *extra]


def run_main(args, env, **env_overrides):
    """Runs `python -m moejax.main args`: CompletedProcess with text stdout and stderr."""
    return subprocess.run(args, cwd=REPO, env={**env, **env_overrides}, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def finished(stdlib_corpus, env, tmp_path_factory):
    """A finished 40-step run (checkpoints 32, 36, 40); tests copy it before changing anything."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = run_main(command(stdlib_corpus, workdir), env)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def copy_of(workdir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(workdir, target)
    return target


def snapshot(workdir):
    """{relative path: (mtime_ns, sha256)} of every file below workdir."""
    return {str(p.relative_to(workdir)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_view(workdir):
    """{tag: [step, ...]} as TensorBoard shows the event files: read in name order, a SessionLog START at step s
    (tensorboardX purge_step) drops the events of steps >= s read before it. Also returns the purge steps."""
    scalars, purges = {}, []
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        blob, pos = path.read_bytes(), 0
        while pos < len(blob):
            (length,) = struct.unpack("<Q", blob[pos:pos + 8])
            event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                purges.append(event.step)
                scalars = {tag: [s for s in steps if s < event.step] for tag, steps in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(event.step)
    return scalars, purges


def truncate_array_file(step_dir):
    """The largest file of the checkpoint's array data, cut to 1000 bytes."""
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(1000)


# ------------------------------------------------------------------ signals


def start_then_signal(args, env, sig, after_line="step 10/"):
    """Starts main, sends sig once stdout has a line starting with after_line; (returncode, stdout, stderr)."""
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    seen, deadline = [], time.time() + TIMEOUT
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if line.startswith(after_line):
            proc.send_signal(sig)
            break
    else:
        proc.kill()
    proc.wait(timeout=TIMEOUT)
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    return proc.returncode, "".join(seen), proc.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_at_the_next_step_and_exits_0(sig, stdlib_corpus, env, tmp_path):
    workdir = tmp_path / "run"
    args = command(stdlib_corpus, workdir, *LONG_RUN)
    returncode, out, err = start_then_signal(args, env, sig)
    assert returncode == 0, out + err
    assert "Traceback" not in err
    (line,) = [line for line in out.splitlines() if "received" in line]
    match = re.fullmatch(rf"{sig.name} received: saved a checkpoint at step (\d+) in (.+) \(it arrived at step "
                         rf"(\d+)\); run the same command to resume: python -m moejax\.main (.+)", line)
    assert match, line
    saved, arrived = int(match[1]), int(match[3])
    assert pathlib.Path(match[2]) == workdir
    assert 10 <= arrived <= saved <= arrived + 1  # the step in progress or the next, not the next log step
    assert shlex.split(match[4]) == args[3:]
    assert checkpoint.checkpoint_steps(workdir) == [saved]  # every_steps=0: only the stop saved
    state, meta = checkpoint.load_checkpoint(workdir)
    assert int(state["step"]) == saved and meta["data"][0]["step"] == saved
    assert max(r["step"] for r in records(workdir)) <= saved
    assert not (workdir / "summary.json").exists()


def test_second_signal_aborts_at_once():
    """The loop's handlers: the first SIGINT only asks to stop, a second raises KeyboardInterrupt; on exit the
    previous handlers are back."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with loop._StopRequest() as stop:
        stop.steps = 7
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.is_set() and stop.name == "SIGINT" and stop.at_step == 7
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs before this returns
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM ends the process
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ------------------------------------------------------------------ errors


BROKEN_CONFIG = "def get_config(arg=None):\n    return undefined_name\n"


def write_config(tmp_path, body):
    path = tmp_path / "broken_config.py"
    path.write_text(body)
    return path


ERRORS = {
    # name: (extra args or a function of (tmp_path, finished) giving them, exit status, expected message parts)
    "config file missing": (["--config=configs/no_such_config.py"], 2,
                            ["config file configs/no_such_config.py does not exist", "--help"]),
    "config file raises": (lambda tmp, _: [f"--config={write_config(tmp, BROKEN_CONFIG)}"], 2,
                           ["broken_config.py failed to load", "NameError", "undefined_name", "line 2"]),
    "unknown field": (["--config.model.moe.topk=3"], 2,
                      ["unknown config field model.moe.topk", "did you mean model.moe.top_k?", "configs/base.py"]),
    "unknown preset": (["--config=configs/deepseekmoe.py:huge"], 2,
                       ["config preset 'huge' of configs/deepseekmoe.py is unknown", "'tiny', 'small', '2b', '16b'"]),
    "bad value": (["--config.model.moe.top_k=many"], 2, ["--config.model.moe.top_k=many", "invalid literal"]),
    "invalid config": (["--config.model.moe.top_k=9"], 2, ["model.moe.top_k=9", "num_experts"]),
    "glob matches nothing": (lambda tmp, _: [f"--config.data.name=text:{tmp}/*.txt"], 2, ["matches no files"]),
    "text directory": (lambda tmp, _: [f"--config.data.name=text:{tmp}"], 2,
                       ["names a directory, not files", "/**/*.txt"]),
    "tfds not prepared": (lambda tmp, _: ["--config.data.name=tfds:moejax_no_such_dataset",
                                          f"--config.data.tfds_dir={tmp}"], 2,
                          ["no prepared TFDS dataset found", "tfds build moejax_no_such_dataset"]),
    "workdir is a file": (lambda tmp, _: [f"--workdir={a_file(tmp)}"], 2, ["is a file, not a directory"]),
    "workdir cannot be created": (lambda tmp, _: [f"--workdir={a_file(tmp) / 'run'}"], 2,
                                  ["cannot create --workdir", "is a file, not a directory"]),
    "workdir of another config": (lambda tmp, done: [f"--workdir={copy_of(done, tmp)}",
                                                     "--config.model.moe.top_k=1"], 1,
                                  ["holds a run with a different config", "model.moe.top_k: 2 in the workdir, 1 now"]),
    "no checkpoint restores": (lambda tmp, done: [f"--workdir={corrupt_all(copy_of(done, tmp))}"], 1,
                               ["can be restored", "step 40:", "step 32:", "restore.log", "to start over"]),
    "divergence": (["--config.model.init_std=1e30"], 1,
                   ["training diverged", "at step 1", "no checkpoint was saved", "train.learning_rate"]),
}


def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a workdir")
    return path


def corrupt_all(workdir):
    """Every checkpoint unreadable, and no summary (a finished run would not be read again)."""
    (workdir / "summary.json").unlink()
    for step in checkpoint.checkpoint_steps(workdir):
        truncate_array_file(workdir / "checkpoints" / str(step))
    return workdir


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_a_few_lines_without_traceback(case, stdlib_corpus, env, finished, tmp_path):
    extra, status, parts = ERRORS[case]
    extra = extra(tmp_path, finished) if callable(extra) else extra
    args = command(stdlib_corpus, tmp_path / "new_run", *extra)
    if any(a.startswith("--config=") for a in extra):  # the case's own config file replaces the tiny one
        args = [a for a in args if not a.startswith("--config=")]
        args.insert(3, next(a for a in extra if a.startswith("--config=")))
    result = run_main(args, env)
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and len(result.stderr.strip().splitlines()) <= 6, result.stderr
    for part in parts:
        assert part in result.stderr, (part, result.stderr)


def test_verbose_prints_the_traceback(stdlib_corpus, env, tmp_path):
    args = command(stdlib_corpus, tmp_path / "run", f"--config.data.name=text:{tmp_path}/*.txt")  # see ERRORS
    for result in run_main(args, env, MOEJAX_VERBOSE="1"), run_main(args + ["--verbose"], env):
        assert result.returncode == 2
        assert "Traceback" in result.stderr and "error: config.data.name=" in result.stderr
    flag_error = run_main(command(stdlib_corpus, tmp_path / "run", "--config.model.moe.topk=3"), env,
                          MOEJAX_VERBOSE="1")
    assert flag_error.returncode == 2 and "Traceback" in flag_error.stderr


def test_a_failed_init_from_leaves_no_workdir(bpe_release, env, tmp_path):
    """init_from a transformers directory whose weights file is cut short: one line, status 1, and the workdir the run
    had created (config.json, tokenizer, checkpoints/) is gone, so the command can run again once fixed."""
    directory, corpus = bpe_release
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    weights = next(broken.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    workdir = tmp_path / "runs" / "finetune"
    result = run_main([sys.executable, "-m", "moejax.main", "--config=configs/finetune.py",
                       f"--config.init_from=hf:{broken}", f"--config.data.name=text:{corpus}/*.py",
                       f"--config.data.dir={tmp_path / 'cache'}", "--config.train.batch_size=2",
                       "--config.train.seq_len=16", f"--workdir={workdir}"], env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("error: ")] and weights.name in result.stderr
    assert not workdir.exists()


# ------------------------------------------------------------------ the front door (moejax/cli.py)


def _raising(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("error,status,line", [
    (cli.UsageError("--top_p=2.0: must be a number in (0, 1]"), 2, "error: --top_p=2.0: must be a number in (0, 1]"),
    (checks.ConfigError("config field a=1 is invalid: b"), 2, "error: config field a=1 is invalid: b"),
    (cli.RunError("runs/x has no checkpoint yet"), 1, "error: runs/x has no checkpoint yet"),
    (ValueError("cannot map tensor w"), 1, "error: cannot map tensor w"),
    (FileNotFoundError(2, "No such file or directory", "x.json"), 1,
     "error: FileNotFoundError: [Errno 2] No such file or directory: 'x.json'"),
    (KeyboardInterrupt(), 130, "error: aborted by Ctrl-C"),
    (KeyboardInterrupt("stopped by Ctrl-C: 9 new tokens"), 130, "error: stopped by Ctrl-C: 9 new tokens"),
])
def test_run_reports_one_line_with_the_status_of_the_policy(error, status, line, capsys, monkeypatch):
    monkeypatch.delenv("MOEJAX_VERBOSE", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.run(_raising(error), ["--checkpoint=x"])
    assert exited.value.code == status and capsys.readouterr().err.splitlines() == [line]
    with pytest.raises(SystemExit):
        cli.run(_raising(error), ["--checkpoint=x", "--verbose"])
    err = capsys.readouterr().err
    assert ("Traceback" in err) == (status != 130) and err.splitlines()[-1] == line  # Ctrl-C: never a traceback


def test_run_exits_0_and_keeps_the_traceback_of_a_bug(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.run(lambda argv: None, [])
    assert exited.value.code == 0
    with pytest.raises(TypeError, match="a bug"):
        cli.run(_raising(TypeError("a bug")), [])


def test_a_closed_output_pipe_ends_the_command_quietly(env):
    code = "from moejax import cli; cli.run(lambda argv: [print('x' * 100) for _ in range(10 ** 6)])"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # as `| head` does
    err = proc.stderr.read()
    assert proc.wait(timeout=TIMEOUT) == 1 and err == b""


@pytest.mark.parametrize("case,error,message", [
    ("missing", cli.UsageError, r"--checkpoint='.*/missing': does not exist"),
    ("a file", cli.UsageError, r"--checkpoint='.*/a_file': is a file; pass a moejax workdir"),
    ("neither", cli.UsageError, r"is neither a moejax workdir .* nor a transformers checkpoint directory"),
    ("unknown step", cli.UsageError, r"--step=999: .* has the checkpoints of steps 32, 36, 40$"),
    ("no checkpoint yet", cli.RunError, r"has no checkpoint yet"),
])
def test_open_checkpoint_says_what_is_wrong(case, error, message, finished, tmp_path):
    paths = {"missing": tmp_path / "missing", "a file": a_file(tmp_path), "neither": tmp_path,
             "unknown step": finished, "no checkpoint yet": tmp_path / "started"}
    (tmp_path / "started").mkdir()
    shutil.copy(finished / "config.json", tmp_path / "started" / "config.json")
    args = argparse.Namespace(checkpoint=str(paths[case]), step=999 if case == "unknown step" else None)
    with pytest.raises(error, match=message):
        cli.open_checkpoint(args)


def test_open_checkpoint_reads_the_step_asked_for(finished):
    opened = cli.open_checkpoint(argparse.Namespace(checkpoint=str(finished), step=36))
    assert opened.is_workdir and opened.step == 36 and opened.config.train.steps == 40
    assert cli.open_checkpoint(argparse.Namespace(checkpoint=str(finished), step=None)).step == 40


def test_removed_on_failure_removes_only_what_the_block_created(tmp_path):
    existing, new = tmp_path / "existing", tmp_path / "new"
    existing.mkdir()
    (existing / "kept.txt").write_text("there before")
    for path in (existing, new):
        with pytest.raises(KeyboardInterrupt), cli.removed_on_failure(path):
            (path / "checkpoints").mkdir(parents=True)
            (path / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert [p.name for p in existing.iterdir()] == ["kept.txt"] and not new.exists()
    with cli.removed_on_failure(new):
        new.mkdir()
    assert new.is_dir()


# ------------------------------------------------------------------ checkpoints and resuming


def test_corrupt_checkpoint_is_one_warning_line_and_resume_purges(stdlib_corpus, env, finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    (workdir / "summary.json").unlink()  # the run stopped after its last checkpoint, which is then damaged
    truncate_array_file(workdir / "checkpoints" / "40")
    result = run_main(command(stdlib_corpus, workdir), env)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    for noise in ("Traceback", "Event loop is closed", "Task exception", "WARNING:absl", "TensorStore"):
        assert noise not in output, output
    assert not re.search(r"^[IWE]\d{4} ", output, re.MULTILINE), output  # absl log lines
    (warning,) = [line for line in output.splitlines() if "WARNING" in line]
    assert re.fullmatch(r"WARNING: checkpoint at step 40 in .+ is unusable \(reading it failed with \w+: .+\); "
                        r"falling back to step 36, the newest good one, and deleted step 40 \(details in .+\)",
                        warning), warning
    assert len(warning) < 500
    assert len(output.strip().splitlines()) <= 14, output
    assert "resuming from the checkpoint at step 36" in result.stdout
    assert "is unusable" in (workdir / "restore.log").read_text()
    assert checkpoint.checkpoint_steps(workdir) == [32, 36, 40]

    # metrics.jsonl and TensorBoard show steps 37..40 of the resumed run once
    keys = [(r["kind"], r["step"]) for r in records(workdir)]
    assert len(keys) == len(set(keys)) and keys[-2:] == [("train", 40), ("eval", 40)]
    scalars, purges = tensorboard_view(workdir)
    assert purges == [37]
    assert scalars["train/loss"] == list(range(4, 41, 4)) and scalars["eval/loss"] == [20, 40]


def test_rerun_at_the_last_checkpoint_writes_the_final_eval_once(stdlib_corpus, env, finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    (workdir / "summary.json").unlink()  # stopped between the last checkpoint and the summary
    result = run_main(command(stdlib_corpus, workdir), env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from the checkpoint at step 40" in result.stdout and (workdir / "summary.json").exists()
    keys = [(r["kind"], r["step"]) for r in records(workdir)]
    assert len(keys) == len(set(keys)) and keys.count(("eval", 40)) == 1 and keys[-1] == ("eval", 40)
    scalars, _ = tensorboard_view(workdir)
    assert scalars["eval/loss"] == [20, 40] and scalars["train/loss"] == list(range(4, 41, 4))


def test_finished_run_prints_its_summary_and_changes_nothing(stdlib_corpus, env, finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    before = snapshot(workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    result = run_main(command(stdlib_corpus, workdir), env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{workdir} holds a finished run of this config (40 steps); nothing to do" in result.stdout
    assert f"validation loss {summary['val_loss']:.4f} nats/token" in result.stdout
    assert "layers_0: max/mean expert load" in result.stdout and f"summary: {workdir / 'summary.json'}" in result.stdout
    assert "compiling" not in result.stdout and result.stderr.strip() == ""
    assert snapshot(workdir) == before


# ------------------------------------------------------------------ --help, --print_config


def test_help_lists_the_configs_and_their_presets(env):
    result = run_main([sys.executable, "-m", "moejax.main", "--help"], env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    configs = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name not in ("__init__.py", "base.py")
                     and not p.name.startswith("base_"))
    assert configs and all(f"  {name}" in out for name in configs)
    assert re.search(r"deepseekmoe\.py +DeepSeekMoE \(Dai et al\., 2024, arXiv 2401\.06066\)", out)
    assert "presets: tiny (default), small, 2b, 16b" in out and "presets: coarse (default), fine" in out
    assert "configs/base.py" in out and "--print_config" in out and "--workdir" in out and "Exit status" in out


def test_print_config_prints_the_resolved_config_and_trains_nothing(env, tmp_path):
    workdir = tmp_path / "run"
    result = run_main([sys.executable, "-m", "moejax.main", "--config=configs/deepseekmoe.py:small",
                       "--config.model.moe.top_k=3", f"--workdir={workdir}", "--print_config"], env)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["model"]["moe"]["top_k"] == 3 and printed["model"]["moe"]["num_experts"] == 63
    assert printed["model"]["moe"]["expert_ffn"] == 176  # the 'small' preset
    assert not workdir.exists()


# ------------------------------------------------------------------ text: data


def test_text_files_that_are_not_utf8_are_skipped(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("plain text, long enough for a few windows of sixteen bytes. " * 40)
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    config = helpers_train.get_config()
    config.data.name, config.train.seq_len, config.train.batch_size = f"text:{tmp_path}/*.txt", 16, 2
    batch = next(data.train_iterator(config))
    out = capsys.readouterr().out
    assert f"warning: skipped {tmp_path / 'binary.txt'} (byte 0x89 at offset 0): not valid UTF-8 text" in out
    assert batch.shape == (2, 17)
    assert data.corpus_fingerprint(config)["files"] == 1

    config.data.name = f"text:{tmp_path}/binary*"
    with pytest.raises(ValueError, match="none of the 1 files it matches is valid UTF-8 text"):
        data.train_iterator(config)


# ------------------------------------------------------------------ moejax.load


def test_load_gives_the_config_and_variables_quietly(finished, capfd):
    capfd.readouterr()
    config, variables = moejax.load(finished)
    again_config, again = moejax.load(finished, step=40)
    _, older = moejax.load(finished, step=36)
    state, meta = checkpoint.load_checkpoint(finished)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured  # no absl warnings (e.g. _CHECKPOINT_METADATA)

    assert config.model.d_model == 32 and config.train.steps == 40 and config.data.name.startswith("text:")
    assert config.train.step_decay_at == (0.8, 0.9) and config.to_dict() == again_config.to_dict()
    assert set(variables) == {"params", "moe_state"}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(variables))
    assert meta["step"] == 40
    for loaded, same, saved in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(again["params"]),
                                   jax.tree.leaves(state["params"]), strict=True):
        assert np.array_equal(loaded, same) and np.array_equal(loaded, saved)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables["params"]),
                                                        jax.tree.leaves(older["params"]), strict=True))
    tokens = np.frombuffer(b"def load(path):\n    return", np.uint8).astype(np.int32)[None]
    logits = model.Transformer(config.model).apply(variables, tokens)
    assert logits.shape == (1, tokens.shape[1], 256) and np.all(np.isfinite(logits))


def test_load_refuses_a_path_without_a_run(finished, tmp_path):
    with pytest.raises(checkpoint.WorkdirError, match="has no config.json"):
        moejax.load(tmp_path)
    shutil.copy(finished / "config.json", tmp_path / "config.json")
    with pytest.raises(checkpoint.WorkdirError, match="has no checkpoint yet"):
        moejax.load(tmp_path)
    with pytest.raises(checkpoint.WorkdirError, match="no checkpoint at step 7"):
        moejax.load(finished, step=7)


def test_load_fills_fields_an_older_config_json_lacks(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    saved = json.loads((workdir / "config.json").read_text())
    del saved["model"]["moe"]["router"]["eval_top_k"], saved["upcycle"]
    (workdir / "config.json").write_text(json.dumps(saved))
    config, _ = moejax.load(workdir)
    assert config.model.moe.router.eval_top_k == 0 and config.upcycle.granularity == 1
    assert config.model.d_model == 32


def test_the_commands_keep_their_compiled_programs_in_the_compile_cache(bpe_release, env, tmp_path):
    """--compile_cache is on by default (a per-user directory, filled); 'off' writes nothing."""
    directory = bpe_release[0]
    command = [sys.executable, "-m", "moejax.generate", f"--checkpoint={directory}", "--prompt=def",
               "--max_new_tokens=3"]
    home = tmp_path / "home"
    quiet = {**env, "HOME": str(home), "MOEJAX_COMPILE_CACHE": ""}  # the default: ~/.cache/moejax/jax
    subprocess.run(command, cwd=REPO, env=quiet, check=True, capture_output=True)
    assert any((home / ".cache" / "moejax" / "jax").iterdir())
    subprocess.run([*command, "--compile_cache=off"], cwd=REPO, env={**quiet, "HOME": str(tmp_path / "h2")},
                   check=True, capture_output=True)
    assert not (tmp_path / "h2" / ".cache").exists()
    assert cli.default_compile_cache() == "off"  # the test session's
