"""No path trick gets a handler run under a more permissive rule, and no input crashes the
middleware or lengthens a deadline.

The invariant, checked for every request below: whenever a handler runs, it runs under the
rule of its own route (its partition, deadline and limits), or, for the exempt route, with
no budget at all. Tricks either reach the same route (and so the same rule) or no handler
(404, 405 or a redirect). Requests go through httpx (which normalises some paths) and, for
raw paths a client would normalise, straight into the ASGI app with a hand-built scope.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from poolguard import PoolGuardMiddleware
from poolguard.core.budget import current_scope
from poolguard.integrations.asgi.middleware import RouteRule
from poolguard.integrations.asgi.wire import header_deadline as _header_deadline

MakeGuard = Callable[..., Any]
Calls = list[tuple[str, dict[str, Any]]]

DEFAULT = RouteRule(deadline=9.0)
RULES = {
    "/health": RouteRule(exempt=True),
    "/reports/{id}": RouteRule(deadline=0.5, max_queries=1, priority="sheddable"),
    "/admin/reports/{id}": RouteRule(deadline=0.25, max_queries=2, priority="sheddable"),
}
#: What each handler must see, whatever path reached it.
EXPECTED: dict[str, dict[str, Any]] = {
    "health": {"scope": None},
    "reports": {"partition": "GET /reports/{id}", "deadline": 0.5, "max_queries": 1},
    "admin-reports": {"partition": "GET /admin/reports/{id}", "deadline": 0.25, "max_queries": 2},
    "public": {"partition": "GET /public/{path}", "deadline": 9.0, "max_queries": None},
}


def budget_seen() -> dict[str, Any]:
    s = current_scope()
    if s is None:
        return {"scope": None}
    assert s.deadline_at is not None
    return {
        "partition": s.partition,
        "deadline": round(s.deadline_at - s.started_at, 6),
        "max_queries": s.budget.max_queries,
    }


def starlette_app(guard: Any, calls: Calls) -> Starlette:
    def handler(name: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            calls.append((name, budget_seen()))
            return JSONResponse({"handler": name})

        return endpoint

    app = Starlette(
        routes=[
            Route("/health", handler("health")),
            Route("/reports/{id}", handler("reports")),
            Route("/public/{path:path}", handler("public")),
            Mount("/admin", routes=[Route("/reports/{id}", handler("admin-reports"))]),
        ]
    )
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        default=DEFAULT,
        routes=RULES,
        deadline_header="x-request-deadline",
    )
    return app


def fastapi_app(guard: Any, calls: Calls) -> FastAPI:
    app = FastAPI()
    admin = APIRouter(prefix="/admin")

    @app.get("/health")
    async def health() -> dict[str, str]:
        calls.append(("health", budget_seen()))
        return {"handler": "health"}

    @app.get("/reports/{id}")
    async def reports(id: str) -> dict[str, str]:
        calls.append(("reports", budget_seen()))
        return {"handler": "reports"}

    @app.get("/public/{path:path}")
    async def public(path: str) -> dict[str, str]:
        calls.append(("public", budget_seen()))
        return {"handler": "public"}

    @admin.get("/reports/{id}")
    async def admin_reports(id: str) -> dict[str, str]:
        calls.append(("admin-reports", budget_seen()))
        return {"handler": "admin-reports"}

    app.include_router(admin)
    app.add_middleware(
        PoolGuardMiddleware,
        guard=guard,
        default=DEFAULT,
        routes=RULES,
        deadline_header="x-request-deadline",
    )
    return app


@pytest.fixture(params=["starlette", "fastapi"])
def app_and_calls(
    request: pytest.FixtureRequest, make_guard: MakeGuard, sqlite_file_url: str
) -> tuple[Any, Calls]:
    engine = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool, pool_size=2)
    guard = make_guard(engine)
    calls: Calls = []
    build = starlette_app if request.param == "starlette" else fastapi_app
    return build(guard, calls), calls


def raw_scope(
    path: str, method: str = "GET", *, root_path: str = "", headers: list[Any] | None = None
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


async def call_raw(app: Any, scope: dict[str, Any]) -> int:
    sent: list[dict[str, Any]] = []
    done = False
    complete = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await complete.wait()  # like a server: disconnect is reported once the response is out
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete.set()

    await app(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1
    return int(starts[0]["status"])


def check(calls: Calls, status: int, handler: str | None) -> None:
    """The invariant, and the outcome pinned for this trick."""
    for name, seen in calls:
        assert seen == EXPECTED[name], (name, seen)
    assert [name for name, _ in calls] == ([handler] if handler else [])
    if handler is None:
        assert status in (307, 404, 405), status
    else:
        assert status == 200


# (method, raw path, root_path) -> the handler that runs, if any
RAW_TRICKS: list[tuple[str, str, str, str | None]] = [
    ("GET", "/reports/1", "", "reports"),
    ("GET", "//reports/1", "", None),
    ("GET", "/%72eports/1", "", None),  # a server decodes first; undecoded, it is no route
    ("GET", "/reports%2F1", "", None),
    ("GET", "/reports/1/", "", None),  # redirected, not served
    ("GET", "/REPORTS/1", "", None),
    ("GET", "/Reports/1", "", None),
    ("GET", "/health/../reports/1", "", None),
    ("GET", "/./reports/1", "", None),
    ("GET", "/health%2F..%2Freports%2F1", "", None),
    ("GET", "/public/../reports/1", "", "public"),  # the public handler, under its own rule
    ("GET", "/public/%2e%2e/reports/1", "", "public"),
    ("GET", "/reports/1%00", "", "reports"),
    ("GET", "/reports/1\x00", "", "reports"),
    ("GET", "/reports/1;/health", "", None),
    ("GET", "/reports/1;health", "", "reports"),
    ("GET", "/health/", "", None),
    ("GET", "/HEALTH", "", None),
    ("GET", "/admin/reports/1", "", "admin-reports"),
    ("GET", "/admin//reports/1", "", None),
    ("GET", "/admin/../reports/1", "", None),
    ("GET", "/admin/reports/1/", "", None),
    ("GET", "/health/reports/1", "/health", "reports"),  # root_path is stripped, as the router does
    ("GET", "/reports/1", "/reports/1", None),
    ("get", "/reports/1", "", None),
    ("FOO", "/reports/1", "", None),
    ("POST", "/health", "", None),
]


@pytest.mark.parametrize(("method", "path", "root_path", "handler"), RAW_TRICKS)
async def test_raw_path_tricks_never_reach_a_handler_under_another_rule(
    app_and_calls: tuple[Any, Calls], method: str, path: str, root_path: str, handler: str | None
) -> None:
    app, calls = app_and_calls
    status = await call_raw(app, raw_scope(path, method, root_path=root_path))
    check(calls, status, handler)


# What httpx sends for these: some normalised (dot segments, percent-decoding).
CLIENT_TRICKS: list[tuple[str, str | None]] = [
    ("/reports/1", "reports"),
    ("/%72eports/1", "reports"),  # decoded to /reports/1: same route, same rule
    ("/reports%2F1", "reports"),
    ("/health/../reports/1", "reports"),
    ("/./reports/1", "reports"),
    ("/health%2F..%2Freports%2F1", None),
    ("/reports/1/", None),
    ("/REPORTS/1", None),
    ("/health", "health"),
    ("/public/..%2Freports%2F1", "public"),
    ("/admin/reports/1", "admin-reports"),
    ("/admin/%2E%2E/reports/1", None),
]


@pytest.mark.parametrize(("path", "handler"), CLIENT_TRICKS)
async def test_client_path_tricks_never_reach_a_handler_under_another_rule(
    app_and_calls: tuple[Any, Calls], path: str, handler: str | None
) -> None:
    app, calls = app_and_calls
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", follow_redirects=False
    ) as c:
        r = await c.get(path)
    check(calls, r.status_code, handler)


async def test_head_runs_the_get_handler_under_the_get_rule(
    app_and_calls: tuple[Any, Calls],
) -> None:
    app, calls = app_and_calls
    status = await call_raw(app, raw_scope("/reports/7", "HEAD"))
    # Starlette serves HEAD with the GET handler; FastAPI answers 405. Either way, never
    # under a laxer rule.
    check(calls, status, "reports" if isinstance(app, Starlette) and status == 200 else None)


async def test_exempt_rule_cannot_be_borrowed_by_a_protected_route(
    app_and_calls: tuple[Any, Calls],
) -> None:
    app, calls = app_and_calls
    for path in ("/health", "/health?next=/reports/1", "/health#/reports/1"):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            r = await c.get(path)
        assert r.json() == {"handler": "health"}
    assert calls == [("health", {"scope": None})] * 3


# -- the deadline header --------------------------------------------------------------------------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=40))
def test_any_header_bytes_are_ignored_or_read_as_plain_seconds(value: bytes) -> None:
    got = _header_deadline([(b"x-request-deadline", value)], b"x-request-deadline")
    text = value.decode("latin-1").strip(" \t")
    plain = text.replace(".", "", 1).isdigit() and text.isascii() and not text.startswith(".")
    if got is None:
        return
    assert plain, value  # only plain decimals are read
    assert got == float(text)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**30), 10**30))
def test_any_number_spelling_never_gives_a_negative_or_unbounded_deadline(value: float) -> None:
    for spelling in (repr(value), str(value), f"{value:f}" if value == value else "nan"):
        got = _header_deadline([(b"x-request-deadline", spelling.encode())], b"x-request-deadline")
        if got is not None:
            assert 0.0 <= got < 1e10  # never negative; below MIN_HEADER_DEADLINE means 504


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-request-deadline", b"30")],  # longer than the rule: no effect
        [(b"x-request-deadline", b"-0.1")],
        [(b"x-request-deadline", b"NaN")],
        [(b"x-request-deadline", b"1e400")],
        [(b"x-request-deadline", b"0.1"), (b"x-request-deadline", b"0.2")],  # repeated
        [(b"X-Request-Deadline", b"0.5"), (b"x-request-deadline", b"0.5")],  # repeated, any case
        [(b"x-request-deadline", "½".encode())],
        [(b"x-request-deadline", b"1" * 10_000)],
        [(b"x-request-deadline", None)],  # a broken scope must not crash the middleware
        [(None, b"0.1")],
        [(b"x-request-deadline",)],
    ],
)
async def test_malformed_deadline_headers_never_lengthen_or_crash(
    app_and_calls: tuple[Any, Calls], headers: list[Any]
) -> None:
    app, calls = app_and_calls
    t0 = time.perf_counter()
    try:
        status = await call_raw(app, raw_scope("/public/x", headers=headers))
    except (ValueError, TypeError, AttributeError) as err:
        # Some applications fail on a broken header list themselves (FastAPI does): then the
        # failure must be theirs, not the middleware's.
        innermost = err.__traceback__
        while innermost is not None and innermost.tb_next is not None:
            innermost = innermost.tb_next
        assert innermost is not None
        assert "poolguard" not in innermost.tb_frame.f_code.co_filename
        assert None in headers[0] or len(headers[0]) != 2
        assert all(seen == EXPECTED[name] for name, seen in calls)
        return
    assert time.perf_counter() - t0 < 0.5
    check(calls, status, "public")  # the rule's 9 s deadline, untouched


async def test_a_valid_deadline_header_shortens(app_and_calls: tuple[Any, Calls]) -> None:
    app, calls = app_and_calls
    await call_raw(app, raw_scope("/public/x", headers=[(b"x-request-deadline", b"0.125")]))
    await call_raw(app, raw_scope("/reports/1", headers=[(b"x-request-deadline", b"0.125")]))
    assert [seen["deadline"] for _, seen in calls] == [0.125, 0.125]


# -- what answers reveal --------------------------------------------------------------------------
async def test_refusals_reveal_no_sql_parameters_or_internals(
    make_guard: MakeGuard, sqlite_file_url: str
) -> None:
    engine = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool, pool_size=2)
    guard = make_guard(engine)

    def endpoint(request: Request) -> Response:
        with engine.connect() as c:
            for _ in range(3):
                c.execute(
                    sa.text("select :token, 'literal-in-sql' from sqlite_master"),
                    {"token": "s3cr3t-token"},
                )
        return Response()  # pragma: no cover

    app = Starlette(routes=[Route("/q", endpoint)])
    app.add_middleware(PoolGuardMiddleware, guard=guard, routes={"/q": RouteRule(max_queries=2)})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        r = await c.get("/q")
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    doc = json.loads(r.content)
    assert set(doc) <= {"type", "title", "status", "detail", "retry_after"}
    for leak in ("s3cr3t", "literal-in-sql", "sqlite_master", "Traceback", "poolguard/", ".py"):
        assert leak not in r.text


@pytest.mark.postgresql
async def test_an_error_after_a_hang_up_is_logged_without_the_drivers_text(
    make_guard: MakeGuard, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that fails after its client went away is logged at DEBUG by the class of
    its error only: a driver's message can quote the data (issue #10, item 12), as a
    PostgreSQL unique violation's ``DETAIL: Key (email)=(...) already exists`` does."""
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    guard = make_guard(engine)
    secret = "alice.hangup@example.com"
    with engine.begin() as c:
        c.execute(sa.text("drop table if exists mw_hangup_users"))
        c.execute(sa.text("create table mw_hangup_users (email text primary key)"))
        c.execute(sa.text("insert into mw_hangup_users values (:e)"), {"e": secret})
    started = asyncio.Event()

    async def signup(request: Request) -> Response:
        started.set()
        try:
            await asyncio.sleep(10)  # the client hangs up meanwhile: this is cancelled
        except asyncio.CancelledError:
            # Clean-up that fails on the database, as a real one can.
            with engine.begin() as c:
                c.execute(sa.text("insert into mw_hangup_users values (:e)"), {"e": secret})
        return Response("unreachable")  # pragma: no cover

    app = Starlette(routes=[Route("/signup", signup, methods=["POST"])])
    app.add_middleware(PoolGuardMiddleware, guard=guard)

    async def receive() -> dict[str, Any]:
        if not started.is_set():
            return {"type": "http.request", "body": b"", "more_body": False}
        await started.wait()
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)  # pragma: no cover (nobody is left to answer)

    try:
        with caplog.at_level(logging.DEBUG, logger="poolguard"):
            await asyncio.wait_for(app(raw_scope("/signup", "POST"), receive, send), 10)
    finally:
        with engine.begin() as c:
            c.execute(sa.text("drop table mw_hangup_users"))
    assert sent == []
    (line,) = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert line == "handler ended with IntegrityError after its client disconnected"
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert secret not in logged and "DETAIL" not in logged and "Key (" not in logged
