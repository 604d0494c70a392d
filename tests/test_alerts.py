"""Alerts: debounced per (kind, key), logged, forwarded, never raised; the pure detectors of
poolguard.policy.detectors driven by a fake clock (storms on real servers:
tests/test_judgement_storm.py)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from poolguard.observe import alerts as alerts_mod
from poolguard.observe.alerts import Alert, Alerter
from poolguard.policy.detectors import SaturationDetector, StormDetector


class Calls:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def __call__(self, alert: Alert) -> None:
        self.alerts.append(alert)


# -- Alerter -------------------------------------------------------------------------------------
def test_an_alert_is_logged_and_forwarded(caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls()
    a = Alerter(calls, debounce=60)
    before = time.time()
    with caplog.at_level(logging.WARNING, logger="poolguard.alerts"):
        assert a.emit("saturation", "pool-a", "pool pool-a saturated", {"waiting": 7}, now=100.0)
    (alert,) = calls.alerts
    assert alert.kind == "saturation"
    assert alert.message == "pool pool-a saturated"
    assert dict(alert.attributes) == {"waiting": 7}
    assert before <= alert.at <= time.time()
    (record,) = caplog.records
    assert record.name == "poolguard.alerts"
    assert record.levelno == logging.WARNING
    assert "pool pool-a saturated" in record.getMessage()
    assert record.poolguard_alert == "saturation"  # type: ignore[attr-defined]
    assert record.poolguard == {"waiting": 7}  # type: ignore[attr-defined]


def test_a_thousand_alerts_in_one_window_make_one(caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls()
    a = Alerter(calls, debounce=60)
    with caplog.at_level(logging.WARNING, logger="poolguard.alerts"):
        sent = [a.emit("leak", "app.py:10", "leak", {}, now=1000 + i * 0.05) for i in range(1000)]
    assert sent.count(True) == 1
    assert sent[0] is True
    assert len(calls.alerts) == 1
    assert len(caplog.records) == 1
    assert "suppressed" not in calls.alerts[0].attributes

    # The next window's first alert says how many were held back, and the count starts over.
    assert a.emit("leak", "app.py:10", "leak", {"partition": "/a"}, now=1060.0)
    assert dict(calls.alerts[1].attributes) == {"partition": "/a", "suppressed": 999}
    assert not a.emit("leak", "app.py:10", "leak", {}, now=1061.0)
    assert a.emit("leak", "app.py:10", "leak", {}, now=1120.0)
    assert calls.alerts[2].attributes["suppressed"] == 1
    assert a.emit("leak", "app.py:10", "leak", {}, now=1180.0)
    assert "suppressed" not in calls.alerts[3].attributes


def test_debounce_is_per_kind_and_key() -> None:
    calls = Calls()
    a = Alerter(calls, debounce=60)
    assert a.emit("quarantine_opened", "fp1", "m", {}, now=0.0)
    assert a.emit("quarantine_opened", "fp2", "m", {}, now=0.0)
    assert a.emit("quarantine_closed", "fp1", "m", {}, now=0.0)
    assert not a.emit("quarantine_opened", "fp1", "m", {}, now=59.999)
    assert a.emit("quarantine_opened", "fp1", "m", {}, now=60.0)
    assert [x.kind for x in calls.alerts] == [
        "quarantine_opened",
        "quarantine_opened",
        "quarantine_closed",
        "quarantine_opened",
    ]


def test_zero_debounce_lets_everything_through() -> None:
    a = Alerter(debounce=0)
    assert all(a.emit("connection_storm", "p", "m", {}, now=5.0) for _ in range(10))


def test_the_attributes_are_copied() -> None:
    calls = Calls()
    attrs: dict[str, str | int | float] = {"pool": "p"}
    Alerter(calls).emit("saturation", "p", "m", attrs, now=0.0)
    attrs["pool"] = "changed"
    assert calls.alerts[0].attributes == {"pool": "p"}


def test_a_failing_callback_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    def boom(alert: Alert) -> None:
        raise RuntimeError("password=hunter2 in the callback's message")

    a = Alerter(boom)
    with caplog.at_level(logging.WARNING, logger="poolguard.alerts"):
        assert a.emit("leak", "k", "leak", {}, now=0.0) is True
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    (err,) = errors
    assert "RuntimeError" in err.getMessage()
    assert "hunter2" not in err.getMessage()
    assert err.exc_info is None, "one line, no traceback"
    # The alert was still logged, and the alerter keeps working.
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert a.emit("leak", "other", "leak", {}, now=0.0) is True


def test_a_base_exception_from_the_callback_is_not_swallowed() -> None:
    def stop(alert: Alert) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Alerter(stop).emit("leak", "k", "leak", {}, now=0.0)


def test_a_custom_logger_is_used(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("myapp.db")
    with caplog.at_level(logging.WARNING):
        Alerter(logger=log).emit("saturation", "p", "m", {}, now=0.0)
    assert [r.name for r in caplog.records] == ["myapp.db"]


def test_only_known_kinds() -> None:
    with pytest.raises(ValueError, match="kind"):
        Alerter().emit("fire", "k", "m", {}, now=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"debounce": -1}, ValueError, "debounce"),
        ({"debounce": float("inf")}, ValueError, "debounce"),
        ({"debounce": True}, TypeError, "debounce"),
        ({"debounce": "60"}, TypeError, "debounce"),
        ({"callback": 3}, TypeError, "callback"),
        ({"logger": "poolguard"}, TypeError, "logger"),
    ],
)
def test_alerter_options_are_validated(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    callback = kwargs.pop("callback", None)
    with pytest.raises(error, match=name):
        Alerter(callback, **kwargs)


def test_expired_entries_are_pruned_but_pending_counts_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(alerts_mod, "_MAX_KEYS", 100)
    calls = Calls()
    a = Alerter(calls, debounce=10)
    assert a.emit("leak", "keep", "m", {}, now=0.0)
    assert not a.emit("leak", "keep", "m", {}, now=1.0)  # one suppressed, pending
    for i in range(99):
        a.emit("leak", f"k{i}", "m", {}, now=0.0)
    assert len(a._state) == 100
    a.emit("leak", "new", "m", {}, now=20.0)  # over the cap: the expired, empty entries go
    assert set(a._state) == {("leak", "keep"), ("leak", "new")}
    assert a.emit("leak", "keep", "m", {}, now=21.0)
    assert calls.alerts[-1].attributes["suppressed"] == 1


def test_debounce_state_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts_mod, "_MAX_KEYS", 100)
    a = Alerter(debounce=10)
    for i in range(1000):  # all within one window: nothing has expired
        assert a.emit("leak", f"k{i}", "m", {}, now=i * 0.001)
    assert len(a._state) <= 100
    assert ("leak", "k999") in a._state, "the oldest entries go first"
    assert ("leak", "k0") not in a._state


def test_emit_is_thread_safe() -> None:
    calls = Calls()
    a = Alerter(calls, debounce=60)
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [a.emit("saturation", "p", "m", {}, now=1.0) for _ in range(500)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert len(calls.alerts) == 1
    assert a.emit("saturation", "p", "m", {}, now=61.0)
    assert calls.alerts[1].attributes["suppressed"] == 8 * 500 - 1


# -- SaturationDetector ----------------------------------------------------------------------------
def test_saturation_fires_once_after_sustain() -> None:
    d = SaturationDetector(sustain=5.0)
    assert not d.observe(False, 0.0)
    assert d.saturated_since is None
    fired = [d.observe(True, t / 10) for t in range(0, 50)]  # 0.0 .. 4.9 s
    assert not any(fired)
    assert d.saturated_since == 0.0
    assert d.observe(True, 5.0)
    assert not any(d.observe(True, 5.0 + t) for t in range(1, 100)), "exactly once per episode"


def test_saturation_rearms_after_it_clears() -> None:
    d = SaturationDetector(sustain=5.0)
    d.observe(True, 0.0)
    assert d.observe(True, 5.0)
    assert not d.observe(False, 6.0)
    assert not d.observe(True, 7.0)
    assert not d.observe(True, 11.9)
    assert d.observe(True, 12.0)


def test_a_break_in_saturation_restarts_the_clock() -> None:
    d = SaturationDetector(sustain=5.0)
    d.observe(True, 0.0)
    d.observe(True, 4.0)
    d.observe(False, 4.5)
    assert not d.observe(True, 5.0)
    assert not d.observe(True, 9.9)
    assert d.observe(True, 10.0)


def test_zero_sustain_fires_on_the_first_saturated_observation() -> None:
    d = SaturationDetector(sustain=0)
    assert d.observe(True, 3.0)
    assert not d.observe(True, 3.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "5", True])
def test_saturation_sustain_is_validated(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="sustain"):
        SaturationDetector(sustain=bad)


# -- StormDetector ---------------------------------------------------------------------------------
def test_a_storm_is_more_than_threshold_connects_in_the_window() -> None:
    d = StormDetector(threshold=5, window=10.0)
    assert not any(d.observe(float(t)) for t in range(5))  # 5 in the window: not more than 5
    assert d.observe(5.0)
    assert d.storming


def test_connects_spread_out_never_storm() -> None:
    d = StormDetector(threshold=5, window=10.0)
    # One every 2.5 s: at most 4 within any 10 s.
    assert not any(d.observe(t * 2.5) for t in range(1000))


def test_the_window_edge_is_exclusive() -> None:
    d = StormDetector(threshold=2, window=10.0)
    d.observe(0.0)
    d.observe(5.0)
    assert not d.observe(10.0), "the attempt at t=0 is exactly one window old: out"
    assert d.observe(10.5)


def test_after_a_storm_it_stays_quiet_until_the_rate_halves() -> None:
    d = StormDetector(threshold=4, window=10.0)
    assert [d.observe(t * 0.1) for t in range(5)] == [False] * 4 + [True]
    # Still a storm: quiet however many more come.
    assert not any(d.observe(1.0 + t * 0.1) for t in range(50))
    # Three, then two in the window (exactly threshold / 2, not below it): still quiet.
    assert not d.observe(9.0)
    assert not d.observe(12.0)
    assert not d.observe(16.0)
    assert d.counts(16.0) == (3, 0)
    assert not d.observe(23.0)
    assert d.counts(23.0) == (2, 0)
    assert d.storming
    # One in the window: below threshold / 2; re-armed (this attempt itself does not fire).
    assert not d.observe(40.0)
    assert not d.storming
    assert [d.observe(40.0 + t * 0.1) for t in range(1, 5)] == [False] * 3 + [True]


def test_failed_connects_count_too() -> None:
    d = StormDetector(threshold=3, window=10.0)
    d.observe(0.0)
    d.observe(0.1, failed=True)
    d.observe(0.2, failed=True)
    assert d.observe(0.3, failed=True)
    assert d.counts(0.3) == (4, 3)
    assert d.counts(10.15) == (2, 2)


def test_storm_memory_is_bounded() -> None:
    d = StormDetector(threshold=20, window=10.0)
    for i in range(100_000):
        d.observe(i * 0.0001)
    assert len(d._attempts) == 21


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": 2.5}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"threshold": 5, "window": 0}, "window"),
        ({"threshold": 5, "window": -1.0}, "window"),
        ({"threshold": 5, "window": float("nan")}, "window"),
    ],
)
def test_storm_options_are_validated(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        StormDetector(**kwargs)
