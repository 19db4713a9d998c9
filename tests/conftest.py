"""Test setup: 8 forced host CPU devices and a faster XLA:CPU backend compile, set before jax is imported anywhere;
the slowest test modules are collected first so that pytest-xdist does not end on a long test."""
import fcntl
import os
import pathlib

# The suite's programs are tiny and compile-bound: LLVM optimisation level 0 cuts their compile time by a quarter to a
# half. XLA's HLO passes (fusion, SPMD partitioning) are unchanged; results may differ from the default level in the
# last bits (gradients of the tiny train config: 5e-7 relative at most), far inside the suite's tolerances, and
# every test that compares two runs runs both under this flag. Subprocesses inherit it through XLA_FLAGS; those that
# change the forced device count keep it (tests/helpers_env.py, test_notebooks.kernel_env).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Test modules by their cost on 2 CPU cores, the slowest first: pytest-xdist hands out tests in collection order, so
# the long ones start early and the suite ends on cheap tests instead of one worker finishing a long test alone.
# Modules not listed go between the two groups. Each module's tests stay together and in order (module fixtures).
SLOW_FIRST = ["test_hf", "test_generate", "test_posthoc_cli", "test_posthoc_compress", "test_parallel", "test_cli",
              "test_notebooks", "test_zoo", "test_train", "test_kernels", "test_experiments", "test_moe"]
CHEAP_LAST = ["test_posthoc_analysis", "test_upcycle", "test_data", "test_routing", "test_losses", "test_configs"]


def module_rank(item) -> int:
    name = item.path.stem
    if name in SLOW_FIRST:
        return SLOW_FIRST.index(name)
    if name in CHEAP_LAST:
        return len(SLOW_FIRST) + 1 + CHEAP_LAST.index(name)
    return len(SLOW_FIRST)


def pytest_collection_modifyitems(items):
    missing = [name for name in SLOW_FIRST + CHEAP_LAST if not (pathlib.Path(__file__).parent / f"{name}.py").exists()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py orders test modules that do not exist: {missing}")
    items.sort(key=module_rank)  # stable: the order within a module is kept


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
