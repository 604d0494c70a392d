"""Every option is checked once, at construction, with a message naming it (issue #10
items 2, 15, 16; issue #12 item 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from poolguard import PoolGuard
from poolguard.validate import MAX_SECONDS

MakeGuard = Callable[..., Any]


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"checkout_timeout": 1e10}, ValueError, "checkout_timeout must be at most"),
        ({"statement_timeout": 3e6}, ValueError, "statement_timeout must be at most"),
        ({"lock_timeout": 3e6}, ValueError, "lock_timeout must be at most"),
        ({"idle_in_transaction_timeout": 3e6}, ValueError, "idle_in_transaction_timeout"),
        ({"hold_timeout": float("inf")}, ValueError, "hold_timeout"),
        ({"statement_timeout": float("nan")}, ValueError, "statement_timeout"),
        ({"statement_timeout": "5"}, TypeError, "statement_timeout"),
        ({"statement_timeout": True}, TypeError, "statement_timeout"),
        ({"capacity": 10**30}, ValueError, "capacity"),
        ({"capacity": 0}, ValueError, "capacity"),
        ({"critical_reserve": -1}, ValueError, "critical_reserve"),
        ({"partition_share": 0}, ValueError, "partition_share"),
        ({"slow_statement_threshold": 1e300}, ValueError, "slow_statement_threshold"),
        ({"quarantine_allow": [1]}, TypeError, "quarantine_allow"),
        ({"quarantine_allow": "select 1"}, TypeError, "quarantine_allow"),
        ({"quarantine_allow": 5}, TypeError, "quarantine_allow"),
        ({"quarantine_threshold": 0}, ValueError, "quarantine_threshold"),
        ({"quarantine_cooldown": -1}, ValueError, "quarantine_cooldown"),
        ({"on_alert": "print"}, TypeError, "on_alert"),
        ({"alert_debounce": -1}, ValueError, "alert_debounce"),
        ({"operation_metrics": "yes"}, TypeError, "operation_metrics"),
        ({"exception_events": 1}, TypeError, "exception_events"),
        ({"meter_provider": object()}, TypeError, "meter_provider"),
        ({"tracer_provider": 3}, TypeError, "tracer_provider"),
        ({"max_fingerprints": 0}, ValueError, "max_fingerprints"),
        ({"max_fingerprints": "many"}, TypeError, "max_fingerprints"),
        ({"pg_timeout_mode": "statement"}, ValueError, "pg_timeout_mode"),
        ({"trace_statements": "some"}, ValueError, "trace_statements"),
        ({"pool_name": ""}, TypeError, "pool_name"),
        ({"reclaim_leaked": "no"}, TypeError, "reclaim_leaked"),
        ({"bogus_option": 1}, TypeError, "bogus_option"),
        ({"fleet": "redis://"}, TypeError, "fleet"),
    ],
)
def test_a_wrong_option_fails_at_construction_naming_it(
    options: dict[str, Any], error: type[Exception], names: str
) -> None:
    engine = sa.create_engine("sqlite://")
    with pytest.raises(error, match=names):
        PoolGuard(engine, **options)
    # Nothing was left installed: a guard can still be built on the same engine.
    PoolGuard(engine).close()


def test_one_rule_per_option_across_the_parts() -> None:
    """The three disagreements of 0.1.0 end: zero is a valid slow-statement threshold and
    alert debounce everywhere; max_fingerprints' type error is a TypeError everywhere."""
    from poolguard.observe.stats import StatsRegistry

    engine = sa.create_engine("sqlite://")
    g = PoolGuard(engine, slow_statement_threshold=0, alert_debounce=0)
    g.close()
    with pytest.raises(TypeError, match="max_fingerprints"):
        PoolGuard(engine, max_fingerprints=1.5)
    with pytest.raises(TypeError):
        StatsRegistry(max_fingerprints=1.5)  # type: ignore[arg-type]


def test_the_largest_accepted_time_outs_work_on_postgresql(
    pg_url: str, make_guard: MakeGuard
) -> None:
    """At the bound, PostgreSQL takes the values (before: 3e6 s was accepted, then every
    checkout failed with DataError)."""
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    make_guard(
        engine,
        statement_timeout=MAX_SECONDS,
        lock_timeout=MAX_SECONDS,
        idle_in_transaction_timeout=MAX_SECONDS,
        checkout_timeout=MAX_SECONDS,
    )
    with engine.connect() as c:
        assert c.execute(sa.text("select 1")).scalar() == 1
        assert c.execute(sa.text("show statement_timeout")).scalar() in ("2147483647ms", "35791min")


def test_settings_in_stats_come_from_the_config(make_guard: MakeGuard) -> None:
    guard = make_guard(sa.create_engine("sqlite://"), statement_timeout=2.0, shed_target=0.01)
    s = guard.stats()["settings"]
    assert s["statement_timeout"] == 2.0
    assert s["lock_timeout"] == guard.config.timeouts.lock_timeout
    assert s["shed_target"] == 0.01
    assert s["timeout_enforcement"] == guard.enforcer.name


def test_admit_and_release_name_their_bad_arguments(make_guard: MakeGuard) -> None:
    guard = make_guard(sa.create_engine("sqlite://"))
    with pytest.raises(ValueError, match="priority"):
        guard.admit("bogus")
    with pytest.raises(TypeError, match="fingerprint"):
        guard.release(123)
    assert guard.admit("sheddable").admit


def test_partition_names_from_input_stay_bounded(make_guard: MakeGuard) -> None:
    """5,000 partition names from user input: statistics keep at most 200 plus "_OTHER"
    (before: 5,000 entries in stats()["shedding"] and 2,000 metric values)."""
    engine = sa.create_engine("sqlite://")
    guard = make_guard(engine)
    for i in range(5000):
        with guard.budget(partition=f"tenant-{i}"), engine.connect() as c:
            c.exec_driver_sql("select 1")
    levels = guard.stats()["shedding"]["levels"]
    assert len(levels) <= 201
    assert "_OTHER" in levels
    assert "tenant-0" in levels
