"""The gate on its own: bounded waits, partition caps, the critical reserve, async waiters
that never block the loop and give their place back when cancelled, and a randomised check
of its accounting; waiters interrupted by a signal handler, and waits longer than the OS
can take in one call."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from poolguard import PoolGuard
from poolguard.policy.gate import Gate, Ticket

NORMAL, CRITICAL, SHEDDABLE = 1, 0, 2


def assert_empty(g: Gate) -> None:
    snap = g.snapshot()
    assert snap.held == 0, snap
    assert snap.waiting == 0, snap
    assert snap.held_by_partition == {} and snap.waiting_by_partition == {}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": 4, "reserve": 4}, "critical_reserve"),
        ({"capacity": 4, "max_share": 0}, "partition_share"),
    ],
)
def test_bad_configuration_names_the_option(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Gate(**kwargs)


def test_fast_path_then_bounded_wait() -> None:
    g = Gate(2)
    a = g.acquire("p", NORMAL, 0.1)
    b = g.acquire("p", NORMAL, 0.1)
    assert a and b
    t0 = time.monotonic()
    assert g.acquire("p", NORMAL, 0.05) is None
    waited = time.monotonic() - t0
    assert 0.04 <= waited < 1.0
    assert g.timeouts_total == 1
    g.release(a)
    g.release(a)  # idempotent
    g.release(b)
    assert_empty(g)


def test_release_wakes_a_thread_waiter() -> None:
    g = Gate(1)
    held = g.acquire("p", NORMAL, 0.1)
    assert held is not None
    got: list[Ticket | None] = []
    th = threading.Thread(target=lambda: got.append(g.acquire("p", NORMAL, 5.0)))
    th.start()
    while g.waiting == 0:
        time.sleep(0.001)
    g.release(held)
    th.join(5)
    assert got and got[0] is not None and got[0].waited > 0
    g.release(got[0])
    assert_empty(g)


def test_partition_over_its_share_yields_to_another_partition() -> None:
    g = Gate(4, max_share=0.5)
    rogue = [g.acquire("rogue", NORMAL, 0.1) for _ in range(4)]  # work-conserving: nobody waits
    assert all(rogue)
    results: dict[str, Ticket | None] = {}

    def want(name: str) -> None:
        results[name] = g.acquire(name, NORMAL, 5.0)

    t_rogue = threading.Thread(target=want, args=("rogue",))
    t_rogue.start()
    while g.waiting < 1:
        time.sleep(0.001)
    t_healthy = threading.Thread(target=want, args=("healthy",))
    t_healthy.start()
    while g.waiting < 2:
        time.sleep(0.001)
    # The rogue queued first, but it is over its cap while "healthy" waits.
    g.release(rogue.pop())  # type: ignore[arg-type]
    t_healthy.join(5)
    assert results.get("healthy") is not None
    assert "rogue" not in results
    for t in rogue:
        g.release(t)  # type: ignore[arg-type]
    t_rogue.join(5)
    assert results["rogue"] is not None
    g.release(results["rogue"])  # type: ignore[arg-type]
    g.release(results["healthy"])  # type: ignore[arg-type]
    assert_empty(g)


def test_critical_reserve_is_kept_for_critical_work() -> None:
    g = Gate(4, reserve=1)
    normal = [g.acquire("p", NORMAL, 0.01) for _ in range(3)]
    assert all(normal)
    assert g.acquire("p", NORMAL, 0.01) is None
    assert g.acquire("p", SHEDDABLE, 0.01) is None
    crit = g.acquire("p", CRITICAL, 0.01)
    assert crit is not None
    for t in [*normal, crit]:
        g.release(t)  # type: ignore[arg-type]
    assert_empty(g)


def test_critical_waiters_are_served_before_normal_ones() -> None:
    g = Gate(1)
    held = g.acquire("p", NORMAL, 0.1)
    order: list[str] = []
    lock = threading.Lock()

    def want(name: str, rank: int) -> None:
        t = g.acquire("p", rank, 5.0)
        with lock:
            order.append(name)
        time.sleep(0.01)
        g.release(t)  # type: ignore[arg-type]

    ts = [threading.Thread(target=want, args=("normal", NORMAL))]
    ts[0].start()
    while g.waiting < 1:
        time.sleep(0.001)
    ts.append(threading.Thread(target=want, args=("critical", CRITICAL)))
    ts[1].start()
    while g.waiting < 2:
        time.sleep(0.001)
    g.release(held)  # type: ignore[arg-type]
    for t in ts:
        t.join(5)
    assert order == ["critical", "normal"]
    assert_empty(g)


async def test_async_waiter_does_not_block_the_loop_and_times_out() -> None:
    g = Gate(1)
    held = await g.acquire_async("p", NORMAL, 0.1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    tk = asyncio.create_task(ticker())
    assert await g.acquire_async("p", NORMAL, 0.1) is None
    tk.cancel()
    assert ticks >= 5  # the loop kept running while the waiter waited
    g.release(held)  # type: ignore[arg-type]
    assert_empty(g)


async def test_cancelled_async_waiter_gives_its_place_back() -> None:
    g = Gate(1)
    held = await g.acquire_async("p", NORMAL, 0.1)
    waiter = asyncio.create_task(g.acquire_async("p", NORMAL, 10.0))
    await asyncio.sleep(0.01)
    assert g.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert g.waiting == 0
    g.release(held)  # type: ignore[arg-type]
    assert_empty(g)


async def test_waiter_cancelled_right_after_its_grant_returns_the_slot() -> None:
    g = Gate(1)
    held = await g.acquire_async("p", NORMAL, 0.1)
    waiter = asyncio.create_task(g.acquire_async("p", NORMAL, 10.0))
    await asyncio.sleep(0.01)
    g.release(held)  # type: ignore[arg-type]  # grants the waiter...
    waiter.cancel()  # ...which is cancelled before it runs again
    try:
        t = await waiter
    except asyncio.CancelledError:
        t = None
    if t is not None:
        g.release(t)
    assert_empty(g)


async def test_thread_release_wakes_async_waiter_on_its_loop() -> None:
    g = Gate(1)
    held = g.acquire("p", NORMAL, 0.1)
    waiter = asyncio.create_task(g.acquire_async("p", NORMAL, 5.0))
    await asyncio.sleep(0.01)
    threading.Thread(target=g.release, args=(held,)).start()
    t = await asyncio.wait_for(waiter, 5)
    assert t is not None
    g.release(t)
    assert_empty(g)


_op = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from(["a", "b", "c"]), st.sampled_from([0, 1, 2])),
    st.tuples(st.just("release"), st.integers(0, 50), st.just(0)),
)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 8),
    reserve_frac=st.floats(0, 0.9),
    share=st.sampled_from([0.25, 0.5, 1.0]),
    ops=st.lists(_op, min_size=50, max_size=400),
)
def test_accounting_holds_under_random_operations(
    capacity: int, reserve_frac: float, share: float, ops: list[tuple[str, object, int]]
) -> None:
    reserve = min(capacity - 1, int(capacity * reserve_frac))
    g = Gate(capacity, reserve=reserve, max_share=share)
    held: list[Ticket] = []
    for kind, arg, rank in ops:
        if kind == "acquire":
            t = g.acquire(str(arg), rank, 0.0)
            if t is not None:
                held.append(t)
                # A non-critical grant never eats into the critical reserve.
                if rank != 0:
                    assert g.held <= capacity - reserve
        elif held:
            t = held.pop(int(arg) % len(held))  # type: ignore[call-overload]
            g.release(t)
        snap = g.snapshot()
        assert 0 <= snap.held <= capacity
        assert snap.held == len(held)
        assert sum(snap.held_by_partition.values()) == snap.held
        assert snap.waiting == 0
    for t in held:
        g.release(t)
    assert_empty(g)
    assert g.granted_total == g.released_total


@settings(max_examples=15, deadline=None)
@given(
    capacity=st.integers(1, 6),
    reserve_frac=st.floats(0, 0.5),
    share=st.sampled_from([0.34, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_accounting_holds_with_threads_waiting_and_timing_out(
    capacity: int, reserve_frac: float, share: float, seed: int
) -> None:
    """8 threads x 150 random operations with real waits, time-outs and releases: nothing
    is ever over-granted, and everything comes back."""
    import random

    reserve = min(capacity - 1, int(capacity * reserve_frac))
    g = Gate(capacity, reserve=reserve, max_share=share)
    violations: list[str] = []

    def worker(n: int) -> None:
        rnd = random.Random(seed + n)
        mine: list[Ticket] = []
        for _ in range(150):
            if mine and rnd.random() < 0.5:
                g.release(mine.pop(rnd.randrange(len(mine))))
                continue
            rank = rnd.choice([0, 1, 1, 2])
            t = g.acquire(rnd.choice("abc"), rank, rnd.choice([0.0, 0.0005, 0.002]))
            if t is not None:
                mine.append(t)
            held = g.held
            if held > capacity:
                violations.append(f"held {held} > capacity {capacity}")
        for t in mine:
            g.release(t)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not violations
    assert_empty(g)
    assert g.granted_total == g.released_total


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(1, 4))
async def test_accounting_holds_with_async_waiters_cancelled_at_random(
    seed: int, capacity: int
) -> None:
    import random

    rnd = random.Random(seed)
    g = Gate(capacity, max_share=0.5)

    async def user(n: int) -> None:
        for _ in range(20):
            t = await g.acquire_async(rnd.choice("ab"), rnd.choice([0, 1, 2]), 0.05)
            if t is None:
                continue
            try:
                await asyncio.sleep(rnd.choice([0, 0.001, 0.003]))
            finally:
                g.release(t)

    tasks = [asyncio.create_task(user(i)) for i in range(12)]
    for _ in range(30):
        await asyncio.sleep(rnd.choice([0, 0.001, 0.002]))
        victim = rnd.choice(tasks)
        victim.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert_empty(g)
    assert g.granted_total == g.released_total


def test_over_share_partition_leaves_headroom_while_others_are_active() -> None:
    g = Gate(15, reserve=1, max_share=0.5)  # share 7, headroom (15 - 1 - 7) // 2 = 3
    assert g.headroom == 3
    h = g.acquire("healthy", NORMAL, 0.0)  # healthy traffic is active...
    assert h is not None
    g.release(h)  # ...though it holds nothing right now
    rogue = []
    while (t := g.acquire("rogue", NORMAL, 0.0)) is not None:
        rogue.append(t)
    assert len(rogue) == 14 - 3  # borrowed beyond its share, but not the headroom
    got = g.acquire("healthy", NORMAL, 0.0)
    assert got is not None  # a healthy request finds a slot at once
    for t in [*rogue, got]:
        g.release(t)
    assert_empty(g)


def test_lone_partition_may_use_the_whole_pool() -> None:
    g = Gate(15, reserve=1, max_share=0.5)
    held = []
    while (t := g.acquire("only", NORMAL, 0.0)) is not None:
        held.append(t)
    assert len(held) == 14  # everything but the critical reserve: nobody else is active
    for t in held:
        g.release(t)
    assert_empty(g)


# -- a waiter interrupted inside the wait; timeouts past what the OS can wait ------------------


class SoftTimeLimit(Exception):
    """What Celery's soft time limit raises from its SIGALRM handler (KeyboardInterrupt for
    Ctrl-C is the same case: an exception raised by a signal handler inside the wait)."""


@contextlib.contextmanager
def interrupt_after(seconds: float, exc: type[BaseException] = SoftTimeLimit) -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise exc("interrupted in the wait")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _wait_interrupted(g: Gate, exc: type[BaseException]) -> None:
    with pytest.raises(exc), interrupt_after(0.1, exc):
        g.acquire("p", NORMAL, 30.0)


@pytest.mark.parametrize("exc", [SoftTimeLimit, KeyboardInterrupt])
def test_interrupted_thread_waiter_leaves_nothing_behind(exc: type[BaseException]) -> None:
    g = Gate(1)
    held = g.acquire("p", NORMAL, 0.1)
    assert held is not None
    _wait_interrupted(g, exc)
    assert (g.held, g.waiting) == (1, 0)  # no waiter left queued
    g.release(held)
    # No ghost was granted the freed slot: the next caller gets it at once.
    assert_empty(g)
    again = g.acquire("p", NORMAL, 0.0)
    assert again is not None
    g.release(again)
    assert_empty(g)
    assert g.granted_total == g.released_total


@pytest.mark.parametrize("timeout", [1e10, 1e300, math.inf])
def test_any_positive_timeout_waits_and_is_granted(timeout: float) -> None:
    """threading refuses waits past TIMEOUT_MAX (and past time_t: 1e10 s) with OverflowError;
    the gate waits in steps instead, and a release still wakes the waiter at once."""
    g = Gate(1)
    held = g.acquire("p", NORMAL, 0.1)
    got: list[Ticket | BaseException | None] = []

    def wait() -> None:
        try:
            got.append(g.acquire("p", NORMAL, timeout))
        except BaseException as e:  # the failure being tested for: reported, not hidden
            got.append(e)

    th = threading.Thread(target=wait)
    th.start()
    while g.waiting == 0 and not got:
        time.sleep(0.001)
    g.release(held)  # type: ignore[arg-type]
    th.join(10)
    assert got and isinstance(got[0], Ticket), got
    g.release(got[0])
    assert_empty(g)


@pytest.mark.parametrize("timeout", [1e10, math.inf])
async def test_any_positive_timeout_async(timeout: float) -> None:
    g = Gate(1)
    held = await g.acquire_async("p", NORMAL, 0.1)
    waiter = asyncio.create_task(g.acquire_async("p", NORMAL, timeout))
    while g.waiting == 0 and not waiter.done():
        await asyncio.sleep(0.001)
    g.release(held)  # type: ignore[arg-type]
    t = await asyncio.wait_for(waiter, 10)
    assert t is not None
    g.release(t)
    assert_empty(g)


@pytest.fixture(params=["sqlite", "postgresql"])
def one_slot_engine(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/gate.db"
    else:
        url = request.getfixturevalue("pg_url")
    eng = sa.create_engine(url, poolclass=sa.QueuePool, pool_size=1, max_overflow=0)
    yield eng
    eng.dispose()


def test_checkout_interrupted_at_the_gate_keeps_the_pool_usable(
    one_slot_engine: sa.Engine,
) -> None:
    """Through a real guard: a checkout interrupted while it waits for the one connection
    (Celery's soft time limit) must not leave a slot that nobody owns: with pool_size=1 that
    slot was the whole pool, and every later checkout was refused as saturated."""
    guard = PoolGuard(one_slot_engine, checkout_timeout=30.0)
    try:
        first = one_slot_engine.connect()
        first.execute(sa.text("SELECT 1"))
        with pytest.raises(SoftTimeLimit), interrupt_after(0.1):
            one_slot_engine.connect()
        assert (guard.gate.held, guard.gate.waiting) == (1, 0)
        assert guard.checked_out == 1
        first.close()
        assert (guard.gate.held, guard.gate.waiting) == (0, 0)
        with one_slot_engine.connect() as c:
            assert c.execute(sa.text("SELECT 1")).scalar() == 1
        assert guard.stats()["gate"]["held"] == 0
    finally:
        guard.close()


def _cycle(g: Gate, n: int) -> None:
    for _ in range(n):
        t = g.try_acquire("p", 1)
        assert t is not None
        g.release(t)


def test_the_drain_rate_is_a_busy_pools_and_sees_a_wedged_one() -> None:
    """The rate is read with the caller's clock: 100 releases in the first second read as
    about 100/s; a quiet spell nobody read does not lower it (a burst after it would
    otherwise be refused as a pool that cannot drain); a whole window without a release,
    read while requests arrive, reads as 0."""
    g = Gate(5)
    t0 = time.monotonic()
    assert g.drain_rate(t0) == 0.0  # nothing measured yet
    _cycle(g, 100)
    busy = g.drain_rate(t0 + 1.0)
    assert 90 <= busy <= 100
    _cycle(g, 3)  # three releases in a three-second quiet spell that nobody read
    assert g.drain_rate(t0 + 4.0) == busy
    assert g.drain_rate(t0 + 4.5) == busy  # within the next window: unchanged
    assert g.drain_rate(t0 + 5.0) == 0.0  # a whole window read on time, no release: wedged
    assert g.held == 0 and g.waiting == 0
