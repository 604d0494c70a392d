"""Admission policy: refuse work early when the pool's queue stands (CoDel).

A request that joins a queue it cannot get through in time is worse than useless: it holds
a worker, it makes every request behind it later, and its client retries anyway. So the
middleware asks before it runs a handler, and low-priority work is refused while the queue
in front of the pool is *standing*.

"Standing" is CoDel's notion (Kathleen Nichols and Van Jacobson, "Controlling Queue Delay",
2012; used for RPC queues in Meta's "Fail at Scale", 2015): a good queue absorbs a burst
and drains, so at least once per ``interval`` some request gets through within ``target``;
a bad queue never drains, so its *minimum* delay over an interval stays above ``target``.
Watching the minimum rather than an average or a percentile ignores bursts, which a pool
is there to absorb, and reacts only to sustained overload.

The samples are the queue delays (sojourn times) the gate reports for each checkout, 0.0
when there was no wait, plus the age of the oldest current waiter at each admission
decision: when the pool is wedged no checkout completes, so without that sample the worst
overload would be the one never seen. An empty queue reports 0.0, which counts as a drain.

Levels, from the time the queue has been standing (every sample above ``target``):

- level 0 below one ``interval``: admit everything;
- level 1 from one interval: shed "sheddable" work;
- level 2 while the queue stands and its latest delay exceeds :data:`SEVERE_FACTOR` times
  ``target``: shed "normal" work too, unless the pool is growing (it opened a connection to
  grow within the last interval): a queue behind connections being opened is a burst the
  pool is sized for. Measured in ``bench_closed_loop.py``: the one queue-delay refusal of
  a 12-pair run at 60 clients came in a slice's warm-up, while the pool reopened its
  overflow after 2.5 s idle; with the exception, 0 of 3 x 12 pairs, and scenario (d) of the
  outage replay (a burst at twice the pool's capacity) kept its admitted p99 (358 ms).

Normal work is not shed for a queue that stands but moves: 30 or 60 closed-loop clients on
a pool of 15 keep the gate's queue at 5-10 ms for as long as they run, and every request
still completes in a few milliseconds; shedding them (as a time-based escalation did, after
300 ms of standing) refused 2 of 5,107 and 6 of 2,188 healthy requests in
``bench_closed_loop.py`` and made nothing faster. A delay of ten targets (50 ms) is an
overload by any measure, and the outage replay's scenarios (a)-(d) meet the same goals with
this rule as with the old one.

Critical work is never shed for queue delay. A single sample at or below ``target`` ends
the episode (the queue drained, so the trailing interval's minimum is below target) and the
level drops to 0: CoDel's exit rule. Re-entering takes a full interval again, during which
the "no capacity" rule keeps the queue from growing past what the pool drains in a round.

Pure policy: no I/O, no clock, no lock. Each update is a couple of attribute stores, so
concurrent callers can at worst lose a sample to a race, which a minimum-over-an-interval
estimator tolerates by design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from poolguard import validate
from poolguard.core.budget import PRIORITIES, PRIORITY_RANK

__all__ = [
    "ADMIT",
    "MAX_RETRY_AFTER",
    "MIN_RETRY_AFTER",
    "PRIORITIES",
    "SEVERE_FACTOR",
    "CoDelShedder",
    "Decision",
    "estimate_retry_after",
]

#: A standing queue whose delay exceeds this many targets sheds normal work too (level 2):
#: it is past the point where shedding only the sheddable class could catch up.
SEVERE_FACTOR = 10.0
#: Bounds of Retry-After, in seconds. Less than 1 s cannot be said over HTTP; more than 30 s
#: outlives the overload it describes.
MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 30.0

_INF = math.inf
_CRITICAL = PRIORITY_RANK["critical"]
_NORMAL = PRIORITY_RANK["normal"]
_SHEDDABLE = PRIORITY_RANK["sheddable"]
# At level L, ranks above _LOWEST_KEPT[L] are shed for queue delay.
_LOWEST_KEPT = (_SHEDDABLE, _NORMAL, _CRITICAL)


@dataclass(frozen=True)
class Decision:
    """The verdict on one request.

    ``reason`` is "queue_delay" (the queue stands) or "no_capacity" (the queue is already
    longer than the pool drains in a round), None when admitted. ``retry_after`` is in
    whole seconds within [MIN_RETRY_AFTER, MAX_RETRY_AFTER] when refused, 0.0 when admitted.
    """

    admit: bool
    reason: str | None
    retry_after: float


#: The one admitting decision: shared, so admission allocates nothing.
ADMIT = Decision(True, None, 0.0)


def estimate_retry_after(waiting: int, drain_rate: float) -> float:
    """Seconds until the queue in front of the pool should have drained: a Retry-After.

    ``waiting / drain_rate`` rounded up to whole seconds (HTTP's Retry-After is an integer)
    and clamped to [1, 30]; 1 s when the drain rate is unknown (0, negative or NaN).
    """
    if drain_rate > 0:
        seconds = min(waiting / drain_rate, MAX_RETRY_AFTER)
        return float(max(MIN_RETRY_AFTER, math.ceil(seconds)))
    return MIN_RETRY_AFTER


class CoDelShedder:
    """Decides, before a handler runs, whether its request may join the pool's queue.

    ``target`` is the queue delay that is acceptable as a standing floor (5 ms); ``interval``
    how long it may be exceeded without a single drain before shedding starts (100 ms):
    roughly a round-trip of the work behind the queue, so a burst that clears in one round
    is never punished.
    """

    def __init__(self, *, target: float = 0.005, interval: float = 0.1) -> None:
        # Queue delays no server sees: no upper bound but finiteness.
        self.target = validate.seconds("target", target, limit=None)
        self.interval = validate.seconds("interval", interval, limit=None)
        if self.target >= self.interval:
            raise ValueError(
                f"target must be shorter than interval (the queue must be able to drain "
                f"within an interval); got target={target!r}, interval={interval!r}"
            )
        self._severe = self.target * SEVERE_FACTOR
        # Time of the first sample of the current run of samples above target (the queue
        # has not drained since); +inf when the latest sample was at or below target.
        self._above_since = _INF
        # Whether the latest sample exceeded SEVERE_FACTOR * target.
        self._severe_now = False
        #: Whether the latest sample was above target: only then does a sample at or below
        #: it change anything (it ends the episode), so a checkout that did not wait can skip
        #: :meth:`observe` otherwise. A plain attribute: every checkout reads it.
        self.standing = False

    def observe(self, sojourn: float, now: float) -> None:
        """Record one queue delay (seconds; 0.0 for a checkout that did not wait)."""
        if sojourn > self.target:
            if self._above_since == _INF:
                self._above_since = now
                self.standing = True
            self._severe_now = sojourn > self._severe
        else:
            self._above_since = _INF
            self._severe_now = False
            self.standing = False

    def level(self, now: float) -> int:
        """0 admits all; 1 sheds sheddable work; 2 sheds normal work too."""
        standing = now - self._above_since
        if standing < self.interval:
            return 0
        if self._severe_now:
            return 2
        return 1

    def decide(
        self,
        rank: int,
        now: float,
        *,
        oldest_wait: float = 0.0,
        waiting: int = 0,
        capacity: int = 1,
        drain_rate: float = 0.0,
        wait_bound: float = 0.0,
        growing: bool = False,
    ) -> Decision:
        """Admit or refuse a request of priority ``rank`` (PRIORITY_RANK) before it starts.

        ``oldest_wait`` is the age of the gate's oldest waiter (0.0 when nobody waits) and
        is recorded as a sample; ``waiting`` the gate's queue length; ``capacity`` the
        pool's size; ``drain_rate`` the checkouts completed per second, for Retry-After.

        Besides queue delay, a non-critical request is refused at once ("no_capacity") when
        ``waiting >= capacity`` and that queue would keep it waiting longer than
        ``wait_bound`` (the checkout bound: ``waiting / drain_rate``, or, with nothing
        drained lately, the oldest waiter's age): joining it would only end in a time-out.
        A long queue that drains fast is a healthy burst and is admitted (with the default
        ``wait_bound`` of 0 any such queue refuses). Sheddable work gives up at half the
        queue and half the bound. Critical work is always admitted.

        ``growing``: the pool opened a connection to grow within the last interval. The
        queue then stands behind connections being opened (a burst opening the pool's
        overflow, the first after a quiet spell), and normal work is not shed for its
        delay; sheddable work still is, and "no capacity" still applies.
        """
        self.observe(oldest_wait, now)
        if rank <= _CRITICAL:
            return ADMIT
        level = self.level(now)
        if growing and level > 1:
            level = 1
        if rank > _LOWEST_KEPT[level]:
            return Decision(False, "queue_delay", estimate_retry_after(waiting, drain_rate))
        if rank <= _NORMAL:
            limit, bound = capacity, wait_bound
        else:
            limit, bound = max(1, capacity // 2), wait_bound / 2
        if waiting >= limit:
            expected = waiting / drain_rate if drain_rate > 0 else math.inf
            if expected > bound or oldest_wait >= bound:
                return Decision(False, "no_capacity", estimate_retry_after(waiting, drain_rate))
        return ADMIT
