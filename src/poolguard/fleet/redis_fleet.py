"""``RedisFleet``: the configuration every member of one fleet shares, checked once.

One ``RedisFleet`` is a value (a URL, a name, a budget and timings); ``PoolGuard(engine,
fleet=fleet)`` calls :meth:`RedisFleet.join` and gets a member of its own. Every option is
validated here, at construction, and an error names the option. redis-py is imported only
when a ``RedisFleet`` is built, so ``import poolguard.fleet`` works on a core install.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from typing_extensions import Unpack

    from poolguard.fleet.member import RedisMember
    from poolguard.fleet.protocol import JoinParts

__all__ = ["RedisFleet", "read_fleet"]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _require_redis() -> None:
    try:
        import redis
        import redis.asyncio  # noqa: F401
    except ImportError as e:
        raise ImportError("RedisFleet needs redis-py: pip install 'poolguard[redis]'") from e


def _seconds(name: str, value: object, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or not low <= v <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g} seconds, got {value!r}")
    return v


def _count(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class RedisFleet:
    """Every replica of one app (``name``) shares ``max_connections`` and its quarantine.

    - ``max_connections``: the fleet's budget of checked-out connections, at every moment,
      whatever the number of members. Size it from the database server's limit (see
      docs/fleet.md): it is the cap, not a per-process number.
    - ``socket_timeout`` (0.05 s): the longest any round trip to Redis may take; past it the
      member is degraded. Tens of milliseconds: a request never waits longer on Redis.
    - ``lease_ttl`` (5 s) and ``heartbeat`` (1 s): a member renews all its leases once per
      heartbeat; a crashed member's leases return within ``lease_ttl + heartbeat``.
      ``heartbeat`` must be at most a third of ``lease_ttl`` (two renewals may fail).
    - ``fallback_share`` (1): the local cap of a member that has never reached Redis (it
      started while Redis was down), so it serves at a trickle without knowing its share.
    - ``refusal_backoff`` (0.05 s): after the fleet refused a borrow, checkouts do not ask
      again for this long (a saturated fleet must not turn every checkout into a round trip).
    - ``probe_lease``: how long a member holds the fleet's one probe (default: the guard's
      quarantine cool-down is not known here, so 10 s); renewed while the probe runs.
    - ``quarantine_linger`` (600 s): how long an entry outlives its cool-down in Redis if
      nobody probes it (then it expires; members that still hold it decide locally).
    - ``meter_provider``: where the fleet's metrics go (default: the global provider).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        max_connections: int,
        socket_timeout: float = 0.05,
        lease_ttl: float = 5.0,
        heartbeat: float = 1.0,
        fallback_share: int = 1,
        refusal_backoff: float = 0.05,
        probe_lease: float = 10.0,
        quarantine_linger: float = 600.0,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise TypeError(f"url must be a redis:// URL string, got {url!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"url must start with redis://, rediss:// or unix://, got {parts.scheme!r}"
            )
        if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
            raise ValueError(
                f"name must be a non-empty str of letters, digits and -_.: , got {name!r}"
            )
        self.url = url
        self.name = name
        self.max_connections = _count("max_connections", max_connections, low=1)
        self.socket_timeout = _seconds("socket_timeout", socket_timeout, low=0.001, high=5.0)
        self.lease_ttl = _seconds("lease_ttl", lease_ttl, low=0.1, high=3600.0)
        self.heartbeat = _seconds("heartbeat", heartbeat, low=0.01, high=self.lease_ttl / 3)
        if self.socket_timeout >= self.heartbeat:
            raise ValueError(
                f"socket_timeout must be shorter than heartbeat ({self.heartbeat:g} s), "
                f"got {socket_timeout!r}"
            )
        self.fallback_share = _count("fallback_share", fallback_share, low=0)
        if self.fallback_share > self.max_connections:
            raise ValueError(
                f"fallback_share must be <= max_connections ({self.max_connections}), "
                f"got {fallback_share!r}"
            )
        self.refusal_backoff = _seconds("refusal_backoff", refusal_backoff, low=0.0, high=10.0)
        self.probe_lease = _seconds("probe_lease", probe_lease, low=0.05, high=3600.0)
        self.quarantine_linger = _seconds(
            "quarantine_linger", quarantine_linger, low=1.0, high=86400.0
        )
        if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
            raise TypeError(
                f"meter_provider must be an OpenTelemetry MeterProvider, "
                f"got {type(meter_provider).__name__}"
            )
        self.meter_provider = meter_provider
        _require_redis()
        #: Where Redis is, without credentials: for stats and logs.
        self.where = f"{parts.scheme}://{parts.hostname or ''}:{parts.port or 6379}{parts.path}"

    def join(self, **parts: Unpack[JoinParts]) -> RedisMember:
        """A member for one guard (see :class:`~poolguard.fleet.protocol.Fleet`). Makes at
        most a few bounded round trips; with Redis away it returns a degraded member."""
        from poolguard.fleet.member import RedisMember

        return RedisMember(self, meter_provider=self.meter_provider, **parts)

    def __repr__(self) -> str:
        return (
            f"RedisFleet({self.where!r}, name={self.name!r}, "
            f"max_connections={self.max_connections})"
        )


def read_fleet(url: str, name: str, *, timeout: float = 1.0) -> dict[str, Any]:
    """The live fleet, for ``poolguard check --fleet``: its cap, members (leases, pool,
    seconds until their leases expire, host and pid) and how many statements it has
    quarantined. One read-only round trip; raises redis-py's error if Redis cannot answer.
    An unknown fleet reads as ``{"exists": False, ...}`` with no members."""
    _require_redis()
    from poolguard.fleet.store import Store

    store = Store(url, name, socket_timeout=timeout)
    try:
        _now, cap, created, leases, pools, left, info, quarantined = store.read()
    finally:
        store.close_clients()
    lease_map = json.loads(leases) if leases != "{}" else {}
    pool_map = json.loads(pools) if pools != "{}" else {}
    left_map = json.loads(left) if left != "{}" else {}
    info_map = json.loads(info) if info != "{}" else {}
    members = []
    for m in sorted(lease_map):
        try:
            extra = json.loads(info_map.get(m, "{}"))
        except ValueError:
            extra = {}
        members.append(
            {
                "member": m,
                "leases": int(lease_map[m]),
                "pool": int(pool_map.get(m, 0)),
                "expires_in": round(float(left_map.get(m, 0)) / 1000.0, 3),
                "host": str(extra.get("host", "")),
                "pid": int(extra.get("pid", 0)),
            }
        )
    return {
        "name": name,
        "exists": bool(created),
        "max_connections": int(cap) if cap else None,
        "members": members,
        "leases": sum(x["leases"] for x in members),
        "pools": sum(x["pool"] for x in members),
        "quarantined": int(quarantined),
    }


if TYPE_CHECKING:
    from poolguard.fleet.protocol import Fleet, FleetMember

    def _conforms(fleet: RedisFleet, member: RedisMember) -> tuple[Fleet, FleetMember]:
        """mypy checks here that RedisFleet and its members implement the guard's seam."""
        return fleet, member
