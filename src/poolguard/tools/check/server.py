"""Reading the server: one connection, no pool, bounded in time whatever the driver does.

It reads PostgreSQL's or MySQL/MariaDB's settings as the connecting role sees them, so connect
as the application's role: a per-role ``ALTER ROLE ... SET statement_timeout`` is then what it
sees.

Why three time bounds: the server may be the thing in trouble, and a check that hangs right
after a deploy is worse than none. Each driver gets its own connect-timeout argument; PyMySQL's
``connect_timeout`` only covers the TCP connect and then reads the server's greeting with no
timeout at all, so a host that accepts connections and never answers (a black-holed port, a
stopped server behind a proxy) hung it for good: it also gets ``read_timeout`` and
``write_timeout``. And since a driver may still block somewhere nobody measured, the whole
read runs on a daemon thread (or under ``asyncio.wait_for``) that the check stops waiting for
after three times the connect timeout.
"""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

from poolguard.tools.check.facts import CheckError, ServerFacts
from poolguard.tools.urls import DEFAULT_PORTS, UrlError, display_url, parse_url, sanitize

__all__ = ["APPLICATION_NAME", "gather"]

#: The connect-timeout argument of each driver SQLAlchemy knows: without one, a black-holed
#: host makes the check hang for minutes, which is worst right after a deploy.
_CONNECT_TIMEOUT_ARG: dict[str, str] = {
    "psycopg": "connect_timeout",
    "psycopg2": "connect_timeout",
    "psycopg_async": "connect_timeout",
    "psycopg2cffi": "connect_timeout",
    "asyncpg": "timeout",
    "pg8000": "timeout",
    "pymysql": "connect_timeout",
    "mysqldb": "connect_timeout",
    "aiomysql": "connect_timeout",
    "asyncmy": "connect_timeout",
    "mariadbconnector": "connect_timeout",
    "mysqlconnector": "connection_timeout",
}
#: Drivers whose connect timeout stops at the TCP connect: their reads need a bound too.
_READ_TIMEOUT_ARGS: dict[str, tuple[str, ...]] = {
    "pymysql": ("read_timeout", "write_timeout"),
    "mysqldb": ("read_timeout", "write_timeout"),
    "mariadbconnector": ("read_timeout", "write_timeout"),
}
#: Integer-only timeouts (libpq-based drivers, where libpq also ignores values below 2;
#: PyMySQL's connect_timeout; mysqlclient's).
_INT_TIMEOUT = frozenset(
    {"psycopg", "psycopg2", "psycopg_async", "psycopg2cffi", "pymysql", "mysqldb"}
)
#: PostgreSQL application_name of the check's own session.
APPLICATION_NAME = "poolguard check"
_ASYNC_DRIVERS = frozenset({"asyncpg", "psycopg_async", "aiomysql", "asyncmy", "aiosqlite"})
#: The whole read may take this many connect timeouts (connect, then a few queries).
_OVERALL_FACTOR = 3


def _pg_seconds(setting: str, unit: str | None) -> float:
    value = float(setting)
    scale = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}.get(unit or "s", 1.0)
    return value * scale


def _gather_postgresql(conn: Any) -> ServerFacts:
    from sqlalchemy import text

    # The server may be the thing in trouble: never let the check itself hang on it.
    conn.exec_driver_sql("SET statement_timeout = 5000")
    version = str(conn.execute(text("SHOW server_version")).scalar())
    rows = conn.execute(
        text(
            # reset_val, not setting: the value this role and database get on connecting,
            # unaffected by the SET above.
            "SELECT name, reset_val, unit FROM pg_settings WHERE name IN ("
            "'max_connections', 'superuser_reserved_connections', 'reserved_connections', "
            "'statement_timeout', 'idle_in_transaction_session_timeout', 'lock_timeout')"
        )
    ).all()
    settings = {str(r[0]): (str(r[1]), r[2]) for r in rows}
    reserved: dict[str, int] = {
        name: int(settings[name][0])
        for name in ("superuser_reserved_connections", "reserved_connections")
        if name in settings  # reserved_connections is PostgreSQL 16+
    }
    timeouts: dict[str, float] = {
        name: _pg_seconds(*settings[name])
        for name in ("statement_timeout", "idle_in_transaction_session_timeout", "lock_timeout")
        if name in settings
    }
    states = _counts(
        conn,
        "SELECT coalesce(state, 'unknown'), count(*) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
        "GROUP BY 1 ORDER BY 1",
    )
    return ServerFacts(
        backend="postgresql",
        version=f"PostgreSQL {version}",
        max_connections=int(settings["max_connections"][0]),
        reserved=reserved,
        current_connections=sum(states.values()),
        connection_states=states,
        timeouts=timeouts,
    )


def _counts(conn: Any, sql: str) -> dict[str, int]:
    """A query's (name, count) rows, as a dict."""
    from sqlalchemy import text

    return {str(r[0]): int(r[1]) for r in conn.execute(text(sql)).all()}


def _gather_mysql(conn: Any) -> ServerFacts:
    from sqlalchemy import text

    version = str(conn.execute(text("SELECT VERSION()")).scalar())
    rows = conn.execute(
        text(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('max_connections', "
            "'max_execution_time', 'max_statement_time', 'wait_timeout')"
        )
    ).all()
    variables = {str(r[0]).lower(): str(r[1]) for r in rows}
    threads = conn.execute(text("SHOW GLOBAL STATUS LIKE 'Threads_connected'")).all()
    connected = int(threads[0][1]) - 1 if threads else 0  # minus the check's own
    states: dict[str, int] = {}
    try:
        states = _counts(
            conn,
            "SELECT COMMAND, COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE ID <> CONNECTION_ID() AND COMMAND <> 'Daemon' "
            "GROUP BY COMMAND ORDER BY COMMAND",
        )
    except Exception:  # the role may lack PROCESS; the total above is enough
        states = {}
    mariadb = "mariadb" in version.lower()
    timeouts: dict[str, float] = {}
    if mariadb and "max_statement_time" in variables:
        timeouts["max_statement_time"] = float(variables["max_statement_time"])
    if not mariadb and "max_execution_time" in variables:
        timeouts["max_execution_time"] = float(variables["max_execution_time"]) / 1000.0
    if "wait_timeout" in variables:
        timeouts["wait_timeout"] = float(variables["wait_timeout"])
    return ServerFacts(
        backend="mariadb" if mariadb else "mysql",
        version=f"{'MariaDB' if mariadb else 'MySQL'} {version}",
        # MySQL admits one extra connection for an administrator beyond max_connections, and
        # MariaDB's extra_max_connections are on a separate port: neither is the apps' to use.
        max_connections=int(variables["max_connections"]),
        reserved={},
        current_connections=max(0, connected),
        connection_states=states,
        timeouts=timeouts,
    )


def _gather_on(conn: Any) -> ServerFacts:
    if conn.dialect.name == "postgresql":
        return _gather_postgresql(conn)
    return _gather_mysql(conn)


def _connect_args(driver: str, connect_timeout: float) -> dict[str, Any]:
    args: dict[str, Any] = {}
    whole = max(2, math.ceil(connect_timeout))
    arg = _CONNECT_TIMEOUT_ARG.get(driver)
    if arg is not None:
        args[arg] = whole if driver in _INT_TIMEOUT else connect_timeout
    for name in _READ_TIMEOUT_ARGS.get(driver, ()):
        # the check's own queries are tiny; a read that takes longer is the server's trouble
        args[name] = whole if driver == "mysqldb" else connect_timeout
    # Name the session, so that whoever looks at pg_stat_activity sees who is asking.
    if driver in ("psycopg", "psycopg2", "psycopg_async", "pg8000"):
        args["application_name"] = APPLICATION_NAME
    elif driver == "asyncpg":
        args["server_settings"] = {"application_name": APPLICATION_NAME}
    return args


def gather(url: str, connect_timeout: float = 5.0) -> ServerFacts:
    """Connect once (no pool), read the limits and current usage, disconnect.

    Async driver URLs (asyncpg, aiomysql, ...) work as they are, so the check can be run
    with the application's own setting; they run on a private event loop.
    """
    try:
        u = parse_url(url)
    except UrlError as e:
        raise CheckError(f"--database-url {e}") from None
    shown = display_url(u)
    backend = u.get_backend_name()
    if backend not in DEFAULT_PORTS:
        raise CheckError(f"poolguard check supports PostgreSQL and MySQL/MariaDB, not {backend!r}")
    try:
        driver = str(u.get_dialect().driver)  # loads the dialect: unknown names fail here
    except Exception:  # NoSuchModuleError, or a third-party dialect that fails to load
        raise CheckError(f"unknown database driver in {shown}") from None
    connect_args = _connect_args(driver, connect_timeout)
    timed_out = CheckError(f"cannot connect to {shown}: timed out after {connect_timeout:g}s")
    try:
        if driver in _ASYNC_DRIVERS:
            return asyncio.run(_gather_async(u, connect_args, connect_timeout))
        return _bounded(lambda: _gather_sync(u, connect_args), connect_timeout, timed_out)
    except CheckError:
        raise
    except ModuleNotFoundError as e:
        raise CheckError(
            f"the {driver} driver is not installed ({e.name}): pip install it to check {shown}"
        ) from None
    except (asyncio.TimeoutError, TimeoutError):
        raise timed_out from None
    except Exception as e:
        orig = getattr(e, "orig", None)
        detail = str(orig if orig is not None else e) or type(e).__name__
        raise CheckError(f"cannot connect to {shown}: {sanitize(detail, url)}") from None


def _bounded(work: Any, connect_timeout: float, timed_out: CheckError) -> ServerFacts:
    """Run ``work`` on a daemon thread and wait for it at most the overall bound.

    A thread that is still blocked in the driver afterwards is abandoned: the check is a
    one-shot command and the process exits with it (a daemon thread does not hold it).
    """
    result: list[ServerFacts] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(work())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    t = threading.Thread(target=target, name="poolguard-check", daemon=True)
    t.start()
    t.join(connect_timeout * _OVERALL_FACTOR)
    if t.is_alive():
        raise timed_out
    if error:
        raise error[0]
    return result[0]


def _gather_sync(u: Any, connect_args: dict[str, Any]) -> ServerFacts:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(u, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            return _gather_on(conn)
    finally:
        engine.dispose()


async def _gather_async(u: Any, connect_args: dict[str, Any], timeout: float) -> ServerFacts:
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
    from sqlalchemy.pool import NullPool

    async def read(engine: AsyncEngine) -> ServerFacts:
        async with engine.connect() as conn:
            facts: ServerFacts = await conn.run_sync(_gather_on)
            return facts

    engine = create_async_engine(u, poolclass=NullPool, connect_args=connect_args)
    try:
        # Belt and braces: the driver's connect timeout bounds connecting, this bounds it all.
        return await asyncio.wait_for(read(engine), timeout * _OVERALL_FACTOR)
    finally:
        await engine.dispose()
