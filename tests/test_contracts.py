"""SQLAlchemy's own contracts hold with a guard installed (issue #10, items 6 and 8)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from poolguard import QueryTimeout

MakeGuard = Callable[..., Any]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> sa.Engine:
    if request.param == "sqlite":
        return sa.create_engine("sqlite://")
    url: str = request.getfixturevalue("pg_url")
    return sa.create_engine(url, pool_size=2, max_overflow=0)


def test_an_observer_added_after_the_guard_sees_every_statement(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    """A do_execute listener that returns None runs for each statement, as it does without
    poolguard (before: never called, since poolguard's listener ends SQLAlchemy's chain)."""
    guard = make_guard(engine)
    seen: list[str] = []

    def observe(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        seen.append(statement)

    event.listen(engine, "do_execute", observe)
    with engine.connect() as c:
        assert c.execute(sa.text("select :x"), {"x": 7}).scalar() == 7
        assert c.execute(sa.text("select 8")).scalar() == 8
    assert [s.lower().split()[0] for s in seen[-2:]] == ["select", "select"]
    assert len(seen) >= 2
    assert guard.stats()["statements"]  # poolguard still timed them


def test_a_later_listener_that_runs_the_statement_runs_it_once(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    """The first listener returning True executes the statement (SQLAlchemy's rule):
    poolguard does not run it a second time, and still applies its time-out."""
    make_guard(engine)
    ran: list[str] = []

    def run_it(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        ran.append(statement)
        cursor.execute(statement, parameters)
        return True

    event.listen(engine, "do_execute", run_it)
    with engine.connect() as c:
        assert c.execute(sa.text("select /* mine */ :x"), {"x": 3}).scalar() == 3
    # (the dialect's own first-connect queries pass through the listener too)
    assert len([st for st in ran if "mine" in st]) == 1


def test_executemany_and_no_params_listeners_run_too(make_guard: MakeGuard) -> None:
    engine = sa.create_engine("sqlite://")
    make_guard(engine)
    many: list[int] = []
    bare: list[str] = []
    event.listen(engine, "do_executemany", lambda cur, st, params, ctx: many.append(len(params)))
    event.listen(engine, "do_execute_no_params", lambda cur, st, ctx: bare.append(st))
    with engine.begin() as c:
        c.execution_options(no_parameters=True).exec_driver_sql("create table t (x int)")
        c.execute(sa.text("insert into t values (:x)"), [{"x": 1}, {"x": 2}, {"x": 3}])
        assert c.exec_driver_sql("select count(*) from t").scalar() == 3
    assert many == [3]
    assert any(s.startswith("create table") for s in bare)


def test_a_listener_removed_again_stops_being_called(make_guard: MakeGuard) -> None:
    engine = sa.create_engine("sqlite://")
    make_guard(engine)
    seen: list[str] = []

    def observe(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        seen.append(statement)

    event.listen(engine, "do_execute", observe)
    with engine.connect() as c:
        c.execute(sa.text("select 1"))
        event.remove(engine, "do_execute", observe)
        c.execute(sa.text("select 2"))
    assert len(seen) == 1


def test_connection_info_stays_the_applications(engine: sa.Engine, make_guard: MakeGuard) -> None:
    """Nothing of poolguard's lands in ``connection.info`` (before: its per-connection
    state did, which SQLAlchemy's test_connection_info and applications see)."""
    guard = make_guard(engine, statement_timeout=2.0)
    with engine.connect() as c:
        c.execute(sa.text("select 1"))
        with guard.budget(deadline=0.5):  # a tightened time-out: per-statement state
            c.execute(sa.text("select 2"))
        assert dict(c.info) == {}
        c.info["mine"] = 1
    with engine.connect() as c:
        assert dict(c.info) == {"mine": 1}  # the application's dict, kept by the pool


def test_the_time_out_still_applies_through_a_later_listener(
    pg_url: str, make_guard: MakeGuard
) -> None:
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    make_guard(engine, statement_timeout=0.3)
    event.listen(engine, "do_execute", lambda cur, st, params, ctx: None)
    with engine.connect() as c, pytest.raises(QueryTimeout) as ei:
        c.execute(sa.text("select pg_sleep(3)"))
    assert ei.value.cause == "statement"
