"""The fleet-wide quarantine: one member's link between its local breakers and Redis.

Local first, always: the guard's own :class:`~poolguard.policy.quarantine.Quarantine` keeps
refusing and tripping on its own, and this link only adds what the fleet knows.

- **Strikes** from every member go to one sliding window in Redis; the ``threshold``-th
  opens the fingerprint for the whole fleet. A member's own breaker opening (it counted
  enough strikes locally, or Redis was away) is pushed too, and never resets an entry the
  fleet already has: a member that (re)starts reads the state and aligns to it.
- **Broadcast** by pub/sub (a member refuses the statement within milliseconds), with the
  state in keys that expire, and a version number in every heartbeat reply so that a missed
  message is caught at the next heartbeat at the latest.
- **One probe per cool-down** across the fleet: past the cool-down every member's breaker
  stays *held* until a member claims the probe in Redis; the claim is a lease, renewed while
  the probe runs and left to lapse when no local caller used it, so that a member with
  traffic gets it next.
- **Release** on any member deletes the entry and every member releases it.

Everything that talks to Redis runs on the member's worker thread; :meth:`strike`,
:meth:`transition` and :meth:`released` only queue, so the statement path never waits.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from poolguard.fleet.store import Entry, Store
from poolguard.policy.quarantine import Quarantine, Transition

__all__ = ["QuarantineLink"]

log = logging.getLogger("poolguard.fleet")

#: Strikes and transitions queued while the worker catches up (or Redis is away): past it
#: the oldest go. Losing a strike costs at worst one more time-out somewhere.
_MAX_QUEUED = 10_000

_Op = tuple[Literal["strike", "open", "close"], str, str, str, float, int]


class QuarantineLink:
    """Applies the fleet's quarantine state to one local quarantine, and tells the fleet
    what happens locally."""

    def __init__(
        self,
        store: Store,
        quarantine: Quarantine,
        member: str,
        *,
        linger: float,
        probe_lease: float,
        on_transition: Callable[[Transition], None] | None,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.q = quarantine
        self.member = member
        self.linger = linger
        self.probe_lease = probe_lease
        self.on_transition = on_transition
        self._wake = wake
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: deque[_Op] = deque(maxlen=_MAX_QUEUED)
        self._due: dict[str, float] = {}  # fp -> when to (re)claim the probe
        self._granted: set[str] = set()  # probes this member holds in Redis
        self._known: set[str] = set()  # fingerprints the fleet confirmed open
        self._pending_release: set[str] = set()
        self._strike_ids = itertools.count(1)
        self._applying = threading.local()
        self.degraded = False
        self.qver = -1
        self.strikes_sent = 0
        self.strikes_dropped = 0
        self.remote_opened = 0
        self.remote_closed = 0
        self.probes_granted = 0

    # -- from the guard (never blocks) ----------------------------------------------------------
    def strike(self, fingerprint: str, summary: str) -> None:
        if self.degraded:
            self.strikes_dropped += 1
            return
        self._queue.append(("strike", fingerprint, summary, "", 0.0, 0))
        self._wake()

    def transition(self, t: Transition) -> None:
        if getattr(self._applying, "on", False):
            return  # the guard echoing a transition this link applied from the fleet
        if t.kind == "closed":
            self._forget(t.fingerprint)
            self._queue.append(("close", t.fingerprint, "", "probe", 0.0, 0))
        else:
            if not self.degraded:
                self.q.hold_probe(t.fingerprint)
            self._queue.append(("open", t.fingerprint, t.summary, t.kind, t.cooldown, t.timeouts))
        self._wake()

    def released(self, fingerprint: str) -> None:
        self._forget(fingerprint)
        with self._lock:
            self._pending_release.add(fingerprint)
        self._queue.append(("close", fingerprint, "", "release", 0.0, 0))
        self._wake()

    # -- the worker's side (Redis round trips; StoreError propagates to the member) ------------
    def work(self) -> float:
        """Send what is queued and claim the probes that are due; returns when to come back
        (a monotonic time). Raises the store's error when Redis fails."""
        while self._queue:
            op = self._queue[0]
            self._send(op)
            self._queue.popleft()
        now = self._clock()
        with self._lock:
            due = [fp for fp, at in self._due.items() if at <= now]
        for fp in due:
            self._claim(fp)
        with self._lock:
            return min(self._due.values(), default=now + 3600.0)

    def flush(self) -> None:
        """Send what is still queued (leaving the fleet); raises the store's error."""
        while self._queue:
            self._send(self._queue.popleft())

    def _send(self, op: _Op) -> None:
        kind, fp, summary, how, cooldown, timeouts = op
        q = self.q
        if kind == "strike":
            e = self.store.strike(
                fp,
                summary,
                self.member,
                f"{self.member}:{next(self._strike_ids)}",
                threshold=q.threshold,
                window=q.window,
                cooldown=q.cooldown,
                linger=self.linger,
            )
            self.strikes_sent += 1
            if e is not None:
                self.apply(e)
        elif kind == "open":
            e = self.store.open(
                fp,
                summary,
                self.member,
                how,
                cooldown=cooldown,
                max_cooldown=q.max_cooldown,
                timeouts=timeouts,
                linger=self.linger,
            )
            if e is not None:
                self.apply(e)
        else:
            self.store.close(fp, self.member, how)
            if how == "release":
                with self._lock:
                    self._pending_release.discard(fp)

    def _claim(self, fp: str) -> None:
        now = self._clock()
        status = self.q.probe_status(fp, now)
        if status is None:
            self._forget(fp)
            return
        if status == "open":
            left = self.q.retry_in(fp, now) or 0.0
            self._schedule(fp, now + max(left, 0.0))
            return
        mine = fp in self._granted
        if mine and status != "probing":
            # Granted, and no caller here used it: hold again and let the lease lapse, so a
            # member that has traffic for it can probe (never two probes at once).
            self.q.hold_probe(fp)
            if self.q.probe_status(fp, now) != "probing":
                self._granted.discard(fp)
                self._schedule(fp, now + self.probe_lease)
                return
        verdict, left = self.store.claim(
            fp, self.member, lease=self.probe_lease, linger=self.linger
        )
        now = self._clock()
        if verdict == "granted":
            if not mine:
                self.probes_granted += 1
            self._granted.add(fp)
            self.q.grant_probe(fp)
            self._schedule(fp, now + left * 0.8)
        elif verdict == "absent":
            # The entry expired (nobody probed for a long time) or was closed unseen: the
            # local breaker decides alone from now on.
            self._forget(fp)
            self.q.grant_probe(fp)
        else:  # "open" (cool-down moved) or "held" (another member probes)
            self._granted.discard(fp)
            self.q.hold_probe(fp)
            self._schedule(fp, now + left + 0.01)

    def resync(self) -> None:
        """Read the whole state (join, rejoin, a missed message): push what only this member
        knows, then align to everything the fleet holds; close what the fleet released."""
        with self._lock:
            releases = list(self._pending_release)
        for fp in releases:
            self.store.close(fp, self.member, "release")
            with self._lock:
                self._pending_release.discard(fp)
        now = self._clock()
        for entry in self.q.entries(now):
            if entry.fingerprint not in self._known:
                e = self.store.open(
                    entry.fingerprint,
                    entry.summary,
                    self.member,
                    "opened",
                    cooldown=max(entry.retry_at - now, 0.001),
                    max_cooldown=self.q.max_cooldown,
                    timeouts=self.q.threshold,
                    linger=self.linger,
                )
                if e is not None:
                    self.apply(e)
        qver, entries = self.store.state()
        seen = set()
        for e in entries:
            seen.add(e.fingerprint)
            self.apply(e)
        pending = {op[1] for op in list(self._queue) if op[0] == "open"}
        for fp in list(self._known - seen - pending):
            self._apply_closed(fp)
        self.qver = qver

    # -- applying the fleet's state (worker and listener threads) ------------------------------
    def apply(self, e: Entry) -> None:
        if e.kind == "closed":
            self._apply_closed(e.fingerprint)
            return
        if e.fingerprint in self._pending_release:
            return  # released here; the release is on its way
        now = self._clock()
        t = self.q.apply_remote(
            e.fingerprint,
            e.summary,
            now,
            retry_in=e.retry_in,
            cooldown=e.cooldown,
            trips=e.trips,
            timeouts=e.timeouts,
            hold=not self.degraded,
        )
        if self.q.retry_in(e.fingerprint, now) is None:
            return  # allow-listed here
        with self._lock:
            self._known.add(e.fingerprint)
        if not self.degraded:
            self._schedule(e.fingerprint, now + max(e.retry_in, 0.0))
        if t is not None:
            self.remote_opened += 1
            self._notify(t)

    def _apply_closed(self, fp: str) -> None:
        self._forget(fp)
        t = self.q.release(fp, self._clock())
        if t is not None:
            self.remote_closed += 1
            self._notify(t)

    def _notify(self, t: Transition) -> None:
        if self.on_transition is None:
            return
        self._applying.on = True
        try:
            self.on_transition(t)
        except Exception as exc:  # the guard's reporting must not stop the fleet's
            log.error("poolguard fleet: transition callback failed with %s", type(exc).__name__)
        finally:
            self._applying.on = False

    # -- degraded mode ---------------------------------------------------------------------------
    def lose_redis(self) -> None:
        """Redis is away: every member probes for itself until it is back."""
        self.degraded = True
        with self._lock:
            self._due.clear()
            self._granted.clear()
            self._known.clear()
        for fp in self.q.quarantined_ids():
            self.q.grant_probe(fp)
        dropped = sum(1 for op in self._queue if op[0] == "strike")
        self.strikes_dropped += dropped
        kept = [op for op in self._queue if op[0] == "close"]
        self._queue.clear()
        self._queue.extend(kept)

    def regain_redis(self) -> None:
        self.degraded = False
        for fp in self.q.quarantined_ids():
            self.q.hold_probe(fp)

    # -- bookkeeping -----------------------------------------------------------------------------
    def _schedule(self, fp: str, at: float) -> None:
        with self._lock:
            self._due[fp] = at
        self._wake()

    def _forget(self, fp: str) -> None:
        with self._lock:
            self._due.pop(fp, None)
            self._granted.discard(fp)
            self._known.discard(fp)

    def figures(self) -> dict[str, int]:
        return {
            "known": len(self._known),
            "probes_held": len(self._granted),
            "queued": len(self._queue),
            "strikes_sent": self.strikes_sent,
            "strikes_dropped": self.strikes_dropped,
            "remote_opened": self.remote_opened,
            "remote_closed": self.remote_closed,
            "probes_granted": self.probes_granted,
        }
