"""One guard's membership of a Redis fleet: its leases, its threads, its degraded mode.

The member moves its gate's capacity to the leases it holds (see
:mod:`poolguard.fleet.shares` for the arithmetic) and leaves the quarantine to
:class:`~poolguard.fleet.quarantine_link.QuarantineLink`. Redis is a helper, never a
dependency of a request:

- a checkout within the base share touches only the local gate; :meth:`borrow` runs when
  the gate is full and makes one round trip with a socket time-out of tens of milliseconds;
  async callers borrow on their own loop's ``redis.asyncio`` client;
- renewals are batched: one heartbeat per member renews all its leases, whatever its
  checkout rate, on a worker thread of its own, which also sends strikes and claims probes;
- a member whose share shrinks stops its heaviest route first (the gate serves only routes
  below their share from the leases it still holds) and renews every :data:`DRAIN_BEAT`
  until it is down to its share; a member that joins opens its gate with its whole base
  share (measured: with one or two slots, a slow route took them all);
- when a round trip fails the member is *degraded*: its gate falls back to its last known
  base share (so every member doing the same keeps the fleet within the cap), breakers keep
  working locally, an alert goes out, and the heartbeat keeps trying; the first success
  rejoins (the member registers what it uses, reads the quarantine state, and carries on).

Requests are sequence-numbered: Redis drops a request older than the last it applied for
the member and the member ignores a reply older than the last it applied, so a borrow and a
heartbeat that cross never leave the gate above the leases.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from poolguard.fleet import shares
from poolguard.fleet.metrics import FleetMetrics
from poolguard.fleet.quarantine_link import QuarantineLink
from poolguard.fleet.store import REBALANCE, Reply, Store, StoreError, Terms, parse_entry
from poolguard.observe.alerts import Alerter, AlertKind
from poolguard.policy.gate import ACTIVE

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from poolguard.fleet.redis_fleet import RedisFleet
    from poolguard.policy.gate import Gate
    from poolguard.policy.quarantine import Quarantine, Transition

__all__ = ["RedisMember"]

log = logging.getLogger("poolguard.fleet")

#: Seconds between heartbeats while a member gives leases back or waits for its base share.
DRAIN_BEAT = 0.1


class _Borrow(NamedTuple):
    want: int
    seq: int
    t0: float  # perf_counter() when it started, for the borrow duration metric


class RedisMember:
    """Implements :class:`~poolguard.fleet.protocol.FleetMember` on Redis."""

    def __init__(
        self,
        fleet: RedisFleet,
        *,
        gate: Gate,
        quarantine: Quarantine,
        alerts: Alerter,
        pool_capacity: int,
        on_transition: Callable[[Transition], None] | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.fleet = fleet
        self.gate = gate
        self.alerts = alerts
        self.pool = max(0, int(pool_capacity))
        self.id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.store = Store(fleet.url, fleet.name, socket_timeout=fleet.socket_timeout)
        self._wake_event = threading.Event()
        self.link = QuarantineLink(
            self.store,
            quarantine,
            self.id,
            linger=fleet.quarantine_linger,
            probe_lease=fleet.probe_lease,
            on_transition=on_transition,
            wake=self._wake_event.set,
        )
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pool": self.pool})
        self._terms = Terms(fleet.lease_ttl, fleet.max_connections, self.pool, info)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._applied_seq = 0
        self._in_flight = 0
        self._no_borrow_until = 0.0
        self._stop = threading.Event()
        self._beat_now = False
        self._last_call = 0.0
        self.closed = False
        self.known = False  # reached Redis at least once: its base share is known
        self.degraded = False
        self.leases = 0
        self.base = 0
        self.members = 0
        self.total = 0
        self.starving = False
        self.last_sync = 0.0
        self.opened = False  # the gate opens once it holds its base share (see _apply)
        self._joined = time.monotonic()
        self.counts = {"granted": 0, "refused": 0, "failed": 0, "skipped": 0, "cancelled": 0}
        self.degraded_episodes = 0
        self.metrics = FleetMetrics(self, fleet=fleet.name, meter_provider=meter_provider)
        # Nothing is used before Redis says how much: the first heartbeat runs here, so the
        # member starts with its base share (or its fallback) and the fleet's quarantine.
        gate.set_capacity(0)
        self._heartbeat()
        self._worker = threading.Thread(
            target=self._run, name=f"poolguard-fleet-{fleet.name}", daemon=True
        )
        self._listener = threading.Thread(
            target=self._listen, name=f"poolguard-fleet-{fleet.name}-events", daemon=True
        )
        self._worker.start()
        self._listener.start()

    # -- the protocol --------------------------------------------------------------------------
    def borrow(self) -> bool:
        b = self._borrow_start()
        if b is None:
            return False
        try:
            return self._borrow_done(self._sync(b.seq, b.want), b)
        except StoreError as e:
            return self._borrow_failed(e, b)

    async def borrow_async(self) -> bool:
        b = self._borrow_start()
        if b is None:
            return False
        try:
            reply = await self.store.sync_async(self.id, b.seq, self._terms, want=b.want)
        except StoreError as e:
            return self._borrow_failed(e, b)
        except BaseException:  # cancelled: the heartbeat reconciles what Redis granted
            with self._lock:
                self._in_flight -= 1
            self.counts["cancelled"] += 1
            raise
        return self._borrow_done(reply, b)

    def strike(self, fingerprint: str, summary: str) -> None:
        if not self.closed:
            self.link.strike(fingerprint, summary)

    def transition(self, t: Transition) -> None:
        if not self.closed:
            self.link.transition(t)

    def released(self, fingerprint: str) -> None:
        if not self.closed:
            self.link.released(fingerprint)

    def snapshot(self) -> dict[str, Any]:
        g = self.gate
        return {
            "name": self.fleet.name,
            "member": self.id,
            "redis": self.fleet.where,
            "mode": "closed" if self.closed else "degraded" if self.degraded else "connected",
            "max_connections": self.fleet.max_connections,
            "members": self.members,
            "share": self.base,
            "leases": self.leases,
            "borrowed": max(0, self.leases - self.base),
            "capacity": g.capacity,
            "held": g.held,
            "starving": self.starving,
            "last_sync_age": round(time.monotonic() - self.last_sync, 3) if self.known else None,
            "borrows": dict(self.counts),
            "degraded_episodes": self.degraded_episodes,
            "quarantine": self.link.figures(),
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._wake_event.set()
        for t in (self._worker, self._listener):
            if t is not threading.current_thread():
                t.join(timeout=2.0)
        try:
            if not self.degraded:
                self.link.flush()  # strikes and releases still queued: worth one round trip each
            self.store.leave(self.id)
        except StoreError:
            pass  # the leases expire within one TTL
        self.store.close_clients()

    # -- figures -------------------------------------------------------------------------------
    def figures(self) -> dict[str, int]:
        return {
            "leases": self.leases,
            "share": self.base,
            "capacity": self.gate.capacity,
            "members": self.members,
            "degraded": int(self.degraded),
        }

    # -- borrowing -----------------------------------------------------------------------------
    def _borrow_start(self) -> _Borrow | None:
        """A borrow to make now (what to ask for, its sequence number, when it started), or
        None: nothing to ask, or nothing may be asked."""
        if self.closed or self.degraded or self.starving:
            self.counts["skipped"] += 1
            return None
        if time.monotonic() < self._no_borrow_until:
            self.counts["skipped"] += 1
            return None
        g = self.gate
        with self._lock:
            want = shares.borrow_want(
                leases=self.leases,
                held=g.held,
                waiting=g.waiting,
                in_flight=self._in_flight,
                pool=self.pool,
            )
            # One borrow in flight per member: it asks for every waiter, and the gate hands
            # what it gets to the queue, so a burst costs Redis one round trip, not one each.
            # Leases above the capacity are being given back (the gate shrinks, or has not
            # opened yet): a reply would only say so, and nothing may be borrowed then.
            if want <= g.capacity or self._in_flight or self.leases > g.capacity:
                self.counts["skipped"] += 1
                return None
            self._in_flight += 1
        return _Borrow(want, next(self._seq), time.perf_counter())

    def _sync(self, seq: int, want: int, *, claim: int = 0, rejoin: bool = False) -> Reply:
        """One round trip: renew this member's leases and ask for ``want`` of them."""
        return self.store.sync(self.id, seq, self._terms, want=want, claim=claim, rejoin=rejoin)

    def _borrow_done(self, reply: Reply, b: _Borrow) -> bool:
        elapsed = time.perf_counter() - b.t0
        before = self.gate.capacity
        with self._lock:
            self._in_flight -= 1
        self._apply(reply, keep=self.pool)
        raised = self.gate.capacity > before
        if reply.leases < b.want:
            self._no_borrow_until = time.monotonic() + self.fleet.refusal_backoff
        outcome = "granted" if raised else "refused"
        self.counts[outcome] += 1
        self.metrics.borrow(outcome, elapsed)
        return raised

    def _borrow_failed(self, err: BaseException, b: _Borrow) -> bool:
        with self._lock:
            self._in_flight -= 1
        self.counts["failed"] += 1
        self.metrics.borrow("failed", time.perf_counter() - b.t0)
        self._lose(err)
        return False

    # -- heartbeat -----------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        g = self.gate
        rejoin = self.degraded or self.known
        plan = shares.heartbeat_plan(
            capacity=g.capacity,
            held=g.held,
            waiting=g.waiting,
            base=self.base,
            pool=self.pool,
            starving=self.starving,
        )
        seq = next(self._seq)
        slots = g.slots
        if (plan.lower_to is not None or slots > g.capacity) and not self.degraded:
            # Lower first (the capacity, and what is still leased above it for light
            # partitions while the heavy one drains), tell Redis after.
            lower_to = g.capacity if plan.lower_to is None else plan.lower_to
            with self._lock:
                self._applied_seq = seq
                slots = g.set_capacity(lower_to, leased=self.leases)
        want = max(plan.want, g.held, slots)
        if not self.known:
            want = 0  # learn the fair share first; the next round trip asks for it
        try:
            reply = self._sync(seq, want, claim=g.capacity if rejoin else 0, rejoin=rejoin)
            if not self.known:
                base = shares.base_share(reply.fair, self.pool)
                seq = next(self._seq)
                reply = self._sync(seq, base)
                plan = shares.Plan(lower_to=None, want=base, keep=self.pool)
        except StoreError as e:
            self._lose(e)
            return
        was_degraded = self.degraded
        if was_degraded:
            with self._lock:
                self.degraded = False
                self._applied_seq = 0  # replies from before the outage are stale anyway
            self.link.regain_redis()
        self._apply(reply, keep=plan.keep)
        self._rebalance(reply)
        if was_degraded:
            self._alert(
                "fleet_rejoined",
                f"fleet {self.fleet.name}: Redis reachable again; rejoined with "
                f"{self.leases} of {self.fleet.max_connections} connections",
            )
            try:
                self.link.resync()
            except StoreError as e:
                self._lose(e)
                return
        elif reply.qver != self.link.qver:
            try:
                self.link.resync()
            except StoreError as e:
                self._lose(e)

    def _rebalance(self, reply: Reply) -> None:
        """A member below its base share asks the others to renew now (pub/sub) so that they
        learn the new fair share at once; each then gives back at its next heartbeat what it
        holds above it, as its connections come back (giving back faster would refuse its
        own healthy checkouts behind the slow ones still running). Best effort."""
        if not reply.applied or self.degraded:
            return
        now = time.monotonic()
        if reply.starving and self.leases < self.base and now - self._last_call > 0.2:
            self._last_call = now
            try:
                self.store.publish_rebalance(self.id)
            except StoreError:
                pass

    def _apply(self, reply: Reply, *, keep: int) -> None:
        with self._lock:
            if self.degraded or self.closed or reply.seq < self._applied_seq:
                return
            self._applied_seq = reply.seq
            self.known = True
            self.leases = reply.leases
            self.members = reply.members
            # Each member sees 1/members of a route's requests: a route that counts as
            # active (the gate keeps headroom free for it) must look as much further back.
            self.gate.active_window = ACTIVE * max(1, reply.members)
            self.total = reply.total
            self.base = shares.base_share(reply.fair, self.pool)
            self.starving = reply.starving
            self.last_sync = now = time.monotonic()
            capacity = max(0, min(reply.leases, self.pool, keep))
            if not self.opened:
                # A member that just joined opens its gate with its whole base share: with
                # one or two slots, the first slow requests to arrive would take them all.
                # The members above their share give it back within their slowest holder
                # (a statement time-out at most); after one lease TTL it opens anyway.
                if reply.leases >= self.base or now - self._joined >= self.fleet.lease_ttl:
                    self.opened = True
                else:
                    capacity = 0
            self.gate.set_capacity(capacity, leased=min(reply.leases, self.pool))

    # -- degraded mode -------------------------------------------------------------------------
    def _lose(self, err: BaseException) -> None:
        with self._lock:
            if self.degraded or self.closed:
                return
            self.degraded = True
            self.opened = True  # on its last known base share now, whatever it holds
            self._applied_seq = next(self._seq)  # whatever reply is still in flight is stale
            cap = shares.degraded_capacity(
                base=self.base, fallback=min(self.fleet.fallback_share, self.pool), known=self.known
            )
            self.gate.set_capacity(cap)
        self.degraded_episodes += 1
        self.metrics.degraded()
        self.link.lose_redis()
        self._alert(
            "fleet_degraded",
            f"fleet {self.fleet.name}: Redis unreachable ({type(err).__name__}); running on a "
            f"local cap of {self.gate.capacity} connections until it is back",
        )

    def _alert(self, kind: AlertKind, message: str) -> None:
        attrs: dict[str, str | int | float] = {
            "fleet": self.fleet.name,
            "capacity": self.gate.capacity,
            "max_connections": self.fleet.max_connections,
        }
        self.alerts.emit(kind, self.fleet.name, message, attrs, time.monotonic())

    def _run(self) -> None:
        every = self.fleet.heartbeat
        next_beat = time.monotonic() + every
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat or self._beat_now:
                self._beat_now = False
                self._heartbeat()
                next_beat = time.monotonic() + self._beat_every()
            come_back = next_beat
            if not self.degraded:
                try:
                    come_back = min(come_back, self.link.work())
                except StoreError as e:
                    self._lose(e)
            self._wake_event.wait(max(0.0, min(come_back - time.monotonic(), every)))
            self._wake_event.clear()

    def _beat_every(self) -> float:
        """Seconds to the next heartbeat: ``heartbeat``, or :data:`DRAIN_BEAT` while the gate
        holds leases above its capacity (it shrinks, or waits to open). A member below its
        base share waits for what a shrinking one gives back as its holders return, and a
        whole heartbeat of delay was measured as a second of newcomers on one slot."""
        g = self.gate
        if not self.degraded and (not self.opened or self.leases > g.capacity):
            return min(self.fleet.heartbeat, DRAIN_BEAT)
        return self.fleet.heartbeat

    def _listen(self) -> None:
        ps: Any = None
        while not self._stop.is_set():
            try:
                if ps is None:
                    ps = self.store.pubsub()
                    if self.link.qver >= 0:
                        self.link.qver = -2  # messages may have been missed: resync
                msg = ps.get_message(timeout=0.2)
            except StoreError:
                if ps is not None:
                    _close_quietly(ps)
                ps = None
                self._stop.wait(self.fleet.heartbeat)
                continue
            if msg is None or msg.get("type") != "message":
                continue
            data = msg["data"]
            if REBALANCE in data:
                if self.id not in data:
                    # A member is below its base share: renew now rather than at the next
                    # heartbeat, so what others do not need goes back at once.
                    self._beat_now = True
                    self._wake_event.set()
                continue
            e = parse_entry(data)
            if e is not None and e.origin != self.id:
                self.link.apply(e)
        if ps is not None:
            _close_quietly(ps)


def _close_quietly(ps: Any) -> None:
    try:
        ps.close()
    except Exception:  # closing a dead connection: nothing to do
        pass
