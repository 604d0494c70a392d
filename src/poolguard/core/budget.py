"""Budgets and the budget scope that carries one through a unit of work.

A scope lives in a contextvar so that it follows the work wherever it goes: into
``await``-ed coroutines, and into the thread pool that Starlette and FastAPI use for
``def`` endpoints (``run_in_threadpool`` copies the context). Scopes nest; an inner
scope can only tighten what its parents allow, and every statement counts against
every scope in the chain.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from poolguard import validate
from poolguard.errors import BudgetExceeded

__all__ = ["PRIORITIES", "Budget", "BudgetScope", "current_scope", "scope_context"]

#: Priority classes, most important first. Critical work keeps a reserve in the gate and is
#: shed last; sheddable work is shed first.
PRIORITIES: tuple[str, ...] = ("critical", "normal", "sheddable")
PRIORITY_RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}


def _caller_seconds(name: str, value: object) -> float | None:
    """A deadline or a db-time allowance: seconds no server sees, so no upper bound."""
    return None if value is None else validate.seconds(name, value, optional=True, limit=None)


@dataclass(frozen=True)
class Budget:
    """What one unit of work may spend. Every field is optional; seconds are floats.

    ``partition`` names the share of the pool the work draws from (the middleware uses
    the route template); unnamed work shares the default partition.
    """

    deadline: float | None = None
    statement_timeout: float | None = None
    max_queries: int | None = None
    max_db_time: float | None = None
    max_connections: int | None = None
    priority: str | None = None
    partition: str | None = None

    def __post_init__(self) -> None:
        _caller_seconds("deadline", self.deadline)
        validate.optional_seconds("statement_timeout", self.statement_timeout)
        _caller_seconds("max_db_time", self.max_db_time)
        validate.optional_count("max_queries", self.max_queries)
        validate.optional_count("max_connections", self.max_connections)
        if self.priority is not None:
            validate.choice("priority", self.priority, PRIORITIES)
        if self.partition is not None and (
            not isinstance(self.partition, str) or not self.partition
        ):
            raise ValueError(f"partition must be a non-empty str, got {self.partition!r}")


@dataclass(eq=False)
class BudgetScope:
    """The running state of one budget: its deadline and what has been spent.

    Effective limits are resolved once, on entry, against the parent, so the per-statement
    check is a few comparisons.
    """

    budget: Budget
    parent: BudgetScope | None = None
    deadline_at: float | None = None
    statement_timeout: float | None = None
    priority: str = "normal"
    partition: str | None = None
    queries: int = 0
    db_time: float = 0.0
    connections: int = 0
    pool_wait: float = 0.0
    timeouts: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        b, p = self.budget, self.parent
        now = self.started_at
        own_deadline = now + b.deadline if b.deadline is not None else None
        parent_deadline = p.deadline_at if p is not None else None
        self.deadline_at = _min_opt(own_deadline, parent_deadline)
        self.statement_timeout = _min_opt(
            b.statement_timeout, p.statement_timeout if p is not None else None
        )
        if p is None:
            self.priority = b.priority or "normal"
        else:
            # An inner scope may lower its priority but never raise it above its parent's.
            wanted = b.priority or p.priority
            self.priority = max(wanted, p.priority, key=PRIORITY_RANK.__getitem__)
        self.partition = b.partition or (p.partition if p is not None else None)
        # Resolved once, like the limits: every statement counts against each scope of the
        # chain, and must fit the allowances of the few that have any.
        self._scopes: tuple[BudgetScope, ...] = (self, *(p._scopes if p is not None else ()))
        self._limited = tuple(
            s
            for s in self._scopes
            if s.budget.max_queries is not None or s.budget.max_db_time is not None
        )

    def chain(self) -> Iterator[BudgetScope]:
        """This scope, then its parents."""
        return iter(self._scopes)

    def admit_statement(self, default_timeout: float | None, now: float) -> float | None:
        """Check every limit before a statement starts; return its effective timeout.

        Raises :class:`BudgetExceeded` rather than start a statement that cannot finish
        inside the budget: past the deadline, or with the query or db-time allowance spent.
        """
        # A scope's own statement_timeout replaces the guard's default (a reports route may
        # need longer statements than the rest); the deadline and db-time room only tighten.
        timeout = self.statement_timeout if self.statement_timeout is not None else default_timeout
        if self.deadline_at is not None:
            left = self.deadline_at - now
            if left <= 0:
                raise BudgetExceeded(
                    "deadline",
                    used=now - self.started_at,
                    allowed=self.deadline_at - self.started_at,
                    partition=self.partition,
                )
            timeout = left if timeout is None else min(timeout, left)
        for s in self._limited:
            b = s.budget
            if b.max_queries is not None and s.queries >= b.max_queries:
                raise BudgetExceeded(
                    "max_queries", used=s.queries, allowed=b.max_queries, partition=self.partition
                )
            if b.max_db_time is not None:
                room = b.max_db_time - s.db_time
                if room <= 0:
                    raise BudgetExceeded(
                        "max_db_time",
                        used=s.db_time,
                        allowed=b.max_db_time,
                        partition=self.partition,
                    )
                timeout = room if timeout is None else min(timeout, room)
        return timeout

    def record_statement(self, elapsed: float, timed_out: bool = False) -> None:
        for s in self._scopes:
            s.queries += 1
            s.db_time += elapsed
            if timed_out:
                s.timeouts += 1

    def admit_connection(self) -> None:
        """Count a connection about to be checked out against every scope's allowance."""
        for s in self.chain():
            m = s.budget.max_connections
            if m is not None and s.connections >= m:
                raise BudgetExceeded(
                    "max_connections", used=s.connections, allowed=m, partition=self.partition
                )
        for s in self.chain():
            s.connections += 1

    def release_connection(self) -> None:
        for s in self.chain():
            s.connections -= 1

    def record_pool_wait(self, waited: float) -> None:
        for s in self.chain():
            s.pool_wait += waited


def _min_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b


_current: contextvars.ContextVar[BudgetScope | None] = contextvars.ContextVar(
    "poolguard_budget_scope", default=None
)

#: The fast accessor for the hot path (a bound method: no attribute lookups per call).
current_scope = _current.get


class scope_context:
    """Opens a :class:`BudgetScope` for a ``with`` or ``async with`` block.

    The same object serves both forms so that ``guard.budget()`` reads the same in sync and
    async code. It is single-use, like the scope it opens.
    """

    __slots__ = ("_budget", "_scope", "_token")

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._scope: BudgetScope | None = None
        self._token: contextvars.Token[BudgetScope | None] | None = None

    @property
    def scope(self) -> BudgetScope:
        if self._scope is None:
            raise RuntimeError("the budget scope has not been entered")
        return self._scope

    def __enter__(self) -> BudgetScope:
        if self._token is not None:
            raise RuntimeError("a budget scope cannot be entered twice")
        self._scope = BudgetScope(self._budget, parent=_current.get())
        self._token = _current.set(self._scope)
        return self._scope

    def __exit__(self, *exc_info: object) -> None:
        # The scope ends the same way whether or not the block raised.
        assert self._token is not None
        _current.reset(self._token)

    async def __aenter__(self) -> BudgetScope:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)
