"""The OpenTelemetry semantic conventions poolguard follows (v1.44.0), and the literal-free
descriptions of exceptions and databases its signals carry. docs/telemetry.md is the
reference for every name here."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, cast

from poolguard.errors import PoolGuardError

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

#: The semantic-conventions release followed here (and announced as the scope's schema URL).
SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
SCOPE_NAME = "poolguard"

# -- attribute keys (semantic conventions) ------------------------------------------------------
DB_SYSTEM_NAME = "db.system.name"
DB_OPERATION_NAME = "db.operation.name"
DB_QUERY_SUMMARY = "db.query.summary"
DB_QUERY_TEXT = "db.query.text"
DB_RESPONSE_STATUS_CODE = "db.response.status_code"
DB_POOL_NAME = "db.client.connection.pool.name"
DB_CONNECTION_STATE = "db.client.connection.state"
ERROR_TYPE = "error.type"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"
# -- attribute keys (poolguard) -------------------------------------------------------------------
PG_FINGERPRINT = "poolguard.fingerprint"
PG_PARTITION = "poolguard.partition"
PG_PRIORITY = "poolguard.priority"
PG_TIMEOUT = "poolguard.timeout"
PG_OUTCOME = "poolguard.outcome"
PG_REFUSAL_KIND = "poolguard.refusal.kind"
PG_SHED_REASON = "poolguard.shed.reason"
PG_TRANSITION = "poolguard.quarantine.transition"

#: A pool wait shorter than this is the fast path (a free slot): it gets no span.
WAIT_SPAN_THRESHOLD_NS = 500_000

# Bucket advice. The convention gives boundaries for db.client.operation.duration; the SDK's
# default boundaries (0 .. 10000) were made for milliseconds and would put every wait measured
# in seconds into the first bucket, so the pool histograms get second-scale advice too.
OPERATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CREATE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
USE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# Dialect names that differ from the convention's well-known db.system.name values.
DB_SYSTEM_NAMES = {
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
    "postgres": "postgresql",
}
# A database status code is kept only if it looks like a code (SQLSTATE, SQLITE_*, a number):
# it must never become a channel for a message.
_STATUS_CODE = re.compile(r"[A-Z0-9_]{1,40}")


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class; builtins by their bare name (``TimeoutError``)."""
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    if not module or module == "builtins":
        return str(name)
    return f"{module}.{name}"


def _unwrap(exc: BaseException) -> BaseException:
    # SQLAlchemy wraps the driver's exception in a generic DBAPIError; the conventions prefer
    # the original. poolguard's own errors are the most relevant type and are kept as they are.
    if isinstance(exc, PoolGuardError):
        return exc
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException) and _is_sqlalchemy_wrapper(exc):
        return orig
    return exc


def _is_sqlalchemy_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("sqlalchemy.")


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of an exception: the qualified class name of the most relevant one."""
    return qualified_name(type(_unwrap(exc)))


def safe_message(exc: BaseException) -> str:
    """A message that cannot carry a literal.

    poolguard's own errors are built from fingerprints, summaries and numbers, so their text
    is kept; any other exception is described by its class name only.
    """
    if isinstance(exc, PoolGuardError):
        try:
            return str(exc)
        except Exception:  # a broken __str__ must not break reporting
            return type(exc).__name__
    return type(_unwrap(exc)).__name__


def response_status_code(exc: BaseException) -> str | None:
    """The database's status code (SQLSTATE, MySQL error number, SQLite error name), if any."""
    orig = _unwrap(exc)
    for attr in ("sqlstate", "pgcode", "sqlite_errorname"):
        value = getattr(orig, attr, None)
        if isinstance(value, str) and _STATUS_CODE.fullmatch(value):
            return value
    args = getattr(orig, "args", ())
    if (
        type(orig).__module__.split(".")[0] in ("pymysql", "MySQLdb", "aiomysql", "mysql")
        and args
        and type(args[0]) is int
    ):
        return str(args[0])
    return None


def db_system_name(dialect: Dialect) -> str:
    """The convention's ``db.system.name`` for a SQLAlchemy dialect (MariaDB told from MySQL)."""
    if getattr(dialect, "is_mariadb", False):
        return "mariadb"
    return DB_SYSTEM_NAMES.get(dialect.name, dialect.name)


# -- opentelemetry-instrumentation-sqlalchemy ----------------------------------------------------
_OTEL_SQLALCHEMY = "opentelemetry.instrumentation.sqlalchemy"


def instrumented_by_opentelemetry(engine: Engine | AsyncEngine) -> bool:
    """True when opentelemetry-instrumentation-sqlalchemy traces this engine's statements.

    That package registers a ``before_cursor_execute`` listener (a method of its
    ``EngineTracer``) on each engine it instruments, either on the engine itself
    (``instrument(engine=...)``) or on every engine created after a global ``instrument()``.
    Pass ``statement_spans=not instrumented_by_opentelemetry(engine)`` so that no statement is
    traced twice. Nothing of that package is imported.
    """
    target = cast("Engine", getattr(engine, "sync_engine", engine))
    return any(_from_otel(fn) for fn in target.dispatch.before_cursor_execute)


def _from_otel(fn: object, depth: int = 0) -> bool:
    if depth > 3:
        return False
    candidates: list[object] = [fn, getattr(fn, "__func__", None)]
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        candidates.append(type(owner))
    for c in candidates:
        module = getattr(c, "__module__", None)
        if isinstance(module, str) and (
            module == _OTEL_SQLALCHEMY or module.startswith(_OTEL_SQLALCHEMY + ".")
        ):
            return True
    # Listeners SQLAlchemy adapts (legacy signatures, retval wrappers) close over the original.
    inner = [getattr(fn, "__wrapped__", None)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return any(callable(x) and _from_otel(x, depth + 1) for x in inner)
