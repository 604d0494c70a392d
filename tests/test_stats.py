"""Per-fingerprint statistics: right numbers, worst first, bounded, exact under threads."""

from __future__ import annotations

import json
import math
import random
import sys
import threading
from collections.abc import Iterator

import pytest

from poolguard.observe.fingerprint import Fingerprint, fingerprint
from poolguard.observe.stats import OTHER, StatsRegistry

STEP = 2 ** (1 / 4)  # the histogram's bucket growth factor


def fp(n: int | str) -> Fingerprint:
    return fingerprint(f"SELECT * FROM table_{n} WHERE id = 1")


def exact_percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, computed the slow, obvious way."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def assert_within_one_bucket(reported: float, exact: float) -> None:
    # reported is the upper bound of exact's bucket: never below, at most one step above
    # (plus the rounding to microseconds of the snapshot).
    assert exact - 1e-6 <= reported <= exact * STEP + 1e-6, (reported, exact)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_are_within_one_bucket_of_exact(seed: int) -> None:
    rng = random.Random(seed)
    # a realistic mix: a fast mode, a slow mode and a long tail
    values = (
        [rng.lognormvariate(math.log(0.002), 0.5) for _ in range(5000)]
        + [rng.lognormvariate(math.log(0.080), 0.3) for _ in range(800)]
        + [rng.uniform(0.5, 12.0) for _ in range(60)]
    )
    rng.shuffle(values)
    reg = StatsRegistry()
    f = fp("p")
    for v in values:
        reg.record(f, v)
    row = reg.get(f.id)
    assert row is not None
    assert row["count"] == len(values)
    for key, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        reported = row[key]
        assert isinstance(reported, float)
        assert_within_one_bucket(reported, exact_percentile(values, q))
    assert row["max"] == round(max(values), 6)
    assert row["total_time"] == pytest.approx(sum(values), abs=1e-5)
    assert row["mean"] == pytest.approx(sum(values) / len(values), abs=1e-6)


def test_percentiles_on_known_data() -> None:
    reg = StatsRegistry()
    f = fp("known")
    values = [0.001] * 50 + [0.010] * 45 + [0.100] * 4 + [2.0]
    for v in values:
        reg.record(f, v)
    row = reg.get(f.id)
    assert row is not None
    assert_within_one_bucket(row["p50"], 0.001)  # type: ignore[arg-type]
    assert_within_one_bucket(row["p95"], 0.010)  # type: ignore[arg-type]
    assert_within_one_bucket(row["p99"], 0.100)  # type: ignore[arg-type]
    assert row["max"] == 2.0
    # a single observation: every percentile is that value (clamped to the max)
    one = StatsRegistry()
    one.record(f, 0.0123)
    row = one.get(f.id)
    assert row is not None
    assert row["p50"] == row["p99"] == row["max"] == 0.0123


def test_extreme_and_invalid_durations_never_raise() -> None:
    reg = StatsRegistry()
    f = fp("odd")
    for v in (0.0, 1e-9, -1.0, float("nan"), float("inf"), 5000.0, 1e300):
        reg.record(f, v)
        reg.record_hold(f, v)
    row = reg.get(f.id)
    assert row is not None
    assert row["count"] == 7
    json.dumps(row, allow_nan=False)  # everything finite
    assert row["max"] >= 5000.0  # type: ignore[operator]
    assert row["p99"] == row["max"]


def test_errors_timeouts_refusals_and_holds() -> None:
    reg = StatsRegistry()
    f = fp("e")
    reg.record(f, 0.01)
    reg.record(f, 0.02, error=True)
    reg.record(f, 2.0, error=True, timeout=True)
    reg.record(f, 2.0, timeout=True)  # a timeout is an error even when not flagged as one
    reg.record_refusal(f, "quarantined")
    reg.record_refusal(f, "quarantined")
    reg.record_refusal(f, "budget")
    for s in (0.5, 0.7, 9.0):
        reg.record_hold(f, s)
    row = reg.get(f.id)
    assert row is not None
    assert row["count"] == 4  # refusals are not executions
    assert row["errors"] == 3
    assert row["timeouts"] == 2
    assert row["refusals"] == {"quarantined": 2, "budget": 1}
    assert row["hold_count"] == 3
    assert row["hold_max"] == 9.0
    assert row["hold_p99"] == 9.0


def test_row_shape_and_json() -> None:
    reg = StatsRegistry()
    f = fingerprint("SELECT name FROM users WHERE email = 'someone@example.com'")
    reg.record(f, 0.0015)
    reg.record_refusal(fp("only-refused"), "saturated")
    reg.record_hold(fp("only-held"), 0.25)
    rows = reg.snapshot()
    assert len(rows) == 3
    assert set(rows[0]) == {
        "fingerprint",
        "summary",
        "normalized",
        "count",
        "errors",
        "timeouts",
        "refusals",
        "total_time",
        "mean",
        "p50",
        "p95",
        "p99",
        "max",
        "hold_count",
        "hold_p99",
        "hold_max",
    }
    text = json.dumps(rows, allow_nan=False)
    assert "someone@example.com" not in text
    assert json.loads(text) == rows
    row = reg.get(f.id)
    assert row is not None
    assert (row["fingerprint"], row["summary"]) == (f.id, "SELECT users")
    assert row["normalized"] == "select name from users where email = ?"
    assert reg.get("0000000000000000") is None


def test_snapshot_is_worst_first_and_limited() -> None:
    reg = StatsRegistry()
    slow, busy, refused, timing_out, idle = fp("slow"), fp("busy"), fp("ref"), fp("to"), fp("i")
    reg.record(idle, 0.001)
    for _ in range(10):
        reg.record(slow, 1.0)  # 10 s in total
    for _ in range(1000):
        reg.record(busy, 0.002)  # 2 s in total
    reg.record(refused, 0.001)
    reg.record_refusal(refused, "budget")
    reg.record_refusal(refused, "saturated")
    reg.record(timing_out, 0.001, timeout=True)
    order = [r["fingerprint"] for r in reg.snapshot()]
    assert order == [timing_out.id, refused.id, slow.id, busy.id, idle.id]
    assert [r["fingerprint"] for r in reg.snapshot(limit=2)] == [timing_out.id, refused.id]
    assert reg.snapshot(limit=0) == []


def test_overflow_row_beyond_max_fingerprints() -> None:
    reg = StatsRegistry(max_fingerprints=3)
    first = [fp(i) for i in range(3)]
    for f in first:
        reg.record(f, 0.01)
    for i in range(3, 50):
        reg.record(fp(i), 0.5)
    reg.record_refusal(fp(99), "quarantined")
    reg.record_hold(fp(98), 1.0)
    for f in first:  # known rows keep counting; nothing was evicted
        reg.record(f, 0.01)
    assert len(reg) == 3
    rows = {r["fingerprint"]: r for r in reg.snapshot()}
    assert set(rows) == {f.id for f in first} | {OTHER}
    other = rows[OTHER]
    assert other["summary"] == OTHER
    assert other["count"] == 47
    assert other["refusals"] == {"quarantined": 1}
    assert other["hold_count"] == 1
    assert all(rows[f.id]["count"] == 2 for f in first)
    assert reg.get(OTHER) == other
    # the other row sorts like any other row: it holds the most time here
    assert reg.snapshot()[0]["fingerprint"] == OTHER


def test_no_other_row_until_needed_and_reset() -> None:
    reg = StatsRegistry(max_fingerprints=2)
    reg.record(fp(1), 0.1)
    assert [r["fingerprint"] for r in reg.snapshot()] == [fp(1).id]
    reg.record(fp(2), 0.1)
    reg.record(fp(3), 0.1)
    assert len(reg.snapshot()) == 3
    reg.reset()
    assert reg.snapshot() == []
    assert len(reg) == 0
    reg.record(fp(3), 0.1)  # room again after a reset
    assert [r["fingerprint"] for r in reg.snapshot()] == [fp(3).id]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_max_fingerprints_is_validated(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        StatsRegistry(max_fingerprints=bad)  # type: ignore[arg-type]


def _hammer(target: object, n_threads: int, barrier: threading.Barrier) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            barrier.wait()
            target(k)  # type: ignore[operator]
        except BaseException as e:  # pragma: no cover - the failure being tested for
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture
def busy_switching() -> Iterator[None]:
    # switch threads 50 times as often as by default, so that races get more chances
    # (much more often makes a loaded CI machine crawl: every switch is a context switch)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_recording_is_exact() -> None:
    reg = StatsRegistry()
    shared = fp("shared")
    own = [fp(f"own{k}") for k in range(8)]
    per_thread = 10_000

    def work(k: int) -> None:
        mine = own[k]
        for i in range(per_thread):
            reg.record(shared, 0.001, error=i % 10 == 0)
            reg.record(mine, 0.002)
            if i % 100 == 0:
                reg.record_refusal(shared, "budget")
                reg.record_hold(shared, 0.01)
                reg.snapshot(limit=3)  # readers race with writers too

    assert _hammer(work, 8, threading.Barrier(8)) == []
    row = reg.get(shared.id)
    assert row is not None
    assert row["count"] == 8 * per_thread
    assert row["errors"] == 8 * per_thread // 10
    assert row["refusals"] == {"budget": 8 * per_thread // 100}
    assert row["hold_count"] == 8 * per_thread // 100
    assert row["total_time"] == pytest.approx(8 * per_thread * 0.001)
    for f in own:
        mine = reg.get(f.id)
        assert mine is not None
        assert mine["count"] == per_thread


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_row_creation_respects_the_limit() -> None:
    reg = StatsRegistry(max_fingerprints=50)
    fps = [fp(f"c{i}") for i in range(200)]

    def work(k: int) -> None:
        for f in fps[k % 2 :: 2] + fps:
            reg.record(f, 0.001)

    assert _hammer(work, 8, threading.Barrier(8)) == []
    assert len(reg) == 50
    rows = reg.snapshot()
    assert sum(r["count"] for r in rows) == 8 * (100 + 200)  # type: ignore[misc]
    assert [r["count"] for r in rows if r["fingerprint"] != OTHER] == [12] * 50
