"""Saturation and connection-storm alerts through a real guard on a real PostgreSQL, delivered
to ``on_alert``: the pool's own behaviour raises them, not a detector fed by hand."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from poolguard import PoolGuard
from poolguard.observe.alerts import Alert

pytestmark = pytest.mark.postgresql
MakeGuard = Callable[..., PoolGuard]


def _until(cond: Callable[[], bool], within: float = 30.0) -> bool:
    end = time.monotonic() + within
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_sustained_saturation_alerts_once(make_guard: MakeGuard, pg_url: str) -> None:
    """A pool whose queue does not drain for 5 s (the detector's sustain) is an incident:
    one ``saturation`` alert, naming the pool and the queue, however long it lasts."""
    alerts: list[Alert] = []
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    # hold_timeout sets the watchdog's period (a quarter of it, at most 1 s).
    guard = make_guard(engine, checkout_timeout=60.0, hold_timeout=0.4, on_alert=alerts.append)
    held = engine.connect()
    held.execute(sa.text("select 1"))
    waiter = threading.Thread(target=lambda: engine.connect().close())
    waiter.start()
    try:
        assert _until(lambda: any(a.kind == "saturation" for a in alerts)), alerts
        time.sleep(1.0)  # still saturated: no second alert
    finally:
        held.close()
        waiter.join(60)
    saturation = [a for a in alerts if a.kind == "saturation"]
    assert len(saturation) == 1
    assert saturation[0].attributes["pool"] == guard.pool_name
    assert saturation[0].attributes["waiting"] == 1
    assert saturation[0].attributes["held"] == 1


def test_short_wait_raises_no_saturation_alert(make_guard: MakeGuard, pg_url: str) -> None:
    """A burst the gate absorbs is not an incident."""
    alerts: list[Alert] = []
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    make_guard(engine, checkout_timeout=60.0, hold_timeout=0.4, on_alert=alerts.append)
    held = engine.connect()
    waiter = threading.Thread(target=lambda: engine.connect().close())
    waiter.start()
    time.sleep(0.5)
    held.close()
    waiter.join(60)
    time.sleep(0.3)  # a few more watchdog rounds
    assert [a for a in alerts if a.kind == "saturation"] == []


def test_connection_storm_alerts(make_guard: MakeGuard, pg_url: str) -> None:
    """Clients reconnecting in a loop (no pooling, or a pool that keeps losing its
    connections) cost the server a process each: more new connections within 10 s than
    twice the pool's capacity (at least 10) raise one ``connection_storm`` alert."""
    alerts: list[Alert] = []
    engine = sa.create_engine(pg_url, poolclass=sa.NullPool)
    guard = make_guard(engine, on_alert=alerts.append)
    threshold = max(10, 2 * guard.gate.capacity)
    for _ in range(threshold):
        with engine.connect() as c:
            c.execute(sa.text("select 1"))
    assert [a for a in alerts if a.kind == "connection_storm"] == []  # at the threshold
    for _ in range(5):
        with engine.connect() as c:
            c.execute(sa.text("select 1"))
    storms = [a for a in alerts if a.kind == "connection_storm"]
    assert len(storms) == 1  # one alert for the storm, not one per connection
    assert storms[0].attributes["threshold"] == threshold
    assert storms[0].attributes["pool"] == guard.pool_name
