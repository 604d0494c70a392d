"""What ``poolguard check`` reasons about: the fleet as deployed, the server as read.

Plain frozen data, validated once, so that the arithmetic and the rendering are pure
functions of it and every branch is testable without a server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["Backend", "CheckError", "Fleet", "ServerFacts"]

Backend = Literal["postgresql", "mysql", "mariadb"]


class CheckError(Exception):
    """Bad input or no connection; the message is one sanitised line."""


@dataclass(frozen=True)
class Fleet:
    """How the application is deployed. ``pool_size=0`` and ``max_overflow=-1`` mean
    "no limit" in SQLAlchemy, so the worst case is then unbounded (``None``)."""

    pool_size: int
    max_overflow: int
    workers: int
    replicas: int
    other_clients: int = 0
    #: A live fleet's shared cap (``poolguard check --fleet``): its members together never
    #: hold more, whatever their pools add up to.
    cap: int | None = None
    #: The fleet's name, when read from Redis.
    name: str | None = None

    def __post_init__(self) -> None:
        if self.pool_size < 0:
            raise ValueError("pool_size must be >= 0 (0 means no limit)")
        if self.max_overflow < -1:
            raise ValueError("max_overflow must be >= -1 (-1 means no limit)")
        if self.workers < 1 or self.replicas < 1:
            raise ValueError("workers and replicas must be >= 1")
        if self.other_clients < 0:
            raise ValueError("other_clients must be >= 0")
        if self.cap is not None and self.cap < 1:
            raise ValueError("the fleet's cap must be >= 1")

    @property
    def processes(self) -> int:
        return self.workers * self.replicas

    @property
    def per_process(self) -> int | None:
        if self.pool_size == 0 or self.max_overflow == -1:
            return None
        return self.pool_size + self.max_overflow

    @property
    def worst_case(self) -> int | None:
        per = self.per_process
        pools = None if per is None else per * self.processes
        if self.cap is not None:
            pools = self.cap if pools is None else min(pools, self.cap)
        return None if pools is None else pools + self.other_clients


@dataclass(frozen=True)
class ServerFacts:
    """What the server allows, as read from it. Timeouts are in seconds, 0 = disabled."""

    backend: Backend
    version: str
    max_connections: int
    #: Slots ordinary roles cannot use, by setting name (PostgreSQL only).
    reserved: Mapping[str, int]
    #: Client connections open right now, not counting the check's own.
    current_connections: int
    #: ``state`` (PostgreSQL) or ``COMMAND`` (MySQL) -> count, when visible.
    connection_states: Mapping[str, int]
    #: Server setting name -> seconds (0 = disabled), for the settings this backend has.
    timeouts: Mapping[str, float]

    @property
    def usable(self) -> int:
        return self.max_connections - sum(self.reserved.values())
