"""Query budgets: what a test may spend in the database, and the recorder that counts it.

The pytest plugin (:mod:`poolguard.integrations.pytest_plugin`) decides when to record; this
module counts, with class-level ``Engine`` listeners that exist only while something records
(see the plugin's docstring for why). Only fingerprints are kept, never literals.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple

from sqlalchemy import event
from sqlalchemy.engine import Engine

from poolguard.observe.fingerprint import Fingerprint, fingerprinter_for
from poolguard.observe.stats import bucket_of, bucket_upper

__all__ = [
    "MARKER",
    "FingerprintStats",
    "QueryBudgetBlock",
    "QueryBudgetExceeded",
    "QueryRecorder",
    "listeners_installed",
]

MARKER = "query_budget"
LIMIT_NAMES = ("max_statements", "max_db_time", "max_repeats")


class QueryBudgetExceeded(AssertionError):
    """A ``with query_budget(...)`` block went over its limits.

    An ``AssertionError`` because that is what a failed check in a test is: pytest reports it as
    a failure (not an error), and ``pytest.raises(AssertionError)`` catches it.
    """


class FingerprintStats(NamedTuple):
    """One statement shape's numbers: what ``QueryRecorder.fingerprints`` maps an id to.

    A tuple so that ``summary, normalized, count, total_time = stats`` works; the ``count``
    field deliberately shadows ``tuple.count``, which nobody needs on a 4-tuple.
    """

    summary: str
    normalized: str
    count: int  # type: ignore[assignment]
    total_time: float


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    max_statements: int | None = None
    max_db_time: float | None = None
    max_repeats: int | None = None

    @classmethod
    def parse(cls, kwargs: Mapping[str, object]) -> Limits:
        """Validate limits; TypeError/ValueError messages name the argument."""
        for name in kwargs:
            if name not in LIMIT_NAMES:
                raise TypeError(f"unknown argument {name!r} (expected {', '.join(LIMIT_NAMES)})")
        max_statements = _count(kwargs.get("max_statements"), "max_statements", minimum=0)
        max_repeats = _count(kwargs.get("max_repeats"), "max_repeats", minimum=1)
        db_time = kwargs.get("max_db_time")
        if db_time is not None:
            if isinstance(db_time, bool) or not isinstance(db_time, (int, float)):
                raise TypeError(
                    f"max_db_time must be a number of seconds, got {type(db_time).__name__}"
                )
            if not math.isfinite(db_time) or db_time <= 0:
                raise ValueError(f"max_db_time must be a positive number of seconds, got {db_time}")
        return cls(max_statements, None if db_time is None else float(db_time), max_repeats)

    @property
    def empty(self) -> bool:
        return self.max_statements is None and self.max_db_time is None and self.max_repeats is None

    def violations(self, rec: QueryRecorder) -> list[tuple[str, str]]:
        """(headline, paragraph) per broken limit; paragraphs name the fingerprints responsible
        with their literal-free normal forms, so the message says what to fix."""
        out: list[tuple[str, str]] = []
        fps = rec.fingerprints
        if self.max_repeats is not None:
            limit = self.max_repeats
            repeated = sorted(
                ((fid, s) for fid, s in fps.items() if s.count > limit),
                key=lambda item: (-item[1].count, item[0]),
            )
            out += [
                (
                    f"N+1 {s.summary or 'statement'} x{s.count}",
                    f"N+1: {_label(fid, s)} ran {s.count} times (max_repeats={limit}): "
                    f"{s.normalized}",
                )
                for fid, s in repeated
            ]
        if self.max_statements is not None and rec.statements > self.max_statements:
            top = sorted(fps.items(), key=lambda item: (-item[1].count, item[0]))[:5]
            out.append(
                (
                    f"{rec.statements} statements > max_statements={self.max_statements}",
                    f"{rec.statements} statements ran (max_statements={self.max_statements}); "
                    "most frequent:"
                    + "".join(
                        f"\n    {s.count} x {_label(fid, s)}: {s.normalized}" for fid, s in top
                    ),
                )
            )
        if self.max_db_time is not None and rec.db_time > self.max_db_time:
            top = sorted(fps.items(), key=lambda item: (-item[1].total_time, item[0]))[:5]
            out.append(
                (
                    f"db time {rec.db_time:.3f}s > max_db_time={self.max_db_time:g}",
                    f"{rec.db_time:.3f}s of database time (max_db_time={self.max_db_time:g}); "
                    "slowest:"
                    + "".join(
                        f"\n    {s.total_time:.3f}s in {s.count} x {_label(fid, s)}: {s.normalized}"
                        for fid, s in top
                    ),
                )
            )
        return out


def _count(value: object, name: str, *, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _label(fid: str, s: FingerprintStats) -> str:
    return f"{s.summary or 'statement'} [{fid}]"


def failure_message(where: str, violations: list[tuple[str, str]]) -> str:
    # The first line is what pytest's short summary (-ra) shows: make it say what broke.
    headline = "; ".join(short for short, _ in violations)
    body = "\n".join(f"  {detail}" for _, detail in violations)
    return f"query budget exceeded{where}: {headline}\n{body}"


# --------------------------------------------------------------------------- recording


class QueryRecorder:
    """Counts statements, database time and fingerprints while it is started.

    The ``query_budget`` fixture's value; it records the test's call phase. Calling it returns
    a context manager that checks limits on one block only::

        def test_list(query_budget, client):
            with query_budget(max_statements=3, max_repeats=1):
                client.get("/users")
            assert query_budget.statements < 10
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statements = 0
        self._db_time = 0.0
        # id -> [summary, normalized, count, total_time]; lists so updates need no allocation
        self._fps: dict[str, list[Any]] = {}
        self._active = False

    # -- the numbers

    @property
    def statements(self) -> int:
        """Statements sent to a database (executemany counts once)."""
        return self._statements

    @property
    def db_time(self) -> float:
        """Seconds spent executing them, as seen by the client (cursor execute to return)."""
        return self._db_time

    @property
    def fingerprints(self) -> Mapping[str, FingerprintStats]:
        """A snapshot: fingerprint id -> (summary, normalized, count, total_time)."""
        with self._lock:
            snap = {fid: FingerprintStats(*v[:4]) for fid, v in self._fps.items()}
        return MappingProxyType(snap)

    def __repr__(self) -> str:
        return (
            f"<QueryRecorder statements={self._statements} db_time={self._db_time:.6f}s "
            f"fingerprints={len(self._fps)}>"
        )

    def reset(self) -> None:
        """Forget what was recorded so far (recording goes on if started)."""
        with self._lock:
            self._statements = 0
            self._db_time = 0.0
            self._fps.clear()

    def __call__(
        self,
        *,
        max_statements: int | None = None,
        max_db_time: float | None = None,
        max_repeats: int | None = None,
    ) -> QueryBudgetBlock:
        """A context manager that fails (:class:`QueryBudgetExceeded`) when its block goes
        over these limits; it yields a recorder of just that block."""
        limits = Limits.parse(
            {
                "max_statements": max_statements,
                "max_db_time": max_db_time,
                "max_repeats": max_repeats,
            }
        )
        return QueryBudgetBlock(limits)

    # -- lifecycle

    def start(self) -> None:
        if not self._active:
            self._active = True
            _HUB.attach(self)

    def stop(self) -> None:
        if self._active:
            self._active = False
            _HUB.detach(self)

    # -- called from the listeners, on whichever thread executes

    def _started(self, fp: Fingerprint) -> None:
        with self._lock:
            self._statements += 1
            entry = self._fps.get(fp.id)
            if entry is None:
                self._fps[fp.id] = [fp.summary, fp.normalized, 1, 0.0, {}]
            else:
                entry[2] += 1

    def _finished(self, fp: Fingerprint, elapsed: float) -> None:
        with self._lock:
            entry = self._fps.get(fp.id)
            if entry is not None:  # None: started before this recorder was
                entry[3] += elapsed
                self._db_time += elapsed
                hist = entry[4]
                b = bucket_of(elapsed)
                hist[b] = hist.get(b, 0) + 1

    def _as_report(self) -> dict[str, Any]:
        with self._lock:
            hists = {fid: sorted(v[4].items()) for fid, v in self._fps.items()}
        return {
            "statements": self.statements,
            "db_time": round(self.db_time, 6),
            "fingerprints": {
                fid: {
                    "summary": s.summary,
                    "normalized": s.normalized,
                    "count": s.count,
                    "total_time": round(s.total_time, 6),
                    # Each execution's time, by bucket: what lets `poolguard diff` test
                    # per-execution times rather than a mean one stall can move.
                    "histogram": [[bucket_upper(b), n] for b, n in hists.get(fid, [])],
                }
                for fid, s in sorted(self.fingerprints.items())
            },
        }


class QueryBudgetBlock:
    """``with query_budget(max_repeats=1) as block:``: records and checks just the block.

    If the block raises, that exception propagates unchanged: a budget report would only hide
    the real failure.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._recorder = QueryRecorder()

    def __enter__(self) -> QueryRecorder:
        self._recorder.start()
        return self._recorder

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        __tracebackhide__ = True  # the failure is the user's `with` line, not this frame
        self._recorder.stop()
        if exc_type is None:
            violations = self._limits.violations(self._recorder)
            if violations:
                raise QueryBudgetExceeded(failure_message(" in block", violations))


class _Hub:
    """The one pair of class-level listeners, shared by every active recorder.

    Installed when the first recorder starts, removed when the last one stops. The recorder
    tuple is replaced, never mutated, so the listeners read it without a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.recorders: tuple[QueryRecorder, ...] = ()
        # id(cursor) -> (fingerprint, start); a statement that raises leaves its entry until
        # the hub is uninstalled, which is at the latest the end of the test.
        self.pending: dict[int, tuple[Fingerprint, float]] = {}

    def attach(self, rec: QueryRecorder) -> None:
        with self._lock:
            if not self.recorders:
                _install()
            self.recorders = (*self.recorders, rec)

    def detach(self, rec: QueryRecorder) -> None:
        with self._lock:
            self.recorders = tuple(r for r in self.recorders if r is not rec)
            if not self.recorders:
                _uninstall()
                self.pending.clear()


_HUB = _Hub()


def _before_cursor_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    # The engine's dialect rules, as the guard's statement path reads the same statement.
    fp = fingerprinter_for(conn.dialect.name)(statement)
    _HUB.pending[id(cursor)] = (fp, time.perf_counter())
    for rec in _HUB.recorders:
        rec._started(fp)


def _after_cursor_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    item = _HUB.pending.pop(id(cursor), None)
    if item is None:
        return
    fp, started = item
    elapsed = time.perf_counter() - started
    for rec in _HUB.recorders:
        rec._finished(fp, elapsed)


def _listeners() -> tuple[tuple[str, Any], ...]:
    return (
        ("before_cursor_execute", _before_cursor_execute),
        ("after_cursor_execute", _after_cursor_execute),
    )


#: ``Engine._has_events`` before the plugin's listeners went on: SQLAlchemy sets the class
#: flag when a Connection-level listener is added and never clears it, which would leave
#: every engine of the process on the slow, event-dispatching execute path after one
#: recorded test.
_had_events: list[bool] = []


def _install() -> None:
    if not _had_events:
        _had_events.append(bool(Engine.__dict__.get("_has_events", False)))
    for name, fn in _listeners():
        event.listen(Engine, name, fn)


def _uninstall() -> None:
    for name, fn in _listeners():
        if event.contains(Engine, name, fn):
            event.remove(Engine, name, fn)
    if _had_events and not _class_listeners_left():
        Engine._has_events = _had_events.pop()


def _class_listeners_left() -> bool:
    """Whether anyone else still listens on the Engine class for Connection events (when
    SQLAlchemy's registry cannot be read, assume so and leave the flag alone)."""
    dispatch: Any = Engine.dispatch
    try:
        return any(
            bool(getattr(dispatch, name)._clslevel.get(Engine)) for name in dispatch._event_names
        )
    except AttributeError:
        return True


def listeners_installed() -> bool:
    """Whether the plugin has listeners on ``Engine`` right now (for tests and debugging)."""
    return any(event.contains(Engine, name, fn) for name, fn in _listeners())
