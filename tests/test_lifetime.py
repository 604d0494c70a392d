"""A guard's lifetime follows its engine's: collected with it, alive again after fork(),
and never sharing capacity with a pool that belongs to another engine (issue #10, 3-5)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from poolguard import PoolGuard, PoolSaturated

MakeGuard = Callable[..., Any]


def _python(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter (no test fixture holds its guards)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_dropped_engines_are_collected_with_their_guards_and_threads() -> None:
    """20 engines guarded, used and dropped without close(): all 20 are collected, and
    every watchdog thread ends (before: 20 alive, 20 threads)."""
    out = _python(
        """
        import gc, threading, time, weakref
        import sqlalchemy as sa
        from poolguard import PoolGuard
        def use_one():
            e = sa.create_engine("sqlite://")
            PoolGuard(e, hold_timeout=0.4)          # no reference kept, as users often do
            with e.connect() as c:
                c.exec_driver_sql("select 1")
            return weakref.ref(e)
        refs = [use_one() for _ in range(20)]
        def threads():
            return sum(t.name.startswith("poolguard-watchdog") for t in threading.enumerate())
        print(threads())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            gc.collect()
            if not any(r() for r in refs) and threads() == 0:
                break
            time.sleep(0.05)
        print(sum(r() is not None for r in refs), threads())
        """
    )
    started, (alive, threads) = out.splitlines()[0], out.splitlines()[1].split()
    assert started == "20"
    assert (alive, threads) == ("0", "0")


def test_a_guard_that_is_still_referenced_keeps_working_after_gc(make_guard: MakeGuard) -> None:
    import gc

    engine = sa.create_engine("sqlite://")
    guard = make_guard(engine, hold_timeout=0.4)
    gc.collect()
    assert guard._watchdog.alive
    with engine.connect() as c:
        assert c.exec_driver_sql("select 1").scalar() == 1
        assert guard.checked_out == 1
    assert guard.checked_out == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_has_a_watchdog_and_forgets_the_parents_checkouts(
    tmp_path: Any,
) -> None:
    """SQLAlchemy's recipe under gunicorn --preload: the parent holds a connection when it
    forks; the child calls engine.dispose(close=False). In the child the gate is empty, a
    checkout of the full pool succeeds, and leaks are still reported (by a new watchdog)."""
    out = _python(
        f"""
        import os, threading, time
        import sqlalchemy as sa
        from poolguard import PoolGuard
        alerts = []
        e = sa.create_engine("sqlite:///{tmp_path}/f.db", pool_size=1, max_overflow=0)
        g = PoolGuard(e, hold_timeout=0.3, checkout_timeout=0.2,
                      on_alert=lambda a: alerts.append(a.kind))
        held = e.connect()                       # the parent's checkout, live at fork time
        held.exec_driver_sql("select 1")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            e.dispose(close=False)
            watchdogs = [t for t in threading.enumerate() if "poolguard-watchdog" in t.name]
            report = [len(watchdogs), g.checked_out, g.gate.held]
            c = e.connect()                      # the child's whole pool: one connection
            c.exec_driver_sql("select 1")
            time.sleep(1.5)                      # past hold_timeout: reported by the watchdog
            report.append("leak" in alerts)
            c.close()
            report.append(g.checked_out)
            os.write(w, repr(report).encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        print(os.read(r, 1000).decode())
        held.close()
        print(g.checked_out, g.gate.held, status)
        g.close()
        """
    )
    child, parent = out.splitlines()
    assert child == "[1, 0, 0, True, 0]"
    assert parent == "0 0 0"


def test_a_copied_engine_disposed_gets_a_pool_of_its_own(make_guard: MakeGuard) -> None:
    """copy.copy(engine) + dispose(): the copy's new pool is not the guarded engine's, so
    the two size-1 pools do not share the gate's one slot (before: the second checkout was
    PoolSaturated)."""
    engine = sa.create_engine("sqlite://", poolclass=sa.QueuePool, pool_size=1, max_overflow=0)
    guard = make_guard(engine, checkout_timeout=0.2)
    other = copy.copy(engine)
    other.dispose()
    assert other.pool is not engine.pool
    with engine.connect() as a:
        a.exec_driver_sql("select 1")
        assert guard.gate.held == 1
        with other.connect() as b:  # its own pool and capacity
            assert b.exec_driver_sql("select 2").scalar() == 2
        assert guard.gate.held == 1
        # The guarded engine's own pool is still gated: a second checkout waits and fails.
        with pytest.raises(PoolSaturated):
            engine.connect()
    other.dispose()
    assert guard.gate.held == 0


def test_the_guarded_engines_own_dispose_keeps_the_gate(make_guard: MakeGuard) -> None:
    engine = sa.create_engine("sqlite://", poolclass=sa.QueuePool, pool_size=1, max_overflow=0)
    guard = make_guard(engine, checkout_timeout=0.2)
    engine.dispose()
    with engine.connect() as a:
        a.exec_driver_sql("select 1")
        assert guard.gate.held == 1
        with pytest.raises(PoolSaturated):
            engine.connect()
    assert guard.gate.held == 0


def test_a_guard_on_an_engine_after_close_replaces_it() -> None:
    engine = sa.create_engine("sqlite://")
    first = PoolGuard(engine)
    with pytest.raises(RuntimeError, match="already has a PoolGuard"):
        PoolGuard(engine)
    first.close()
    second = PoolGuard(engine)
    try:
        with engine.connect() as c:
            c.exec_driver_sql("select 1")
            assert second.checked_out == 1 and first.checked_out == 0
    finally:
        second.close()
        engine.dispose()


def test_threads_left_after_close(make_guard: MakeGuard) -> None:
    engine = sa.create_engine("sqlite://")
    guard = make_guard(engine)
    name = guard._watchdog.name
    guard.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(t.name == name for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name == name for t in threading.enumerate())
