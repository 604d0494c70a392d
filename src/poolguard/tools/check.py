"""``poolguard check``: will the whole fleet's pools fit in the database server?

Every process sizes its own pool, so nobody sees the sum until a deploy or an autoscaler adds
replicas and the server answers "too many clients" to the healthy ones. This check does the
arithmetic against the live server's real limits::

    worst case = (pool_size + max_overflow) * workers * replicas + other_clients
    usable     = max_connections - superuser_reserved_connections - reserved_connections

and says OK or AT RISK, with the headroom, a per-process pool that fits, and the server-side
timeouts worth setting as a backstop (a server with ``statement_timeout = 0`` lets any client
that is not guarded hold a connection forever).

It reads PostgreSQL's or MySQL/MariaDB's settings as the connecting role sees them, so connect as
the application's role: a per-role ``ALTER ROLE ... SET statement_timeout`` is then what it sees.

Credentials never reach the output: the URL is only ever shown as ``driver://host:port/database``
and driver errors, which can echo the DSN, are scrubbed before they are printed.

Exit status: 0 OK, 1 AT RISK, 2 bad input or cannot connect (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, quote_plus

__all__ = [
    "Assessment",
    "CheckError",
    "Fleet",
    "ServerFacts",
    "assess",
    "configure_parser",
    "gather",
    "render_json",
    "render_text",
    "run",
    "safe_url",
    "sanitize",
]

Backend = Literal["postgresql", "mysql", "mariadb"]
Status = Literal["OK", "AT RISK"]

#: Default ports, so the display always has the ``host:port`` it promises.
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
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
#: Integer-only connect timeouts (libpq-based drivers; libpq also ignores values below 2).
_INT_TIMEOUT = frozenset({"psycopg", "psycopg2", "psycopg_async", "psycopg2cffi", "pymysql"})
#: PostgreSQL application_name of the check's own session.
APPLICATION_NAME = "poolguard check"
_ASYNC_DRIVERS = frozenset({"asyncpg", "psycopg_async", "aiomysql", "asyncmy", "aiosqlite"})


class CheckError(Exception):
    """Bad input or no connection; the message is one sanitised line."""


# --------------------------------------------------------------------------- credentials


def _parse_url(url: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
        if "@" in (u.host or ""):
            raise ValueError("unescaped '@'")  # host would show part of the password
        return u
    except (ArgumentError, ValueError):
        # Never echo the string: a malformed URL is often a password with an unescaped '@'.
        raise CheckError(
            "--database-url is not a valid SQLAlchemy URL (dialect+driver://user:password"
            "@host:port/database; escape special characters in the password with %XX)"
        ) from None


def safe_url(url: str) -> str:
    """``driver://host:port/database``: what may be shown of a URL (no user, no password,
    no query string, which can carry ``password=`` or ``sslkey=`` too)."""
    u = _parse_url(url)
    backend = u.get_backend_name()
    port = u.port or _DEFAULT_PORTS.get(backend)
    host = u.host or "localhost"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{u.drivername}://{host}{f':{port}' if port else ''}/{u.database or ''}"


_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_USER_PASS_AT = re.compile(r"[^\s:/@'\"(),]+:[^\s@/'\"]+@")
_KEY_VALUE = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|user|username)([\"']?\s*[=:]\s*)"
    # MySQL's "(using password: YES)" says whether one was sent, not what it was.
    r"(?!(?:YES|NO)\))"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;&)}]+)"
)


def sanitize(message: str, url: str | None = None) -> str:
    """Scrub anything credential-like from a driver's error message and keep one line.

    Drivers echo the DSN in some failures (``password=...`` from libpq, ``user:pass@host``
    from URL-shaped messages, ``'user'@'host'`` from MySQL). Patterns catch the shapes; the
    literal password (raw and percent-encoded) and quoted user name from ``url`` are removed
    too, whatever the shape around them.
    """
    text = " ".join(message.split())  # one line, whatever the driver sent
    if url:
        if url in text:
            text = text.replace(url, "<database url>")
        try:
            u = _parse_url(url)
        except CheckError:
            u = None
        if u is not None:
            if u.password:
                secret = str(u.password)
                for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
                    text = text.replace(form, "***")
            if u.username:
                name = re.escape(str(u.username))
                text = re.sub(rf"([\"'`]){name}\1", r"\1***\1", text)
                text = re.sub(rf"(?i)(\bfor user\s+){name}\b", r"\1***", text)
    text = _USERINFO.sub("", text)
    text = _USER_PASS_AT.sub("***@", text)
    text = _KEY_VALUE.sub(r"\1\2***", text)
    return text


# --------------------------------------------------------------------------- the facts


@dataclass(frozen=True)
class Fleet:
    """How the application is deployed. ``pool_size=0`` and ``max_overflow=-1`` mean
    "no limit" in SQLAlchemy, so the worst case is then unbounded (``None``)."""

    pool_size: int
    max_overflow: int
    workers: int
    replicas: int
    other_clients: int = 0

    def __post_init__(self) -> None:
        if self.pool_size < 0:
            raise ValueError("pool_size must be >= 0 (0 means no limit)")
        if self.max_overflow < -1:
            raise ValueError("max_overflow must be >= -1 (-1 means no limit)")
        if self.workers < 1 or self.replicas < 1:
            raise ValueError("workers and replicas must be >= 1")
        if self.other_clients < 0:
            raise ValueError("other_clients must be >= 0")

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
        return None if per is None else per * self.processes + self.other_clients


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


def _seconds_text(value: float) -> str:
    if value == 0:
        return "0 (disabled)"
    return f"{value:g}s"


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
    if pg:
        if t.get("statement_timeout") == 0:
            recs.append(
                "statement_timeout is 0 (disabled): set a server-side backstop for every "
                "client, e.g. ALTER ROLE <app role> SET statement_timeout = '30s'"
            )
        if t.get("idle_in_transaction_session_timeout") == 0:
            recs.append(
                "idle_in_transaction_session_timeout is 0 (disabled): a transaction left open "
                "holds its connection and its locks forever; e.g. ALTER ROLE <app role> SET "
                "idle_in_transaction_session_timeout = '60s'"
            )
    else:
        if t.get("max_statement_time") == 0:
            recs.append(
                "max_statement_time is 0 (disabled): set a server-side backstop, e.g. "
                "SET GLOBAL max_statement_time = 30"
            )
        if t.get("max_execution_time") == 0:
            recs.append(
                "max_execution_time is 0 (disabled): set a backstop for SELECTs, e.g. "
                "SET GLOBAL max_execution_time = 30000 (milliseconds)"
            )
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


# --------------------------------------------------------------------------- reading


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
    states = {
        str(r[0]): int(r[1])
        for r in conn.execute(
            text(
                "SELECT coalesce(state, 'unknown'), count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
                "GROUP BY 1 ORDER BY 1"
            )
        ).all()
    }
    return ServerFacts(
        backend="postgresql",
        version=f"PostgreSQL {version}",
        max_connections=int(settings["max_connections"][0]),
        reserved=reserved,
        current_connections=sum(states.values()),
        connection_states=states,
        timeouts=timeouts,
    )


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
        states = {
            str(r[0]): int(r[1])
            for r in conn.execute(
                text(
                    "SELECT COMMAND, COUNT(*) FROM information_schema.PROCESSLIST "
                    "WHERE ID <> CONNECTION_ID() AND COMMAND <> 'Daemon' "
                    "GROUP BY COMMAND ORDER BY COMMAND"
                )
            ).all()
        }
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


def gather(url: str, connect_timeout: float = 5.0) -> ServerFacts:
    """Connect once (no pool), read the limits and current usage, disconnect.

    Async driver URLs (asyncpg, aiomysql, ...) work as they are, so the check can be run
    with the application's own setting; they run on a private event loop.
    """
    u = _parse_url(url)
    backend = u.get_backend_name()
    if backend not in _DEFAULT_PORTS:
        raise CheckError(f"poolguard check supports PostgreSQL and MySQL/MariaDB, not {backend!r}")
    try:
        driver = str(u.get_dialect().driver)  # loads the dialect: unknown names fail here
    except Exception:  # NoSuchModuleError, or a third-party dialect that fails to load
        raise CheckError(f"unknown database driver in {safe_url(url)}") from None
    connect_args: dict[str, Any] = {}
    arg = _CONNECT_TIMEOUT_ARG.get(driver)
    if arg is not None:
        connect_args[arg] = (
            max(2, math.ceil(connect_timeout)) if driver in _INT_TIMEOUT else connect_timeout
        )
    # Name the session, so that whoever looks at pg_stat_activity sees who is asking.
    if driver in ("psycopg", "psycopg2", "psycopg_async", "pg8000"):
        connect_args["application_name"] = APPLICATION_NAME
    elif driver == "asyncpg":
        connect_args["server_settings"] = {"application_name": APPLICATION_NAME}
    try:
        if driver in _ASYNC_DRIVERS:
            return asyncio.run(_gather_async(u, connect_args, connect_timeout))
        return _gather_sync(u, connect_args)
    except CheckError:
        raise
    except ModuleNotFoundError as e:
        raise CheckError(
            f"the {driver} driver is not installed ({e.name}): pip install it to check "
            f"{safe_url(url)}"
        ) from None
    except asyncio.TimeoutError:
        raise CheckError(
            f"cannot connect to {safe_url(url)}: timed out after {connect_timeout:g}s"
        ) from None
    except Exception as e:
        orig = getattr(e, "orig", None)
        detail = str(orig if orig is not None else e) or type(e).__name__
        raise CheckError(f"cannot connect to {safe_url(url)}: {sanitize(detail, url)}") from None


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
        return await asyncio.wait_for(read(engine), timeout * 3)
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- rendering


def render_text(database: str, facts: ServerFacts, fleet: Fleet, verdict: Assessment) -> str:
    """The human report: the server's numbers, the fleet's arithmetic, the verdict, advice."""
    rows: list[tuple[str, str]] = [("max_connections", str(facts.max_connections))]
    if facts.reserved:
        parts = " + ".join(f"{v} {k}" for k, v in facts.reserved.items())
        rows.append(("reserved", f"{sum(facts.reserved.values())} ({parts})"))
    rows.append(("usable by applications", str(facts.usable)))
    current = str(facts.current_connections)
    if facts.connection_states:
        current += " (" + ", ".join(f"{k} {v}" for k, v in facts.connection_states.items()) + ")"
    rows.append(("open now (besides this check)", current))
    rows += [(name, _seconds_text(v)) for name, v in facts.timeouts.items()]
    width = max(len(k) for k, _ in rows)
    out = [f"poolguard check: {database} ({facts.version})", "", "server"]
    out += [f"  {k.ljust(width)}  {v}" for k, v in rows]

    pool = f"pool_size {fleet.pool_size} + max_overflow {fleet.max_overflow}"
    worst = "unbounded" if verdict.worst_case is None else str(verdict.worst_case)
    out += [
        "",
        "fleet worst case",
        f"  ({pool}) x {fleet.workers} workers x {fleet.replicas} replicas "
        f"+ {fleet.other_clients} other clients = {worst}",
        "",
    ]
    if verdict.status == "OK":
        out.append(
            f"OK: at most {worst} of {verdict.usable} usable connections "
            f"({verdict.headroom} to spare)"
        )
    elif verdict.headroom is None:
        out.append(f"AT RISK: the fleet's pools are unbounded; the server accepts {verdict.usable}")
    else:
        out.append(
            f"AT RISK: the fleet can open {worst} connections, {-verdict.headroom} more than "
            f"the {verdict.usable} the server accepts"
        )
    if verdict.recommendations:
        out += ["", "recommendations"]
        out += [f"  - {r}" for r in verdict.recommendations]
    return "\n".join(out) + "\n"


def render_json(database: str, facts: ServerFacts, fleet: Fleet, verdict: Assessment) -> str:
    """The machine report (for deploy pipelines that gate on the status)."""
    doc = {
        "status": verdict.status,
        "database": database,
        "server": {
            "backend": facts.backend,
            "version": facts.version,
            "max_connections": facts.max_connections,
            "reserved": dict(facts.reserved),
            "usable": facts.usable,
            "current_connections": facts.current_connections,
            "connection_states": dict(facts.connection_states),
            "timeouts": dict(facts.timeouts),
        },
        "fleet": {
            "pool_size": fleet.pool_size,
            "max_overflow": fleet.max_overflow,
            "workers": fleet.workers,
            "replicas": fleet.replicas,
            "other_clients": fleet.other_clients,
        },
        "worst_case": verdict.worst_case,
        "usable": verdict.usable,
        "headroom": verdict.headroom,
        "fits_per_process": verdict.fits_per_process,
        "recommendations": list(verdict.recommendations),
    }
    return json.dumps(doc, indent=2) + "\n"


# --------------------------------------------------------------------------- command line


def _int_at_least(minimum: int, note: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{note}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``check``'s arguments to its sub-parser (the CLI owns the parser tree)."""
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL of the server; defaults to $POOLGUARD_DATABASE_URL or "
        "$DATABASE_URL (prefer those: a password on the command line shows in ps)",
    )
    parser.add_argument(
        "--pool-size",
        type=_int_at_least(0, " (0 means no limit)"),
        default=5,
        help="each process's pool_size (default 5, SQLAlchemy's)",
    )
    parser.add_argument(
        "--max-overflow",
        type=_int_at_least(-1, " (-1 means no limit)"),
        default=10,
        help="each process's max_overflow (default 10, SQLAlchemy's)",
    )
    parser.add_argument(
        "--workers", type=_int_at_least(1), required=True, help="processes per replica"
    )
    parser.add_argument(
        "--replicas", type=_int_at_least(1), required=True, help="replicas (pods, hosts)"
    )
    parser.add_argument(
        "--other-clients",
        type=_int_at_least(0),
        default=0,
        help="connections used by everything else: jobs, cron, admin, replication (default 0)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting after this long (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    """Run ``poolguard check`` from parsed arguments; returns the exit status."""
    url = (
        args.database_url
        or os.environ.get("POOLGUARD_DATABASE_URL")
        or (os.environ.get("DATABASE_URL"))
    )
    if not url:
        print(
            "poolguard check: give --database-url (or set POOLGUARD_DATABASE_URL)",
            file=sys.stderr,
        )
        return 2
    try:
        fleet = Fleet(
            pool_size=args.pool_size,
            max_overflow=args.max_overflow,
            workers=args.workers,
            replicas=args.replicas,
            other_clients=args.other_clients,
        )
        database = safe_url(url)
        facts = gather(url, args.connect_timeout)
    except CheckError as e:
        print(f"poolguard check: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a one-shot command: a traceback could carry the URL
        print(
            f"poolguard check: unexpected {type(e).__name__}: {sanitize(str(e), url)}",
            file=sys.stderr,
        )
        return 2
    verdict = assess(facts, fleet)
    render = render_json if args.json else render_text
    sys.stdout.write(render(database, facts, fleet, verdict))
    return 0 if verdict.status == "OK" else 1
