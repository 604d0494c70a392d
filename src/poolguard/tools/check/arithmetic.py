"""The arithmetic of ``poolguard check``: worst case against usable, and the advice.

::

    worst case = (pool_size + max_overflow) * workers * replicas + other_clients
    usable     = max_connections - superuser_reserved_connections - reserved_connections

Pure: the verdict and the recommendations are a function of the facts and the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from poolguard.tools.check.facts import Fleet, ServerFacts

__all__ = ["Assessment", "Status", "assess"]

Status = Literal["OK", "AT RISK"]


@dataclass(frozen=True)
class Assessment:
    """The verdict; pure data so that it renders as text or JSON alike."""

    status: Status
    worst_case: int | None
    usable: int
    #: usable - worst case; negative when AT RISK; None when the worst case is unbounded.
    headroom: int | None
    #: Largest per-process pool (pool_size + max_overflow) that fits, 0 if none does.
    fits_per_process: int
    recommendations: tuple[str, ...] = field(default=())


#: The server's time-outs that should not be 0 (disabled), and the advice when one is.
_PG_BACKSTOPS = (
    (
        "statement_timeout",
        "set a server-side backstop for every client, e.g. ALTER ROLE <app role> SET "
        "statement_timeout = '30s'",
    ),
    (
        "idle_in_transaction_session_timeout",
        "a transaction left open holds its connection and its locks forever; e.g. ALTER ROLE "
        "<app role> SET idle_in_transaction_session_timeout = '60s'",
    ),
)
_MYSQL_BACKSTOPS = (
    (
        "max_statement_time",
        "set a server-side backstop, e.g. SET GLOBAL max_statement_time = 30",
    ),
    (
        "max_execution_time",
        "set a backstop for SELECTs, e.g. SET GLOBAL max_execution_time = 30000 (milliseconds)",
    ),
)


def assess(facts: ServerFacts, fleet: Fleet) -> Assessment:
    """The arithmetic and the advice: pure, so every branch is testable without a server."""
    usable = facts.usable
    worst = fleet.worst_case
    at_risk = worst is None or worst > usable
    room_per_process = max(0, usable - fleet.other_clients) // fleet.processes
    recs: list[str] = []
    pg = facts.backend == "postgresql"

    if at_risk:
        if worst is None:
            recs.append(
                "the pools are unbounded (pool_size=0 or max_overflow=-1): set both limits, "
                "or one burst can take every connection the server has"
            )
        if room_per_process >= 1:
            per = fleet.per_process
            if per is not None:  # keep the application's split between steady and burst
                pool = fleet.pool_size * room_per_process // per
            elif fleet.pool_size:
                pool = fleet.pool_size
            else:
                pool = room_per_process // 3
            pool = max(1, min(pool, room_per_process))
            recs.append(
                f"per process, use at most {room_per_process} connections: e.g. "
                f"pool_size={pool}, max_overflow={room_per_process - pool} "
                f"(({usable} usable - {fleet.other_clients} other clients) // "
                f"({fleet.workers} workers x {fleet.replicas} replicas))"
            )
        else:
            recs.append(
                f"not even one connection per process fits: {fleet.processes} processes and "
                f"{fleet.other_clients} other clients share {usable} usable connections"
            )
        pooler = (
            "PgBouncer in transaction pooling mode (then give PoolGuard "
            'pg_timeout_mode="transaction")'
            if pg
            else "a connection proxy such as ProxySQL or MaxScale"
        )
        recs.append(
            f"the fleet needs more connections than the server can hold: put {pooler} in front "
            f"of it, or raise max_connections (currently {facts.max_connections}) if the "
            "server has the memory for it"
        )

    t = facts.timeouts
    for name, advice in _PG_BACKSTOPS if pg else _MYSQL_BACKSTOPS:
        if t.get(name) == 0:
            recs.append(f"{name} is 0 (disabled): {advice}")
    if not pg:
        wait = t.get("wait_timeout")
        if wait:
            recs.append(
                f"the server closes idle connections after wait_timeout={wait:g}s: set the "
                f"engine's pool_recycle below it (e.g. pool_recycle={max(1, int(wait) - 60)}) "
                "or pool_pre_ping=True"
            )

    return Assessment(
        status="AT RISK" if at_risk else "OK",
        worst_case=worst,
        usable=usable,
        headroom=None if worst is None else usable - worst,
        fits_per_process=room_per_process,
        recommendations=tuple(recs),
    )
