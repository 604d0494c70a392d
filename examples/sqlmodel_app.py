"""FastAPI + SQLModel, guarded by poolguard, with CORS for a browser front end.

The layout most FastAPI projects grow into, folded into one file: the engine and its guard
(``app/core/db.py``), a ``Session`` dependency (``app/api/deps.py``), the application with its
middleware (``app/main.py``). What it shows:

- ``PoolGuard(engine)`` on SQLModel's engine: every ``session.exec()`` runs under a
  server-side statement time-out, and waits for a connection are bounded;
- the middleware order: ``PoolGuardMiddleware`` added first, ``CORSMiddleware`` after it, so
  CORS is the outermost and poolguard's own 503/504 answers carry
  ``access-control-allow-origin`` (and expose ``Retry-After`` to the front end's code);
- a rogue endpoint times out (504), then is quarantined (503), while the healthy ones answer.

Run it::

    uvicorn examples.sqlmodel_app:app            # SQLite file in the temp directory
    DATABASE_URL=postgresql+psycopg://user@host/db uvicorn examples.sqlmodel_app:app
    python examples/sqlmodel_app.py --self-test  # in-process checks, exit 0 when all pass

Needs ``pip install poolguard sqlmodel fastapi`` (and uvicorn to serve it, httpx for the
self-test).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import Engine, text
from sqlmodel import Field, Session, SQLModel, create_engine, func, select
from starlette.middleware.cors import CORSMiddleware

from poolguard import PoolGuard, PoolGuardMiddleware

NAME = "sqlmodel_app"
DEFAULT_SQLITE = os.path.join(tempfile.gettempdir(), "poolguard-example-sqlmodel.db")
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE}"
FRONT_END = "https://shop.example"


class Hero(SQLModel, table=True):
    __tablename__ = "poolguard_example_heroes"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    power: int = 0


# -- app/core/db.py: the engine and its guard, made once -------------------------------------
engine: Engine = create_engine(DATABASE_URL, pool_size=5, max_overflow=10)
guard = PoolGuard(engine, statement_timeout=1.0, checkout_timeout=0.5)


def setup_database(bind: Engine) -> None:
    SQLModel.metadata.create_all(bind, tables=[Hero.__table__])  # type: ignore[list-item]
    with Session(bind) as session:
        if session.exec(select(func.count()).select_from(Hero)).one() == 0:
            session.add_all(Hero(name=f"hero {i}", power=i % 7) for i in range(1, 51))
            session.commit()


def slow_sql(dialect: str) -> str:
    """The query that went wrong in a deploy: it never ends on its own."""
    if dialect == "postgresql":
        return "SELECT pg_sleep(30)"
    if dialect in ("mysql", "mariadb"):
        return (
            "SELECT COUNT(*) FROM information_schema.columns a, information_schema.columns b, "
            "information_schema.columns c"
        )
    return (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000) "
        "SELECT count(*) FROM c"
    )


# -- app/api/deps.py: the session dependency --------------------------------------------------
def get_session() -> Iterator[Session]:
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


# -- app/main.py: the application ---------------------------------------------------------------
@asynccontextmanager
async def lifespan(_app: FastAPI) -> Any:
    setup_database(engine)
    yield
    guard.close()
    engine.dispose()


app = FastAPI(title="poolguard example: FastAPI + SQLModel", lifespan=lifespan)
# The order matters: add_middleware wraps outside what was added before. poolguard first...
app.add_middleware(PoolGuardMiddleware, guard=guard)
# ...CORS last, the outermost: it decorates every answer, poolguard's 503/504 included.
app.add_middleware(
    CORSMiddleware,
    allow_origins=[FRONT_END],
    allow_methods=["*"],
    allow_headers=["*"],
    expose_headers=["Retry-After"],
)


@app.get("/heroes/{hero_id}")
def read_hero(hero_id: int, session: SessionDep) -> Hero:
    hero = session.get(Hero, hero_id)
    if hero is None:
        raise HTTPException(status_code=404, detail="no such hero")
    return hero


@app.get("/heroes")
def list_heroes(session: SessionDep, min_power: int = 0) -> list[Hero]:
    return list(session.exec(select(Hero).where(Hero.power >= min_power).limit(20)))


@app.get("/heroes/{hero_id}/rivals")
def rivals(hero_id: int, session: SessionDep) -> dict[str, Any]:
    session.exec(text(slow_sql(engine.dialect.name)))  # type: ignore[call-overload]
    return {"hero_id": hero_id, "rivals": []}


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

    def has_cors(r: httpx.Response) -> bool:
        return r.headers.get("access-control-allow-origin") == FRONT_END

    created = DATABASE_URL.startswith("sqlite") and not os.path.exists(DEFAULT_SQLITE)
    cross_origin = {"origin": FRONT_END}
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://api.example") as client,
        ):
            r = await client.get("/heroes/3", headers=cross_origin)
            check(r.status_code == 200 and r.json()["name"] == "hero 3", "GET /heroes/3 -> 200")
            check(has_cors(r), "the application's answer carries CORS headers")
            r = await client.get("/heroes", params={"min_power": 5})
            check(r.status_code == 200 and len(r.json()) > 0, "GET /heroes?min_power=5 -> 200")
            r = await client.get("/heroes/999", headers=cross_origin)
            check(r.status_code == 404, "GET /heroes/999 -> 404 (the app's own answer)")

            for attempt in range(1, 4):
                r = await client.get("/heroes/1/rivals", headers=cross_origin)
                check(
                    r.status_code == 504
                    and r.headers["content-type"].startswith("application/problem+json"),
                    f"rogue query #{attempt} -> 504 problem+json",
                )
                check(has_cors(r), f"rogue query #{attempt}: the 504 carries CORS headers")
            r = await client.get("/heroes/2/rivals", headers=cross_origin)
            check(r.status_code == 503 and "retry-after" in r.headers, "quarantined -> 503")
            check(has_cors(r), "the 503 carries CORS headers")
            exposed = r.headers.get("access-control-expose-headers", "").lower()
            check("retry-after" in exposed, "Retry-After is exposed to the front end")
            r = await client.get("/heroes/4", headers=cross_origin)
            check(r.status_code == 200, "healthy endpoint still 200 while the rogue is refused")
            for entry in guard.quarantined():
                guard.release(entry["fingerprint"])
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
