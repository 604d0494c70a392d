"""The exception hierarchy, and how each refusal maps onto HTTP.

Each error subclasses the SQLAlchemy error that code already catches for the same
situation, so adopting poolguard never breaks an existing ``except`` clause. None of
them carries SQL literals or bound parameters: only the statement's fingerprint, its
literal-free summary and numbers.

That includes what an application log prints: ``str()``, ``repr()``, ``.args`` and
SQLAlchemy's own message methods (``StatementError._sql_message``, which prints
``[SQL: ...]`` and the driver's text). A driver's message is not safe: PostgreSQL appends
``CONTEXT: SQL statement "..."`` with the values a PL/pgSQL function interpolated, and
``DETAIL: Key (email)=(...)``. So :class:`QueryTimeout` keeps the driver's exception only
as ``.orig`` (SQLAlchemy's contract, for code that inspects it deliberately) and builds
its message from poolguard's own fields.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc

__all__ = [
    "BudgetExceeded",
    "PoolGuardError",
    "PoolSaturated",
    "QueryQuarantined",
    "QueryTimeout",
]


class PoolGuardError(Exception):
    """Base of every refusal poolguard makes.

    ``http_status`` and ``retry_after`` tell the middleware how to answer; ``kind``
    is a stable, low-cardinality name used in problem documents, metrics and logs.
    """

    kind: str = "poolguard-error"
    title: str = "Database protection refused the request"
    http_status: int = 503
    retry_after: float | None = None
    partition: str | None = None

    def problem(self) -> dict[str, Any]:
        """An RFC 9457 problem document: no SQL, parameters or tracebacks."""
        body: dict[str, Any] = {
            "type": f"https://poolguard.dev/problems/{self.kind}",
            "title": self.title,
            "status": self.http_status,
            "detail": self.problem_detail(),
        }
        if self.retry_after is not None:
            body["retry_after"] = round(self.retry_after, 3)
        return body

    def problem_detail(self) -> str:
        return self.title


class QueryTimeout(PoolGuardError, sa_exc.OperationalError):
    """A statement ran past its timeout and the server (or the watchdog) stopped it.

    The connection is healthy afterwards; the transaction it ran in is rolled back or
    aborted, as after any failed statement.
    """

    kind = "query-timeout"
    title = "A database statement took too long"
    http_status = 504

    def __init__(
        self,
        *,
        fingerprint: str,
        summary: str,
        normalized: str,
        timeout: float,
        elapsed: float,
        orig: BaseException | None = None,
        partition: str | None = None,
        cause: str = "statement",
    ) -> None:
        self.fingerprint = fingerprint
        self.summary = summary
        self.timeout = timeout
        self.elapsed = elapsed
        self.partition = partition
        #: "statement" (it ran too long), "lock" (it waited too long for another's lock) or
        #: "quarantined" (poolguard cancelled it: its statement was quarantined while it ran).
        self.cause = cause
        # StatementError's initializer, not DBAPIError's: the latter formats the driver's
        # message into args[0]. The literal-free normal form stands in for the statement
        # and parameters are never kept; ``orig`` is the driver's exception, as SQLAlchemy
        # promises.
        sa_exc.StatementError.__init__(
            self, str(self), normalized, None, orig or Exception("timeout"), hide_parameters=True
        )

    def _sql_message(self) -> str:
        # SQLAlchemyError.__str__ and logging helpers call this; StatementError's version
        # would add "[SQL: ...]" and any detail lines. Ours is the whole message.
        return str(self)

    def problem_detail(self) -> str:
        if self.cause == "quarantined":
            return (
                f"statement {self.summary} ({self.fingerprint}) was cancelled: it was "
                "quarantined while it ran"
            )
        what = "lock wait" if self.cause == "lock" else "timeout"
        return (
            f"statement {self.summary} ({self.fingerprint}) exceeded its "
            f"{self.timeout:.3f} s {what}"
        )

    def __str__(self) -> str:
        return f"QueryTimeout: {self.summary} [{self.fingerprint}] ran {self.elapsed:.3f} s, " + (
            "cancelled: quarantined while it ran"
            if self.cause == "quarantined"
            else ("lock wait limit" if self.cause == "lock" else "timeout")
            + f" {self.timeout:.3f} s"
        )

    def __reduce__(self) -> Any:  # pragma: no cover - pickling support for workers
        names = ("fingerprint", "summary", "timeout", "elapsed", "partition", "cause")
        return _reduce(QueryTimeout, self, *names, normalized=str(self.statement))


class PoolSaturated(PoolGuardError, sa_exc.TimeoutError):
    """No connection could be had within the checkout bound or the time left."""

    kind = "pool-saturated"
    title = "The database is busy"
    http_status = 503

    def __init__(
        self,
        *,
        waited: float,
        limit: float,
        reason: str = "checkout_timeout",
        partition: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.waited = waited
        self.limit = limit
        self.reason = reason
        self.partition = partition
        self.retry_after = retry_after
        sa_exc.TimeoutError.__init__(self, str(self))

    def problem_detail(self) -> str:
        return f"no database connection within {self.limit:.3f} s ({self.reason})"

    def __str__(self) -> str:
        where = f" for partition {self.partition!r}" if self.partition else ""
        return (
            f"PoolSaturated: waited {self.waited:.3f} s of {self.limit:.3f} s "
            f"({self.reason}){where}"
        )

    def __reduce__(self) -> Any:  # pragma: no cover
        return _reduce(PoolSaturated, self, "waited", "limit", "reason", "partition", "retry_after")


class BudgetExceeded(PoolGuardError):
    """The budget scope has no room left for this statement or connection.

    ``limit`` names the budget field that ran out: ``deadline``, ``max_queries``,
    ``max_db_time`` or ``max_connections``. A spent deadline or database time maps
    to 504 (the request ran out of time); a count limit to 503.
    """

    kind = "budget-exceeded"
    title = "The request exceeded its database budget"

    def __init__(
        self, limit: str, *, used: float, allowed: float, partition: str | None = None
    ) -> None:
        self.limit = limit
        self.used = used
        self.allowed = allowed
        self.partition = partition
        self.http_status = 504 if limit in ("deadline", "max_db_time") else 503
        super().__init__(str(self))

    def problem_detail(self) -> str:
        return f"budget {self.limit} exhausted"

    def __str__(self) -> str:
        return f"BudgetExceeded: {self.limit} used {self.used:g} of {self.allowed:g}"

    def __reduce__(self) -> Any:  # pragma: no cover
        return _reduce(BudgetExceeded, self, "limit", "used", "allowed", "partition")


class QueryQuarantined(PoolGuardError):
    """The statement's fingerprint keeps timing out and is refused for a cool-down."""

    kind = "query-quarantined"
    title = "This database operation is temporarily disabled"
    http_status = 503

    def __init__(
        self,
        *,
        fingerprint: str,
        summary: str,
        retry_after: float,
        partition: str | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        self.summary = summary
        self.retry_after = retry_after
        self.partition = partition
        super().__init__(str(self))

    def problem_detail(self) -> str:
        return f"statement {self.summary} ({self.fingerprint}) is quarantined"

    def __str__(self) -> str:
        return (
            f"QueryQuarantined: {self.summary} [{self.fingerprint}] refused for "
            f"{self.retry_after:.1f} s more"
        )

    def __reduce__(self) -> Any:  # pragma: no cover
        return _reduce(QueryQuarantined, self, "fingerprint", "summary", "retry_after", "partition")


class Shed(PoolGuardError):
    """Refused before the handler ran because the pool's queue is overloaded."""

    kind = "shed"
    title = "The service is overloaded"
    http_status = 503

    def __init__(self, *, reason: str, retry_after: float, partition: str | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        self.partition = partition
        super().__init__(str(self))

    def problem_detail(self) -> str:
        return f"request shed ({self.reason})"

    def __str__(self) -> str:
        return f"Shed: {self.reason}, retry after {self.retry_after:.1f} s"

    def __reduce__(self) -> Any:  # pragma: no cover
        return _reduce(Shed, self, "reason", "retry_after", "partition")


def _reduce(cls: type[PoolGuardError], err: PoolGuardError, *names: str, **extra: Any) -> Any:
    """``__reduce__``'s answer: unpickling calls ``cls`` with the named attributes of ``err``
    (and ``extra``) as keywords, so no driver message or statement text is pickled."""
    return _rebuild, (cls, {**{name: getattr(err, name) for name in names}, **extra})


def _rebuild(
    cls: type[PoolGuardError], kwargs: dict[str, Any]
) -> PoolGuardError:  # pragma: no cover
    if cls is BudgetExceeded:
        limit = kwargs.pop("limit")
        return BudgetExceeded(limit, **kwargs)
    return cls(**kwargs)
