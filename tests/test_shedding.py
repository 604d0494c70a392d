"""The CoDel admission policy on an explicit fake clock: standing queues are shed lowest
priority first, draining queues never are, critical work never is, and a queue longer
than a round of the pool is refused at once."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolguard.core.budget import PRIORITY_RANK
from poolguard.policy.shedding import (
    ADMIT,
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    PRIORITIES,
    SEVERE_FACTOR,
    CoDelShedder,
    Decision,
    estimate_retry_after,
)

CRITICAL, NORMAL, SHEDDABLE = (PRIORITY_RANK[p] for p in ("critical", "normal", "sheddable"))
TARGET, INTERVAL = 0.005, 0.1
BAD = 0.02  # above target, below SEVERE_FACTOR * target
SEVERE = 2 * SEVERE_FACTOR * TARGET  # an overload: normal work is shed too
TICK = 0.01  # a checkout every 10 ms


def standing(s: CoDelShedder, start: float, end: float, sojourn: float = BAD) -> None:
    """Feed one checkout per TICK with the same queue delay over [start, end]."""
    n = round((end - start) / TICK)
    for i in range(n + 1):
        s.observe(sojourn, start + i * TICK)


def admits(s: CoDelShedder, rank: int, now: float, **kw: Any) -> bool:
    return s.decide(rank, now, **kw).admit


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target": 0}, ValueError, "target must be a positive"),
        ({"target": -0.005}, ValueError, "target"),
        ({"target": float("nan")}, ValueError, "target"),
        ({"target": "5ms"}, TypeError, "target must be a number"),
        ({"interval": float("inf")}, ValueError, "interval must be a positive"),
        ({"interval": True}, TypeError, "interval"),
        ({"target": 0.1, "interval": 0.1}, ValueError, "target must be shorter than interval"),
        ({"target": 0.2, "interval": 0.1}, ValueError, "target must be shorter than interval"),
    ],
)
def test_bad_configuration_names_the_option(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        CoDelShedder(**kwargs)


def test_defaults_are_the_classic_numbers() -> None:
    s = CoDelShedder()
    assert (s.target, s.interval) == (0.005, 0.1)
    assert PRIORITIES == ("critical", "normal", "sheddable")
    assert s.level(0.0) == 0
    assert not s.standing


# -- good queues -----------------------------------------------------------------------------------
def test_a_queue_that_drains_every_interval_never_sheds() -> None:
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    now = 0.0
    for _ in range(100):  # ten seconds of bursts that clear within each interval
        for i in range(9):
            s.observe(0.5, now + i * TICK)  # even half a second of delay...
        s.observe(0.0, now + 9 * TICK)  # ...as long as the queue empties once per interval
        now += INTERVAL - 0.001
        assert s.level(now) == 0
        assert admits(s, SHEDDABLE, now, oldest_wait=0.5, waiting=1, capacity=10)
    assert s.level(now) == 0  # as of the last sample, taken at ``now``


def test_an_empty_gate_at_admission_counts_as_a_drain() -> None:
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    standing(s, 0.0, 1.0, SEVERE)
    assert s.level(1.0) == 2
    # Nobody waits at the gate now (oldest_wait 0.0): the queue has drained.
    assert admits(s, SHEDDABLE, 1.0, oldest_wait=0.0, waiting=0, capacity=10)
    assert s.level(1.0) == 0


# -- standing queues -------------------------------------------------------------------------------
def test_a_standing_queue_sheds_sheddable_after_one_interval_then_normal() -> None:
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    standing(s, 0.0, 0.09)
    assert s.level(0.09) == 0
    standing(s, 0.1, 0.1)
    assert s.level(0.1) == 1
    d = s.decide(SHEDDABLE, 0.1, oldest_wait=BAD, waiting=3, capacity=10, drain_rate=100.0)
    assert d == Decision(False, "queue_delay", 1.0)
    assert admits(s, NORMAL, 0.1, oldest_wait=BAD, waiting=3, capacity=10)
    # A queue that stands but moves (BAD, under ten targets) never sheds normal work...
    standing(s, 0.11, 1.0)
    assert s.level(1.0) == 1
    assert admits(s, NORMAL, 1.0, oldest_wait=BAD, waiting=3, capacity=10)
    # ...an overload does.
    escalate = 1.01
    standing(s, escalate, escalate, SEVERE)
    assert s.level(escalate) == 2
    d = s.decide(NORMAL, escalate, oldest_wait=SEVERE, waiting=3, capacity=10)
    assert (d.admit, d.reason) == (False, "queue_delay")
    assert admits(s, CRITICAL, escalate, oldest_wait=SEVERE, waiting=3, capacity=10)


def test_a_wedged_pool_is_seen_through_the_oldest_waiter_alone() -> None:
    """No checkout completes, so observe() is never called: admissions still see it."""
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    assert admits(s, SHEDDABLE, 0.0, oldest_wait=0.004, waiting=2, capacity=10)
    assert admits(s, SHEDDABLE, 0.05, oldest_wait=0.03, waiting=2, capacity=10)
    assert admits(s, SHEDDABLE, 0.14, oldest_wait=0.049, waiting=2, capacity=10)
    assert not admits(s, SHEDDABLE, 0.16, oldest_wait=0.049, waiting=2, capacity=10)
    assert admits(s, NORMAL, 0.16, oldest_wait=0.049, waiting=2, capacity=10)


def test_a_severe_delay_sheds_normal_work_without_waiting_more_intervals() -> None:
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    severe = SEVERE_FACTOR * TARGET
    s.observe(BAD, 0.0)
    # Severe, but not standing for a whole interval yet: a burst is not overload.
    assert admits(s, NORMAL, 0.05, oldest_wait=severe * 2, waiting=1, capacity=10)
    assert s.level(0.05) == 0
    assert not admits(s, NORMAL, 0.1, oldest_wait=severe * 2, waiting=1, capacity=10)
    assert s.level(0.1) == 2
    # At exactly SEVERE_FACTOR * target it is merely standing again.
    s.observe(severe, 0.11)
    assert s.level(0.11) == 1


def test_a_queue_behind_a_growing_pool_sheds_no_normal_work() -> None:
    """While the pool opens connections to grow (a burst opening its overflow), a severe
    standing delay sheds sheddable work only; once it stops growing, normal work too."""
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    standing(s, 0.0, 0.2, sojourn=SEVERE)
    assert s.level(0.2) == 2
    assert admits(s, NORMAL, 0.2, oldest_wait=SEVERE, growing=True)
    assert not admits(s, SHEDDABLE, 0.2, oldest_wait=SEVERE, growing=True)
    d = s.decide(NORMAL, 0.2, oldest_wait=SEVERE, growing=False)
    assert not d.admit and d.reason == "queue_delay"


@pytest.mark.parametrize("level_at", [0.1, 0.3, 5.0])
def test_critical_is_never_shed(level_at: float) -> None:
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    standing(s, 0.0, level_at, sojourn=1.0)
    assert s.level(level_at) == 2
    d = s.decide(CRITICAL, level_at, oldest_wait=30.0, waiting=1000, capacity=1)
    assert d is ADMIT


# -- recovery --------------------------------------------------------------------------------------
def test_one_drain_ends_the_episode_and_reentry_takes_a_full_interval() -> None:
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    standing(s, 0.0, 0.5, SEVERE)
    assert s.level(0.5) == 2
    s.observe(TARGET, 0.51)  # at target counts as a drain
    assert not s.standing
    assert s.level(0.51) == 0
    assert admits(s, SHEDDABLE, 0.51, oldest_wait=TARGET, waiting=1, capacity=10)
    standing(s, 0.52, 0.61)
    assert s.level(0.61) == 0
    assert s.level(0.625) == 1  # a full interval after the first sample above target


def test_level_is_live_not_as_of_the_last_sample() -> None:
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    s.observe(BAD, 1.0)
    assert s.level(1.2) == 1  # nothing has drained since 1.0
    assert s.level(1.0) == 0  # the last sample, at 1.0, was not a whole interval in
    s.observe(BAD, 1.1)
    assert s.level(1.1) == 1


# -- no capacity -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rank", "capacity", "admitted_up_to"),
    [
        (NORMAL, 10, 9),
        (SHEDDABLE, 10, 4),
        (NORMAL, 5, 4),
        (SHEDDABLE, 5, 1),
        (NORMAL, 1, 0),
        (SHEDDABLE, 1, 0),  # half of one is rounded up to one, not down to "never"
        (SHEDDABLE, 2, 0),
        (SHEDDABLE, 3, 0),
    ],
)
def test_no_capacity(rank: int, capacity: int, admitted_up_to: int) -> None:
    s = CoDelShedder()
    assert admits(s, rank, 0.0, waiting=admitted_up_to, capacity=capacity)
    d = s.decide(rank, 0.0, waiting=admitted_up_to + 1, capacity=capacity, drain_rate=2.0)
    assert d.admit is False
    assert d.reason == "no_capacity"
    assert d.retry_after == math.ceil((admitted_up_to + 1) / 2.0)
    assert s.decide(CRITICAL, 0.0, waiting=10 * capacity, capacity=capacity) is ADMIT


def test_admission_shares_one_decision() -> None:
    s = CoDelShedder()
    assert s.decide(NORMAL, 0.0, waiting=0, capacity=10) is ADMIT
    assert Decision(True, None, 0.0) == ADMIT


# -- Retry-After -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("waiting", "drain_rate", "expected"),
    [
        (0, 0.0, 1.0),
        (10, 0.0, 1.0),  # unknown drain rate
        (10, -1.0, 1.0),
        (10, float("nan"), 1.0),
        (0, 50.0, 1.0),
        (10, 5.0, 2.0),
        (7, 2.0, 4.0),  # 3.5 s, rounded up to whole seconds
        (61, 2.0, 30.0),
        (10**9, 1e-300, 30.0),  # would overflow if it were not clamped first
        (10, float("inf"), 1.0),
    ],
)
def test_retry_after(waiting: int, drain_rate: float, expected: float) -> None:
    assert estimate_retry_after(waiting, drain_rate) == expected


@given(
    waiting=st.integers(0, 10**6),
    drain_rate=st.floats(allow_nan=True, allow_infinity=True),
    capacity=st.integers(1, 200),
    rank=st.sampled_from([NORMAL, SHEDDABLE]),
    oldest_wait=st.floats(0.0, 60.0),
)
def test_refusals_always_carry_a_bounded_whole_second_retry_after(
    waiting: int, drain_rate: float, capacity: int, rank: int, oldest_wait: float
) -> None:
    s = CoDelShedder()
    standing(s, 0.0, 0.3)
    d = s.decide(
        rank,
        0.3,
        oldest_wait=oldest_wait,
        waiting=waiting,
        capacity=capacity,
        drain_rate=drain_rate,
    )
    if d.admit:
        assert d is ADMIT
    else:
        assert MIN_RETRY_AFTER <= d.retry_after <= MAX_RETRY_AFTER
        assert d.retry_after == int(d.retry_after)
        assert d.reason in ("queue_delay", "no_capacity")


# -- random sample sequences -----------------------------------------------------------------------
samples = st.lists(
    st.tuples(st.floats(0.0, 0.05), st.floats(0.0, 0.2)),  # (gap since last, sojourn)
    max_size=200,
)


@given(samples)
def test_never_sheds_while_drains_are_less_than_an_interval_apart(
    seq: list[tuple[float, float]],
) -> None:
    """A drain (a sample at or below target) at least every interval keeps level 0, whatever
    the delays in between: CoDel's promise that bursts are never punished."""
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    now, last_drain = 0.0, 0.0
    s.observe(0.0, now)
    for gap, sojourn in seq:
        if now + gap - last_drain >= INTERVAL:
            sojourn = 0.0  # force the drain the property is about
        now += gap
        s.observe(sojourn, now)
        if sojourn <= TARGET:
            last_drain = now
        assert s.level(now) == 0


@given(samples)
def test_level_follows_the_time_since_the_queue_last_drained(
    seq: list[tuple[float, float]],
) -> None:
    """An independent statement of the rule: the level depends only on how long every
    sample has been above target, and on whether the latest one is severe."""
    s = CoDelShedder(target=TARGET, interval=INTERVAL)
    now = 0.0
    above_since: float | None = None
    for gap, sojourn in seq:
        now += gap
        s.observe(sojourn, now)
        if sojourn <= TARGET:
            above_since = None
        elif above_since is None:
            above_since = now
        for probe_at in (now, now + INTERVAL, now + 1.0):
            standing_for = -1.0 if above_since is None else probe_at - above_since
            if standing_for < INTERVAL:
                expected = 0
            elif sojourn > SEVERE_FACTOR * TARGET:
                expected = 2
            else:
                expected = 1  # standing but moving: only sheddable work is shed
            assert s.level(probe_at) == expected


def test_a_long_queue_that_drains_within_the_bound_is_a_healthy_burst() -> None:
    """With the checkout bound given (as the guard does), a queue as long as the pool is
    refused only when it would keep the request past that bound (a count alone refused
    healthy bursts on a pool that drains 1,000 checkouts a second)."""
    s = CoDelShedder(target=0.005, interval=0.1)
    normal = PRIORITY_RANK["normal"]
    fast = s.decide(normal, 0.0, waiting=20, capacity=15, drain_rate=1000.0, wait_bound=1.0)
    assert fast.admit
    slow = s.decide(normal, 0.0, waiting=20, capacity=15, drain_rate=10.0, wait_bound=1.0)
    assert not slow.admit and slow.reason == "no_capacity"
    stuck = s.decide(normal, 0.0, waiting=20, capacity=15, drain_rate=0.0, wait_bound=1.0)
    assert not stuck.admit and stuck.reason == "no_capacity"
    # Sheddable work gives up at half the queue and half the bound: 8 waiting at 10/s is
    # 0.8 s, past its 0.5 s.
    shed = s.decide(
        PRIORITY_RANK["sheddable"], 0.0, waiting=8, capacity=15, drain_rate=10.0, wait_bound=1.0
    )
    assert not shed.admit
