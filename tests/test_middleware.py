"""PoolGuardMiddleware: budgets per route template, refusal before dispatch, errors as
problem+json, streaming, client disconnects, Server-Timing; on Starlette and FastAPI, ``def``
and ``async def`` endpoints, sync and async engines, SQLite and a real PostgreSQL.

Every test that touches a guard builds it with ``make_guard``, which fails the test if a
connection or a gate slot is left behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Host, Mount, Route, Router, WebSocketRoute
from starlette.websockets import WebSocket

from poolguard import (
    BudgetExceeded,
    PoolGuardMiddleware,
    PoolSaturated,
    QueryQuarantined,
    QueryTimeout,
)
from poolguard.core.budget import current_scope
from poolguard.errors import Shed
from poolguard.integrations.asgi import inflight, middleware
from poolguard.integrations.asgi.middleware import DEFAULT_DEADLINE, MAX_READ_AHEAD, RouteRule

MakeGuard = Callable[..., Any]

# Runs until interrupted: SQLite's recursive CTE with no bound.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


# -- helpers ----------------------------------------------------------------------------------
def http_scope(
    path: str,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    root_path: str = "",
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("latin-1"),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


class DrivenRequest:
    """One hand-driven request: what the app receives, and every message it sends.

    Like uvicorn, ``receive`` reports ``http.disconnect`` once the response is complete (or
    after ``disconnect_after`` seconds, a client going away early).
    """

    def __init__(
        self,
        body: list[bytes] | None = None,
        *,
        disconnect_after: float | None = None,
        chunk_delay: float = 0.0,
    ) -> None:
        self.chunks = list(body or [b""])
        self.disconnect_after = disconnect_after
        self.chunk_delay = chunk_delay
        self.sent: list[dict[str, Any]] = []
        self.chunks_read = 0
        self.first_send_at: float | None = None
        self._complete = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.chunks:
            if self.chunk_delay and self.chunks_read:
                await asyncio.sleep(self.chunk_delay)
            self.chunks_read += 1
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}
        if self.disconnect_after is not None:
            await asyncio.sleep(self.disconnect_after)
        else:
            await self._complete.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.first_send_at is None:
            self.first_send_at = time.perf_counter()
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._complete.set()

    @property
    def starts(self) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == "http.response.start"]

    @property
    def status(self) -> int:
        (start,) = self.starts
        return int(start["status"])

    def header(self, name: str) -> list[str]:
        (start,) = self.starts
        return [v.decode() for k, v in start["headers"] if k.decode().lower() == name]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


@pytest.fixture(params=["task", "cancel_scope"])
def runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of running a handler: its own asyncio task (on asyncio), and the anyio
    cancel scope used on other event loops (forced here, on asyncio)."""
    if request.param == "cancel_scope":
        monkeypatch.setattr(middleware, "on_asyncio", lambda: False)
    return str(request.param)


def client(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def report() -> dict[str, Any]:
    """What budget the current request runs under (None outside any scope)."""
    s = current_scope()
    if s is None:
        return {"scope": None}
    assert s.deadline_at is not None
    return {
        "scope": True,
        "partition": s.partition,
        "deadline": round(s.deadline_at - s.started_at, 6),
        "statement_timeout": s.statement_timeout,
        "max_queries": s.budget.max_queries,
        "max_db_time": s.budget.max_db_time,
        "max_connections": s.budget.max_connections,
        "queries": s.queries,
    }


async def report_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(report())


def record_admissions(guard: Any) -> list[tuple[str, str | None]]:
    """(priority, partition) of every guard.admit() call the middleware makes."""
    calls: list[tuple[str, str | None]] = []
    admit = guard.admit

    def recording(priority: str = "normal", partition: str | None = None) -> Any:
        calls.append((priority, partition))
        return admit(priority, partition)

    guard.admit = recording
    return calls


def sqlite_engine(url: str, size: int = 3) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.QueuePool, pool_size=size, max_overflow=0)


def assert_problem(
    response: httpx.Response | DrivenRequest, status: int, kind: str, *, retry_after: bool
) -> dict[str, Any]:
    """A problem+json answer: status, type, Retry-After as required, nothing else leaking."""
    if isinstance(response, DrivenRequest):
        code, body = response.status, response.body
        ctype = response.header("content-type")
        retry = response.header("retry-after")
    else:
        code, body = response.status_code, response.content
        ctype = [response.headers["content-type"]]
        retry = response.headers.get_list("retry-after")
    assert code == status
    assert ctype == ["application/problem+json"]
    doc = json.loads(body)
    assert doc["type"] == f"https://poolguard.dev/problems/{kind}"
    assert doc["status"] == status
    assert doc["title"]
    assert "Traceback" not in body.decode()
    if retry_after:
        assert len(retry) == 1
        assert re.fullmatch(r"[1-9][0-9]*", retry[0]), retry
    else:
        assert retry == []
    return dict(doc)


# -- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"guard": "not a guard"}, TypeError, "guard"),
        ({"routes": [("/a", RouteRule())]}, TypeError, "routes"),
        ({"routes": {"/a": {"deadline": 1.0}}}, TypeError, r"routes\['/a'\]"),
        ({"routes": {1: RouteRule()}}, TypeError, "routes keys"),
        ({"routes": {"FETCH /a": RouteRule()}}, ValueError, "FETCH"),
        ({"routes": {"HEAD /a": RouteRule()}}, ValueError, "HEAD"),
        ({"routes": {"a": RouteRule()}}, ValueError, "starts with '/'"),
        ({"routes": {"GET /a b": RouteRule()}}, ValueError, "METHOD /template"),
        ({"routes": {"/a/{id:nope}": RouteRule()}}, ValueError, "not a route template"),
        (
            {"routes": {"GET /a/{id:int}": RouteRule(), "get /a/{id}": RouteRule()}},
            ValueError,
            "repeats",
        ),
        ({"default": {"deadline": 1.0}}, TypeError, "default"),
        ({"deadline_header": b"x-deadline"}, TypeError, "deadline_header"),
        ({"deadline_header": "x deadline"}, ValueError, "deadline_header"),
        ({"server_timing": "yes"}, TypeError, "server_timing"),
        ({"max_inflight": 0}, ValueError, "max_inflight"),
        ({"max_inflight": True}, TypeError, "max_inflight"),
        ({"max_inflight": 2.5}, TypeError, "max_inflight"),
    ],
)
def test_wrong_option_fails_at_construction_naming_it(
    make_guard: MakeGuard, sqlite_file_url: str, kwargs: dict[str, Any], error: type, name: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    options: dict[str, Any] = {"guard": guard, **kwargs}
    with pytest.raises(error, match=name):
        PoolGuardMiddleware(Starlette(), **options)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"deadline": 0}, ValueError, "deadline"),
        ({"deadline": float("inf")}, ValueError, "deadline"),
        ({"deadline": "1"}, TypeError, "deadline"),
        ({"statement_timeout": -1.0}, ValueError, "statement_timeout"),
        ({"max_queries": 0}, ValueError, "max_queries"),
        ({"max_queries": 1.5}, TypeError, "max_queries"),
        ({"max_db_time": float("nan")}, ValueError, "max_db_time"),
        ({"max_connections": 0}, ValueError, "max_connections"),
        ({"priority": "urgent"}, ValueError, "priority"),
        ({"exempt": "yes"}, TypeError, "exempt"),
    ],
)
def test_wrong_rule_field_fails_naming_it(kwargs: dict[str, Any], error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        RouteRule(**kwargs)


def test_route_rule_is_frozen() -> None:
    rule = RouteRule(deadline=1.0)
    with pytest.raises(AttributeError):
        rule.deadline = 2.0  # type: ignore[misc]


def test_one_guard_has_one_inflight_limit(make_guard: MakeGuard, sqlite_file_url: str) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    PoolGuardMiddleware(Starlette(), guard=guard, max_inflight=8)
    PoolGuardMiddleware(Starlette(), guard=guard, max_inflight=8)  # same limit: shared
    with pytest.raises(ValueError, match="max_inflight=9 conflicts"):
        PoolGuardMiddleware(Starlette(), guard=guard, max_inflight=9)


async def test_rule_for_an_unknown_template_is_reported_at_first_request(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    app = Starlette(routes=[Route("/reports/{id}", report_endpoint)])
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        routes={"GET /reprots/{id}": RouteRule(deadline=1.0), "POST /reports/{id}": RouteRule()},
    )
    async with client(app) as c:
        with pytest.raises(ValueError, match="match no route") as ei:
            await c.get("/reports/1")
        message = str(ei.value)
        assert "GET /reprots/{id}" in message
        assert "POST /reports/{id}" in message  # the template exists, the method does not
        assert "GET HEAD /reports/{id}" in message  # and what does exist is listed
        # Routes may be added after the middleware: once they exist, the rules apply.
        app.add_route("/reprots/{id}", report_endpoint)
        app.add_route("/reports/{id}", report_endpoint, methods=["POST"])
        r = await c.get("/reprots/7")
    assert r.status_code == 200
    assert r.json()["deadline"] == 1.0


# -- pass-through -----------------------------------------------------------------------------
async def test_lifespan_and_websocket_scopes_pass_through_untouched(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    seen: list[tuple[Any, Any, Any, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send, current_scope()))

    mw = PoolGuardMiddleware(inner, guard=guard, routes=None)

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        pass

    for kind in ("lifespan", "websocket"):
        scope = {"type": kind, "path": "/ws", "headers": []}
        snapshot = dict(scope)
        await mw(scope, receive, send)
        got_scope, got_receive, got_send, budget = seen.pop()
        assert got_scope is scope
        assert scope == snapshot
        assert got_receive is receive
        assert got_send is send
        assert budget is None


async def test_lifespan_and_websocket_work_through_the_middleware(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    events: list[str] = []

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"budget": current_scope() is not None})
        await websocket.close()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = Starlette(routes=[WebSocketRoute("/ws", ws)], lifespan=lifespan)
    app.add_middleware(PoolGuardMiddleware, guard=guard, routes={"/ws": RouteRule()})

    async def drive(scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = []

        async def receive() -> dict[str, Any]:
            return incoming.pop(0)

        async def send(message: Any) -> None:
            out.append(message)

        await app(scope, receive, send)
        return out

    lifespan_scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    startup_shutdown = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent = await drive(lifespan_scope, startup_shutdown)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["startup", "shutdown"]
    ws_scope = {**http_scope("/ws"), "type": "websocket", "scheme": "ws", "subprotocols": []}
    sent = await drive(ws_scope, [{"type": "websocket.connect"}])
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(sent[1]["text"]) == {"budget": False}


# -- budgets per route template -------------------------------------------------------------
def _nested_starlette_app() -> Starlette:
    async def raw_asgi(scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse(report())(scope, receive, send)

    return Starlette(
        routes=[
            Route("/reports/{id:int}", report_endpoint, methods=["GET", "POST"]),
            Mount(
                "/api",
                routes=[
                    Route("/items/{name}", report_endpoint),
                    Mount("/v2", routes=[Route("/things/{a}/{b}", report_endpoint)]),
                ],
            ),
            Mount("/static", app=raw_asgi),
            Host("{tenant}.example.org", app=Router(routes=[Route("/h/{x}", report_endpoint)])),
        ]
    )


@pytest.mark.parametrize(
    ("method", "path", "partition"),
    [
        ("GET", "/reports/1", "GET /reports/{id}"),
        ("GET", "/reports/99999", "GET /reports/{id}"),
        ("POST", "/reports/5", "POST /reports/{id}"),
        ("HEAD", "/reports/5", "GET /reports/{id}"),
        ("GET", "/api/items/shoe", "GET /api/items/{name}"),
        ("GET", "/api/v2/things/1/2", "GET /api/v2/things/{a}/{b}"),
        ("GET", "/static/css/site.css", "GET /static/{path}"),
        ("GET", "acme.example.org/h/1", "GET /h/{x}"),
    ],
)
async def test_partition_is_the_route_template(
    make_guard: MakeGuard, sqlite_file_url: str, method: str, path: str, partition: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    app = _nested_starlette_app()
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    host, _, rest = path.partition("/")
    headers = {"host": host} if host else {}
    async with client(app) as c:
        r = await c.request(method, "/" + rest, headers=headers)
    assert r.status_code == 200
    if method != "HEAD":
        assert r.json()["partition"] == partition
        assert r.json()["deadline"] == DEFAULT_DEADLINE


async def test_partitions_stay_bounded_whatever_the_paths(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    app = _nested_starlette_app()
    partitions: list[str] = []
    orig_admit = guard.admit

    def admit(priority: str = "normal", partition: str | None = None) -> Any:
        assert partition is not None
        partitions.append(partition)
        return orig_admit(priority, partition)

    guard.admit = admit
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    async with client(app) as c:
        for i in range(60):
            await c.get(f"/reports/{i}")
            await c.get(f"/api/items/item-{i}")
            await c.get(f"/no/such/path/{i}")
            await c.request(f"X{i}", f"/static/{i}")
    assert set(partitions) == {
        "GET /reports/{id}",
        "GET /api/items/{name}",
        "default",  # every unmatched request shares one partition
        "_OTHER /static/{path}",  # invented methods do not mint partitions
    }
    assert len(partitions) == 240


async def test_fastapi_included_routers_and_def_endpoints(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sqlite_engine(sqlite_file_url)
    guard = make_guard(engine)
    app = FastAPI()
    outer = APIRouter(prefix="/shop")
    inner = APIRouter(prefix="/orders")

    @inner.post("/{order_id}/pay")
    def pay(order_id: int) -> dict[str, Any]:  # a def endpoint: runs in the thread pool
        with engine.connect() as c:
            c.execute(sa.text("select 1"))
            c.execute(sa.text("select 2"))
        return report()

    @outer.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, Any]:
        return report()

    outer.include_router(inner)
    app.include_router(outer)
    admissions = record_admissions(guard)
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        routes={
            "POST /shop/orders/{order_id}/pay": RouteRule(max_queries=5, priority="critical"),
            "/shop/items/{item_id}": RouteRule(deadline=2.5),
        },
    )
    async with client(app) as c:
        paid = (await c.post("/shop/orders/12/pay")).json()
        got = (await c.get("/shop/items/abc")).json()
    assert paid["partition"] == "POST /shop/orders/{order_id}/pay"
    assert paid["max_queries"] == 5
    assert paid["queries"] == 2
    assert paid["deadline"] == DEFAULT_DEADLINE  # inherited from the default rule
    assert got["partition"] == "GET /shop/items/{item_id}"
    assert got["deadline"] == 2.5
    assert admissions == [
        ("critical", "POST /shop/orders/{order_id}/pay"),
        ("normal", "GET /shop/items/{item_id}"),
    ]


async def test_routes_added_later_and_mounted_sub_apps_get_their_own_template(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    app = FastAPI()
    api = APIRouter(prefix="/api")

    @api.get("/first/{n}")
    async def first(n: int) -> dict[str, Any]:
        return report()

    app.include_router(api)
    sub = Starlette(routes=[Route("/things/{thing}", report_endpoint)])
    app.mount("/sub", sub)
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    async with client(app) as c:
        assert (await c.get("/api/first/1")).json()["partition"] == "GET /api/first/{n}"
        assert (await c.get("/api/later/1")).status_code == 404

        @api.get("/later/{n}")  # added to the included router after it served requests
        async def later(n: int) -> dict[str, Any]:
            return report()

        assert (await c.get("/api/later/1")).json()["partition"] == "GET /api/later/{n}"
        assert (await c.get("/sub/things/x")).json()["partition"] == "GET /sub/things/{thing}"


async def test_method_rule_wins_head_takes_get_and_rules_inherit_the_default(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    heads: list[dict[str, Any]] = []

    async def endpoint(request: Request) -> Response:
        if request.method == "HEAD":
            heads.append(report())
        return JSONResponse(report())

    app = Starlette(routes=[Route("/r/{id:int}", endpoint, methods=["GET", "POST", "DELETE"])])
    admissions = record_admissions(guard)
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        default=RouteRule(deadline=4.0, statement_timeout=1.5, priority="sheddable"),
        routes={
            "/r/{id:int}": RouteRule(max_queries=7),
            "POST /r/{id}": RouteRule(deadline=1.0, priority="critical"),
        },
    )
    async with client(app) as c:
        get = (await c.get("/r/1")).json()
        post = (await c.post("/r/1")).json()
        delete = (await c.delete("/r/1")).json()
        assert (await c.head("/r/1")).status_code == 200
    assert get == {**get, "deadline": 4.0, "max_queries": 7, "statement_timeout": 1.5}
    assert post == {**post, "deadline": 1.0, "max_queries": None, "statement_timeout": 1.5}
    assert delete["partition"] == "DELETE /r/{id}"
    assert delete["max_queries"] == 7
    assert heads == [{**get, "queries": 0}]
    assert admissions == [
        ("sheddable", "GET /r/{id}"),
        ("critical", "POST /r/{id}"),
        ("sheddable", "DELETE /r/{id}"),
        ("sheddable", "GET /r/{id}"),
    ]


async def test_critical_rule_reaches_the_budget_scope(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))

    async def endpoint(request: Request) -> Response:
        s = current_scope()
        return Response(s.priority if s else "none")

    app = Starlette(routes=[Route("/pay", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard, default=RouteRule(priority="critical"))
    async with client(app) as c:
        assert (await c.get("/pay")).text == "critical"


async def test_exempt_route_gets_no_scope_and_is_never_shed(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        await release.wait()
        return JSONResponse(report())

    app = Starlette(routes=[Route("/slow", slow), Route("/health", report_endpoint)])
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        max_inflight=1,
        routes={"GET /health": RouteRule(exempt=True)},
    )
    async with client(app) as c:
        busy = asyncio.create_task(c.get("/slow"))
        while guard.gate.snapshot().held == 0 and not _inflight_full(app):
            await asyncio.sleep(0.005)
        assert (await c.get("/slow")).status_code == 503  # the one in-flight place is taken
        health = await c.get("/health")
        release.set()
        assert (await busy).status_code == 200
    assert health.status_code == 200
    assert health.json() == {"scope": None}


def _inflight_full(app: Starlette) -> bool:
    return any(c.count >= c.limit for c in list(inflight._in_flight.values()))


# -- the deadline header ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "deadline"),
    [
        (b"0.25", 0.25),
        (b" 1.5 ", 1.5),
        (b"1", 1.0),
        (b"30", 2.0),  # never lengthens
        (b"999999999", 2.0),
        (b"-1", 2.0),
        (b"nan", 2.0),
        (b"inf", 2.0),
        (b"1e-3", 2.0),
        (b"0x1", 2.0),
        (b"1_0", 2.0),
        (b"", 2.0),
        (b"0.5, 0.1", 2.0),
        (b"\xd9\xa1", 2.0),  # an Arabic-Indic one: float() would take it
    ],
)
async def test_deadline_header_can_only_shorten(
    make_guard: MakeGuard, sqlite_file_url: str, value: bytes, deadline: float
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    app = Starlette(routes=[Route("/r", report_endpoint)])
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        default=RouteRule(deadline=2.0),
        deadline_header="X-Request-Deadline",
    )
    ex = DrivenRequest()
    await app(http_scope("/r", headers=[(b"x-request-deadline", value)]), ex.receive, ex.send)
    assert ex.status == 200
    assert json.loads(ex.body)["deadline"] == pytest.approx(deadline)


async def test_deadline_header_is_ignored_unless_configured_or_repeated(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    off = Starlette(routes=[Route("/r", report_endpoint)])
    off.add_middleware(PoolGuardMiddleware, guard=guard, default=RouteRule(deadline=2.0))
    on = Starlette(routes=[Route("/r", report_endpoint)])
    on.add_middleware(
        PoolGuardMiddleware, guard=guard, default=RouteRule(deadline=2.0), deadline_header="x-dl"
    )
    async with client(off) as c:
        assert (await c.get("/r", headers={"x-dl": "0.5"})).json()["deadline"] == 2.0
    async with client(on) as c:
        assert (await c.get("/r", headers={"x-dl": "0.5"})).json()["deadline"] == 0.5
        twice = [("x-dl", "0.5"), ("x-dl", "0.4")]
        assert (await c.get("/r", headers=twice)).json()["deadline"] == 2.0


async def test_zero_deadline_header_refuses_the_first_statement_with_504(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sqlite_engine(sqlite_file_url)
    guard = make_guard(engine)
    ran: list[str] = []

    def endpoint(request: Request) -> Response:
        ran.append("handler")
        with engine.connect() as c:
            c.execute(sa.text("select 1"))
        return JSONResponse({})

    app = Starlette(routes=[Route("/r", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard, deadline_header="x-request-deadline")
    async with client(app) as c:
        for _ in range(20):  # never a race with a fast handler: it does not run at all
            r = await c.get("/r", headers={"x-request-deadline": "0"})
            doc = assert_problem(r, 504, "budget-exceeded", retry_after=False)
            assert "deadline" in doc["detail"]
    assert ran == []
    # Refused at the door, and counted like every other refusal (by kind and route).
    assert guard.stats()["refusals"] == {"budget": {"GET /r": 20}}


# -- errors from handlers -----------------------------------------------------------------------
def _raising_app(guard: Any, exc: BaseException, **kw: Any) -> Starlette:
    async def endpoint(request: Request) -> Response:
        raise exc

    app = Starlette(routes=[Route("/boom", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard, **kw)
    return app


@pytest.mark.parametrize(
    ("exc", "status", "kind", "retry_after"),
    [
        (PoolSaturated(waited=0.2, limit=0.2, retry_after=7.0), 503, "pool-saturated", "7"),
        (PoolSaturated(waited=0.2, limit=0.2), 503, "pool-saturated", "1"),
        (
            QueryQuarantined(fingerprint="ab" * 8, summary="SELECT t", retry_after=12.2),
            503,
            "query-quarantined",
            "13",
        ),
        (Shed(reason="queue_delay", retry_after=3.0), 503, "shed", "3"),
        (
            QueryTimeout(
                fingerprint="cd" * 8,
                summary="SELECT t",
                normalized="SELECT ?",
                timeout=1,
                elapsed=1,
            ),
            504,
            "query-timeout",
            None,
        ),
        (BudgetExceeded("deadline", used=2, allowed=1), 504, "budget-exceeded", None),
        (BudgetExceeded("max_db_time", used=2, allowed=1), 504, "budget-exceeded", None),
        (BudgetExceeded("max_queries", used=5, allowed=5), 503, "budget-exceeded", None),
        (BudgetExceeded("max_connections", used=1, allowed=1), 503, "budget-exceeded", None),
    ],
)
async def test_each_refusal_maps_to_its_status(
    make_guard: MakeGuard,
    sqlite_file_url: str,
    exc: Exception,
    status: int,
    kind: str,
    retry_after: str | None,
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    async with client(_raising_app(guard, exc)) as c:
        r = await c.get("/boom")
    doc = assert_problem(r, status, kind, retry_after=retry_after is not None)
    assert doc == exc.problem()
    assert doc["detail"]
    if retry_after is not None:
        assert r.headers["retry-after"] == retry_after


async def test_a_failing_problem_document_still_gives_the_status(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    class Broken(PoolSaturated):
        def problem(self) -> dict[str, Any]:
            raise TypeError("cannot describe myself")

    guard = make_guard(sqlite_engine(sqlite_file_url))
    async with client(_raising_app(guard, Broken(waited=0.1, limit=0.1))) as c:
        r = await c.get("/boom")
    doc = assert_problem(r, 503, "pool-saturated", retry_after=True)
    assert doc == {
        "type": "https://poolguard.dev/problems/pool-saturated",
        "title": "The database is busy",
        "status": 503,
    }


async def test_the_applications_own_exception_handler_wins(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    app = _raising_app(guard, PoolSaturated(waited=0.1, limit=0.1))

    async def handler(request: Request, exc: Exception) -> Response:
        return JSONResponse({"mine": type(exc).__name__}, status_code=429)

    app.add_exception_handler(PoolSaturated, handler)
    async with client(app) as c:
        r = await c.get("/boom")
    assert r.status_code == 429
    assert r.json() == {"mine": "PoolSaturated"}


async def test_refusal_inside_a_single_exception_group_is_mapped(
    make_guard: MakeGuard, sqlite_file_url: str, runner: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))

    async def endpoint(request: Request) -> Response:
        async def child() -> None:
            raise PoolSaturated(waited=0.1, limit=0.1, retry_after=2.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
        return Response()

    app = Starlette(routes=[Route("/g", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    async with client(app) as c:
        r = await c.get("/g")
    assert_problem(r, 503, "pool-saturated", retry_after=True)


async def test_other_exceptions_pass_through_unchanged(
    make_guard: MakeGuard, sqlite_file_url: str, runner: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    boom = KeyError("not ours")
    app = _raising_app(guard, boom)
    ex = DrivenRequest()
    with pytest.raises(KeyError) as ei:
        await app(http_scope("/boom"), ex.receive, ex.send)
    assert ei.value is boom
    assert ex.status == 500  # Starlette's ServerErrorMiddleware answered, not poolguard


async def test_refusal_after_the_response_started_is_reraised_not_answered_twice(
    make_guard: MakeGuard, sqlite_file_url: str, runner: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first,"
        raise QueryTimeout(
            fingerprint="ef" * 8, summary="SELECT t", normalized="SELECT ?", timeout=1, elapsed=1
        )

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(chunks())

    app = Starlette(routes=[Route("/s", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    ex = DrivenRequest()
    with pytest.raises(QueryTimeout):
        await app(http_scope("/s"), ex.receive, ex.send)
    assert len(ex.starts) == 1
    assert ex.status == 200
    assert ex.body == b"first,"


async def test_real_query_timeout_is_504_without_sql_or_parameters(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sqlite_engine(sqlite_file_url)
    guard = make_guard(engine)

    def endpoint(request: Request) -> Response:
        with engine.connect() as c:
            c.execute(
                sa.text(ENDLESS + " WHERE x != 'hunter2-literal' AND x != :p"),
                {"p": "param-secret"},
            )
        return Response()

    app = Starlette(routes=[Route("/slow", endpoint)])
    app.add_middleware(
        PoolGuardMiddleware, guard=guard, routes={"/slow": RouteRule(statement_timeout=0.2)}
    )
    async with client(app) as c:
        t0 = time.monotonic()
        r = await c.get("/slow")
    assert time.monotonic() - t0 < 2.0
    assert_problem(r, 504, "query-timeout", retry_after=False)
    for secret in ("hunter2", "param-secret", "RECURSIVE", "WHERE"):
        assert secret not in r.text


async def test_real_budget_limit_is_503_and_real_saturation_is_503_with_retry_after(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sqlite_engine(sqlite_file_url, size=1)
    guard = make_guard(engine, checkout_timeout=0.1)

    def chatty(request: Request) -> Response:
        with engine.connect() as c:
            for _ in range(5):
                c.execute(sa.text("select 1"))
        return Response()

    app = Starlette(routes=[Route("/chatty", chatty)])
    app.add_middleware(
        PoolGuardMiddleware, guard=guard, routes={"/chatty": RouteRule(max_queries=3)}
    )
    async with client(app) as c:
        assert_problem(await c.get("/chatty"), 503, "budget-exceeded", retry_after=False)
        held = engine.connect()  # the pool's only connection, taken outside any request
        try:
            r = await c.get("/chatty")
        finally:
            held.close()
    assert_problem(r, 503, "pool-saturated", retry_after=True)


async def test_fastapi_yield_dependency_and_background_task_errors(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    """Before the response: answered 503. After it (a yield dependency's cleanup, a
    background task): the response stands, the error reaches the server, no second start."""
    guard = make_guard(sqlite_engine(sqlite_file_url))
    app = FastAPI()

    def fails_on_setup() -> Iterator[int]:
        raise PoolSaturated(waited=0.1, limit=0.1, retry_after=4.0)
        yield 1  # pragma: no cover

    def fails_on_cleanup() -> Iterator[int]:
        yield 1
        raise QueryQuarantined(fingerprint="12" * 8, summary="SELECT t", retry_after=5.0)

    @app.get("/setup")
    def setup(dep: int = Depends(fails_on_setup)) -> dict[str, int]:
        return {"dep": dep}  # pragma: no cover

    @app.get("/cleanup")
    def cleanup(dep: int = Depends(fails_on_cleanup)) -> dict[str, int]:
        return {"dep": dep}

    @app.get("/background")
    def background(tasks: BackgroundTasks) -> dict[str, int]:
        def task() -> None:
            raise PoolSaturated(waited=0.1, limit=0.1)

        tasks.add_task(task)
        return {"ok": 1}

    app.add_middleware(PoolGuardMiddleware, guard=guard)
    async with client(app) as c:
        r = await c.get("/setup")
    assert_problem(r, 503, "pool-saturated", retry_after=True)
    assert r.headers["retry-after"] == "4"

    for path, error in (("/cleanup", QueryQuarantined), ("/background", PoolSaturated)):
        ex = DrivenRequest()
        with pytest.raises(error):
            await app(http_scope(path), ex.receive, ex.send)
        assert len(ex.starts) == 1
        assert ex.status == 200


# -- streaming --------------------------------------------------------------------------------
async def test_streaming_response_keeps_its_budget_until_the_stream_ends(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sqlite_engine(sqlite_file_url)
    guard = make_guard(engine)

    def rows() -> Iterator[bytes]:  # a sync generator: Starlette iterates it in threads
        with engine.connect() as c:
            for i in range(4):
                c.execute(sa.text("select :i"), {"i": i})
                s = current_scope()
                assert s is not None
                yield f"{s.partition}:{s.queries};".encode()

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(rows())

    app = Starlette(routes=[Route("/export/{kind}", endpoint)])
    app.add_middleware(
        PoolGuardMiddleware, guard=guard, routes={"/export/{kind}": RouteRule(max_queries=3)}
    )
    ex = DrivenRequest()
    with pytest.raises(BudgetExceeded):
        await app(http_scope("/export/csv"), ex.receive, ex.send)
    assert len(ex.starts) == 1
    assert ex.status == 200
    part = "GET /export/{kind}"
    assert ex.body == f"{part}:1;{part}:2;{part}:3;".encode()


async def test_async_streaming_on_an_async_engine(make_guard: MakeGuard, tmp_path: Any) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/stream.db")
    guard = make_guard(engine)

    async def rows() -> AsyncIterator[bytes]:
        async with engine.connect() as c:
            for i in range(3):
                await c.execute(sa.text("select :i"), {"i": i})
                await asyncio.sleep(0.01)
                s = current_scope()
                assert s is not None
                yield f"{s.queries},".encode()

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(rows())

    app = Starlette(routes=[Route("/export", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard, server_timing=True)
    try:
        async with client(app) as c:
            r = await c.get("/export")
        assert r.status_code == 200
        assert r.text == "1,2,3,"
        # Headers go out before the body: Server-Timing shows the work done by then.
        assert 'db-queries;desc="0"' in r.headers["server-timing"]
        assert guard.gate.held == 0
    finally:
        await engine.dispose()


# -- shedding ---------------------------------------------------------------------------------
async def test_inflight_limit_sheds_by_priority_fast_and_counts_once(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    sheds: list[dict[str, Any]] = []
    orig_shed = guard.telemetry.shed

    def record_shed(**kw: Any) -> None:
        sheds.append(kw)
        orig_shed(**kw)

    guard.telemetry.shed = record_shed
    release = asyncio.Event()

    async def held(request: Request) -> Response:
        await release.wait()
        return Response("done")

    app = Starlette(
        routes=[
            Route("/normal", held),
            Route("/other", held),
            Route("/bulk", held),
            Route("/pay", held),
        ]
    )
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        max_inflight=2,  # ceilings: sheddable 1, normal 2, critical 3
        routes={"/bulk": RouteRule(priority="sheddable"), "/pay": RouteRule(priority="critical")},
    )
    running: list[asyncio.Task[None]] = []
    exchanges: list[DrivenRequest] = []

    async def start(path: str) -> DrivenRequest:
        ex = DrivenRequest()
        exchanges.append(ex)
        running.append(asyncio.create_task(app(http_scope(path), ex.receive, ex.send)))
        await asyncio.sleep(0.01)
        return ex

    async def refused(path: str) -> DrivenRequest:
        ex = DrivenRequest()
        t0 = time.perf_counter()
        await app(http_scope(path), ex.receive, ex.send)
        assert ex.first_send_at is not None
        latencies.append(ex.first_send_at - t0)
        return ex

    latencies: list[float] = []
    granted_before = guard.gate.snapshot().granted_total
    await start("/normal")  # 1 in flight
    shed_bulk = await refused("/bulk")  # sheddable stops at 1
    await start("/other")  # 2
    shed_normal = await refused("/normal")  # normal stops at 2
    await start("/pay")  # critical goes on to 3
    shed_pay = await refused("/pay")
    for ex in (shed_bulk, shed_normal, shed_pay):
        doc = assert_problem(ex, 503, "shed", retry_after=True)
        assert doc["detail"] == "request shed (inflight_limit)"
    # Refusals are cheap: no database access, well under a millisecond each.
    for _ in range(30):
        await refused("/normal")
    assert statistics.median(latencies) < 0.001, latencies
    assert guard.gate.snapshot().granted_total == granted_before
    release.set()
    await asyncio.gather(*running)
    assert [ex.body for ex in exchanges] == [b"done"] * 3
    assert len(sheds) == 33
    # Every in-flight refusal is in stats() too, by route (and in metrics: poolguard.shed).
    assert guard.stats()["refusals"] == {
        "inflight": {"GET /bulk": 1, "GET /normal": 31, "GET /pay": 1}
    }
    assert sheds[:3] == [
        {"reason": "inflight_limit", "priority": "sheddable", "partition": "GET /bulk"},
        {"reason": "inflight_limit", "priority": "normal", "partition": "GET /normal"},
        {"reason": "inflight_limit", "priority": "critical", "partition": "GET /pay"},
    ]
    # Everyone has left: the next request is admitted.
    ex = DrivenRequest()
    release.set()
    await app(http_scope("/bulk"), ex.receive, ex.send)
    assert ex.status == 200


async def test_held_up_pool_sheds_before_dispatch_and_counts_once(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sqlite_engine(sqlite_file_url, size=1)
    guard = make_guard(engine, checkout_timeout=2.0)
    sheds: list[dict[str, Any]] = []
    orig_shed = guard.telemetry.shed

    def record_shed(**kw: Any) -> None:
        sheds.append(kw)
        orig_shed(**kw)

    guard.telemetry.shed = record_shed
    calls: list[str] = []

    def query(request: Request) -> Response:
        calls.append(request.url.path)
        with engine.connect() as c:
            c.execute(sa.text("select 1"))
        return Response("ok")

    app = Starlette(routes=[Route("/q/{n}", query)])
    app.add_middleware(PoolGuardMiddleware, guard=guard, max_inflight=10)
    holder = engine.connect()  # the only connection, held up
    async with client(app) as c:
        try:
            waiting = asyncio.create_task(c.get("/q/1"))
            for _ in range(200):
                if guard.gate.waiting:
                    break
                await asyncio.sleep(0.005)
            assert guard.gate.waiting == 1
            t0 = time.perf_counter()
            r = await c.get("/q/2")
            elapsed = time.perf_counter() - t0
        finally:
            holder.close()
        assert (await waiting).status_code == 200
    doc = assert_problem(r, 503, "shed", retry_after=True)
    assert doc["detail"] == "request shed (no_capacity)"
    assert elapsed < 0.05
    assert calls == ["/q/1"]  # the refused request never reached its handler
    assert sheds == [{"reason": "no_capacity", "priority": "normal", "partition": "GET /q/{n}"}]


# -- client disconnects -----------------------------------------------------------------------
async def test_disconnect_cancels_an_async_handler(
    make_guard: MakeGuard, sqlite_file_url: str, runner: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    outcome: list[str] = []

    async def endpoint(request: Request) -> Response:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        return Response()  # pragma: no cover

    app = Starlette(routes=[Route("/slow", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    ex = DrivenRequest(disconnect_after=0.1)
    t0 = time.monotonic()
    await app(http_scope("/slow"), ex.receive, ex.send)
    assert time.monotonic() - t0 < 1.0
    assert outcome == ["cancelled"]
    assert ex.sent == []  # nobody to answer


async def test_request_body_reaches_the_handler_whole_and_read_ahead_is_bounded(
    make_guard: MakeGuard, sqlite_file_url: str, runner: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    reads_before_handler: list[int] = []
    chunk = 16 * 1024
    chunks = [bytes([i]) * chunk for i in range(12)]
    ex = DrivenRequest(chunks)

    async def upload(request: Request) -> Response:
        await asyncio.sleep(0.05)  # the watcher reads meanwhile
        reads_before_handler.append(ex.chunks_read)
        body = await request.body()
        return Response(str(len(body)).encode() + b":" + bytes(sorted(set(body))))

    app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    await app(http_scope("/upload", "POST"), ex.receive, ex.send)
    assert ex.status == 200
    assert ex.body == str(12 * chunk).encode() + b":" + bytes(range(12))
    assert reads_before_handler == [MAX_READ_AHEAD // chunk]  # then it waited


async def test_disconnect_after_the_response_does_not_cancel_background_tasks(
    make_guard: MakeGuard, sqlite_file_url: str, runner: str
) -> None:
    guard = make_guard(sqlite_engine(sqlite_file_url))
    done: list[str] = []

    async def task() -> None:
        await asyncio.sleep(0.1)
        done.append("background")

    async def endpoint(request: Request) -> Response:
        return Response("ok", background=BackgroundTask(task))

    app = Starlette(routes=[Route("/r", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    ex = DrivenRequest()  # reports http.disconnect as soon as the response is complete
    await app(http_scope("/r"), ex.receive, ex.send)
    assert ex.body == b"ok"
    assert done == ["background"]


@pytest.mark.postgresql
async def test_disconnect_cancels_the_statement_on_postgresql(
    make_guard: MakeGuard, pg_async_url: str, pg_url: str
) -> None:
    engine = create_async_engine(pg_async_url, pool_size=2, max_overflow=0)
    guard = make_guard(engine, statement_timeout=10.0)
    admin = sa.create_engine(pg_url, poolclass=sa.NullPool)
    marker = "pg_sleep(5.0001)"  # a statement only this test runs

    async def endpoint(request: Request) -> Response:
        async with engine.connect() as c:
            await c.execute(sa.text(f"select {marker}"))
        return Response()  # pragma: no cover

    def active() -> int:
        with admin.connect() as c:
            n = c.execute(
                sa.text(
                    "select count(*) from pg_stat_activity where state = 'active' "
                    "and query like :q and pid <> pg_backend_pid()"
                ),
                {"q": f"%{marker}%"},
            ).scalar()
        return int(n or 0)

    app = Starlette(routes=[Route("/sleep", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    try:
        await _warm_up(engine)
        ex = DrivenRequest(disconnect_after=0.2)
        t0 = time.monotonic()
        await app(http_scope("/sleep"), ex.receive, ex.send)
        assert time.monotonic() - t0 < 1.0
        while engine.sync_engine.pool.checkedout() and time.monotonic() - t0 < 1.2:
            await asyncio.sleep(0.02)
        assert engine.sync_engine.pool.checkedout() == 0
        assert guard.checked_out == 0
        while active() and time.monotonic() - t0 < 1.2:
            await asyncio.sleep(0.05)
        assert active() == 0
        assert ex.sent == []
    finally:
        admin.dispose()
        await engine.dispose()


@pytest.mark.postgresql
async def test_disconnect_from_a_def_endpoint_waits_for_its_connection(
    make_guard: MakeGuard, pg_url: str
) -> None:
    """A thread cannot be interrupted: its statement ends at its time-out, and the request
    stays in flight until its connection is back."""
    engine = sa.create_engine(pg_url, pool_size=2, max_overflow=0)
    guard = make_guard(engine)
    with engine.connect() as c:  # as _warm_up
        c.execute(sa.text("select 1"))

    def endpoint(request: Request) -> Response:
        with engine.connect() as c:
            c.execute(sa.text("select pg_sleep(5)"))
        return Response()  # pragma: no cover

    app = Starlette(routes=[Route("/sleep", endpoint)])
    app.add_middleware(
        PoolGuardMiddleware, guard=guard, routes={"/sleep": RouteRule(statement_timeout=0.5)}
    )
    ex = DrivenRequest(disconnect_after=0.1)
    t0 = time.monotonic()
    await app(http_scope("/sleep"), ex.receive, ex.send)
    elapsed = time.monotonic() - t0
    assert 0.4 < elapsed < 2.0
    assert engine.pool.checkedout() == 0
    assert ex.sent == []


async def _warm_up(engine: AsyncEngine) -> None:
    # Connect (and initialise the dialect) first, so that the disconnect lands in the
    # statement rather than in the connect.
    async with engine.connect() as c:
        await c.execute(sa.text("select 1"))


# -- Server-Timing ----------------------------------------------------------------------------
async def test_server_timing_reports_db_time_wait_and_count(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sqlite_engine(sqlite_file_url)
    guard = make_guard(engine)

    def endpoint(request: Request) -> Response:
        with engine.connect() as c:
            c.execute(sa.text("select 1"))
            c.execute(sa.text("select 2"))
        return Response("ok", headers={"server-timing": "app;dur=1"})

    on = Starlette(routes=[Route("/t", endpoint)])
    on.add_middleware(PoolGuardMiddleware, guard=guard, server_timing=True)
    off = Starlette(routes=[Route("/t", endpoint)])
    off.add_middleware(PoolGuardMiddleware, guard=guard)
    async with client(on) as c:
        t0 = time.perf_counter()
        r = await c.get("/t")
        wall_ms = (time.perf_counter() - t0) * 1000
    timings = r.headers.get_list("server-timing")
    assert timings[0] == "app;dur=1"  # the app's own entry is kept
    m = re.fullmatch(
        r'db;dur=(\d+\.\d\d), db-wait;dur=(\d+\.\d\d), db-queries;desc="(\d+)"', timings[1]
    )
    assert m is not None, timings
    assert 0 < float(m[1]) <= wall_ms  # milliseconds, and within the request
    assert float(m[2]) <= wall_ms
    assert m[3] == "2"
    async with client(off) as c:
        assert (await c.get("/t")).headers.get_list("server-timing") == ["app;dur=1"]


# -- engines and endpoints --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sqlite", "aiosqlite", "psycopg", "asyncpg"])
async def test_fastapi_on_each_engine_kind(
    make_guard: MakeGuard, request: pytest.FixtureRequest, tmp_path: Any, kind: str
) -> None:
    if kind in ("psycopg", "asyncpg"):
        pg_url = request.getfixturevalue("pg_url")
        url = pg_url if kind == "psycopg" else pg_url.replace("+psycopg", "+asyncpg")
    else:
        driver = "sqlite" if kind == "sqlite" else "sqlite+aiosqlite"
        url = f"{driver}:///{tmp_path}/engines.db"
    app = FastAPI()
    if kind in ("aiosqlite", "asyncpg"):
        engine: Any = create_async_engine(url, pool_size=2, max_overflow=0)

        @app.get("/items/{item_id}")
        async def item(item_id: int) -> dict[str, Any]:
            async with engine.connect() as c:
                await c.execute(sa.text("select 1"))
                await c.execute(sa.text("select 2"))
            return report()

    else:
        engine = sa.create_engine(url, poolclass=sa.QueuePool, pool_size=2, max_overflow=0)

        @app.get("/items/{item_id}")
        def item(item_id: int) -> dict[str, Any]:
            with engine.connect() as c:
                c.execute(sa.text("select 1"))
                c.execute(sa.text("select 2"))
            return report()

    guard = make_guard(engine)
    app.add_middleware(
        PoolGuardMiddleware, guard=guard, routes={"/items/{item_id}": RouteRule(max_queries=5)}
    )
    try:
        async with client(app) as c:
            results = [await c.get(f"/items/{i}") for i in range(3)]
        for r in results:
            assert r.status_code == 200
            assert r.json()["queries"] == 2
            assert r.json()["partition"] == "GET /items/{item_id}"
        assert guard.gate.snapshot().granted_total >= 3
    finally:
        if isinstance(engine, AsyncEngine):
            await engine.dispose()


def test_in_flight_counter_is_thread_safe() -> None:
    counter = inflight.InFlight(1000, 500)
    admitted = [0] * 8

    def worker(i: int) -> None:
        for _ in range(2000):
            if counter.enter(1, f"p{i % 3}"):
                admitted[i] += 1
                counter.leave(f"p{i % 3}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.count == 0
    assert counter.by_partition == {}
    assert sum(admitted) == 16000


def test_in_flight_partition_share_applies_only_under_contention() -> None:
    counter = inflight.InFlight(10, 4)  # limit 10, a route's share 4 under contention
    # No contention: one route may use every place there is (nobody to be fair to).
    assert all(counter.enter(1, "busy") for _ in range(6))
    # Contention: a route over its share is refused, sheddable too; critical never is.
    assert not counter.enter(1, "busy", contended=True)
    assert not counter.enter(2, "busy", contended=True)
    assert counter.enter(0, "busy", contended=True)
    assert counter.enter(1, "healthy", contended=True)  # a route under its share gets in
    assert counter.of("busy") == 7
    assert all(counter.enter(1, "busy") for _ in range(2))
    assert counter.count == 10
    assert not counter.enter(1, "healthy")  # the backstop itself
    assert counter.enter(0, "healthy")  # critical work has half a limit of headroom


def test_default_in_flight_limit_is_a_backstop_above_the_thread_pool() -> None:
    # FastAPI's 40 threads plus SQLAlchemy's default pool (15) never reach it; nor do the
    # 60 closed-loop clients of bench_closed_loop.py.
    assert inflight.default_limit(15) == 100
    assert inflight.default_limit(50) == 200
