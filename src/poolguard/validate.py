"""The rules every option is checked by: one definition each, so no two parts disagree.

Types are checked before values (a wrong type is a ``TypeError``, a value out of range a
``ValueError``), and every message starts with the option's user-facing name. Upper bounds
are the smallest any supported server accepts, so a value that would fail on the first
checkout fails at construction instead.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

__all__ = ["MAX_COUNT", "MAX_SECONDS", "choice", "count", "flag", "seconds", "share"]

#: PostgreSQL takes time-outs in milliseconds as a 32-bit int (2,147,483,647 ms, 24.8 days);
#: MariaDB's and SQLite's limits are larger. A checkout or hold bound past it is a mistake.
MAX_SECONDS = 2_147_483.647
#: Counts (capacity, fingerprints, thresholds): far past any real pool, far below overflow.
MAX_COUNT = 1_000_000

_T = TypeVar("_T")


def seconds(
    name: str,
    value: object,
    *,
    optional: bool = False,
    zero: bool = False,
    limit: float | None = MAX_SECONDS,
) -> float:
    """A duration in seconds: a finite number > 0 (>= 0 with ``zero``), at most ``limit``
    (:data:`MAX_SECONDS` by default: pass None for durations no server sees). With
    ``optional`` the caller handles None before calling."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds or None" if optional else "a number of seconds"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    v = float(value) if abs(value) < 1e300 else math.inf
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
        if zero:
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    if limit is not None and v > limit:
        raise ValueError(
            f"{name} must be at most {limit} seconds (PostgreSQL's limit), got {value!r}"
        )
    return v


def optional_seconds(name: str, value: object, *, zero: bool = False) -> float | None:
    return None if value is None else seconds(name, value, optional=True, zero=zero)


def count(name: str, value: object, *, minimum: int = 1) -> int:
    """A whole number from ``minimum`` to :data:`MAX_COUNT`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value > MAX_COUNT:
        raise ValueError(f"{name} must be an int <= {MAX_COUNT}, got {value!r}")
    return value


def optional_count(name: str, value: object, *, minimum: int = 1) -> int | None:
    return None if value is None else count(name, value, minimum=minimum)


def share(name: str, value: object) -> float:
    """A fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not 0 < v <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return v


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def callable_or_none(name: str, value: _T) -> _T:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")
    return value


def provider(name: str, value: Any, method: str) -> Any:
    """An OpenTelemetry provider (or None for the global one): anything with ``method``."""
    if value is not None and not callable(getattr(value, method, None)):
        raise TypeError(
            f"{name} must be an OpenTelemetry {name.replace('_', ' ').title().replace(' ', '')}"
            f" (with .{method}()) or None, got {type(value).__name__}"
        )
    return value


def text(name: str, value: object, *, optional: bool = False, max_len: int = 200) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{name} must be at most {max_len} characters")
    return value
