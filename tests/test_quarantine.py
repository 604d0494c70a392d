"""The quarantine circuit breaker as a pure state machine, on an explicit fake clock.

Scenario tests pin each transition; a rule-based hypothesis machine then drives random
sequences of checks, outcomes, releases, allow-list changes and clock advances, and checks
the invariants that the guard relies on.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import poolguard.policy.quarantine as quarantine_module
from poolguard.policy.quarantine import (
    MAX_TRACKED,
    PROBE_RETRY,
    Quarantine,
    QuarantineEntry,
    Transition,
)

FP = "0123456789abcdef"
OTHER = "fedcba9876543210"
SUMMARY = "SELECT FROM orders WHERE ..."


def tripped(q: Quarantine, fp: str = FP, at: float = 0.0) -> Transition:
    """Time ``fp`` out ``threshold`` times at ``at``; return the "opened" transition."""
    t: Transition | None = None
    for _ in range(q.threshold):
        t = q.record_timeout(fp, SUMMARY, at)
    assert t is not None
    assert t.kind == "opened"
    return t


def probe(q: Quarantine, at: float, fp: str = FP) -> None:
    """Let the probe through at ``at`` (fails the test if it is refused)."""
    assert q.check(fp, at) is None


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"threshold": 0}, ValueError, "threshold must be an int >= 1, got 0"),
        ({"threshold": 2.0}, TypeError, "threshold must be an int >= 1"),
        ({"threshold": True}, TypeError, "threshold"),
        ({"window": 0}, ValueError, "window must be a positive"),
        ({"window": float("inf")}, ValueError, "window"),
        ({"window": "60"}, TypeError, "window must be a number"),
        ({"cooldown": -1.0}, ValueError, "cooldown must be a positive"),
        ({"cooldown": float("nan")}, ValueError, "cooldown"),
        ({"max_cooldown": 0.0}, ValueError, "max_cooldown must be a positive"),
        ({"cooldown": 60.0, "max_cooldown": 30.0}, ValueError, "max_cooldown must be >= cooldown"),
        ({"allow": FP}, TypeError, "allow must be an iterable"),
        ({"allow": [FP, 7]}, TypeError, "fingerprint id"),
    ],
)
def test_bad_configuration_names_the_option(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Quarantine(**kwargs)


def test_defaults_and_ints_accepted() -> None:
    q = Quarantine(window=60, cooldown=30, max_cooldown=30)
    assert (q.threshold, q.window, q.cooldown, q.max_cooldown) == (3, 60.0, 30.0, 30.0)
    assert q.active is False
    assert q.entries(0.0) == []


# -- opening ---------------------------------------------------------------------------------------
def test_threshold_within_window_opens() -> None:
    q = Quarantine(threshold=3, window=60.0, cooldown=30.0)
    assert q.record_timeout(FP, SUMMARY, 0.0) is None
    assert q.record_timeout(FP, SUMMARY, 10.0) is None
    assert q.active is False
    assert q.check(FP, 10.0) is None
    t = q.record_timeout(FP, SUMMARY, 59.0)
    assert t == Transition("opened", FP, SUMMARY, 30.0, 3)
    assert q.active is True
    assert q.entries(59.0) == [QuarantineEntry(FP, SUMMARY, "open", 59.0, 89.0, 1)]
    assert q.tracked == 0  # the strikes moved into the breaker
    assert q.check(OTHER, 59.0) is None  # only that fingerprint is refused


def test_threshold_one_opens_on_the_first_timeout() -> None:
    q = Quarantine(threshold=1)
    t = q.record_timeout(FP, SUMMARY, 5.0)
    assert t is not None
    assert t.kind == "opened"
    assert t.timeouts == 1


def test_timeouts_spread_beyond_the_window_do_not_open() -> None:
    q = Quarantine(threshold=3, window=60.0)
    # The window is (now - 60, now]: the first stamp expires exactly at 60.
    assert q.record_timeout(FP, SUMMARY, 0.0) is None
    assert q.record_timeout(FP, SUMMARY, 30.0) is None
    assert q.record_timeout(FP, SUMMARY, 60.0) is None
    assert q.active is False
    assert q.check(FP, 60.0) is None
    # The window slides: 30 and 60 are still in it, so one more within 90 opens.
    t = q.record_timeout(FP, SUMMARY, 61.0)
    assert t is not None
    assert t.kind == "opened"


def test_closed_fingerprints_ignore_success_and_error() -> None:
    q = Quarantine(threshold=2)
    assert q.record_timeout(FP, SUMMARY, 0.0) is None
    assert q.record_success(FP, 1.0) is None
    q.record_error(FP, 1.0)
    # Successes do not forgive time-outs: the window is about time-outs only.
    t = q.record_timeout(FP, SUMMARY, 2.0)
    assert t is not None
    assert t.kind == "opened"


def _peak_allocation(call: Callable[[str, float], object], times: list[float]) -> int:
    """Bytes allocated at the peak of a loop of calls, above what was live before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        for now in times:
            call(FP, now)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def test_closed_fingerprint_costs_no_allocation() -> None:
    """The guard calls check() and record_success() for every statement while anything is
    quarantined: for the statements that are not, they must allocate nothing. Measured
    against a no-op of the same shape (the loop itself allocates its iterator)."""
    q = Quarantine()
    tripped(q, OTHER)  # something is quarantined, so the look-ups really happen
    q.record_timeout(FP, SUMMARY, 0.0)  # and FP has strikes on record
    times = [float(i) for i in range(1000)]

    def noop(fingerprint: str, now: float) -> None:
        return None

    # Before 3.11 a method call's frame comes from the heap once (then from a free list):
    # a constant, not a per-call cost.
    slack = 0 if sys.version_info >= (3, 11) else 512
    baseline = _peak_allocation(noop, times) + slack
    assert _peak_allocation(q.record_success, times) <= baseline
    assert _peak_allocation(q.check, times) <= baseline
    q.record_error(FP, 1.0)
    assert _peak_allocation(q.record_error, times) <= baseline


# -- open: refused with a shrinking wait -----------------------------------------------------------
def test_open_refuses_with_a_decreasing_retry() -> None:
    q = Quarantine(cooldown=30.0)
    tripped(q, at=100.0)
    waits = [q.check(FP, now) for now in (100.0, 110.0, 125.5, 129.9)]
    assert waits == pytest.approx([30.0, 20.0, 4.5, 0.1])
    assert all(w is not None and w > 0 for w in waits)
    # Outcomes of executions that started before the breaker opened change nothing.
    assert q.record_success(FP, 120.0) is None
    assert q.record_timeout(FP, SUMMARY, 120.0) is None
    q.record_error(FP, 120.0)
    assert q.entries(120.0) == [QuarantineEntry(FP, SUMMARY, "open", 100.0, 130.0, 1)]


# -- half-open: one probe --------------------------------------------------------------------------
def test_exactly_one_probe_when_the_cooldown_ends() -> None:
    q = Quarantine(cooldown=30.0)
    tripped(q)
    assert q.entries(30.0)[0].state == "half_open"
    probe(q, 30.0)
    for now in (30.0, 31.0, 45.0, 59.9):
        w = q.check(FP, now)
        assert w is not None
        assert 0 < w <= PROBE_RETRY
    assert q.active is True


def test_probe_success_closes_and_resets() -> None:
    q = Quarantine(threshold=3, cooldown=30.0)
    tripped(q)
    probe(q, 31.0)
    t = q.record_success(FP, 31.0)
    assert t == Transition("closed", FP, SUMMARY, 0.0, 3)
    assert q.active is False
    assert q.entries(31.0) == []
    assert q.check(FP, 31.0) is None
    assert q.record_success(FP, 32.0) is None  # a second report closes nothing
    # Counters start over: two time-outs are not enough any more.
    assert q.record_timeout(FP, SUMMARY, 32.0) is None
    assert q.record_timeout(FP, SUMMARY, 33.0) is None
    assert q.active is False


def test_probe_timeout_reopens_with_doubled_capped_cooldown() -> None:
    q = Quarantine(threshold=3, cooldown=30.0, max_cooldown=200.0)
    tripped(q)
    now = 0.0
    expected = [60.0, 120.0, 200.0, 200.0]
    for trips, cooldown in enumerate(expected, start=2):
        now = q.entries(now)[0].retry_at
        assert q.check(FP, now - 0.001) is not None  # not a moment early
        probe(q, now)
        t = q.record_timeout(FP, "new summary", now + 1.0)
        assert t == Transition("reopened", FP, "new summary", cooldown, 3 + trips - 1)
        (entry,) = q.entries(now + 1.0)
        assert entry.state == "open"
        assert entry.trips == trips
        assert entry.opened_at == 0.0  # the episode began at the first trip
        assert entry.retry_at == now + 1.0 + cooldown
        assert q.check(FP, now + 1.0) == pytest.approx(cooldown)


def test_probe_error_keeps_half_open_and_lets_the_next_caller_probe() -> None:
    q = Quarantine(cooldown=30.0)
    tripped(q)
    probe(q, 30.0)
    assert q.check(FP, 30.5) is not None
    q.record_error(FP, 31.0)
    assert q.entries(31.0)[0].state == "half_open"
    probe(q, 31.0)
    assert q.check(FP, 31.0) is not None
    t = q.record_success(FP, 32.0)
    assert t is not None
    assert t.kind == "closed"


def test_a_lost_probe_stops_blocking_after_cooldown() -> None:
    q = Quarantine(cooldown=30.0, max_cooldown=600.0)
    tripped(q)
    probe(q, 30.0)  # this caller never reports back
    w = q.check(FP, 59.5)
    assert w == pytest.approx(0.5)  # the time left before the probe is presumed lost
    probe(q, 60.0)  # in flight for `cooldown`: presumed lost, the next caller probes
    assert q.check(FP, 60.0) is not None
    # The lost probe's late report after a reopen is ignored (the breaker is open again).
    reopened = q.record_timeout(FP, SUMMARY, 61.0)
    assert reopened is not None
    assert reopened.kind == "reopened"
    assert q.record_success(FP, 62.0) is None
    assert q.active is True


def test_stale_limit_uses_the_base_cooldown_not_the_doubled_one() -> None:
    q = Quarantine(cooldown=10.0, max_cooldown=600.0)
    tripped(q)
    probe(q, 10.0)
    q.record_timeout(FP, SUMMARY, 10.0)  # reopened for 20 s
    probe(q, 30.0)
    assert q.check(FP, 39.9) is not None
    probe(q, 40.0)


# -- by hand ---------------------------------------------------------------------------------------
def test_release_by_hand() -> None:
    q = Quarantine(threshold=2)
    assert q.release(FP, 0.0) is None
    tripped(q, at=1.0)
    t = q.release(FP, 2.0)
    assert t == Transition("closed", FP, SUMMARY, 0.0, 2)
    assert q.active is False
    assert q.check(FP, 2.0) is None
    assert q.release(FP, 3.0) is None


def test_release_forgets_recent_timeouts() -> None:
    q = Quarantine(threshold=2)
    assert q.record_timeout(FP, SUMMARY, 0.0) is None
    assert q.tracked == 1
    assert q.release(FP, 1.0) is None  # it was not quarantined
    assert q.tracked == 0
    assert q.record_timeout(FP, SUMMARY, 2.0) is None  # one strike again, not two


def test_allow_list_never_opens() -> None:
    q = Quarantine(threshold=1, allow=[FP])
    assert q.allowed == frozenset({FP})
    for i in range(20):
        assert q.record_timeout(FP, SUMMARY, float(i)) is None
        assert q.check(FP, float(i)) is None
    assert q.active is False
    assert q.tracked == 0


def test_allow_at_run_time_releases_and_disallow_counts_again() -> None:
    q = Quarantine(threshold=1)
    tripped(q)
    t = q.allow(FP)
    assert t == Transition("closed", FP, SUMMARY, 0.0, 1)
    assert q.active is False
    assert q.allow(FP) is None  # already allowed, nothing to release
    assert q.record_timeout(FP, SUMMARY, 1.0) is None
    q.disallow(FP)
    assert q.allowed == frozenset()
    t2 = q.record_timeout(FP, SUMMARY, 2.0)
    assert t2 is not None
    assert t2.kind == "opened"
    with pytest.raises(TypeError, match="fingerprint id"):
        q.allow("")


def test_entries_are_json_friendly() -> None:
    q = Quarantine(cooldown=30.0)
    tripped(q, at=5.0)
    tripped(q, OTHER, at=20.0)
    rows = json.loads(json.dumps([dataclasses.asdict(e) for e in q.entries(40.0)]))
    assert rows == [
        {
            "fingerprint": FP,
            "summary": SUMMARY,
            "state": "half_open",
            "opened_at": 5.0,
            "retry_at": 35.0,
            "trips": 1,
        },
        {
            "fingerprint": OTHER,
            "summary": SUMMARY,
            "state": "open",
            "opened_at": 20.0,
            "retry_at": 50.0,
            "trips": 1,
        },
    ]


# -- memory ----------------------------------------------------------------------------------------
def test_distinct_fingerprints_stay_under_the_cap() -> None:
    q = Quarantine(threshold=3, window=1e9)  # nothing ages out: only the cap bounds it
    for i in range(100_000):
        q.record_timeout(f"{i:016x}", SUMMARY, float(i))
    assert q.tracked == MAX_TRACKED
    assert q.active is False


def test_cap_drops_the_fingerprint_with_the_stalest_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quarantine_module, "MAX_TRACKED", 3)
    q = Quarantine(threshold=3, window=1000.0)
    q.record_timeout("a", SUMMARY, 0.0)
    q.record_timeout("b", SUMMARY, 1.0)
    q.record_timeout("c", SUMMARY, 2.0)
    q.record_timeout("a", SUMMARY, 3.0)  # "a" is fresh again; "b" is now the stalest
    q.record_timeout("d", SUMMARY, 4.0)  # over the cap: "b" is forgotten
    assert q.tracked == 3
    t = q.record_timeout("a", SUMMARY, 5.0)  # "a" kept both strikes: 0, 3, 5
    assert t is not None
    assert t.kind == "opened"
    assert q.record_timeout("b", SUMMARY, 6.0) is None
    assert q.record_timeout("b", SUMMARY, 7.0) is None  # had "b" been kept: 1, 6, 7 opens
    assert q.active is True
    assert [e.fingerprint for e in q.entries(7.0)] == ["a"]


def test_timeouts_older_than_the_window_are_forgotten() -> None:
    q = Quarantine(threshold=3, window=60.0)
    for i in range(1000):
        q.record_timeout(f"{i:016x}", SUMMARY, i / 100)
    assert q.tracked == 1000
    q.record_timeout(FP, SUMMARY, 70.0)  # 60 s after the last of them
    assert q.tracked == 1


# -- random sequences ------------------------------------------------------------------------------
THRESHOLD, WINDOW, COOLDOWN, MAX_COOLDOWN = 2, 10.0, 5.0, 20.0
# Two ids keep the machine on few fingerprints, so that it reaches deep states (reopened,
# lost probes) often. Both start off the allow-list (a constructor allow-list is tested
# above); `by_hand` adds and removes them at run time.
IDS = ["000000000000000a", "000000000000000b"]
fingerprints = st.sampled_from(IDS)
steps = st.sampled_from([0.0, 0.5, 1.0, COOLDOWN, WINDOW]) | st.floats(0.0, 12.0)


class QuarantineMachine(RuleBasedStateMachine):
    """Drives a Quarantine and a small model of what it must do side by side.

    The model is deliberately external: what the caller can see (the transitions returned
    and the entries listed), plus which probes it was granted and has not reported yet.
    """

    def __init__(self) -> None:
        super().__init__()
        self.q = Quarantine(
            threshold=THRESHOLD,
            window=WINDOW,
            cooldown=COOLDOWN,
            max_cooldown=MAX_COOLDOWN,
        )
        self.now = 0.0
        self.allowed: set[str] = set()
        self.strikes: dict[str, list[float]] = {}
        self.cooldowns: dict[str, float] = {}  # quarantined fingerprints: current cool-down
        self.in_flight: dict[str, float] = {}  # probes granted and not reported yet
        self.probed: set[str] = set()  # a probe was granted since the cool-down ended

    def _entry(self, fp: str) -> QuarantineEntry | None:
        return next((e for e in self.q.entries(self.now) if e.fingerprint == fp), None)

    def _forget(self, fp: str) -> None:
        self.cooldowns.pop(fp, None)
        self.in_flight.pop(fp, None)
        self.probed.discard(fp)

    @rule(dt=steps)
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(fp=fingerprints, extra=st.sampled_from([0.0, 0.25, COOLDOWN]))
    def until_retry(self, fp: str, extra: float) -> None:
        """Jump to (just past) the end of a cool-down, where the interesting states are."""
        entry = self._entry(fp)
        if entry is not None:
            self.now = max(self.now, entry.retry_at + extra)

    @rule(fp=fingerprints)
    def check(self, fp: str) -> None:
        self._check(fp)

    @rule(fp=fingerprints, outcome=st.sampled_from(["success", "timeout", "error"]))
    def run(self, fp: str, outcome: str) -> None:
        """What the guard does: check, and if let through, run and report at once."""
        if self._check(fp) is None:
            getattr(self, outcome)(fp)

    def _check(self, fp: str) -> float | None:
        entry = self._entry(fp)
        wait = self.q.check(fp, self.now)
        if fp in self.allowed or entry is None:
            assert wait is None
            return wait
        if self.now < entry.retry_at:
            assert wait == entry.retry_at - self.now
            assert wait > 0
            return wait
        started = self.in_flight.get(fp)
        if started is None or started + COOLDOWN - self.now <= 0:
            assert wait is None, "the cool-down is over and no live probe is in flight"
            self.in_flight[fp] = self.now
            self.probed.add(fp)
        else:
            assert wait is not None, "a second probe while one is in flight"
            assert 0 < wait <= PROBE_RETRY
        return wait

    @rule(fp=fingerprints)
    def timeout(self, fp: str) -> None:
        t = self.q.record_timeout(fp, SUMMARY, self.now)
        if fp in self.allowed:
            assert t is None
            return
        if fp in self.cooldowns:
            if fp not in self.probed:
                assert t is None
                return
            cooldown = min(self.cooldowns[fp] * 2, MAX_COOLDOWN)
            assert t is not None
            assert (t.kind, t.cooldown) == ("reopened", cooldown)
            self._forget(fp)
            self.cooldowns[fp] = cooldown
            return
        stamps = self.strikes.setdefault(fp, [])
        stamps.append(self.now)
        if len(stamps) >= THRESHOLD and self.now - stamps[-THRESHOLD] < WINDOW:
            assert t is not None
            assert (t.kind, t.cooldown, t.timeouts) == ("opened", COOLDOWN, THRESHOLD)
            del self.strikes[fp]
            self.cooldowns[fp] = COOLDOWN
        else:
            assert t is None

    @rule(fp=fingerprints)
    def success(self, fp: str) -> None:
        t = self.q.record_success(fp, self.now)
        if fp in self.probed:
            assert t is not None
            assert (t.kind, t.cooldown) == ("closed", 0.0)
            self._forget(fp)
        else:
            assert t is None

    @rule(fp=fingerprints)
    def error(self, fp: str) -> None:
        self.q.record_error(fp, self.now)
        self.in_flight.pop(fp, None)

    @rule(fp=fingerprints, action=st.sampled_from(["release", "allow", "disallow", "disallow"]))
    def by_hand(self, fp: str, action: str) -> None:
        # One rule for the rare, manual operations, so that they do not crowd out the
        # traffic-driven ones; disallowing is drawn twice as often as allowing, so that
        # fingerprints spend most of their time off the allow-list, where things happen.
        if action == "disallow":
            self.q.disallow(fp)
            self.allowed.discard(fp)
            return
        was_quarantined = fp in self.cooldowns
        if action == "release":
            t = self.q.release(fp, self.now)
        else:
            t = self.q.allow(fp)
            self.allowed.add(fp)
        if was_quarantined:
            assert t is not None
            assert (t.kind, t.cooldown) == ("closed", 0.0)
        else:
            assert t is None
        self._forget(fp)
        self.strikes.pop(fp, None)

    @invariant()
    def listing_matches(self) -> None:
        entries = self.q.entries(self.now)
        listed = {e.fingerprint for e in entries}
        assert self.q.active == bool(entries)
        assert listed == set(self.cooldowns)
        assert not listed & self.allowed
        for e in entries:
            assert e.state == ("open" if self.now < e.retry_at else "half_open")
            assert e.retry_at - self.now <= MAX_COOLDOWN * (1 + 1e-9)  # float rounding
        assert self.q.allowed == frozenset(self.allowed)


QuarantineMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
test_quarantine_state_machine = QuarantineMachine.TestCase
