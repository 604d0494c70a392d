"""The ASGI middleware: a budget per request, refusal before dispatch, refusals as HTTP.

Why a middleware and not a dependency or an exception handler: refusing has to happen
before a request is dispatched. FastAPI queues ``def`` endpoints in a 40-thread pool before
they ever reach the connection pool, so by the time a dependency runs the request has already
waited its turn (a plain burst at twice the pool's capacity measured a 4.3 s median). Here a
request is refused before the router sees it, for the price of a route match and a counter.

Why pure ASGI (no ``BaseHTTPMiddleware``): streaming responses must keep streaming, the budget
scope (a contextvar) must be set in the very task that runs the handler, and a client that
goes away must be able to cancel that task.

Install it once, on the top-level application::

    app.add_middleware(PoolGuardMiddleware, guard=guard, routes={...})

See docs/middleware.md for every option and for what holds for ``def`` and ``async def``
endpoints.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from poolguard.core.budget import PRIORITY_RANK, Budget, BudgetScope
from poolguard.errors import BudgetExceeded, PoolGuardError, PoolSaturated, QueryQuarantined, Shed
from poolguard.guard import PoolGuard
from poolguard.integrations.asgi.disconnect import (
    MAX_READ_AHEAD,
    Exchange,
    Receiver,
    on_asyncio,
    run_cancel_once,
    run_in_cancel_scope,
)
from poolguard.integrations.asgi.inflight import in_flight_for
from poolguard.integrations.asgi.routing import MAX_DEPTH, Expansions, collect_templates, find_route
from poolguard.policy.gate import DEFAULT_PARTITION
from poolguard.policy.shedding import estimate_retry_after

__all__ = ["DEFAULT_DEADLINE", "MAX_READ_AHEAD", "PoolGuardMiddleware", "RouteRule"]

log = logging.getLogger("poolguard")

Priority = Literal["critical", "normal", "sheddable"]

#: Seconds a request may spend in total when no rule says otherwise. Twice the guard's
#: default statement time-out, so one slow but permitted statement plus a pool wait still
#: fits; well under the 30-60 s after which proxies, load balancers and clients give up (and
#: retry), so the server stops working on a request before its client has abandoned it.
DEFAULT_DEADLINE = 10.0

#: Smallest deadline an incoming deadline header can ask for: below it ("0": no time left)
#: the request is answered 504 at once, before the handler runs.
MIN_HEADER_DEADLINE = 0.001

#: Seconds past the deadline that an abandoned request waits for its connections to come back
#: (a statement stopped by its time-out still needs its rollback).
RETURN_GRACE = 1.0

#: Methods kept in partition names; anything else is "_OTHER" (OpenTelemetry's convention)
#: so that a client inventing methods cannot mint partitions.
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_OTHER = "_OTHER"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Seconds as a plain decimal: no sign, exponent, "inf", "nan", hex or digit separators (all
# of which float() accepts), bounded length.
_DEADLINE_VALUE = re.compile(rb"[ \t]*([0-9]{1,9}(?:\.[0-9]{1,9})?)[ \t]*")


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
        Budget(
            deadline=self.deadline,
            statement_timeout=self.statement_timeout,
            max_queries=self.max_queries,
            max_db_time=self.max_db_time,
            max_connections=self.max_connections,
            priority=self.priority,
        )
        if not isinstance(self.exempt, bool):
            raise TypeError(f"exempt must be a bool, got {type(self.exempt).__name__}")


_BUILTIN_DEFAULT = RouteRule(deadline=DEFAULT_DEADLINE, priority="normal")


@dataclass(frozen=True)
class _Plan:
    """A rule resolved for one (method, template): what a request needs, computed once."""

    partition: str
    priority: str
    rank: int
    exempt: bool
    deadline: float
    statement_timeout: float | None
    max_queries: int | None
    max_db_time: float | None
    max_connections: int | None


class PoolGuardMiddleware:
    """Gives every HTTP request a budget scope, refuses excess work before it is dispatched,
    and answers poolguard's refusals with ``application/problem+json``.

    Args:
        app: the ASGI application to wrap.
        guard: the :class:`~poolguard.PoolGuard` whose pool the requests draw on.
        routes: rules by route template, ``"GET /reports/{id}"`` or ``"/reports/{id}"``
            (every method); a method-specific rule wins. Templates are matched the way the
            router matches them, never on the raw path.
        default: the rule for requests without a route rule (its unset fields fall back to
            a 10 s deadline and priority "normal").
        deadline_header: name of an incoming header carrying the caller's remaining time in
            seconds (``"x-request-deadline"``); it can shorten a request's deadline, never
            lengthen it. None (the default) ignores such headers.
        server_timing: add a ``Server-Timing`` header with the request's database time,
            pool wait and statement count.
        max_inflight: requests this guard admits at once (default: twice the pool's
            capacity); sheddable work stops at half of it, critical work may go half over.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        guard: PoolGuard,
        routes: Mapping[str, RouteRule] | None = None,
        default: RouteRule | None = None,
        deadline_header: str | None = None,
        server_timing: bool = False,
        max_inflight: int | None = None,
    ) -> None:
        if not isinstance(guard, PoolGuard):
            raise TypeError(f"guard must be a PoolGuard, got {type(guard).__name__}")
        if default is not None and not isinstance(default, RouteRule):
            raise TypeError(f"default must be a RouteRule, got {type(default).__name__}")
        if not isinstance(server_timing, bool):
            raise TypeError(f"server_timing must be a bool, got {type(server_timing).__name__}")
        if max_inflight is None:
            max_inflight = 2 * guard.gate.capacity
        elif isinstance(max_inflight, bool) or not isinstance(max_inflight, int):
            raise TypeError(f"max_inflight must be an int, got {type(max_inflight).__name__}")
        elif max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight!r}")
        header: bytes | None = None
        if deadline_header is not None:
            if not isinstance(deadline_header, str):
                raise TypeError(
                    f"deadline_header must be a str, got {type(deadline_header).__name__}"
                )
            if not _TOKEN.fullmatch(deadline_header):
                raise ValueError(
                    f"deadline_header must be an HTTP header name, got {deadline_header!r}"
                )
            # ASGI servers lower-case header names; hand-built scopes are compared lowered too.
            header = deadline_header.lower().encode("ascii")

        self.app = app
        self.guard = guard
        self.server_timing = server_timing
        self.max_inflight = max_inflight
        self.deadline_header = deadline_header
        self._header = header
        self._default = _BUILTIN_DEFAULT if default is None else _inherit(default, _BUILTIN_DEFAULT)
        self._rules = _parse_rules(routes)
        self._rules_checked = not self._rules
        self._plans: dict[tuple[str, str | None], _Plan] = {}
        self._expanded: Expansions = {}
        self._unmatched = _plan(self._default, DEFAULT_PARTITION)
        self._in_flight = in_flight_for(guard, max_inflight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._rules_checked:
            self._check_rules(scope)
        plan = self._plan_for(scope)
        if plan.exempt:
            await self.app(scope, receive, send)
            return
        deadline = plan.deadline
        if self._header is not None:
            asked = _header_deadline(scope.get("headers"), self._header)
            if asked is not None and asked < deadline:
                if asked < MIN_HEADER_DEADLINE:
                    # The caller has no time left: answer now rather than start work that
                    # nobody will wait for.
                    spent = BudgetExceeded(
                        "deadline", used=0.0, allowed=asked, partition=plan.partition
                    )
                    await _send_problem(send, spent, None)
                    return
                deadline = asked

        guard = self.guard
        in_flight = self._in_flight
        if not in_flight.enter(plan.rank, plan.partition):
            # guard.admit() counts its own refusals; this one is ours to count.
            guard.telemetry.shed(
                reason="inflight_limit", priority=plan.priority, partition=plan.partition
            )
            retry = self._estimate_retry_after()
            await _send_problem(
                send,
                Shed(reason="inflight_limit", retry_after=retry, partition=plan.partition),
                retry,
            )
            return
        try:
            decision = guard.admit(plan.priority, plan.partition)
            if not decision.admit:
                await _send_problem(
                    send,
                    Shed(
                        reason=decision.reason or "shed",
                        retry_after=decision.retry_after,
                        partition=plan.partition,
                    ),
                    decision.retry_after,
                )
                return
            with guard.budget(
                deadline,
                statement_timeout=plan.statement_timeout,
                max_queries=plan.max_queries,
                max_db_time=plan.max_db_time,
                max_connections=plan.max_connections,
                priority=plan.priority,
                partition=plan.partition,
            ) as budget:
                await self._serve(scope, receive, send, budget)
        finally:
            in_flight.leave(plan.partition)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, budget: BudgetScope) -> None:
        """Run the app inside the budget, watching for the client going away."""
        exchange = Exchange()
        server_timing = self.server_timing

        async def guarded_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                # Set before sending: if send itself fails, a second start is still wrong.
                exchange.started = True
                if server_timing:
                    message = _with_server_timing(message, budget)
            elif kind == "http.response.body" and not message.get("more_body", False):
                exchange.complete = True
            await send(message)

        receiver = Receiver(receive)
        app = self.app(scope, receiver.receive, guarded_send)
        if on_asyncio():
            error = await run_cancel_once(app, receiver, exchange)
        else:
            error = await run_in_cancel_scope(app, receiver, exchange)

        if exchange.abandoned:
            # The client is gone: nobody to answer. Cancelling may surface as an error from
            # the handler's database driver; that is the cancellation, not a fault.
            if error is not None:
                log.debug("handler ended with %r after its client disconnected", error)
            await _until_connections_returned(budget)
            return
        if error is None:
            return
        refusal = _guard_error(error)
        if refusal is None or exchange.started:
            # Not ours to answer, or too late to: a second http.response.start is a protocol
            # error, so the server (and its error middleware) gets the exception instead.
            raise error
        await _send_problem(
            send, refusal, self._retry_after_for(refusal), budget if server_timing else None
        )

    def _retry_after_for(self, err: PoolGuardError) -> float | None:
        """Retry-After for the refusals that pass with time (503s); None for the rest.

        A spent budget or a timed-out statement would fail the same way again at once, so
        they get no Retry-After.
        """
        if not isinstance(err, (PoolSaturated, QueryQuarantined, Shed)):
            return None
        if err.retry_after is not None:
            return err.retry_after
        return self._estimate_retry_after()

    def _estimate_retry_after(self) -> float:
        """When the gate's queue should have drained, from its recent release rate."""
        gate = self.guard.gate
        return estimate_retry_after(gate.waiting, gate.drain_rate(time.monotonic()))

    # -- routes -------------------------------------------------------------------------------
    def _route_table(self, scope: Scope) -> list[Any] | None:
        """The routes the router will walk: the wrapped app's, else the Starlette app's."""
        for owner in (self.app, scope.get("app")):
            routes = getattr(owner, "routes", None)
            if isinstance(routes, list):
                return routes
        return None

    def _plan_for(self, scope: Scope) -> _Plan:
        routes = self._route_table(scope)
        if routes is None:
            return self._unmatched
        # Matching runs on a copy: some routers note their progress in the scope.
        found = find_route(routes, dict(scope), "", 0, self._expanded)
        if found is None:
            return self._unmatched
        method = str(scope.get("method", "")).upper()
        if method == "HEAD":
            # HEAD is served by the GET handler (Starlette adds HEAD to GET routes), so it
            # takes the GET rule and shares the GET partition.
            method = "GET"
        elif method not in _METHODS:
            method = _OTHER
        key = (method, found)
        plan = self._plans.get(key)
        if plan is None:
            rule = self._rules.get((method, found)) or self._rules.get((None, found))
            merged = _inherit(rule, self._default) if rule is not None else self._default
            plan = self._plans[key] = _plan(merged, f"{method} {found}")
        return plan

    def _check_rules(self, scope: Scope) -> None:
        """Refuse to serve with a rule that can never apply (a typo protects nothing).

        Runs at the first HTTP request rather than in ``__init__`` because routes may be
        added after the middleware (Starlette builds its middleware stack lazily, and
        routers can be included later); until it passes, every request raises.
        """
        routes = self._route_table(scope)
        if routes is None:
            raise ValueError(
                "PoolGuardMiddleware: routes= needs a Starlette or FastAPI application (one "
                "with .routes) to match templates against; wrap the application itself or use "
                "app.add_middleware()"
            )
        known: dict[str, set[str] | None] = {}
        collect_templates(routes, "", 0, known, self._expanded)
        unknown = []
        for method, template in self._rules:
            methods = known.get(template, set())
            if template not in known or not (
                method is None or methods is None or method in methods
            ):
                unknown.append(f"{method} {template}" if method else template)
        if unknown:
            listing = ", ".join(
                f"{' '.join(sorted(m)) if m else '*'} {t}" for t, m in sorted(known.items())
            )
            raise ValueError(
                f"PoolGuardMiddleware: routes= has rules that match no route: "
                f"{', '.join(unknown)}. Known templates: {listing or 'none'}"
            )
        self._rules_checked = True


async def _until_connections_returned(budget: BudgetScope) -> None:
    """After a cancel, keep the request in flight until its connections are back.

    A ``def`` endpoint cannot be interrupted: its thread keeps its connection until the
    statement ends (by its time-out or the deadline), and a cancel on asyncio stops waiting
    for that thread. Leaving now would free the in-flight slot while the connection is still
    held, and the limit exists to bound exactly that; so wait, up to the deadline and a grace.
    An async handler has given its connections back by now and this returns at once.
    """
    if budget.connections <= 0:
        return
    now = time.monotonic()
    until = (budget.deadline_at if budget.deadline_at is not None else now) + RETURN_GRACE
    while budget.connections > 0 and time.monotonic() < until:
        await anyio.sleep(0.01)


# -- rules ------------------------------------------------------------------------------------
def _parse_rules(routes: Mapping[str, RouteRule] | None) -> dict[tuple[str | None, str], RouteRule]:
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
        if method not in _METHODS:
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


def _inherit(rule: RouteRule, base: RouteRule) -> RouteRule:
    def pick(name: str) -> Any:
        value = getattr(rule, name)
        return getattr(base, name) if value is None else value

    return RouteRule(
        deadline=pick("deadline"),
        statement_timeout=pick("statement_timeout"),
        max_queries=pick("max_queries"),
        max_db_time=pick("max_db_time"),
        max_connections=pick("max_connections"),
        priority=pick("priority"),
        exempt=rule.exempt,
    )


def _plan(rule: RouteRule, partition: str) -> _Plan:
    priority = rule.priority or "normal"
    return _Plan(
        partition=partition,
        priority=priority,
        rank=PRIORITY_RANK[priority],
        exempt=rule.exempt,
        deadline=rule.deadline if rule.deadline is not None else DEFAULT_DEADLINE,
        statement_timeout=rule.statement_timeout,
        max_queries=rule.max_queries,
        max_db_time=rule.max_db_time,
        max_connections=rule.max_connections,
    )


# -- the wire ---------------------------------------------------------------------------------
def _header_deadline(headers: Any, name: bytes) -> float | None:
    """The caller's remaining time from its deadline header; None when absent or unusable.

    A repeated header is ignored rather than guessed at (which copy is the caller's?).
    """
    try:
        found: bytes | None = None
        for key, value in headers or ():
            if key.lower() == name:
                if found is not None:
                    return None
                found = value
        if found is None:
            return None
        match = _DEADLINE_VALUE.fullmatch(found)
    except (TypeError, ValueError, AttributeError):  # a malformed scope: ignore the header
        return None
    if match is None:
        return None
    return float(match.group(1))


def _guard_error(exc: BaseException) -> PoolGuardError | None:
    """The poolguard refusal behind ``exc``, also inside single-exception groups."""
    for _ in range(MAX_DEPTH):
        if isinstance(exc, PoolGuardError):
            return exc
        inner = getattr(exc, "exceptions", None)  # (Base)ExceptionGroup, also on 3.10
        if not (isinstance(inner, tuple) and len(inner) == 1):
            return None
        exc = inner[0]
    return None


def _retry_after_value(seconds: float) -> bytes:
    if not math.isfinite(seconds) or seconds < 1:
        return b"1"
    return str(math.ceil(seconds)).encode("ascii")


def _server_timing_value(budget: BudgetScope) -> bytes:
    return (
        f"db;dur={budget.db_time * 1000:.2f}, db-wait;dur={budget.pool_wait * 1000:.2f}, "
        f'db-queries;desc="{budget.queries}"'
    ).encode("ascii")


def _with_server_timing(message: Message, budget: BudgetScope) -> Message:
    # A new message: the app may reuse its own dict and its header list.
    headers = [*message.get("headers", ()), (b"server-timing", _server_timing_value(budget))]
    return {**message, "headers": headers}


def _problem_document(err: PoolGuardError) -> dict[str, Any]:
    """``err.problem()``, or its literal-free essentials if building it fails.

    A refusal must reach the client as its 503/504 whatever happens to its description:
    a 500 would hide the very status that tells the client to back off.
    """
    try:
        return err.problem()
    except Exception:
        log.warning("%s.problem() failed; answering with a minimal document", type(err).__name__)
        return {
            "type": f"https://poolguard.dev/problems/{err.kind}",
            "title": err.title,
            "status": err.http_status,
        }


async def _send_problem(
    send: Send, err: PoolGuardError, retry_after: float | None, budget: BudgetScope | None = None
) -> None:
    """Answer with ``err``'s RFC 9457 document: no SQL, parameters or traceback in it."""
    body = json.dumps(_problem_document(err), separators=(",", ":")).encode("utf-8")
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", _retry_after_value(retry_after)))
    if budget is not None:
        headers.append((b"server-timing", _server_timing_value(budget)))
    await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
