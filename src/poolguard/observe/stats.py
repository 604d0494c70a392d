"""Per-fingerprint statement statistics in bounded memory.

Why a log-bucketed histogram instead of samples: ``record`` runs for every statement, so
it may not sort, allocate or grow anything. A fixed array of counters whose bucket
boundaries grow by a factor of ``2 ** (1/4)`` from 1 microsecond to about 1000 seconds
(121 buckets, plus one for anything longer) costs one ``log2`` and one increment, and
answers any percentile afterwards. The price is resolution: a percentile is reported as
the upper bound of the bucket that holds it (clamped to the largest value observed), so it
is never below the true nearest-rank value and at most about 19 % (``2 ** (1/4)``) above
it. That is plenty to tell a 2 ms statement from a 200 ms one, which is what quarantine
decisions and dashboards need.

Why one overflow row instead of eviction: the fingerprints that matter (the hot and the
rogue ones) show up early and keep showing up. Evicting to make room for newcomers would
let a stream of one-off statements (ad-hoc SQL with inlined values, say) wipe out exactly
the rows an operator needs. So the registry keeps the first ``max_fingerprints`` it sees and
folds the rest into a single row called ``"other"``; a large ``other`` row is itself the
signal that something generates unbounded SQL.

Why a queue instead of a lock per row: ``record`` runs for every statement, and even an
uncontended lock plus the histogram arithmetic measured 2.2 us per statement inside a real
loop. Recorders only append a tuple to a ``collections.deque`` (atomic, about 0.1 us); every
``_FOLD_AT`` entries, or when a snapshot is taken, one thread folds the queues into the rows
under the registry lock. Counts stay exact (one folder at a time, nothing dropped), memory
stays bounded (a queue never grows past ``_FOLD_AT`` plus what lands during one fold), and
a snapshot always includes everything recorded before it was asked for. Successful
executions, nearly every entry, have a queue of their own with two-field entries, and their
fold looks a row up only when the fingerprint changes from the previous entry: together
under half the instructions per statement of one tagged queue.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from poolguard import validate
from poolguard.observe.fingerprint import Fingerprint

__all__ = ["OTHER", "StatsRegistry"]

#: The fingerprint id and summary of the row that collects everything past the limit.
OTHER = "other"

_LOWEST = 1e-6  # seconds: the upper bound of bucket 0
_STEPS_PER_DOUBLING = 4
_DOUBLINGS = 30  # 1 us * 2**30 ~ 1074 s
_TOP = _LOWEST * 2.0**_DOUBLINGS  # the upper bound of the last finite bucket
_NBUCKETS = _DOUBLINGS * _STEPS_PER_DOUBLING + 2  # [0, 1us], 120 growing ones, (top, inf)
_OVERFLOW_BUCKET = _NBUCKETS - 1
_OFFSET = -math.log2(_LOWEST) * _STEPS_PER_DOUBLING
#: Upper bound of each bucket, in seconds.
_UPPER: tuple[float, ...] = (
    *(_LOWEST * 2.0 ** (i / _STEPS_PER_DOUBLING) for i in range(_NBUCKETS - 1)),
    math.inf,
)
_log2 = math.log2
_ceil = math.ceil


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a duration (the pytest plugin's reports use the same ones)."""
    return _bucket(seconds)


def bucket_upper(bucket: int) -> float:
    """A bucket's upper bound in seconds, rounded to the microsecond's thousandth; the
    overflow bucket reports the last finite bound (JSON has no infinity)."""
    return round(_UPPER[min(bucket, _OVERFLOW_BUCKET - 1)], 9)


#: Queue length at which a recorder folds the queue into the rows.
_FOLD_AT = 256
_ERROR, _TIMEOUT, _REFUSAL, _HOLD = range(4)


def _bucket(seconds: float) -> int:
    """The histogram bucket of ``seconds``: the smallest i with seconds <= _UPPER[i]."""
    if _LOWEST < seconds <= _TOP:
        return _ceil(_log2(seconds) * _STEPS_PER_DOUBLING + _OFFSET)
    if seconds > _TOP:
        return _OVERFLOW_BUCKET
    return 0  # tiny, zero, negative or NaN


def _clean(seconds: float) -> float:
    # Only reached for values outside the normal range: keep sums finite and JSON-safe.
    if seconds != seconds or seconds < 0.0:  # NaN or negative (a clock that went back)
        return 0.0
    return min(seconds, _TOP * 1000.0)


def _percentile(buckets: list[int], count: int, q: float, largest: float) -> float:
    """Nearest-rank percentile ``q`` (0..1) of the histogram, as a bucket upper bound."""
    if count <= 0:
        return 0.0
    rank = max(1, _ceil(q * count))
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return min(_UPPER[i], largest)
    return largest


def _rounded_to_us(seconds: float) -> float:
    """Seconds to the microsecond: a snapshot's durations, without float noise."""
    return round(seconds, 6)


@dataclass(slots=True, eq=False, repr=False)
class _Row:
    """Counters of one fingerprint; mutated only under ``lock``."""

    fp: Fingerprint
    count: int = 0
    errors: int = 0
    timeouts: int = 0
    total: float = 0.0
    max: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * _NBUCKETS)
    refusals: dict[str, int] = field(default_factory=dict)
    hold_count: int = 0
    hold_max: float = 0.0
    hold_buckets: list[int] | None = None  # most fingerprints never get one

    def as_dict(self) -> dict[str, object]:
        # Called with the registry lock held: rows change only while it is held.
        count, errors, timeouts = self.count, self.errors, self.timeouts
        total, largest, buckets = self.total, self.max, self.buckets
        refusals = dict(self.refusals)
        hold_count, hold_max = self.hold_count, self.hold_max
        hold_buckets = self.hold_buckets
        fp = self.fp
        return {
            "fingerprint": fp.id,
            "summary": fp.summary,
            "normalized": fp.normalized,
            "count": count,
            "errors": errors,
            "timeouts": timeouts,
            "refusals": refusals,
            "total_time": _rounded_to_us(total),
            "mean": _rounded_to_us(total / count) if count else 0.0,
            "p50": _rounded_to_us(_percentile(buckets, count, 0.50, largest)),
            "p95": _rounded_to_us(_percentile(buckets, count, 0.95, largest)),
            "p99": _rounded_to_us(_percentile(buckets, count, 0.99, largest)),
            "max": _rounded_to_us(largest),
            "hold_count": hold_count,
            "hold_p99": (
                _rounded_to_us(_percentile(hold_buckets, hold_count, 0.99, hold_max))
                if hold_buckets is not None
                else 0.0
            ),
            "hold_max": _rounded_to_us(hold_max),
        }


def _worst_first(row: dict[str, object]) -> tuple[int, int, float]:
    refusals = cast("dict[str, int]", row["refusals"])
    return (-cast(int, row["timeouts"]), -sum(refusals.values()), -cast(float, row["total_time"]))


class StatsRegistry:
    """Statistics per statement fingerprint, for ``guard.stats()`` and the quarantine UI.

    ``record``, ``record_refusal`` and ``record_hold`` may be called from any thread at any
    rate and never raise on odd values (negative, NaN or infinite durations are clamped).
    Memory is bounded by ``max_fingerprints`` rows of about 1.5 KiB each plus the
    fingerprints themselves; see the module docstring for what happens past the limit.
    """

    def __init__(self, max_fingerprints: int = 1000) -> None:
        self.max_fingerprints = validate.count("max_fingerprints", max_fingerprints)
        self._lock = threading.Lock()  # folding, snapshots, reset
        self._rows: dict[str, _Row] = {}
        self._other = _Row(Fingerprint(OTHER, "", OTHER, ""))
        #: Successful executions waiting to be folded: ``(fingerprint, seconds)``. The
        #: statement path appends to it itself and calls :meth:`fold_soon` once its length
        #: reaches :attr:`fold_at` (what :meth:`record_success` does): a Python call per
        #: statement costs as much as the rest of recording.
        self.successes = self._done = deque[tuple[Fingerprint, float]]()
        self.fold_at = _FOLD_AT
        #: Everything else, tagged: (fingerprint, seconds or refusal kind, _ERROR...).
        self._pending: deque[tuple[Fingerprint, object, int]] = deque()

    def record(
        self, fp: Fingerprint, elapsed: float, *, error: bool = False, timeout: bool = False
    ) -> None:
        """Count one execution of ``fp`` that took ``elapsed`` seconds.

        ``timeout=True`` also counts as an error: ``errors`` is every failed execution,
        ``timeouts`` the subset that failed by running out of time.
        """
        if not (error or timeout):
            self.record_success(fp, elapsed)
            return
        p = self._pending
        p.append((fp, elapsed, _TIMEOUT if timeout else _ERROR))
        if len(p) >= _FOLD_AT:
            self._fold(blocking=False)

    def record_success(self, fp: Fingerprint, elapsed: float) -> None:
        """``record(fp, elapsed)`` for an execution that succeeded: the statement path's
        call, one append and one length check."""
        d = self._done
        d.append((fp, elapsed))
        if len(d) >= _FOLD_AT:
            self._fold(blocking=False)

    def fold_soon(self) -> None:
        """Fold the queues now, unless another thread is folding them."""
        self._fold(blocking=False)

    def record_refusal(self, fp: Fingerprint, kind: str) -> None:
        """Count one refusal of ``fp`` (``kind``: "quarantined", "budget", "saturated", ...).

        A refused statement never ran, so it is not an execution: ``count`` is unchanged.
        Keep ``kind`` to a small fixed vocabulary; it becomes a key of the row's ``refusals``.
        """
        p = self._pending
        p.append((fp, kind, _REFUSAL))
        if len(p) >= _FOLD_AT:
            self._fold(blocking=False)

    def record_hold(self, fp: Fingerprint, seconds: float) -> None:
        """Attribute ``seconds`` of connection hold time to ``fp``."""
        p = self._pending
        p.append((fp, seconds, _HOLD))
        if len(p) >= _FOLD_AT:
            self._fold(blocking=False)

    def _fold(self, *, blocking: bool = True) -> None:
        """Move the queue into the rows. A recorder that finds another thread folding goes
        on: that thread, or the next fold, takes its entry."""
        if not self._lock.acquire(blocking):
            return
        try:
            self._fold_locked()
        finally:
            self._lock.release()

    def _fold_locked(self) -> None:
        self._fold_done()
        self._fold_pending()

    def _row(self, fp: Fingerprint) -> _Row:
        row = self._rows.get(fp.id)
        if row is None:
            if len(self._rows) >= self.max_fingerprints:
                return self._other
            row = self._rows[fp.id] = _Row(fp)
        return row

    def _fold_done(self) -> None:
        pop = self._done.popleft
        upper = _UPPER
        last: Fingerprint | None = None
        row = self._other
        # The bucket of the previous entry, by its bounds: successive durations of one
        # statement mostly share a bucket, and two comparisons cost a tenth of a log2.
        i, low, high = 0, 1.0, 0.0
        for _ in range(len(self._done)):  # what lands meanwhile waits for the next fold
            fp, elapsed = pop()
            if fp is not last:  # a run of one statement is the common case
                row = self._row(fp)
                last = fp
            if not low < elapsed <= high:
                i = _bucket(elapsed)
                if 0 < i < _OVERFLOW_BUCKET and upper[i - 1] < elapsed <= upper[i]:
                    low, high = upper[i - 1], upper[i]
                else:  # an edge the formula rounds across, or out of range: no reuse
                    low, high = 1.0, 0.0
                    elapsed = _clean(elapsed)
            row.count += 1
            row.total += elapsed
            row.buckets[i] += 1
            if elapsed > row.max:
                row.max = elapsed

    def _fold_pending(self) -> None:
        pop = self._pending.popleft
        for _ in range(len(self._pending)):
            fp, value, what = pop()
            row = self._row(fp)
            if what == _REFUSAL:
                kind = cast(str, value)
                row.refusals[kind] = row.refusals.get(kind, 0) + 1
                continue
            seconds = cast(float, value)
            i = _bucket(seconds)
            seconds = _clean(seconds)
            if what == _HOLD:
                buckets = row.hold_buckets
                if buckets is None:
                    buckets = row.hold_buckets = [0] * _NBUCKETS
                buckets[i] += 1
                row.hold_count += 1
                if seconds > row.hold_max:
                    row.hold_max = seconds
                continue
            row.count += 1
            row.total += seconds
            row.buckets[i] += 1
            if seconds > row.max:
                row.max = seconds
            row.errors += 1
            if what == _TIMEOUT:
                row.timeouts += 1

    def snapshot(self, limit: int | None = None) -> list[dict[str, object]]:
        """JSON-serialisable rows, worst first: most timeouts, then most refusals, then the
        most total time. The ``other`` row is included (and sorted like any row) once it
        has data. Durations are seconds rounded to microseconds."""
        with self._lock:
            self._fold_locked()
            rows: Iterable[_Row] = list(self._rows.values())
            out = [row.as_dict() for row in rows]
            other = self._other
            if other.count or other.refusals or other.hold_count:
                out.append(other.as_dict())
        out.sort(key=_worst_first)
        return out if limit is None else out[: max(0, limit)]

    def get(self, fingerprint_id: str) -> dict[str, object] | None:
        """The row of one fingerprint id (``"other"`` for the overflow row), or None."""
        with self._lock:
            self._fold_locked()
            if fingerprint_id == OTHER:
                return self._other.as_dict()
            row = self._rows.get(fingerprint_id)
            return row.as_dict() if row is not None else None

    def reset(self) -> None:
        """Forget everything, including what is queued."""
        with self._lock:
            self._done.clear()
            self._pending.clear()
            self._rows = {}
            self._other = _Row(self._other.fp)

    def __len__(self) -> int:
        """The number of distinct fingerprints tracked (the ``other`` row not included)."""
        with self._lock:
            self._fold_locked()
            return len(self._rows)
