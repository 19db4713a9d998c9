"""Test setup: 8 forced host CPU devices and a faster XLA:CPU backend compile, set before jax is imported anywhere;
the suite ordered and its quick subset marked from measured durations (tests/durations.json); the fixtures of
modules in several folders (a folder's own fixtures are in its conftest.py)."""
import fcntl
import json
import os
import pathlib
import signal
import threading

# The suite's programs are tiny and compile-bound: LLVM optimisation level 0 cuts their compile time by a quarter to a
# half. XLA's HLO passes (fusion, SPMD partitioning) are unchanged; results may differ from the default level in the
# last bits (gradients of the tiny train config: 5e-7 relative at most), far inside the suite's tolerances, and
# every test that compares two runs runs both under this flag. Subprocesses inherit it through XLA_FLAGS; those that
# change the forced device count keep it (tests/helpers_env.py, test_notebooks.kernel_env).
# XLA:CPU's newer fusion emitters cost about a third more compile time on these programs than its classic ones
# (measured on the cached-decoding tests: 27 s -> 17 s of CPU); the flag is probed once, by the first process, in case
# an XLA build does not know it (an unknown flag would abort every test), and its children and workers inherit it.
FAST_FUSION_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _fast_fusion_flag() -> str:
    if "MOEJAX_TEST_FUSION_FLAG" not in os.environ:
        import subprocess
        import sys

        probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"],
                               env=dict(os.environ, XLA_FLAGS=FAST_FUSION_FLAG, JAX_PLATFORMS="cpu"),
                               capture_output=True, timeout=120)
        os.environ["MOEJAX_TEST_FUSION_FLAG"] = FAST_FUSION_FLAG if probe.returncode == 0 else ""
    return os.environ["MOEJAX_TEST_FUSION_FLAG"]


os.environ["XLA_FLAGS"] = " ".join([
    *[f for f in os.environ.get("XLA_FLAGS", "").split() if f != FAST_FUSION_FLAG],
    "--xla_backend_optimization_level=0", _fast_fusion_flag(), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["MOEJAX_COMPILE_CACHE"] = "off"  # commands run in-process: no persistent cache unless a test asks

import jax  # noqa: E402 (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Measured test durations order the suite and define its quick subset. tests/durations.json (written by
# `pytest --record-durations`: seconds of setup + call + teardown per test id, 2 CPU cores under pytest-xdist):
# - pytest-xdist hands out tests in collection order, so modules run costliest first (by their measured total) and the
#   suite ends on cheap tests instead of one worker finishing a long test alone; a module's tests stay together and
#   in order (module fixtures);
# - a test measured at SLOW_SECONDS or more is marked `slow`: `pytest -m "not slow"` is the quick subset for the
#   edit-test loop (CI runs everything). A test not measured yet counts as quick.
DURATIONS = pathlib.Path(__file__).parent / "durations.json"
SLOW_SECONDS = 3.0
_measured_now: dict[str, float] = {}


def pytest_addoption(parser):
    parser.addoption("--record-durations", action="store_true",
                     help=f"write every test's seconds to tests/{DURATIONS.name} (orders the suite, marks slow tests)")


def pytest_configure(config):
    config.addinivalue_line("markers", f"slow: measured at {SLOW_SECONDS:g} s or more (tests/{DURATIONS.name})")


def measured_durations() -> dict[str, float]:
    try:
        return json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}


def pytest_collection_modifyitems(items):
    seconds = measured_durations()
    module_cost: dict[pathlib.Path, float] = {}
    for item in items:
        module_cost[item.path] = module_cost.get(item.path, 0.0) + seconds.get(item.nodeid, 0.0)
        if seconds.get(item.nodeid, 0.0) >= SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -module_cost[item.path])  # stable: the order within a module is kept


def pytest_runtest_logreport(report):
    """Sums each test's phases (under pytest-xdist the controller receives every worker's reports)."""
    _measured_now[report.nodeid] = _measured_now.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    if session.config.getoption("--record-durations") and not os.environ.get("PYTEST_XDIST_WORKER"):
        rounded = {test: round(seconds, 2) for test, seconds in sorted(_measured_now.items())}
        DURATIONS.write_text(json.dumps(rounded, indent=0) + "\n")


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Every test starts from Python's own SIGINT handler. A handler left ignored (SIG_IGN) by a library or an
    earlier test in the same worker would also be inherited by the command subprocesses, whose Ctrl-C tests would
    then wait on a process that cannot be interrupted."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The stdlib corpus, built once for all pytest-xdist workers (the main-job, zoo and notebook tests read it)."""
    from moejax.configs import base

    from moejax import data

    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "moejax_corpus"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        config = base.get_config()
        config.data.dir = str(shared / "data")
        data.corpus_fingerprint(config)  # builds the corpus once
    return shared / "data"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a module's command subprocesses: one host device (a faster compile than the suite's 8), a
    compilation cache they share, and errors without tracebacks (MOEJAX_VERBOSE=0)."""
    from tests import helpers_env

    return helpers_env.single_device_env(tmp_path_factory.mktemp("jax_cache"), MOEJAX_VERBOSE="0")


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    """A ``text:`` corpus of 12 standard-library sources (about 200 KB): <tmp>/corpus/<package>_<file>.py."""
    import shutil
    import sysconfig

    corpus = tmp_path_factory.mktemp("stdlib") / "corpus"
    corpus.mkdir()
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted((stdlib / "json").glob("*.py"))[:4] + sorted((stdlib / "email").glob("*.py"))[:8]:
        shutil.copy(path, corpus / f"{path.parent.name}_{path.name}")
    return corpus


@pytest.fixture(scope="module")
def bpe_release(stdlib_corpus):
    """(checkpoint dir, corpus dir): a 1-layer Mixtral-layout model (4 experts, top-2, GQA, vocab 320 > the
    tokenizer's 300) saved by moejax.hf.save, with a byte-level BPE tokenizer trained on the corpus whose eos '</s>'
    is id 1; the corpus is ``stdlib_corpus`` (fine-tuning, evaluation and the main command read it)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moejax import hf
    from tests import helpers_hf

    config, variables = helpers_hf.random_mixtral(vocab_size=320, seed=1)
    directory = hf.save(config, variables, stdlib_corpus.parent / "release")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([p.read_text() for p in sorted(stdlib_corpus.iterdir())], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return directory, stdlib_corpus
