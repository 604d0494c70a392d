"""Route rules: what requests to one route template may spend, resolved once per route.

Kept apart from the middleware because rules are configuration, checked when the
middleware is built (a wrong field names itself), and resolved to a :class:`Plan` per
(method, template) the first time a request needs it: the request path then only looks it
up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from starlette.routing import compile_path

from poolguard.core.budget import PRIORITY_RANK, Budget

__all__ = [
    "BUILTIN_DEFAULT",
    "DEFAULT_DEADLINE",
    "LIMITS",
    "METHODS",
    "OTHER_METHOD",
    "Plan",
    "Priority",
    "RouteRule",
    "inherit",
    "make_plan",
    "parse_rules",
]

Priority = Literal["critical", "normal", "sheddable"]

#: Seconds a request may spend in total when no rule says otherwise. Twice the guard's
#: default statement time-out, so one slow but permitted statement plus a pool wait still
#: fits; well under the 30-60 s after which proxies, load balancers and clients give up (and
#: retry), so the server stops working on a request before its client has abandoned it.
DEFAULT_DEADLINE = 10.0

#: Methods kept in partition names; anything else is "_OTHER" (OpenTelemetry's convention)
#: so that a client inventing methods cannot mint partitions.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
OTHER_METHOD = "_OTHER"

#: The rule's limits that a request's budget scope takes as they are (``guard.budget``'s
#: keywords); the deadline and the priority get defaults first.
LIMITS = ("statement_timeout", "max_queries", "max_db_time", "max_connections")


@dataclass(frozen=True)
class RouteRule:
    """What requests to one route template may spend, and how they are treated.

    Every field left as None inherits the middleware's ``default`` rule (and from there
    :data:`DEFAULT_DEADLINE` and priority "normal"), so a rule names only what differs.
    Seconds are floats; ``priority`` is "critical" (shed last, draws on the pool's critical
    reserve), "normal" or "sheddable" (shed first). ``exempt`` routes (health checks,
    metrics) get no budget scope and are never shed or counted in flight: their statements
    still run under the guard's own time-outs.
    """

    deadline: float | None = None
    statement_timeout: float | None = None
    max_queries: int | None = None
    max_db_time: float | None = None
    max_connections: int | None = None
    priority: Priority | None = None
    exempt: bool = False

    def __post_init__(self) -> None:
        # Budget validates every field and names the wrong one (TypeError / ValueError).
        Budget(deadline=self.deadline, priority=self.priority, **self.limits())
        if not isinstance(self.exempt, bool):
            raise TypeError(f"exempt must be a bool, got {type(self.exempt).__name__}")

    def limits(self) -> dict[str, Any]:
        """The fields named in :data:`LIMITS`, by name."""
        return {name: getattr(self, name) for name in LIMITS}


BUILTIN_DEFAULT = RouteRule(deadline=DEFAULT_DEADLINE, priority="normal")


@dataclass(frozen=True)
class Plan:
    """A rule resolved for one (method, template): what a request needs, computed once."""

    partition: str
    priority: str
    rank: int
    exempt: bool
    deadline: float
    #: The rule's :data:`LIMITS`, as ``guard.budget``'s keywords.
    limits: Mapping[str, Any]


# -- parsing ------------------------------------------------------------------------------------
def parse_rules(routes: Mapping[str, RouteRule] | None) -> dict[tuple[str | None, str], RouteRule]:
    if routes is None:
        return {}
    if not isinstance(routes, Mapping):
        raise TypeError(
            f"routes must be a mapping of template to RouteRule, got {type(routes).__name__}"
        )
    rules: dict[tuple[str | None, str], RouteRule] = {}
    for key, rule in routes.items():
        if not isinstance(key, str):
            raise TypeError(f"routes keys must be str templates, got {key!r}")
        if not isinstance(rule, RouteRule):
            raise TypeError(f"routes[{key!r}] must be a RouteRule, got {type(rule).__name__}")
        parsed = _parse_key(key)
        if parsed in rules:
            raise ValueError(f"routes[{key!r}] repeats the rule for {_describe(parsed)}")
        rules[parsed] = rule
    return rules


def _parse_key(key: str) -> tuple[str | None, str]:
    """``"GET /items/{id:int}"`` -> ("GET", "/items/{id}"): the router's own path format."""
    parts = key.split()
    if len(parts) == 2:
        method: str | None = parts[0].upper()
        path = parts[1]
        if method == "HEAD":
            raise ValueError(f"routes[{key!r}]: HEAD requests take the GET rule; key it on GET")
        if method not in METHODS:
            raise ValueError(f"routes[{key!r}]: unknown HTTP method {parts[0]!r}")
    elif len(parts) == 1:
        method, path = None, parts[0]
    else:
        raise ValueError(f"routes[{key!r}] must be 'METHOD /template' or '/template'")
    if not path.startswith("/"):
        raise ValueError(f"routes[{key!r}]: a route template starts with '/'")
    try:
        _, path_format, _ = compile_path(path)
    except (AssertionError, ValueError) as err:
        raise ValueError(f"routes[{key!r}]: not a route template ({err})") from None
    return method, path_format


def _describe(key: tuple[str | None, str]) -> str:
    return f"{key[0]} {key[1]}" if key[0] else key[1]


def inherit(rule: RouteRule, base: RouteRule) -> RouteRule:
    def pick(name: str) -> Any:
        value = getattr(rule, name)
        return getattr(base, name) if value is None else value

    # Every field but ``exempt`` inherits; a rule is exempt or not by itself.
    inherited = {f.name: pick(f.name) for f in fields(RouteRule) if f.name != "exempt"}
    return RouteRule(**inherited, exempt=rule.exempt)


def make_plan(rule: RouteRule, partition: str) -> Plan:
    priority = rule.priority or "normal"
    return Plan(
        partition=partition,
        priority=priority,
        rank=PRIORITY_RANK[priority],
        exempt=rule.exempt,
        deadline=rule.deadline if rule.deadline is not None else DEFAULT_DEADLINE,
        limits=rule.limits(),
    )
