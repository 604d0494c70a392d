"""What telemetry reads from the rest of poolguard: structural types, so that telemetry
depends on no other part of the guard, and the pool's state as the gauges report it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["FingerprintLike", "PoolState", "TransitionLike"]


class FingerprintLike(Protocol):
    """What telemetry reads from a :class:`poolguard.fingerprint.Fingerprint`.

    A structural type so that this module depends on no other poolguard module but the errors.
    """

    @property
    def id(self) -> str: ...
    @property
    def normalized(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def operation(self) -> str | None: ...


class TransitionLike(Protocol):
    """What telemetry reads from a :class:`poolguard.quarantine.Transition`."""

    @property
    def kind(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def cooldown(self) -> float: ...
    @property
    def timeouts(self) -> int: ...


@dataclass(frozen=True)
class PoolState:
    """The pool as the gauges report it, read at collection time (never on the hot path)."""

    idle: int
    used: int
    max: int
    idle_max: int
    idle_min: int
    pending: int
