"""The environment of the subprocesses the tests start: tests/conftest.py's XLA_FLAGS (its faster backend compile)
with the forced host device count replaced or dropped."""
import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None) -> str:
    """This process's XLA_FLAGS with `devices` forced host devices, or without the forced count (1 device)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT)]
    if devices is not None:
        flags.append(f"{DEVICE_COUNT}={devices}")
    return " ".join(flags)


def single_device_env(cache_dir, **extra: str) -> dict[str, str]:
    """The environment of a main-job subprocess: one host device (a faster compile than the suite's 8) and a JAX
    compilation cache in cache_dir shared by the subprocesses, plus ``extra`` variables."""
    return dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
