"""poolguard's errors never carry the driver's message, statement text or parameters.

Application logs print ``repr(e)``, ``str(e)`` and ``e.args``, and SQLAlchemy's own message
methods; a driver's message can hold values (PostgreSQL's ``CONTEXT: SQL statement "..."``
line shows what a PL/pgSQL function interpolated). ``.orig`` keeps the driver's exception for
code that asks for it on purpose: that is SQLAlchemy's ``DBAPIError`` contract.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from poolguard import BudgetExceeded, PoolSaturated, QueryQuarantined, QueryTimeout
from poolguard.errors import PoolGuardError, Shed

MakeGuard = Callable[..., Any]
SECRET = "s3cr3t-value-4711"


def _everything_a_log_prints(e: BaseException) -> str:
    """Every rendering of the exception itself that logging code commonly uses."""
    texts = [
        str(e),
        repr(e),
        repr(e.args),
        "".join(traceback.format_exception_only(type(e), e)),
    ]
    if isinstance(e, sa.exc.SQLAlchemyError):
        texts += [
            sa.exc.SQLAlchemyError.__str__(e),
            e._message(),
            e._sql_message(),
        ]
    if isinstance(e, sa.exc.StatementError):
        texts.append(repr(e.params))
    return "\n".join(texts)


def _assert_clean(e: QueryTimeout) -> None:
    printed = _everything_a_log_prints(e)
    assert SECRET not in printed
    assert "CONTEXT" not in printed
    assert "[SQL:" not in printed
    assert e.args == (str(e),)
    assert str(e).startswith("QueryTimeout: ")
    assert e.params is None
    assert isinstance(e, sa.exc.OperationalError)
    # the statement stands in as its literal-free normal form
    assert e.statement is not None and SECRET not in e.statement
    again = pickle.loads(pickle.dumps(e))
    assert SECRET not in repr(again) and again.args == e.args


@pytest.mark.postgresql
def test_postgresql_timeout_inside_plpgsql_with_a_bound_value(
    make_guard: MakeGuard, pg_url: str
) -> None:
    # The function is made and dropped outside the guard: under 0.2 s a loaded CI machine's
    # COMMIT of the DDL can itself run into the statement time-out (seen once in CI).
    setup = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with setup.begin() as c:
        c.exec_driver_sql(
            """
            CREATE OR REPLACE FUNCTION pg_h3_slow_lookup(secret text) RETURNS int
            LANGUAGE plpgsql AS $$
            BEGIN
              EXECUTE format('SELECT pg_sleep(2) WHERE %%L IS NOT NULL', secret);
              RETURN 1;
            END $$
            """
        )
    engine = sa.create_engine(pg_url)
    make_guard(engine, statement_timeout=0.2)
    try:
        with engine.connect() as c, pytest.raises(QueryTimeout) as ei:
            c.execute(sa.text("SELECT pg_h3_slow_lookup(:s)"), {"s": SECRET})
        e = ei.value
        # the driver's message really holds the value: the test would see a leak
        assert SECRET in str(e.orig)
        assert "CONTEXT" in str(e.orig)
        _assert_clean(e)
        assert "SELECT" in str(e) and e.fingerprint in str(e)
    finally:
        with setup.begin() as c:
            c.exec_driver_sql("DROP FUNCTION IF EXISTS pg_h3_slow_lookup(text)")
        setup.dispose()


@pytest.mark.mariadb
def test_mariadb_timeout_with_a_bound_value(make_guard: MakeGuard, mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    make_guard(engine, statement_timeout=0.2)
    with engine.connect() as c, pytest.raises(QueryTimeout) as ei:
        c.execute(sa.text("SELECT sleep(2), :s AS tag"), {"s": SECRET})
    e = ei.value
    assert e.orig is not None
    _assert_clean(e)


def test_sqlalchemy_message_methods_print_only_poolguard_fields() -> None:
    orig = RuntimeError(f"canceling statement\nCONTEXT: SQL statement \"SELECT '{SECRET}'\"")
    e = QueryTimeout(
        fingerprint="0123456789abcdef",
        summary="SELECT users",
        normalized="select * from users where name = ?",
        timeout=0.5,
        elapsed=0.51,
        orig=orig,
    )
    _assert_clean(e)
    assert e.orig is orig
    e.add_detail(f"detail with {SECRET}")  # SQLAlchemy adds details in some paths
    assert SECRET not in _everything_a_log_prints(e)


@pytest.mark.parametrize(
    "err",
    [
        PoolSaturated(waited=0.25, limit=0.25, partition="GET /users"),
        BudgetExceeded("max_queries", used=21, allowed=20),
        QueryQuarantined(
            fingerprint="0123456789abcdef", summary="SELECT t", retry_after=3.0, partition="GET /"
        ),
        Shed(reason="queue_delay", retry_after=1.0, partition="GET /"),
    ],
)
def test_other_errors_print_only_their_own_fields(err: PoolGuardError) -> None:
    assert err.args == (str(err),)
    assert repr(err) == f"{type(err).__name__}({str(err)!r})"
    assert "\n" not in str(err)  # one log line
    again = pickle.loads(pickle.dumps(err))  # worker pools send errors between processes
    assert type(again) is type(err) and again.args == err.args
    # every field survives, the partition too (a 503's body and metrics are built from them)
    assert again.__dict__ == err.__dict__
