"""Per-database enforcement of statement time-outs on the server (or, for SQLite, in the
engine itself), chosen by the engine's dialect name."""

from __future__ import annotations

from sqlalchemy.engine import Dialect

from poolguard.dialects.base import Enforcer

__all__ = ["Enforcer", "enforcer_for"]


def enforcer_for(
    dialect: Dialect,
    *,
    pg_mode: str,
    lock_timeout: float | None,
    lock_timeout_explicit: bool,
    idle_in_transaction_timeout: float | None,
) -> Enforcer:
    name = dialect.name
    if name == "postgresql":
        from poolguard.dialects.postgresql import PostgreSQLEnforcer

        return PostgreSQLEnforcer(
            mode=pg_mode,
            lock_timeout=lock_timeout,
            idle_in_transaction_timeout=idle_in_transaction_timeout,
        )
    if name in ("mysql", "mariadb"):
        from poolguard.dialects.mysql import MySQLEnforcer

        return MySQLEnforcer(lock_timeout=lock_timeout)
    if name == "sqlite":
        from poolguard.dialects.sqlite import SQLiteEnforcer

        return SQLiteEnforcer(lock_timeout=lock_timeout, replace_busy_timeout=lock_timeout_explicit)
    from poolguard.dialects.base import ClientSideOnly

    return ClientSideOnly(name)
