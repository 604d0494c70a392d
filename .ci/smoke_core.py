"""Core-only smoke: what a user of ``pip install poolguard`` gets, with no greenlet.

Run by .ci/run with the interpreter of a fresh virtual environment holding poolguard's wheel
and its core dependencies only (SQLAlchemy, Starlette, opentelemetry-api):

    python smoke_core.py --sqlalchemy 2.0

Checks, in order: greenlet is absent; ``import poolguard`` and ``PoolGuard(sync_engine)`` on
SQLite; a statement time-out that fires; a budget; the middleware on a tiny Starlette app
driven through ASGI directly (no httpx: core only); an AsyncEngine is refused with a line that
names ``poolguard[asyncio]``; the console script (``--version``, ``demo --help``, and
``check`` naming the extra of a missing driver). Prints one line per check; exits 1 at the
first failure, with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


class SmokeFailure(Exception):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def step(name: str, fn: Callable[[], str | None]) -> None:
    t0 = time.monotonic()
    detail = fn()
    extra = f": {detail}" if detail else ""
    print(f"  ok  {name} ({(time.monotonic() - t0) * 1000:.0f} ms){extra}", flush=True)


# -- the checks ---------------------------------------------------------------------------------
def no_greenlet() -> str:
    try:
        import greenlet  # noqa: F401
    except ImportError:
        return "import greenlet fails, as on a core install"
    raise SmokeFailure("greenlet is installed: this environment is not core-only")


def versions(expected_sqlalchemy: str) -> str:
    import sqlalchemy
    import starlette

    import poolguard

    check(
        sqlalchemy.__version__.startswith(expected_sqlalchemy + "."),
        f"SQLAlchemy {sqlalchemy.__version__} installed, {expected_sqlalchemy}.x expected",
    )
    where = Path(poolguard.__file__).resolve()
    check(
        "site-packages" in where.parts,
        f"poolguard imported from {where}, not from the installed wheel",
    )
    return (
        f"Python {sys.version.split()[0]}, SQLAlchemy {sqlalchemy.__version__}, "
        f"Starlette {starlette.__version__}, poolguard {poolguard.__version__}"
    )


def sync_engine(tmp: str) -> Any:
    import sqlalchemy as sa

    return sa.create_engine(
        f"sqlite:///{tmp}/smoke.db", poolclass=sa.QueuePool, pool_size=2, max_overflow=0
    )


def guard_sync_engine(tmp: str) -> str:
    import sqlalchemy as sa

    from poolguard import PoolGuard

    engine = sync_engine(tmp)
    guard = PoolGuard(engine)
    try:
        with engine.connect() as c:
            check(c.execute(sa.text("SELECT 1")).scalar_one() == 1, "SELECT 1 failed")
        json.dumps(guard.stats())
    finally:
        guard.close()
        engine.dispose()
    loaded = sorted(m for m in sys.modules if m.startswith("sqlalchemy.ext.asyncio"))
    check(not loaded, f"guarding a sync engine imported {loaded}")
    return "SELECT 1 through the guard; stats() is JSON; sqlalchemy.ext.asyncio never imported"


def statement_timeout(tmp: str) -> str:
    import sqlalchemy as sa

    from poolguard import PoolGuard, QueryTimeout

    engine = sync_engine(tmp)
    guard = PoolGuard(engine, statement_timeout=0.2)
    try:
        t0 = time.monotonic()
        try:
            with engine.connect() as c:
                c.exec_driver_sql(ENDLESS)
        except QueryTimeout as e:
            took = time.monotonic() - t0
            check(isinstance(e, sa.exc.OperationalError), "QueryTimeout is no OperationalError")
            check(took < 2.0, f"the 0.2 s time-out fired after {took:.2f} s")
            return f"QueryTimeout after {took:.2f} s (limit 0.2 s), an OperationalError"
        raise SmokeFailure("the endless statement was not stopped")
    finally:
        guard.close()
        engine.dispose()


def budget(tmp: str) -> str:
    from poolguard import BudgetExceeded, PoolGuard

    engine = sync_engine(tmp)
    guard = PoolGuard(engine)
    try:
        with guard.budget(deadline=5.0, max_queries=2), engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
            c.exec_driver_sql("SELECT 2")
            try:
                c.exec_driver_sql("SELECT 3")
            except BudgetExceeded as e:
                check(e.limit == "max_queries", f"limit {e.limit!r}, max_queries expected")
                return "the third statement of max_queries=2 raised BudgetExceeded"
        raise SmokeFailure("max_queries=2 let a third statement run")
    finally:
        guard.close()
        engine.dispose()


async def asgi_get(app: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET through ASGI, as a server would send it."""
    messages: list[dict[str, Any]] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"smoke.test")],
        "client": ("127.0.0.1", 5000),
        "server": ("smoke.test", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 10)
    start = next(m for m in messages if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return int(start["status"]), headers, body


def middleware(tmp: str) -> str:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from poolguard import PoolGuard, PoolGuardMiddleware

    engine = sync_engine(tmp)
    guard = PoolGuard(engine, statement_timeout=0.2)

    def ok(request: Request) -> JSONResponse:  # a def endpoint: Starlette's thread pool
        with engine.connect() as c:
            return JSONResponse({"one": c.exec_driver_sql("SELECT 1").scalar_one()})

    def slow(request: Request) -> JSONResponse:
        with engine.connect() as c:
            return JSONResponse({"n": c.exec_driver_sql(ENDLESS).scalar_one()})

    app = Starlette(
        routes=[Route("/ok", ok), Route("/slow", slow)],
        middleware=[Middleware(PoolGuardMiddleware, guard=guard)],
    )
    try:
        status, _, body = asyncio.run(asgi_get(app, "/ok"))
        check(status == 200 and json.loads(body) == {"one": 1}, f"/ok answered {status} {body!r}")
        status, headers, body = asyncio.run(asgi_get(app, "/slow"))
        check(status == 504, f"/slow answered {status}, 504 expected")
        ctype = headers.get("content-type", "")
        check(ctype.startswith("application/problem+json"), f"/slow content-type {ctype!r}")
        check(b"RECURSIVE" not in body, "the problem body carries SQL text")
    finally:
        guard.close()
        engine.dispose()
    return "200 from a def endpoint; 504 application/problem+json for a time-out"


def async_engine_refused() -> str:
    from poolguard import PoolGuard

    try:
        from sqlalchemy.ext.asyncio import AsyncEngine
    except ImportError as e:
        # SQLAlchemy 2.1: the asyncio extension itself refuses to load without greenlet, so no
        # AsyncEngine can exist here; its message names sqlalchemy[asyncio].
        check("greenlet" in str(e), f"importing sqlalchemy.ext.asyncio failed with: {e}")
        return "sqlalchemy.ext.asyncio does not load without greenlet (SQLAlchemy's own error)"
    # SQLAlchemy 2.0 loads the extension without greenlet and fails only on first use; an
    # AsyncEngine (any instance: no async driver is installed either) must be refused at once.
    engine = object.__new__(AsyncEngine)
    try:
        PoolGuard(engine)
    except ImportError as e:
        message = str(e)
        check("poolguard[asyncio]" in message, f"the ImportError does not name the extra: {e}")
        check("\n" not in message, "the ImportError is more than one line")
        return f"ImportError: {message}"
    raise SmokeFailure("PoolGuard(AsyncEngine) without greenlet did not raise ImportError")


def console_script() -> str:
    script = Path(sys.executable).parent / ("poolguard.exe" if os.name == "nt" else "poolguard")
    check(script.exists(), f"no poolguard console script next to {sys.executable}")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *args], capture_output=True, text=True, timeout=60, check=False
        )

    r = run("--version")
    check(r.returncode == 0 and r.stdout.startswith("poolguard "), f"--version: {r}")
    r = run("demo", "--help")
    check(r.returncode == 0, f"demo --help exited {r.returncode}: {r.stderr.strip()}")
    check(r.stdout.startswith("usage: poolguard demo"), f"demo --help printed {r.stdout!r}")
    r = run(
        "check",
        "--database-url",
        "postgresql+asyncpg://smoke@127.0.0.1:1/db",
        "--workers",
        "1",
        "--replicas",
        "1",
    )
    check(r.returncode == 2, f"check with a missing driver exited {r.returncode}")
    check("poolguard[asyncpg]" in r.stderr, f"check does not name the extra: {r.stderr!r}")
    check(r.stderr.count("\n") == 1, f"check's error is not one line: {r.stderr!r}")
    return f"--version, demo --help; check says: {r.stderr.strip()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqlalchemy", required=True, help="expected SQLAlchemy line: 2.0, 2.1")
    args = parser.parse_args()
    check_greenlet_spec = importlib.util.find_spec("greenlet")
    print(f"core smoke: {sys.executable}", flush=True)
    with tempfile.TemporaryDirectory(prefix="poolguard-smoke-") as tmp:
        try:
            step("no greenlet", no_greenlet)
            check(check_greenlet_spec is None, "greenlet is findable")
            step("versions", lambda: versions(args.sqlalchemy))
            step("import poolguard; PoolGuard(sync engine)", lambda: guard_sync_engine(tmp))
            step("statement time-out (SQLite)", lambda: statement_timeout(tmp))
            step("budget", lambda: budget(tmp))
            step("middleware on Starlette, through ASGI", lambda: middleware(tmp))
            step("AsyncEngine without greenlet", async_engine_refused)
            step("console script", console_script)
        except SmokeFailure as e:
            print(f"  FAIL {e}", flush=True)
            return 1
        except Exception as e:
            print(f"  FAIL {type(e).__name__}: {e}", flush=True)
            raise
    print("core smoke: all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
