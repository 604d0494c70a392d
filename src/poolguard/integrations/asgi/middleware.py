"""The ASGI middleware: a budget per request, refusal before dispatch, refusals as HTTP.

Why a middleware and not a dependency or an exception handler: refusing has to happen
before a request is dispatched. FastAPI queues ``def`` endpoints in a 40-thread pool before
they ever reach the connection pool, so by the time a dependency runs the request has already
waited its turn (a plain burst at twice the pool's capacity measured a 4.3 s median). Here a
request is refused before the router sees it, for the price of a route match and a counter.

What refuses is the pool's state, never a count alone: CoDel's verdict on the gate's queue
(``guard.admit()``), and a route's share of the requests in flight only while that route's
queue at the gate stands. The in-flight limit itself is a backstop that a busy, healthy app
does not reach (:mod:`poolguard.integrations.asgi.inflight`).

Why pure ASGI (no ``BaseHTTPMiddleware``): streaming responses must keep streaming, the budget
scope (a contextvar) must be set in the very task that runs the handler, and a client that
goes away must be able to cancel that task.

Install it once, on the top-level application::

    app.add_middleware(PoolGuardMiddleware, guard=guard, routes={...})

See docs/middleware.md for every option and for what holds for ``def`` and ``async def``
endpoints.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from poolguard.core.budget import BudgetScope
from poolguard.errors import BudgetExceeded, PoolGuardError, PoolSaturated, QueryQuarantined, Shed
from poolguard.guard import PoolGuard
from poolguard.integrations.asgi.disconnect import (
    MAX_READ_AHEAD,
    Receiver,
    ResponseProgress,
    on_asyncio,
    run_cancel_once,
    run_in_cancel_scope,
)
from poolguard.integrations.asgi.inflight import default_limit, in_flight_for
from poolguard.integrations.asgi.routing import Expansions, collect_templates, find_route
from poolguard.integrations.asgi.rules import (
    BUILTIN_DEFAULT,
    DEFAULT_DEADLINE,
    METHODS,
    OTHER_METHOD,
    Plan,
    RouteRule,
    inherit,
    make_plan,
    parse_rules,
)
from poolguard.integrations.asgi.wire import (
    guard_error,
    header_deadline,
    send_problem,
    with_server_timing,
)
from poolguard.policy.gate import DEFAULT_PARTITION, Gate
from poolguard.policy.shedding import estimate_retry_after

__all__ = ["DEFAULT_DEADLINE", "MAX_READ_AHEAD", "PoolGuardMiddleware", "RouteRule"]

log = logging.getLogger("poolguard")

#: Smallest deadline an incoming deadline header can ask for: below it ("0": no time left)
#: the request is answered 504 at once, before the handler runs.
MIN_HEADER_DEADLINE = 0.001

#: Seconds past the deadline that an abandoned request waits for its connections to come back
#: (a statement stopped by its time-out still needs its rollback).
RETURN_GRACE = 1.0

#: How long, in shedding intervals (1 s by default), a route that CoDel shed for queue delay
#: stays held to its in-flight share. CoDel ends an episode on the first checkout that does
#: not wait and needs a whole interval to start the next, and each time the door opened
#: in between, the burst of scenario (d) of the outage replay (twice the pool's capacity)
#: queued another interval's arrivals behind the pool: admitted p99 411 ms against 327 ms
#: with the share held (1.5x the unloaded p99 is 396 ms).
SHED_MEMORY_INTERVALS = 10

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


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
        max_inflight: requests this guard admits at once, a backstop (default: four
            times the pool's capacity, at least 100); sheddable work stops at half of it,
            critical work may go half over. While a route's queue at the gate stands, that
            route may keep at most twice its share of the pool in flight.
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
        self.app = app
        self.guard = guard
        self.server_timing = server_timing
        self.max_inflight = _inflight_limit(max_inflight, guard)
        self._header = _header_key(deadline_header)
        self.deadline_header = deadline_header
        self._default = BUILTIN_DEFAULT if default is None else inherit(default, BUILTIN_DEFAULT)
        self._rules = parse_rules(routes)
        self._rules_checked = not self._rules
        self._plans: dict[tuple[str, str | None], Plan] = {}
        self._expanded: Expansions = {}
        self._unmatched = make_plan(self._default, DEFAULT_PARTITION)
        self._in_flight = in_flight_for(guard, self.max_inflight)
        shed = guard.config.shed
        self._stands_after: float = max(shed.interval, guard.config.timeouts.checkout_timeout / 2)
        self._shed_memory: float = SHED_MEMORY_INTERVALS * shed.interval

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
            asked = header_deadline(scope.get("headers"), self._header)
            if asked is not None and asked < deadline:
                if asked < MIN_HEADER_DEADLINE:
                    # The caller has no time left: answer now rather than start work that
                    # nobody will wait for.
                    spent = BudgetExceeded(
                        "deadline", used=0.0, allowed=asked, partition=plan.partition
                    )
                    self.guard.record_refusal("budget", plan.partition)
                    self.guard.telemetry.refusal(spent, kind="budget", partition=plan.partition)
                    await send_problem(send, spent, None)
                    return
                deadline = asked

        guard = self.guard
        in_flight = self._in_flight
        contended = in_flight.of(plan.partition) >= in_flight.partition_cap and (
            in_flight.recently_shed(plan.partition, time.monotonic())
            or self._waiters_running_out(plan.partition)
        )
        if not in_flight.enter(plan.rank, plan.partition, contended):
            gate: Gate = guard.gate
            if contended and gate.held >= gate.capacity - gate.reserve:
                # Still pressing on a full pool: the contention lasts. Left to lapse, the
                # door would open each time CoDel's episode ends (one checkout that does
                # not wait) and let another interval's arrivals queue behind the pool.
                in_flight.shed(plan.partition, time.monotonic() + self._shed_memory)
            # guard.admit() counts its own refusals; this one is ours to count.
            guard.record_refusal("inflight", plan.partition)
            guard.telemetry.shed(
                reason="inflight_limit", priority=plan.priority, partition=plan.partition
            )
            retry = self._estimate_retry_after()
            await send_problem(
                send,
                Shed(reason="inflight_limit", retry_after=retry, partition=plan.partition),
                retry,
            )
            return
        try:
            decision = guard.admit(plan.priority, plan.partition)
            if not decision.admit:
                if decision.reason == "queue_delay":
                    in_flight.shed(plan.partition, time.monotonic() + self._shed_memory)
                await send_problem(
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
                deadline, priority=plan.priority, partition=plan.partition, **plan.limits
            ) as budget:
                await self._serve(scope, receive, send, budget)
        finally:
            in_flight.leave(plan.partition)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, budget: BudgetScope) -> None:
        """Run the app inside the budget, watching for the client going away."""
        progress = ResponseProgress()
        server_timing = self.server_timing

        async def guarded_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                # Set before sending: if send itself fails, a second start is still wrong.
                progress.started = True
                if server_timing:
                    message = with_server_timing(message, budget)
            elif kind == "http.response.body" and not message.get("more_body", False):
                progress.complete = True
            await send(message)

        receiver = Receiver(receive)
        app = self.app(scope, receiver.receive, guarded_send)
        if on_asyncio():
            error = await run_cancel_once(app, receiver, progress)
        else:
            error = await run_in_cancel_scope(app, receiver, progress)

        if progress.abandoned:
            # The client is gone: nobody to answer. Cancelling may surface as an error from
            # the handler's database driver; that is the cancellation, not a fault.
            if error is not None:
                # The class only: a driver's message can quote the row that failed (a
                # unique violation's DETAIL names the duplicate value).
                log.debug(
                    "handler ended with %s after its client disconnected",
                    type(error).__qualname__,
                )
            await _until_connections_returned(budget)
            return
        if error is None:
            return
        refusal = guard_error(error)
        if refusal is None or progress.started:
            # Not ours to answer, or too late to: a second http.response.start is a protocol
            # error, so the server (and its error middleware) gets the exception instead.
            raise error
        await send_problem(
            send, refusal, self._retry_after_for(refusal), budget if server_timing else None
        )

    def _waiters_running_out(self, partition: str) -> bool:
        """Whether ``partition``'s waiters at the gate are running out of time: its oldest
        waiter has waited half the checkout bound (0.5 s by default; at least one shedding
        interval). Then, as after CoDel shed the route, the route's share of the requests in
        flight applies: more of its requests would join a queue they are unlikely to leave
        within their bound, each holding a thread (FastAPI's 40 are shared by every route)
        while it waits.

        Not "someone waits", nor a standing queue of CoDel's 100 ms: measured with 30
        closed-loop clients on two fast routes of a healthy app (bench_closed_loop.py and
        its gate probe, on a loaded 2-core machine), the gate had waiters in 1-3% of
        samples and its oldest waiter reached 106 ms, and a share applied at either of
        those refused healthy requests. A rogue's waiters wait their whole bound.
        """
        gate: Gate = self.guard.gate
        if not gate.waiting:
            return False
        return gate.oldest_wait(time.monotonic(), partition) >= self._stands_after

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

    def _plan_for(self, scope: Scope) -> Plan:
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
        elif method not in METHODS:
            method = OTHER_METHOD
        key = (method, found)
        plan = self._plans.get(key)
        if plan is None:
            rule = self._rules.get((method, found)) or self._rules.get((None, found))
            merged = inherit(rule, self._default) if rule is not None else self._default
            plan = self._plans[key] = make_plan(merged, f"{method} {found}")
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


def _inflight_limit(max_inflight: int | None, guard: PoolGuard) -> int:
    """``max_inflight`` checked, or the default for the guard's pool."""
    if max_inflight is None:
        return default_limit(guard.gate.capacity)
    if isinstance(max_inflight, bool) or not isinstance(max_inflight, int):
        raise TypeError(f"max_inflight must be an int, got {type(max_inflight).__name__}")
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be at least 1, got {max_inflight!r}")
    return max_inflight


def _header_key(deadline_header: str | None) -> bytes | None:
    """``deadline_header`` checked, as the lower-case bytes a scope's headers are matched on."""
    if deadline_header is None:
        return None
    if not isinstance(deadline_header, str):
        raise TypeError(f"deadline_header must be a str, got {type(deadline_header).__name__}")
    if not _TOKEN.fullmatch(deadline_header):
        raise ValueError(f"deadline_header must be an HTTP header name, got {deadline_header!r}")
    # ASGI servers lower-case header names; hand-built scopes are compared lowered too.
    return deadline_header.lower().encode("ascii")


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
