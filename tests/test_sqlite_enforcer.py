"""The SQLite enforcer against connections that are not sqlite3's own: a sqlite3-compatible
``module=`` (pysqlite3), ``creator=`` wrappers with and without a progress handler, and the
aiosqlite adapter; and the busy timeout an application configured itself, which poolguard
keeps unless ``lock_timeout`` is given explicitly."""

from __future__ import annotations

import importlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from poolguard import PoolGuard, QueryTimeout

# Runs until interrupted: SQLite's recursive CTE with no bound.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"

MakeGuard = Callable[..., PoolGuard]


def _pysqlite3() -> ModuleType:
    """pysqlite3 (pip install pysqlite3-binary): a sqlite3-compatible module whose
    connections are not ``sqlite3.Connection``. Missing fails under CI, as a server does."""
    try:
        return importlib.import_module("pysqlite3.dbapi2")
    except ImportError:
        msg = "pysqlite3 not installed: pip install pysqlite3-binary"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on"):
            pytest.fail(msg)
        pytest.skip(msg)


class Delegating:
    """A creator's wrapper that forwards everything (as tracing wrappers do): it has the
    wrapped connection's ``set_progress_handler`` without being a ``sqlite3.Connection``."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class PlainDBAPI:
    """A creator's wrapper with only what PEP 249 and SQLAlchemy's pysqlite dialect use:
    no progress handler, so statements cannot be interrupted."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def cursor(self) -> sqlite3.Cursor:
        return self._conn.cursor()

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        self._conn.rollback()

    def close(self) -> None:
        self._conn.close()

    def create_function(self, *args: Any, **kw: Any) -> None:
        self._conn.create_function(*args, **kw)


def _path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def _assert_interrupts(engine: sa.Engine, guard: PoolGuard) -> None:
    """Every checkout works, and a statement past its time-out is interrupted."""
    for _ in range(3):
        with engine.connect() as c:
            assert c.execute(sa.text("SELECT 1")).scalar() == 1
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout) as ei, engine.connect() as c:
        c.execute(sa.text(ENDLESS))
    assert ei.value.cause == "statement"
    assert time.monotonic() - t0 < 5.0  # the statement's own 0.2 s, never "until done"
    assert guard.stats()["settings"]["timeout_enforcement"] == "sqlite"


def test_pysqlite3_module_is_enforced(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    """Before: every checkout failed (AttributeError: no attribute '_connection')."""
    mod = _pysqlite3()
    engine = sa.create_engine(sqlite_file_url, module=mod, poolclass=sa.QueuePool)
    guard = make_guard(engine, statement_timeout=0.2)
    _assert_interrupts(engine, guard)


def test_delegating_creator_wrapper_is_enforced(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    path = _path(sqlite_file_url)
    engine = sa.create_engine(
        "sqlite://",
        creator=lambda: Delegating(sqlite3.connect(path, check_same_thread=False)),
        poolclass=sa.QueuePool,
    )
    guard = make_guard(engine, statement_timeout=0.2)
    _assert_interrupts(engine, guard)


def test_wrapper_without_progress_handler_works_and_says_it_is_unenforced(
    make_guard: MakeGuard, sqlite_file_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No interrupt is possible: checkouts and statements still work (budgets and the gate
    still apply), stats() says the time-out is not enforced, and one warning says why."""
    path = _path(sqlite_file_url)
    engine = sa.create_engine(
        "sqlite://",
        creator=lambda: PlainDBAPI(sqlite3.connect(path, check_same_thread=False)),
        poolclass=sa.QueuePool,
    )
    guard = make_guard(engine, statement_timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        held = [engine.connect() for _ in range(3)]  # three connections, one warning
        for c in held:
            assert c.execute(sa.text("SELECT 1")).scalar() == 1
            c.close()
    assert guard.stats()["settings"]["timeout_enforcement"] == "none"
    warnings = [r for r in caplog.records if "set_progress_handler" in r.getMessage()]
    assert len(warnings) == 1
    assert "PlainDBAPI" in warnings[0].getMessage()
    with guard.budget(max_queries=1), engine.connect() as c:  # budgets still apply
        c.execute(sa.text("SELECT 1"))
        with pytest.raises(Exception, match="max_queries"):
            c.execute(sa.text("SELECT 2"))


async def test_aiosqlite_adapter_is_still_enforced(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = create_async_engine(
        sqlite_file_url.replace("sqlite://", "sqlite+aiosqlite://"),
        poolclass=sa.AsyncAdaptedQueuePool,
    )
    guard = make_guard(engine, statement_timeout=0.2)
    try:
        with pytest.raises(QueryTimeout) as ei:
            async with engine.connect() as c:
                await c.execute(sa.text(ENDLESS))
        assert ei.value.cause == "statement"
        assert guard.stats()["settings"]["timeout_enforcement"] == "sqlite"
    finally:
        await engine.dispose()


# -- the busy timeout --------------------------------------------------------------------------
def _busy_timeout(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.exec_driver_sql("PRAGMA busy_timeout").scalar_one())


def _hold_write_lock(url: str) -> sqlite3.Connection:
    holder = sqlite3.connect(_path(url), isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS lk (n INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO lk VALUES (1)")
    return holder


def test_driver_default_busy_timeout_is_replaced_by_the_lock_wait(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool)
    assert _busy_timeout(engine) == 5000  # sqlite3's own default
    make_guard(engine, statement_timeout=5.0)  # lock_timeout "auto": min(1 s, 5 s / 2)
    assert _busy_timeout(engine) == 1000


@pytest.mark.parametrize(
    "configure",
    [
        pytest.param({"connect_args": {"timeout": 0.3}}, id="connect_args"),
        pytest.param({"url_query": "?timeout=0.3"}, id="url"),
    ],
)
def test_configured_busy_timeout_is_kept(
    make_guard: MakeGuard, sqlite_file_url: str, configure: dict[str, Any]
) -> None:
    """An application that asked its writers to give up after 0.3 s keeps that: before,
    poolguard's lock wait (2.5 s with the defaults) replaced it on every connection."""
    url = sqlite_file_url + configure.get("url_query", "")
    engine = sa.create_engine(
        url, poolclass=sa.QueuePool, connect_args=configure.get("connect_args", {})
    )
    guard = make_guard(engine, statement_timeout=5.0)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE lk (n INTEGER)"))
    assert _busy_timeout(engine) == 300
    holder = _hold_write_lock(sqlite_file_url)
    try:
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout) as ei, engine.begin() as c:
            c.execute(sa.text("INSERT INTO lk VALUES (2)"))
        waited = time.monotonic() - t0
    finally:
        holder.rollback()
        holder.close()
    assert ei.value.cause == "lock"
    assert ei.value.timeout == pytest.approx(0.3)
    assert waited < 2.4  # the replaced value made every blocked writer wait 2.5 s
    assert guard.quarantined() == []


def test_configured_busy_timeout_is_still_cut_by_a_short_deadline(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    """Kept is not unbounded: the busy handler runs no VM instruction, so a lock wait longer
    than the statement's own time-out could not be interrupted."""
    engine = sa.create_engine(
        sqlite_file_url, poolclass=sa.QueuePool, connect_args={"timeout": 30.0}
    )
    guard = make_guard(engine, statement_timeout=1.0)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE lk (n INTEGER)"))
    holder = _hold_write_lock(sqlite_file_url)
    try:
        with pytest.raises(QueryTimeout) as ei, engine.begin() as c:
            c.execute(sa.text("INSERT INTO lk VALUES (2)"))
    finally:
        holder.rollback()
        holder.close()
    assert ei.value.cause == "lock"
    assert ei.value.timeout <= 0.5  # half the statement's time-out, not the 30 s
    assert guard.stats()["settings"]["timeout_enforcement"] == "sqlite"


def test_explicit_lock_timeout_replaces_a_configured_busy_timeout(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sa.create_engine(
        sqlite_file_url, poolclass=sa.QueuePool, connect_args={"timeout": 0.3}
    )
    make_guard(engine, statement_timeout=5.0, lock_timeout=1.0)
    assert _busy_timeout(engine) == 1000


def test_explicit_lock_timeout_at_half_the_statement_time_out_is_still_explicit(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    """The value "auto" would give, chosen on purpose, is the user's choice too (before, the
    enforcer guessed from the value and kept the connection's 0.3 s)."""
    engine = sa.create_engine(
        sqlite_file_url, poolclass=sa.QueuePool, connect_args={"timeout": 0.3}
    )
    make_guard(engine, statement_timeout=5.0, lock_timeout=2.5)
    assert _busy_timeout(engine) == 2500


def test_lock_timeout_none_leaves_the_busy_timeout_alone(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool, connect_args={"timeout": 7})
    make_guard(engine, lock_timeout=None)
    assert _busy_timeout(engine) == 7000
