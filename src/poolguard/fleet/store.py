"""The fleet's Redis I/O: every round trip a member makes, with short time-outs and no retry.

redis-py runs the scripts of :mod:`poolguard.fleet.scripts` through ``register_script``:
EVALSHA, and after a ``NOSCRIPT`` (a restart, ``SCRIPT FLUSH``) one ``SCRIPT LOAD`` and the
EVALSHA again. The client is built without redis-py's retries (they would multiply the
socket time-out) because a member never waits on Redis for a request: a failed call is an
exception here and degraded mode in :mod:`poolguard.fleet.member`. Async callers get a
``redis.asyncio`` client of their own event loop, so a borrow never blocks the loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from poolguard.fleet import scripts

__all__ = ["REBALANCE", "Entry", "Reply", "Store", "StoreError", "Terms"]

#: The pub/sub message a member below its base share sends: "renew now, please".
REBALANCE = '"kind":"rebalance"'


#: What a failed round trip raises: time-outs, refused connections, a Redis that says
#: "LOADING" or "BUSY", a script error. All mean "Redis cannot help right now".
StoreError = (redis.RedisError, OSError)


@dataclass(frozen=True)
class Terms:
    """What every sync of one member says besides its request, the same each time: its
    leases' TTL, the fleet's cap, its pool, and the JSON ``poolguard check`` shows."""

    ttl: float
    cap: int
    pool: int
    info: str

    def args(self) -> tuple[int, int, int, str]:
        """The SYNC script's ARGV from ``ttl_ms`` to ``info_json``, less ``claim``'s place."""
        return _ms(self.ttl), self.cap, self.pool, self.info


@dataclass(frozen=True)
class Reply:
    """The fleet's answer to a sync: this member's leases and what it needs to decide."""

    seq: int
    leases: int
    members: int
    total: int
    fair: int
    grace: float
    starving: bool
    qver: int
    applied: bool


@dataclass(frozen=True)
class Entry:
    """A quarantine entry as the fleet holds it (``retry_in`` < 0: the cool-down is over)."""

    kind: str
    fingerprint: str
    summary: str
    retry_in: float
    cooldown: float
    trips: int
    timeouts: int
    origin: str


def parse_entry(raw: str | bytes) -> Entry | None:
    """An entry from a script's reply or a pub/sub message; None for anything malformed."""
    try:
        d = json.loads(raw)
        kind, fp = str(d["kind"]), str(d["fp"])
        if kind == "closed":
            return Entry(kind, fp, "", 0.0, 0.0, 0, 0, str(d.get("from", "")))
        return Entry(
            kind,
            fp,
            str(d.get("summary") or ""),
            float(d["retry_in"]) / 1000.0,
            float(d["cooldown"]) / 1000.0,
            int(d["trips"]),
            int(d["timeouts"]),
            str(d.get("from", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class Store:
    """One fleet's keys in one Redis. Thread-safe (redis-py's pool is)."""

    def __init__(self, url: str, name: str, *, socket_timeout: float) -> None:
        self.url = url
        self.prefix = f"poolguard:{{{name}}}:"
        self.channel = self.prefix + "events"
        self.socket_timeout = socket_timeout
        self._kw: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0),
            "retry_on_error": [],
            "health_check_interval": 0,
            "decode_responses": True,
        }
        self.client: redis.Redis = redis.Redis.from_url(url, **self._kw)
        self._scripts = {name: self.client.register_script(src) for name, src in _SOURCES.items()}
        self._keys = [self.prefix + "meta"]
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._async_lock = threading.Lock()

    def _run(self, script: str, *args: str | int | float) -> Any:
        return self._scripts[script](keys=self._keys, args=[self.prefix, *args])

    # -- leases -------------------------------------------------------------------------------
    def sync(
        self, member: str, seq: int, terms: Terms, *, want: int, claim: int, rejoin: bool
    ) -> Reply:
        """Renew this member's leases and ask for ``want`` of them (one round trip)."""
        r = self._run("sync", member, seq, want, claim, *terms.args(), "1" if rejoin else "0")
        return _reply(seq, r)

    async def sync_async(self, member: str, seq: int, terms: Terms, *, want: int) -> Reply:
        """As :meth:`sync` (a borrow) on the running loop's own ``redis.asyncio`` client."""
        script = await self._async_script()
        args = [self.prefix, member, seq, want, 0, *terms.args(), "0"]
        return _reply(seq, await script(keys=self._keys, args=args))

    def publish_rebalance(self, member: str) -> None:
        msg = json.dumps({"kind": "rebalance", "from": member}, separators=(",", ":"))
        self.client.publish(self.channel, msg)

    def leave(self, member: str) -> int:
        return int(self._run("leave", member))

    # -- quarantine ---------------------------------------------------------------------------
    def strike(
        self,
        fp: str,
        summary: str,
        member: str,
        strike_id: str,
        *,
        threshold: int,
        window: float,
        cooldown: float,
        linger: float,
    ) -> Entry | None:
        raw = self._run(
            "strike",
            fp,
            summary,
            member,
            strike_id,
            threshold,
            _ms(window),
            _ms(cooldown),
            _ms(linger),
        )
        return parse_entry(raw) if raw else None

    def open(
        self,
        fp: str,
        summary: str,
        member: str,
        kind: str,
        *,
        cooldown: float,
        max_cooldown: float,
        timeouts: int,
        linger: float,
    ) -> Entry | None:
        raw = self._run(
            "open",
            fp,
            summary,
            member,
            kind,
            _ms(cooldown),
            _ms(max_cooldown),
            timeouts,
            _ms(linger),
        )
        return parse_entry(raw)

    def close(self, fp: str, member: str, how: str) -> bool:
        return bool(self._run("close", fp, member, how))

    def claim(self, fp: str, member: str, *, lease: float, linger: float) -> tuple[str, float]:
        verdict, ms = self._run("claim", fp, member, _ms(lease), _ms(linger))
        return str(verdict), float(ms) / 1000.0

    def state(self) -> tuple[int, list[Entry]]:
        r = self._run("state")
        entries = [e for e in (parse_entry(x) for x in r[1:]) if e is not None]
        return int(r[0]), entries

    def read(self) -> list[Any]:
        return list(self._run("read"))

    # -- plumbing -----------------------------------------------------------------------------
    def pubsub(self) -> Any:
        """A subscriber connection of its own, reading with a longer time-out than requests
        (it idles between events)."""
        c = redis.Redis.from_url(self.url, **{**self._kw, "socket_timeout": 5.0})
        ps = c.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        ps.subscribe(self.channel)
        return ps

    async def _async_script(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._async_lock:
            entry = self._async.get(loop)
            if entry is not None:
                return entry[0]
            client = aredis.Redis.from_url(self.url, **self._kw)
            script = client.register_script(scripts.SYNC)
            closer = _close_with_loop(client)
            self._async[loop] = (script, closer)
        # The loop tracks the async generator from its first step, and closes it when it
        # shuts down (``asyncio.run`` does): the client's sockets go with their loop.
        await closer.__anext__()
        return script

    def close_clients(self) -> None:
        """Drop the connections (the async ones are closed on their own loops, unawaited)."""
        self.client.close()
        with self._async_lock:
            items = list(self._async.items())
            self._async.clear()
        for loop, (script, _) in items:
            client = script.registered_client
            if loop.is_closed():
                continue
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            except RuntimeError:  # the loop is shutting down: its sockets go with it
                pass


_SOURCES = {
    "sync": scripts.SYNC,
    "leave": scripts.LEAVE,
    "strike": scripts.STRIKE,
    "open": scripts.OPEN,
    "close": scripts.CLOSE,
    "claim": scripts.CLAIM,
    "state": scripts.STATE,
    "read": scripts.READ,
}


async def _close_with_loop(client: Any) -> AsyncIterator[None]:
    try:
        yield
        await asyncio.Event().wait()  # pragma: no cover - never resumed, only closed
    finally:
        await client.aclose()


def _reply(seq: int, r: Any) -> Reply:
    return Reply(
        seq=seq,
        leases=int(r[0]),
        members=int(r[1]),
        total=int(r[2]),
        fair=int(r[3]),
        grace=float(r[4]) / 1000.0,
        starving=bool(int(r[5])),
        qver=int(r[6]),
        applied=bool(int(r[7])),
    )
