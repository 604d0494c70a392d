"""The statement path: every statement's budget, time-out, quarantine check and outcome.

Statements go through one ``do_execute`` listener (and its ``executemany`` and
``no_params`` siblings) that runs the statement itself: measured at 0.5 us per statement,
against 3.6 us for a ``before``/``after_cursor_execute`` pair. A listener that returns True
ends SQLAlchemy's chain, so listeners added after poolguard's are called here, in order,
before the statement runs (the first that returns True runs it, as SQLAlchemy would have).
``handle_error`` then turns a server-side time-out into :class:`QueryTimeout`, after
SQLAlchemy has done its own bookkeeping for the failed statement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext
from sqlalchemy.pool import _AdhocProxiedConnection

from poolguard.core.budget import BudgetScope
from poolguard.core.budget import _current as _scope_var
from poolguard.core.outcome import Outcome
from poolguard.errors import BudgetExceeded, QueryQuarantined, QueryTimeout
from poolguard.observe.fingerprint import Fingerprint
from poolguard.observe.telemetry import TRACER_PROVIDER

if TYPE_CHECKING:
    from poolguard.core.parts import Parts

__all__ = ["StatementPath"]

_Run = Callable[[Any, DBAPICursor, str, Any, ExecutionContext], None]


_monotonic = time.monotonic


def _execute(dialect: Any, cursor: DBAPICursor, st: str, params: Any, ctx: Any) -> None:
    dialect.do_execute(cursor, st, params, ctx)


def _executemany(dialect: Any, cursor: DBAPICursor, st: str, params: Any, ctx: Any) -> None:
    dialect.do_executemany(cursor, st, params, ctx)


def _execute_no_params(dialect: Any, cursor: DBAPICursor, st: str, _: Any, ctx: Any) -> None:
    dialect.do_execute_no_params(cursor, st, ctx)


class StatementPath:
    """The three ``do_execute`` listeners and ``handle_error``."""

    def __init__(self, parts: Parts) -> None:
        self.p = parts
        self.held = parts.held
        self.quarantine = parts.quarantine
        self.stats = parts.stats
        self.telemetry = parts.telemetry
        self.enforcer = parts.enforcer
        self.fingerprint = parts.fingerprint
        self.default_timeout = parts.config.timeouts.statement_timeout
        self.baseline = parts.enforcer.session_baseline
        self.successes = parts.stats.successes
        self.fold_at = parts.stats.fold_at
        #: Who runs what is only asked where the server can name sessions (blame, cancel).
        self.track_running = parts.track_pids
        # Bound once: the listener collections hold these exact objects, which is how the
        # statement path finds the listeners added after its own. ``do_execute``, nearly
        # every statement, is ``run`` itself: one Python call fewer per statement.
        self.on_do_execute = self.run
        self.on_do_executemany = self._on_do_executemany
        self.on_do_execute_no_params = self._on_do_execute_no_params
        self._chains: dict[str, _Run] = {}
        #: The dialect's own ``do_execute`` listeners, looked up once: SQLAlchemy adds and
        #: removes listeners in that collection in place, and the lookup costs as much as
        #: the rest of the check.
        self._later: Any = None

    # -- the listeners ------------------------------------------------------------------------
    def _on_do_executemany(
        self, cursor: DBAPICursor, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        run = self._runner(context, "do_executemany", _executemany)
        return run is not None and self.run(cursor, statement, parameters, context, run)

    def _on_do_execute_no_params(
        self, cursor: DBAPICursor, statement: str, context: ExecutionContext
    ) -> bool:
        run = self._runner(context, "do_execute_no_params", _execute_no_params)
        return run is not None and self.run(cursor, statement, None, context, run)

    def _runner(self, context: ExecutionContext | None, name: str, own: _Run) -> _Run | None:
        """How the rarer two listeners run their statement: ``own`` while poolguard's
        listener is the last one, else through the listeners after it; None outside any
        execution context (SQLAlchemy's own statements), which are left to SQLAlchemy."""
        if context is None:
            return None
        later = getattr(context.dialect.dispatch, name).listeners
        return own if later[-1] is getattr(self, "on_" + name) else self._chained(name)

    def _chained(self, name: str) -> _Run:
        """Run the listeners registered after poolguard's, then the statement if none of
        them did: SQLAlchemy's own rule, kept although poolguard's listener ends its chain.
        Only used while such listeners exist."""
        run = self._chains.get(name)
        if run is None:
            run = self._chains[name] = _chain(name, getattr(self, "on_" + name))
        return run

    # -- one statement ------------------------------------------------------------------------
    def run(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext,
        execute: _Run | None = None,
    ) -> bool:
        """One statement, start to end; ``execute`` runs it. None: this is the
        ``do_execute`` listener, and the dialect runs it (or the listeners after poolguard's).

        The success path records what every statement needs and nothing else: the clock is
        read twice (three times when the dialect prepares the statement, SQLite always),
        telemetry only when an SDK may record (:attr:`Telemetry.live`), and the wall clock
        only for a span. Failures are described in full by :meth:`_failed`.
        """
        if context is None:  # SQLAlchemy's own statements outside any execution
            return False
        conn = context._dbapi_connection  # type: ignore[attr-defined]
        if conn.__class__ is _AdhocProxiedConnection:
            # SQLAlchemy's own first-connect statements (the dialect's initialize()), made
            # inside some caller's checkout: the connection's, not the caller's. Left to
            # SQLAlchemy as if poolguard were not there.
            return False
        scope = _scope_var.get()
        if execute is None:
            later = self._later
            if later is None:  # the first statement: poolguard's listener is installed
                later = self._later = context.dialect.dispatch.do_execute.listeners
            if later[-1] is not self.on_do_execute:
                execute = self._chained("do_execute")
        fp = self.fingerprint(statement)
        q = self.quarantine
        default = self.default_timeout
        timeout: float | None = default
        # The time before admission, read only when something is admitted against it.
        now: float | None = None
        if q.active or scope is not None:
            now = _monotonic()
            if q.active:
                wait = q.check(fp.id, now)
                if wait is not None:
                    self._refuse_quarantined(fp, wait, scope)
            if scope is not None:
                try:
                    timeout = scope.admit_statement(default, now)
                except BudgetExceeded as err:
                    if q.active:  # it may have been let through as a quarantine probe
                        q.record_error(fp.id, now)
                    self.p.refused(err, "budget", scope.partition, fp)
                    raise
        record = conn._connection_record
        hold = self.held.get(record)
        if timeout != default or not self.baseline:
            try:
                info = hold.conn.info if hold is not None else {}
                statement = self.enforcer.prepare(statement, timeout, context, info)
            except BaseException:
                if q.active:
                    q.record_error(fp.id, _monotonic() if now is None else now)
                raise
            t0 = _monotonic()  # what preparing took (a SET on a server) is not the statement's
        else:
            t0 = _monotonic() if now is None else now
        if now is None:
            now = t0
        running = hold is not None and self.track_running
        if running:
            hold.running = fp  # type: ignore[union-attr]
            hold.running_since = now  # type: ignore[union-attr]
        try:
            if execute is None:
                context.dialect.do_execute(cursor, statement, parameters, context)
            else:
                execute(context.dialect, cursor, statement, parameters, context)
        except BaseException as err:
            elapsed = _monotonic() - t0
            cancelled = False
            if running:
                hold.running = None  # type: ignore[union-attr]
                cancelled, hold.cancelled = hold.cancelled, False  # type: ignore[union-attr]
            end = time.time_ns()
            o = Outcome(fp, end - round(elapsed * 1e9), end, timeout, scope, err)
            self._failed(o, context, cancelled)
            raise
        elapsed = _monotonic() - t0
        done = self.successes  # StatsRegistry.record_success, without a call
        done.append((fp, elapsed))
        if len(done) >= self.fold_at:
            self.stats.fold_soon()
        if scope is not None:
            scope.record_statement(elapsed)
        if q.active:
            t = q.record_success(fp.id, now)
            if t is not None:
                self.p.on_transition(t)
        if hold is not None:
            hold.fp = fp
            if running:
                hold.running = None
                hold.cancelled = False  # a cancel that came too late found nothing to stop
        tel = self.telemetry
        if tel.live or (
            tel.spans_pending and tel.trace_api[TRACER_PROVIDER] is not None and tel.went_live()
        ):
            end = time.time_ns()  # spans take wall-clock times
            tel.statement(
                fp,
                end - round(elapsed * 1e9),
                end,
                partition=scope.partition if scope else None,
                timeout=timeout,
                error=None,
            )
        return True

    def _refuse_quarantined(self, fp: Fingerprint, wait: float, scope: BudgetScope | None) -> None:
        partition = scope.partition if scope is not None else None
        err = QueryQuarantined(
            fingerprint=fp.id, summary=fp.summary, retry_after=wait, partition=partition
        )
        self.p.refused(err, "quarantined", partition, fp)
        raise err

    # -- failures -----------------------------------------------------------------------------
    def _failed(self, o: Outcome, context: ExecutionContext, cancelled: bool) -> None:
        """Classify a failed statement once, then tell every listener of outcomes."""
        enforcer = self.enforcer
        err: BaseException = o.error  # type: ignore[assignment]
        cause = enforcer.classify(err)
        if cancelled and enforcer.was_cancelled(err):
            cause = "quarantined"  # stopped by poolguard's cancel: no time-out of its own
        o.cause = cause
        if cause is not None:
            o.limit = (
                enforcer.lock_timeout_for(o.timeout) if cause == "lock" else o.timeout
            ) or o.elapsed
            # A strike only for a time-out the statement earned: it ran for the limit the
            # operator set (never cut short by a deadline, which a caller controls), and it
            # cannot have been a lock wait (the victims of a lock holder are not guilty).
            o.strike = (
                cause == "statement"
                and enforcer.timeout_is_own(o.timeout)
                and not _cut_by_deadline(o, self.default_timeout)
            )
            context._poolguard_outcome = o  # type: ignore[attr-defined]
        self.p.outcomes.failed(o)

    def on_handle_error(self, ctx: Any) -> BaseException | None:
        o: Outcome | None = getattr(ctx.execution_context, "_poolguard_outcome", None)
        if o is None or o.cause is None:
            return None
        fp = o.fp
        err = QueryTimeout(
            fingerprint=fp.id,
            summary=fp.summary,
            normalized=fp.normalized,
            timeout=o.limit if o.limit is not None else o.elapsed,
            elapsed=o.elapsed,
            orig=ctx.original_exception,
            partition=o.partition,
            cause=o.cause,
        )
        kind = "cancelled" if o.cause == "quarantined" else "timeout"
        self.p.refused(err, kind, o.partition, fp, timeout=o.limit)
        return err


def _chain(name: str, mine: object) -> _Run:
    no_params = name == "do_execute_no_params"
    fallback = {"do_execute": _execute, "do_executemany": _executemany}.get(
        name, _execute_no_params
    )

    def run(dialect: Any, cursor: DBAPICursor, st: str, params: Any, ctx: Any) -> None:
        after = False
        for fn in getattr(dialect.dispatch, name):
            if after:
                if fn(cursor, st, ctx) if no_params else fn(cursor, st, params, ctx):
                    return
            elif fn is mine:
                after = True
        fallback(dialect, cursor, st, params, ctx)

    return run


def _cut_by_deadline(o: Outcome, default: float) -> bool:
    """True when the statement's time-out was shorter than every statement time-out set
    for it (the guard's, a route rule's or a budget's): a deadline or the db-time allowance
    cut it, and those say how long the caller could wait, not how long the statement may
    run. A client sending a short deadline header must not get a healthy statement
    quarantined for everyone."""
    if o.scope is None or o.timeout is None:
        return False
    limit = o.scope.statement_timeout if o.scope.statement_timeout is not None else default
    return o.timeout < limit
