"""Test setup: 8 forced host CPU devices, set before jax is imported anywhere."""
import fcntl
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


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
