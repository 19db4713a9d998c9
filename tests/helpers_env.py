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
