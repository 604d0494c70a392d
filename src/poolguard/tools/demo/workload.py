"""The demo's database and its three queries, for one dialect: an embedded SQLite file by
default, or PostgreSQL / MariaDB given by ``--database-url`` (where nothing is created)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine

from poolguard.extras import driver_problem
from poolguard.tools.urls import display_url, sanitize

__all__ = ["DemoError", "Workload", "workload_for"]

# The rogue on SQLite: chunks of _CHUNK_ROWS rows (a fraction of a millisecond of stepping),
# then a _PAUSE pause in demo_pace(), which also says whether to go on. About 1% of a core
# per running rogue: fifteen of them leave a loaded 2-core machine to the web app.
_CHUNK_ROWS = 1000
_PAUSE = 0.02


class DemoError(Exception):
    """A problem worth one line on stderr (bad URL, missing driver, cannot connect)."""


class Workload:
    """The demo's database and its three queries, for one dialect.

    ``rogue_params(until)`` gives the rogue statement's parameters for a query that should
    end at ``until`` (``time.monotonic()``); ``stop`` ends every running rogue early on SQLite.
    """

    def __init__(self, url: URL, label: str, engine_kwargs: dict[str, Any]) -> None:
        self.url = url
        self.label = label
        self.engine_kwargs = engine_kwargs
        backend = url.get_backend_name()
        self.backend = "mysql" if backend == "mariadb" else backend
        self.stop = threading.Event()
        self.item_sql: sa.TextClause
        self.orders_sql: sa.TextClause
        self.rogue_sql: sa.TextClause
        if self.backend == "sqlite":
            self.item_sql = sa.text("SELECT id, name, price FROM items WHERE id = :id")
            self.orders_sql = sa.text(
                "SELECT id, item_id, quantity FROM orders WHERE customer_id = :id "
                "ORDER BY id DESC LIMIT 5"
            )
            self.rogue_sql = sa.text(
                "WITH RECURSIVE walk(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM walk "
                f"WHERE CASE WHEN n % {_CHUNK_ROWS} = 0 THEN demo_pace(:until) ELSE 1 END) "
                "SELECT count(*) FROM walk"
            )
        else:
            # On a server the demo creates nothing: the healthy queries are constant SELECTs.
            self.item_sql = sa.text("SELECT CAST(:id AS INTEGER) * 2")
            self.orders_sql = sa.text("SELECT CAST(:id AS INTEGER) + 1")
            # PostgreSQL's statement_timeout stops pg_sleep() at once. MariaDB's
            # max_statement_time may not wake a thread inside one long SLEEP() (MDEV-18024;
            # seen here as 5 s limits firing 2-4 s late), so the rogue there sleeps in
            # 20 ms steps, one row of the sequence engine each, and is stopped between two.
            self.rogue_sql = sa.text(
                "SELECT pg_sleep(:seconds)"
                if self.backend == "postgresql"
                else "SELECT COUNT(*) FROM seq_1_to_100000 WHERE "
                "SYSDATE(6) < NOW(6) + INTERVAL :us MICROSECOND AND SLEEP(0.02) = 0"
            )

    def rogue_params(self, until: float) -> dict[str, float]:
        if self.backend == "sqlite":
            return {"until": until}
        seconds = max(0.0, until - time.monotonic())
        if self.backend == "postgresql":
            return {"seconds": round(seconds, 3)}
        return {"us": int(seconds * 1e6)}

    def _pace(self, until: float) -> int:
        # Runs inside SQLite, in the executing thread: pause, then say whether to go on.
        time.sleep(_PAUSE)
        return 1 if time.monotonic() < until and not self.stop.is_set() else 0

    def make_engine(self) -> Engine:
        """A new engine with SQLAlchemy's default pool: the setting the outage happened on."""
        engine = sa.create_engine(self.url, **self.engine_kwargs)
        if self.backend == "sqlite":
            pace = self._pace

            def add_pace(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.create_function("demo_pace", 1, pace, deterministic=False)

            event.listen(engine, "connect", add_pace)
        return engine

    def check(self) -> None:
        """Connect once and create the SQLite tables; one clear error if that fails."""
        engine = self.make_engine()
        try:
            with engine.begin() as conn:
                if self.backend == "sqlite":
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    conn.exec_driver_sql(
                        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL)"
                    )
                    conn.exec_driver_sql(
                        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, "
                        "item_id INTEGER, quantity INTEGER)"
                    )
                    conn.exec_driver_sql("CREATE INDEX orders_customer ON orders (customer_id)")
                    conn.execute(
                        sa.text("INSERT INTO items VALUES (:id, :name, :price)"),
                        [{"id": i, "name": f"item {i}", "price": i * 1.5} for i in range(1, 1001)],
                    )
                    conn.execute(
                        sa.text("INSERT INTO orders VALUES (:id, :c, :i, :q)"),
                        [
                            {"id": i, "c": i % 200, "i": i % 1000 + 1, "q": i % 5 + 1}
                            for i in range(1, 5001)
                        ],
                    )
                else:
                    conn.execute(self.item_sql, {"id": 1}).one()
                    if self.backend != "postgresql":
                        version = str(conn.execute(sa.text("SELECT VERSION()")).scalar())
                        if "mariadb" not in version.lower():
                            raise DemoError(
                                f"{self.label} is MySQL {version}: the demo runs on MariaDB "
                                "(its rogue query needs MariaDB's sequence engine)"
                            )
        except sa.exc.DBAPIError as err:
            raise DemoError(
                f"cannot use {self.label}: {_describe_db_error(err, self.url)}"
            ) from None
        finally:
            engine.dispose()


def _describe_db_error(err: sa.exc.DBAPIError, url: URL) -> str:
    """The driver's first line, scrubbed of credentials (:func:`poolguard.tools.urls.sanitize`)."""
    orig = err.orig if err.orig is not None else err
    lines = str(orig).strip().splitlines()
    text = sanitize(lines[0], url) if lines else ""
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


def workload_for(database_url: str | None, tmpdir: str) -> Workload:
    """Parse and check ``--database-url`` (None: an SQLite file under ``tmpdir``)."""
    if database_url is None:
        url = sa.make_url(f"sqlite:///{os.path.join(tmpdir, 'demo.db')}")
        return Workload(url, "SQLite (embedded, WAL, temporary file)", {})
    try:
        url = sa.make_url(database_url)
    except (sa.exc.ArgumentError, ValueError):
        raise DemoError(
            "--database-url is not a database URL (driver://user@host:port/db)"
        ) from None
    backend = url.get_backend_name()
    if backend == "mariadb":
        backend = "mysql"
    if backend == "sqlite":
        raise DemoError(
            "--database-url: SQLite is the default (a temporary file the demo creates and "
            "removes); leave --database-url out to use it"
        )
    if backend not in ("postgresql", "mysql", "mariadb"):
        raise DemoError(
            f"--database-url: {backend!r} is not supported (postgresql, mysql or mariadb)"
        )
    try:
        dialect = url.get_dialect()
    except (sa.exc.NoSuchModuleError, ImportError):
        raise DemoError(f"--database-url: no SQLAlchemy dialect for {url.drivername!r}") from None
    if getattr(dialect, "is_async", False):
        raise DemoError(
            f"--database-url: {url.drivername!r} is an asyncio driver; the demo's web app "
            "uses a sync engine (try postgresql+psycopg:// or mysql+pymysql://)"
        )
    problem = driver_problem(url)  # names the package and the extra that bring the driver
    if problem is not None:
        raise DemoError(f"--database-url: {problem}")
    # A bounded connect (the driver's own default can be minutes), for the drivers that are
    # known to take these arguments.
    connect_args: dict[str, Any] = {}
    if dialect.driver in ("psycopg", "psycopg2"):
        connect_args = {"connect_timeout": 5, "application_name": "poolguard-demo"}
    elif dialect.driver in ("pymysql", "mysqldb"):
        connect_args = {"connect_timeout": 5}
    kwargs: dict[str, Any] = {"connect_args": connect_args} if connect_args else {}
    return Workload(url, display_url(url), kwargs)
