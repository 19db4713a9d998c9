"""Config validation helpers: every error names the field, the value and what is allowed."""
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A config field holds a value moejax cannot run with."""


def fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field {field}={value!r} is invalid: {allowed}")


def choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        fail(field, value, "allowed values are " + ", ".join(repr(a) for a in allowed))


def positive_int(field: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(field, value, f"must be an integer >= {minimum}")


def number(field: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        fail(field, value, f"must be a number {'>' if strict else '>='} {minimum}")
