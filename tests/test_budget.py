"""Budget scopes: validation, nesting that only tightens, counters, and context propagation
into the thread pool that Starlette and FastAPI run ``def`` endpoints on."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.concurrency import run_in_threadpool

from poolguard import Budget, BudgetExceeded
from poolguard.core.budget import current_scope, scope_context


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"deadline": 0}, "deadline"),
        ({"deadline": -1.0}, "deadline"),
        ({"deadline": float("inf")}, "deadline"),
        ({"statement_timeout": "2"}, "statement_timeout"),
        ({"max_queries": 0}, "max_queries"),
        ({"max_queries": 1.5}, "max_queries"),
        ({"max_db_time": True}, "max_db_time"),
        ({"max_connections": -2}, "max_connections"),
        ({"priority": "urgent"}, "priority"),
        ({"partition": ""}, "partition"),
    ],
)
def test_bad_budget_fails_at_construction_naming_the_option(kwargs: dict, name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        Budget(**kwargs)


def test_scope_is_visible_inside_and_gone_after() -> None:
    assert current_scope() is None
    with scope_context(Budget(deadline=1.0)) as s:
        assert current_scope() is s
    assert current_scope() is None


def test_inner_scope_can_only_tighten_the_deadline() -> None:
    with scope_context(Budget(deadline=0.5)) as outer:
        with scope_context(Budget(deadline=10.0)) as inner:
            assert inner.deadline_at == outer.deadline_at
        with scope_context(Budget(deadline=0.1)) as tighter:
            assert tighter.deadline_at is not None and outer.deadline_at is not None
            assert tighter.deadline_at < outer.deadline_at


def test_inner_scope_cannot_raise_priority() -> None:
    with scope_context(Budget(priority="sheddable")):
        with scope_context(Budget(priority="critical")) as inner:
            assert inner.priority == "sheddable"
    with scope_context(Budget(priority="critical")):
        with scope_context(Budget(priority="normal")) as inner:
            assert inner.priority == "normal"


def test_statement_timeout_is_min_of_scope_timeout_and_time_left() -> None:
    with scope_context(Budget(deadline=0.2, statement_timeout=5.0)) as s:
        t = s.admit_statement(2.0, time.monotonic())
        assert t is not None and 0.0 < t <= 0.2
    with scope_context(Budget(deadline=60.0, statement_timeout=0.3)) as s:
        assert s.admit_statement(2.0, time.monotonic()) == pytest.approx(0.3)
    with scope_context(Budget(deadline=60.0)) as s:
        assert s.admit_statement(2.0, time.monotonic()) == pytest.approx(2.0)


def test_no_statement_starts_past_the_deadline() -> None:
    with scope_context(Budget(deadline=0.01)) as s:
        with pytest.raises(BudgetExceeded) as ei:
            s.admit_statement(2.0, time.monotonic() + 0.02)
    assert ei.value.limit == "deadline"
    assert ei.value.http_status == 504


def test_max_queries_counts_in_every_enclosing_scope() -> None:
    with scope_context(Budget(max_queries=3)) as outer:
        with scope_context(Budget(max_queries=10)) as inner:
            for _ in range(3):
                inner.admit_statement(None, time.monotonic())
                inner.record_statement(0.001)
            with pytest.raises(BudgetExceeded) as ei:
                inner.admit_statement(None, time.monotonic())
    assert ei.value.limit == "max_queries"
    assert outer.queries == 3 and inner.queries == 3


def test_max_db_time_bounds_the_next_statement_timeout() -> None:
    with scope_context(Budget(max_db_time=1.0)) as s:
        s.record_statement(0.75)
        t = s.admit_statement(5.0, time.monotonic())
        assert t == pytest.approx(0.25)
        s.record_statement(0.3)
        with pytest.raises(BudgetExceeded, match="max_db_time"):
            s.admit_statement(5.0, time.monotonic())


def test_max_connections_refuses_the_extra_connection_and_counts_back() -> None:
    with scope_context(Budget(max_connections=1)) as s:
        s.admit_connection()
        with pytest.raises(BudgetExceeded, match="max_connections"):
            s.admit_connection()
        assert s.connections == 1
        s.release_connection()
        s.admit_connection()
        s.release_connection()
        assert s.connections == 0


def test_scope_cannot_be_entered_twice() -> None:
    ctx = scope_context(Budget())
    with ctx, pytest.raises(RuntimeError, match="twice"):
        ctx.__enter__()


async def test_scope_follows_work_into_starlettes_thread_pool() -> None:
    async with scope_context(Budget(deadline=3.0, partition="GET /items")) as s:
        seen = await run_in_threadpool(current_scope)
        assert seen is s
        assert seen is not None and seen.partition == "GET /items"


async def test_concurrent_tasks_have_separate_scopes() -> None:
    async def work(name: str) -> str | None:
        async with scope_context(Budget(partition=name)):
            await asyncio.sleep(0.01)
            s = current_scope()
            return s.partition if s else None

    got = await asyncio.gather(*(work(f"p{i}") for i in range(10)))
    assert got == [f"p{i}" for i in range(10)]
    assert current_scope() is None


def test_a_root_scope_may_be_critical() -> None:
    with scope_context(Budget(priority="critical")) as s:
        assert s.priority == "critical"
        with scope_context(Budget()) as inner:
            assert inner.priority == "critical"  # inherited
