"""A plain Starlette application (no FastAPI) guarded by poolguard.

Shows the middleware options that matter between services:

- routes under a ``Mount`` are matched by their full template (``/api/notes/{note_id}``),
  the way the router will dispatch them, so a rule cannot be dodged with path tricks;
- ``deadline_header``: a calling service passes its remaining time (``x-request-deadline:
  0.8``) and this app never works on a request its caller has already given up on;
- ``server_timing``: every response says how much database time, pool wait and how many
  statements it cost (visible in the browser's network panel);
- ``max_queries`` on a route turns an accidental N+1 loop into a clean 503 instead of a
  slow page that holds a connection for hundreds of round trips.

Endpoints are ``def`` functions on a sync Engine; Starlette runs them on its thread pool.

Run it::

    uvicorn examples.starlette_app:app
    python examples/starlette_app.py --self-test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import Engine, create_engine, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from poolguard import PoolGuard, PoolGuardMiddleware
from poolguard.integrations.asgi.middleware import RouteRule

NAME = "starlette_app"
DEFAULT_SQLITE = os.path.join(tempfile.gettempdir(), "poolguard-example-starlette.db")
#: MySQL/MariaDB: a long SLEEP() is not reliably stopped by max_statement_time (MDEV-18024);
#: a join that never ends is, between two rows.
MYSQL_SLOW = (
    "SELECT COUNT(*) FROM information_schema.columns a, information_schema.columns b, "
    "information_schema.columns c"
)
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE}"

engine: Engine = create_engine(DATABASE_URL)
guard = PoolGuard(engine, statement_timeout=1.0, checkout_timeout=0.5)


def setup_database(bind: Engine) -> None:
    """Create and fill the example tables once (idempotent)."""
    with bind.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS poolguard_example_notes "
                "(id INTEGER PRIMARY KEY, title VARCHAR(100) NOT NULL)"
            )
        )
        conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS poolguard_example_tags "
                "(note_id INTEGER NOT NULL, tag VARCHAR(40) NOT NULL)"
            )
        )
        if conn.execute(text("SELECT count(*) FROM poolguard_example_notes")).scalar() == 0:
            conn.execute(
                text("INSERT INTO poolguard_example_notes (id, title) VALUES (:id, :title)"),
                [{"id": i, "title": f"note {i}"} for i in range(1, 41)],
            )
            conn.execute(
                text("INSERT INTO poolguard_example_tags (note_id, tag) VALUES (:n, :tag)"),
                [{"n": i, "tag": f"tag{i % 5}"} for i in range(1, 41)],
            )


def note(request: Request) -> JSONResponse:
    note_id = int(request.path_params["note_id"])
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT id, title FROM poolguard_example_notes WHERE id = :id"), {"id": note_id}
        ).first()
    if row is None:
        return JSONResponse({"detail": "no such note"}, status_code=404)
    return JSONResponse({"id": row.id, "title": row.title})


def notes_with_tags(request: Request) -> JSONResponse:
    """An N+1 loop: one query for the notes, then one per note for its tags."""
    limit = int(request.query_params.get("limit", "5"))
    with engine.connect() as conn:
        notes = conn.execute(
            text("SELECT id, title FROM poolguard_example_notes ORDER BY id LIMIT :n"),
            {"n": limit},
        ).all()
        out = []
        for n in notes:
            tags = conn.execute(
                text("SELECT tag FROM poolguard_example_tags WHERE note_id = :id"), {"id": n.id}
            ).scalars()
            out.append({"id": n.id, "title": n.title, "tags": list(tags)})
    return JSONResponse(out)


def search(request: Request) -> JSONResponse:
    """A full-text search done the slow way: it runs for seconds (the rogue query)."""
    with engine.connect() as conn:
        conn.execute(text(slow_sql(engine.dialect.name)))
    return JSONResponse([])


def slow_sql(dialect: str) -> str:
    if dialect == "postgresql":
        return "SELECT pg_sleep(30)"
    if dialect in ("mysql", "mariadb"):
        return MYSQL_SLOW
    return (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000) "
        "SELECT count(*) FROM c"
    )


def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


@asynccontextmanager
async def lifespan(_app: Starlette) -> AsyncIterator[None]:
    setup_database(engine)
    yield
    guard.close()
    engine.dispose()


app = Starlette(
    routes=[
        Route("/health", health),
        Mount(
            "/api",
            routes=[
                Route("/notes", notes_with_tags),
                Route("/notes/search", search),
                Route("/notes/{note_id:int}", note),
            ],
        ),
    ],
    lifespan=lifespan,
)
app.add_middleware(
    PoolGuardMiddleware,
    guard=guard,
    routes={
        # The full template, Mount prefix included. 11 statements cover ten notes.
        "GET /api/notes": RouteRule(max_queries=11),
        "/health": RouteRule(exempt=True),
    },
    default=RouteRule(deadline=3.0),
    deadline_header="x-request-deadline",
    server_timing=True,
)


# -- self-test ----------------------------------------------------------------------------------
async def self_test() -> int:
    """Exercise the app in-process (lifespan included); 0 only if every check passed."""
    import httpx

    failures: list[str] = []
    checks = 0

    def check(ok: bool, what: str) -> None:
        nonlocal checks
        checks += 1
        if not ok:
            failures.append(what)
            print(f"FAILED: {what}", file=sys.stderr)

    created = DATABASE_URL.startswith("sqlite") and not os.path.exists(DEFAULT_SQLITE)
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://example.test") as client,
        ):
            r = await client.get("/health")
            check(r.status_code == 200, "GET /health -> 200")
            r = await client.get("/api/notes/2")
            check(r.status_code == 200 and r.json()["title"] == "note 2", "GET /api/notes/2")
            timing = r.headers.get("server-timing", "")
            check("db;dur=" in timing and 'db-queries;desc="1"' in timing, "Server-Timing header")
            r = await client.get("/api/notes", params={"limit": 10})
            check(r.status_code == 200 and len(r.json()) == 10, "N+1 within max_queries -> 200")

            # The N+1 loop grows past its allowance: refused, not left to run 41 queries.
            r = await client.get("/api/notes", params={"limit": 40})
            check(
                r.status_code == 503
                and r.headers["content-type"].startswith("application/problem+json")
                and r.json()["type"].endswith("/budget-exceeded"),
                "N+1 past max_queries -> 503 budget-exceeded problem+json",
            )
            # The caller can wait 0.3 s more: the slow search is stopped then, not after the
            # guard's 1 s statement time-out, and the caller gets its 504 while it still
            # listens.
            started = time.monotonic()
            r = await client.get("/api/notes/search", headers={"x-request-deadline": "0.3"})
            elapsed = time.monotonic() - started
            check(
                r.status_code == 504
                and r.headers["content-type"].startswith("application/problem+json")
                and elapsed < 0.9,
                f"x-request-deadline: 0.3 -> 504 after {elapsed:.2f} s (statement stopped)",
            )
            # A malformed deadline header is ignored, never trusted.
            r = await client.get("/api/notes/2", headers={"x-request-deadline": "-1"})
            check(r.status_code == 200, "malformed x-request-deadline ignored -> 200")
            check(guard.checked_out == 0, "no connection left checked out")
    finally:
        if created and os.path.exists(DEFAULT_SQLITE):
            os.remove(DEFAULT_SQLITE)
    if failures:
        print(f"self-test FAILED: {NAME}: {len(failures)} of {checks} checks failed")
        return 1
    print(f"self-test passed: {NAME} ({checks} checks on {engine.dialect.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-test", action="store_true", help="run the in-process checks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.self_test:
        return asyncio.run(self_test())
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
