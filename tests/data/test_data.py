"""Tests of moejax.data: the stdlib corpus, text globs, TFDS datasets, iterator state, sharding, no TensorFlow."""
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import sysconfig
import textwrap

import ml_collections
import numpy as np
import pytest

from moejax import data
from moejax.data import corpora
from tests.helpers_configs import REPO


def make_config(data_dir, name="stdlib", *, seed=0, batch=8, seq_len=64, **fields):
    config = ml_collections.ConfigDict()
    config.seed = seed
    config.train = ml_collections.ConfigDict({"batch_size": batch, "seq_len": seq_len})
    config.data = ml_collections.ConfigDict({"name": name, "dir": str(data_dir), "val_fraction": 0.05,
                                             "eval_batches": 3, "tfds_dir": "", "text_key": "text"})
    config.data.update(fields)
    return config


# ------------------------------------------------------------------ independent references (the spec)


def ref_is_val(relpath, val_fraction=0.05):
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:16], 16) < val_fraction * 2**64


def ref_stdlib_files():
    """relpath -> bytes of the stdlib's .py files outside test folders, site-packages and caches."""
    root = sysconfig.get_paths()["stdlib"]
    out = {}
    for dirpath, _, filenames in os.walk(root):
        rel_dir = pathlib.PurePosixPath(pathlib.Path(dirpath).relative_to(root).as_posix())
        skip = {"test", "tests", "idle_test", "__pycache__"}
        if skip & set(rel_dir.parts) or rel_dir.parts[:1] in (("site-packages",), ("dist-packages",)):
            continue
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                out[str(rel_dir / f) if rel_dir.parts else f] = pathlib.Path(dirpath, f).read_bytes()
    return out


def ref_stream(files, names):
    return b"".join(files[n] + b"\0" for n in sorted(names))


def rows_bytes(batch):
    return [bytes(row.astype(np.uint8)) for row in batch]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def stdlib_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("moejax_data")
    data.corpus_fingerprint(make_config(path))  # builds once per session
    return path


@pytest.fixture(scope="session")
def stdlib_ref():
    files = ref_stdlib_files()
    train = [n for n in files if not ref_is_val(n)]
    return files, ref_stream(files, train)


@pytest.fixture
def text_corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"\n", b"    ", b"def", b"return", b"0123"]
    files = {}
    for i in range(40):
        rel = f"d{i % 3}/sub/f{i:02d}.txt"
        files[rel] = b" ".join(words[j] for j in rng.integers(0, len(words), rng.integers(20, 200)))
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(files[rel])
    return tmp_path, files


# ------------------------------------------------------------------ stdlib corpus


def test_stdlib_excludes_test_folders_and_splits_by_file(stdlib_dir, stdlib_ref):
    files, _ = stdlib_ref
    corpus = corpora.load(make_config(stdlib_dir))
    train, val = set(corpus.train_paths), set(corpus.val_paths)
    assert train | val == set(files)
    assert not train & val
    assert {"os.py", "json/__init__.py", "unittest/case.py"} <= train | val
    assert not any({"test", "tests", "idle_test"} & set(p.split("/")) for p in train | val)
    assert val == {n for n in files if ref_is_val(n)}
    assert 0.01 < len(val) / len(files) < 0.12
    assert all(b"\0" not in t for t in files.values())  # the separator never occurs in the corpus


def test_fingerprint_stable_across_builds(stdlib_dir, stdlib_ref, tmp_path, capsys):
    files, train_stream = stdlib_ref
    first = data.corpus_fingerprint(make_config(stdlib_dir))
    second = data.corpus_fingerprint(make_config(tmp_path))  # a fresh build in another dir
    assert "building stdlib corpus" in capsys.readouterr().out
    assert first == second
    sha = hashlib.sha256(b"".join(n.encode() + b"\0" + files[n] + b"\0" for n in sorted(files))).hexdigest()
    assert first["sha256"] == sha
    assert first["python"] == platform.python_version() and first["files"] == len(files)
    assert first["train_bytes"] == len(train_stream)
    assert json.loads(json.dumps(first)) == first
    assert [p.name for p in tmp_path.iterdir()] == [f"stdlib-py{platform.python_version()}-{sha[:16]}-val0.05"]


def test_losing_a_build_race_keeps_the_winner(stdlib_dir):
    target = next(stdlib_dir.glob("stdlib-*"))
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    corpora._build_stdlib(target, [(f"m{i}.py", b"x = 1\n") for i in range(20)], 0.5)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert [p.name for p in stdlib_dir.iterdir()] == [target.name]  # no temp dir left behind


def test_batches_shape_range_and_contiguous(stdlib_dir, stdlib_ref):
    _, train_stream = stdlib_ref
    config = make_config(stdlib_dir, batch=8, seq_len=64)
    it = data.train_iterator(config)
    for _ in range(3):
        batch = next(it)
        assert batch.shape == (8, 65) and batch.dtype == np.int32
        assert batch.min() >= 0 and batch.max() < data.VOCAB_SIZE
        for row in rows_bytes(batch):
            assert row in train_stream
    for batch in data.eval_batches(config):
        assert batch.shape == (8, 65) and batch.dtype == np.int32


def test_seeds_shuffle_differently_and_deterministically(stdlib_dir):
    a, b, c = (data.train_iterator(make_config(stdlib_dir, seed=s)) for s in (0, 0, 1))
    first_a, first_b, first_c = next(a), next(b), next(c)
    np.testing.assert_array_equal(first_a, first_b)
    assert not np.array_equal(first_a, first_c)


def test_state_resumes_bit_identically(stdlib_dir):
    config = make_config(stdlib_dir)
    it = data.train_iterator(config)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = data.train_iterator(config)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed), want)
    other = data.train_iterator(make_config(stdlib_dir, seed=1))
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_process_sharding_partitions_the_global_batch(stdlib_dir):
    config = make_config(stdlib_dir, batch=8)
    whole = data.train_iterator(config)
    parts = [data.train_iterator(config, process_index=p, process_count=2) for p in range(2)]
    evals = [data.eval_batches(config, process_index=p, process_count=2) for p in range(2)]
    for i, global_eval in enumerate(data.eval_batches(config)):
        assert sorted(rows_bytes(global_eval)) == sorted(rows_bytes(evals[0][i]) + rows_bytes(evals[1][i]))
    for _ in range(3):
        b0, b1 = next(parts[0]), next(parts[1])
        assert b0.shape == b1.shape == (4, 65)
        assert not set(rows_bytes(b0)) & set(rows_bytes(b1))
        assert sorted(rows_bytes(next(whole))) == sorted(rows_bytes(b0) + rows_bytes(b1))


def test_eval_batches_fixed_and_seed_independent(stdlib_dir, stdlib_ref):
    files, _ = stdlib_ref
    val_stream = ref_stream(files, [n for n in files if ref_is_val(n)])
    first = data.eval_batches(make_config(stdlib_dir, seed=0))
    again = data.eval_batches(make_config(stdlib_dir, seed=5))
    assert len(first) == 3
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    # 3 x 8 windows evenly spaced over the whole split, in order: window k starts at byte 64 * round(k * (n - 1) / 23)
    n = (len(val_stream) - 1) // 64
    starts = [64 * round(k * (n - 1) / 23) for k in range(24)]
    got = [bytes(row.astype(np.uint8)) for batch in first for row in batch]
    assert got == [val_stream[s:s + 65] for s in starts]
    assert starts[0] == 0 and starts[-1] == 64 * (n - 1)  # the first and the last window of the split


# ------------------------------------------------------------------ text:<glob>


def test_text_glob_split_windows_and_epochs(text_corpus):
    root, files = text_corpus
    config = make_config(root / "cache", f"text:{root}/**/*.txt", batch=2, seq_len=16, val_fraction=0.2)
    fp = data.corpus_fingerprint(config)
    val = [n for n in files if ref_is_val(n, 0.2)]
    assert val and fp["split"] == "file" and fp["files"] == 40 and fp["val_files"] == len(val)
    train_stream = ref_stream(files, set(files) - set(val))
    windows = (len(train_stream) - 1) // 16
    it = data.train_iterator(config)
    rows = [r for _ in range(windows) for r in rows_bytes(next(it))]  # two epochs: 2 * windows rows
    assert sorted(rows[:windows]) == sorted(rows[windows:]) == sorted(
        train_stream[i * 16:i * 16 + 17] for i in range(windows))
    assert rows[:windows] != rows[windows:]  # each epoch is reshuffled
    assert not (root / "cache").exists()  # text corpora are read in place, nothing is cached


def test_text_single_file_splits_by_bytes(tmp_path):
    (tmp_path / "one.txt").write_bytes(b"x" * 1000)
    fp = data.corpus_fingerprint(make_config(tmp_path, f"text:{tmp_path}/one.txt", seq_len=8))
    assert fp["split"] == "bytes" and fp["train_bytes"] + fp["val_bytes"] == 1001 and fp["val_bytes"] == 50


@pytest.mark.parametrize("name", ["wikipedia", "tfds:", "text:", "tfds:a:train:test:x", 3, "stdlib:x"])
def test_bad_name_raises(tmp_path, name):
    with pytest.raises(ValueError) as e:
        data.train_iterator(make_config(tmp_path, name))
    message = str(e.value)
    assert "config.data.name" in message and repr(name) in message
    assert "'stdlib'" in message and "tfds:<name>" in message and "text:<glob>" in message


def test_glob_without_files_raises(tmp_path):
    with pytest.raises(ValueError, match="config.data.name.*matches no files"):
        data.corpus_fingerprint(make_config(tmp_path, f"text:{tmp_path}/*.nothing"))


# ------------------------------------------------------------------ tfds:<name>


@pytest.fixture(scope="module")
def toy_tfds(tmp_path_factory):
    """A prepared array_record TFDS dataset 'toy_text' with distinct documents."""
    tfds = pytest.importorskip("tensorflow_datasets")
    root = tmp_path_factory.mktemp("tfds")
    rng = np.random.default_rng(1)
    docs = {split: [f"{split} doc {i}: ".encode() + bytes(rng.integers(97, 123, rng.integers(5, 120)).tolist())
                    for i in range(n)] for split, n in (("train", 300), ("validation", 40))}

    class ToyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": tfds.features.Scalar(np.int64)}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(d) for split, d in docs.items()}

        def _generate_examples(self, split_docs):
            for i, d in enumerate(split_docs):
                yield i, {"text": d, "id": i}

    ToyText(data_dir=root, file_format="array_record").download_and_prepare(download_dir=root / "dl")
    return root, docs


def lane_docs(iterator, row, steps):
    """Whole documents of one row's lane over `steps` batches (windows overlap by one token)."""
    stream = b""
    for i in range(steps):
        window = bytes(next(iterator)[row].astype(np.uint8))
        stream += window if i == 0 else window[1:]
    return stream.split(b"\0")[1:-1]


def test_tfds_streams_packed_shuffled_sharded(toy_tfds, tmp_path):
    root, docs = toy_tfds
    config = make_config(tmp_path, "tfds:toy_text", batch=4, seq_len=32, tfds_dir=str(root))
    fp = data.corpus_fingerprint(config)
    assert fp["dataset"] == "toy_text/1.0.0" and fp["train_examples"] == 300 and fp["eval_split"] == "validation"
    it = data.train_iterator(config)
    batch = next(it)
    assert batch.shape == (4, 33) and batch.dtype == np.int32
    seen = lane_docs(data.train_iterator(config), 0, 40)
    assert len(seen) > 5 and set(seen) <= set(docs["train"]) and len(set(seen)) == len(seen)
    assert seen != sorted(seen, key=docs["train"].index)  # shuffled
    shards = [set(lane_docs(data.train_iterator(config, process_index=p, process_count=2), 0, 40))
              for p in range(2)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    evals = data.eval_batches(config)
    assert len(evals) == 3 and evals[0].shape == (4, 33)
    first = bytes(evals[0][0].astype(np.uint8)).split(b"\0")[0]  # lanes start on a whole validation document
    assert first.startswith(b"validation doc ") and any(d.startswith(first) for d in docs["validation"])
    for x, y in zip(evals, data.eval_batches(make_config(tmp_path, "tfds:toy_text", batch=4, seq_len=32, seed=3,
                                                         tfds_dir=str(root))), strict=True):
        np.testing.assert_array_equal(x, y)


def test_tfds_state_resumes_bit_identically(toy_tfds, tmp_path):
    root, _ = toy_tfds
    config = make_config(tmp_path, "tfds:toy_text:train[:50%]:validation", batch=4, seq_len=32,
                         tfds_dir=str(root))
    assert data.corpus_fingerprint(config)["train_examples"] == 150
    it = data.train_iterator(config, process_index=1, process_count=2)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = data.train_iterator(config, process_index=1, process_count=2)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed), want)


def test_tfds_missing_dataset_raises(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"config.data.name='tfds:no_such_dataset'.*array_record"):
        data.corpus_fingerprint(make_config(tmp_path, "tfds:no_such_dataset", tfds_dir=str(tmp_path)))


# ------------------------------------------------------------------ no TensorFlow


NO_TF_SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, sys
    imported = []

    class FakeTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # Makes tensorflow look installed, and records (and fails) any attempt to import it.
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "tensorflow":
                return importlib.machinery.ModuleSpec(name, self)
        def create_module(self, spec):
            return None
        def exec_module(self, module):
            imported.append(module.__name__)
            raise ImportError("tensorflow must not be imported")

    sys.meta_path.insert(0, FakeTensorFlow())
    import ml_collections
    from moejax import data
    assert "tensorflow_datasets" not in sys.modules  # imported lazily
    c = ml_collections.ConfigDict({"seed": 0, "train": {"batch_size": 4, "seq_len": 32},
                                   "data": {"name": "stdlib", "dir": sys.argv[1], "val_fraction": 0.05,
                                            "eval_batches": 2, "tfds_dir": "", "text_key": "text"}})
    fp = data.corpus_fingerprint(c)
    next(data.train_iterator(c)), data.eval_batches(c)
    tf = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
    print(json.dumps({"fingerprint": fp, "imported": imported, "modules": tf}))
""")


def test_concurrent_builds_without_tensorflow(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", NO_TF_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["imported"] == [] and r["modules"] == []
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    assert [p.name for p in tmp_path.iterdir()] == [
        f"stdlib-py{platform.python_version()}-{results[0]['fingerprint']['sha256'][:16]}-val0.05"]


def test_tfds_unknown_split_raises(toy_tfds, tmp_path):
    root, _ = toy_tfds
    with pytest.raises(ValueError, match=r"config.data.name='tfds:toy_text'.*'trian'.*allowed"):
        data.corpus_fingerprint(make_config(tmp_path, "tfds:toy_text:trian", tfds_dir=str(root)))


def test_corpus_shorter_than_a_window_raises(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"tiny")
    with pytest.raises(ValueError, match="train split of config.data.name=.*seq_len"):
        data.train_iterator(make_config(tmp_path, f"text:{tmp_path}/a.txt", seq_len=64))
