"""Where post-hoc calibration data comes from (``capture.calibration_batches``, ``--calibration_split`` of every
``python -m moejax.posthoc`` subcommand that reads data): by default the training split, in windows that are fixed
(whatever seed the checkpoint trained with) and share no window with the validation windows ``python -m
moejax.evaluate`` scores (``moejax.data.checkpoint_windows``); the split is recorded in what the commands write, and a
split that does not exist is a usage error naming the flag.
"""
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

from moejax import data
from moejax.posthoc import __main__ as cli
from moejax.posthoc import capture, read_trace

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma", "omega", "rho",
         "return", "yield", "class", "def", "import", "while", "for", "print")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A ``text:`` corpus of 40 files of random words (no two 33-byte windows of it alike, so any window the
    calibration and the evaluation share would be the same bytes read twice): (its name, data dir)."""
    root = tmp_path_factory.mktemp("split_corpus")
    rng = np.random.default_rng(7)
    for i in range(40):
        words = rng.choice(WORDS, size=400)
        numbers = rng.integers(0, 10_000, size=400)
        (root / f"f{i:02d}.txt").write_text(" ".join(f"{w}{n}" for w, n in zip(words, numbers, strict=True)))
    return f"text:{root}/*.txt", str(root.parent / f"{root.name}_data")


def base_config():
    from moejax.configs import base

    return base.get_config()


def windows(batches):
    """The set of rows of a list of token arrays [B, S]."""
    return {tuple(row) for batch in batches for row in np.asarray(batch).tolist()}


def test_train_windows_are_disjoint_from_the_evaluators_and_fixed(corpus):
    name, data_dir = corpus
    flags = dict(data=name, data_dir=data_dir, max_tokens=64 * 32, batch_size=8, seq_len=32)
    config = base_config()
    # the evaluator's windows: python -m moejax.evaluate reads checkpoint_windows with the same flags
    _, scored, _ = data.checkpoint_windows(config, None, **flags)
    _, calibration, _ = capture.calibration_batches(config, None, **flags)
    assert len(calibration) == len(scored) == 8 and calibration[0].shape == (8, 32)
    inputs = windows(window[:, :-1] for window in scored)
    assert len(windows(calibration)) == 64 and not windows(calibration) & inputs
    # nor does a calibration row lie inside the validation text at another offset
    val_text = b"".join(bytes(row) for batch in scored for row in batch.tolist())
    assert not any(bytes(row) in val_text for row in windows(calibration))
    # the validation split is the evaluator's windows themselves (what calibration read before)
    _, same, _ = capture.calibration_batches(config, None, split="validation", **flags)
    assert windows(same) == inputs
    # fixed: the same windows again, whatever seed the checkpoint's config trained with; another seed, others
    config.seed = 12345
    _, again, _ = capture.calibration_batches(config, None, split="train", **flags)
    np.testing.assert_array_equal(np.stack(again), np.stack(calibration))
    _, other, _ = capture.calibration_batches(config, None, seed=capture.CALIBRATION_SEED + 1, **flags)
    assert windows(other) != windows(calibration) and not windows(other) & inputs


def test_the_default_is_train():
    assert inspect.signature(capture.calibration_batches).parameters["split"].default == "train"
    assert capture.SPLITS == ("train", "validation")
    for command in ("trace", "importance", "super-experts"):
        args = cli.parser().parse_args([command, "--checkpoint=c", "--out=o"])
        assert args.calibration_split == "train"


@pytest.mark.parametrize("command,extra", [
    ("trace", []), ("importance", []), ("prune", ["--criterion=frequency", "--keep=2"]),
    ("merge", ["--method=average", "--experts=2"]), ("super-experts", []), ("steer", ["--marker=("]),
])
def test_a_bad_split_is_named_by_every_command_that_reads_data(release, command, extra, tmp_path):
    with pytest.raises(ValueError, match=r"^--calibration_split='test': allowed are train, validation"):
        cli.main([command, *release[1], *extra, "--calibration_split=test", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"split='test' is not a calibration split: allowed are train, validation"):
        capture.calibration_batches(base_config(), split="test")


def test_a_bad_split_exits_with_status_2(release, env, tmp_path):
    result = subprocess.run([sys.executable, "-m", "moejax.posthoc", "importance", *release[1],
                             "--calibration_split=valid", "--out=x.json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: --calibration_split='valid': allowed are train, validation")


def test_provenance_records_the_split(release, tmp_path):
    import moejax

    directory, flags = release
    trace_dir = cli.main(["trace", *flags, "--out", str(tmp_path / "trace")])
    trace = read_trace(trace_dir)
    assert trace.metadata["calibration_split"] == "train"
    config, _ = moejax.load(directory)
    options = dict(data=flags[3], data_dir=flags[5], batch_size=4, seq_len=32, max_tokens=256)
    _, train, _ = capture.calibration_batches(config, directory, **options)
    np.testing.assert_array_equal(trace.token_ids, np.concatenate([b.reshape(-1) for b in train]))

    out = tmp_path / "importance.json"
    result = cli.main(["importance", *flags, "--criterion=frequency", "--calibration_split=validation",
                       "--out", str(out)])
    assert result["calibration_split"] == json.loads(out.read_text())["calibration_split"] == "validation"
    assert result["tokens"] == 256
