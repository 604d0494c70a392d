"""Checkout sites name the application: a leak report's file:line is the first frame of the
application, whatever ORM or framework layers sit between (SQLModel, FastAPI dependencies,
SQLAlchemy's asyncio layer), decided by where each frame's file lives."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run
# time, and those below name local dependencies.
import asyncio
import os
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import Field, Session, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

import poolguard
from poolguard import PoolGuardMiddleware
from poolguard.core import origin
from poolguard.core.origin import is_application_file
from poolguard.observe.alerts import Alert

MakeGuard = Callable[..., Any]
HOLD = 0.2  # hold_timeout for these tests: a leak is reported within about 0.25 s


class Hero(SQLModel, table=True):
    __tablename__ = "origin_heroes"
    id: int | None = Field(default=None, primary_key=True)
    name: str


def here() -> int:
    """The caller's line number."""
    return sys._getframe(1).f_lineno


def site(line: int, function: str) -> str:
    return f"{__file__}:{line} in {function}"


@pytest.fixture
def engine(sqlite_file_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(sqlite_file_url, poolclass=sa.QueuePool)
    SQLModel.metadata.create_all(eng, tables=[Hero.__table__])  # type: ignore[list-item]
    with Session(eng) as s:
        s.add(Hero(name="Deadpond"))
        s.commit()
    yield eng
    eng.dispose()


def leak_sites(alerts: list[Alert], timeout: float = 5.0) -> list[str]:
    """The ``where`` of the leak alerts, waiting for the first one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(a.kind == "leak" for a in alerts):
        time.sleep(0.02)
    return [str(a.attributes["where"]) for a in alerts if a.kind == "leak"]


# -- what counts as the application ----------------------------------------------------------
def test_files_are_classified_by_where_they_live() -> None:
    import json as stdlib_module

    import sqlmodel

    assert is_application_file(__file__)
    assert is_application_file(os.path.join(os.getcwd(), "app", "core", "db.py"))
    assert is_application_file("relative/app.py")
    # Installed packages, by location, whatever their names.
    assert not is_application_file(sqlmodel.__file__)
    assert not is_application_file(str(httpx.__file__))
    assert not is_application_file(os.sep + os.path.join("srv", "venv", "site-packages", "x.py"))
    assert not is_application_file(
        os.sep + os.path.join("usr", "lib", "python3", "dist-packages", "y.py")
    )
    # The standard library, poolguard itself (outside site-packages in an editable install),
    # SQLAlchemy, and pseudo files.
    assert not is_application_file(str(stdlib_module.__file__))
    assert not is_application_file(str(poolguard.__file__))
    assert not is_application_file(str(sa.__file__))
    for pseudo in ("<frozen importlib._bootstrap>", "<string>", "<stdin>", ""):
        assert not is_application_file(pseudo)


# -- through the layers ----------------------------------------------------------------------
def test_leak_through_sqlmodel_names_the_tests_own_line(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    alerts: list[Alert] = []
    make_guard(engine, hold_timeout=HOLD, on_alert=alerts.append)
    session = Session(engine)
    try:
        line = here() + 1
        heroes = session.exec(select(Hero)).all()  # checks out, and holds until close()
        assert [h.name for h in heroes] == ["Deadpond"]
        sites = leak_sites(alerts)
    finally:
        session.close()
    assert sites == [site(line, "test_leak_through_sqlmodel_names_the_tests_own_line")]


def test_leak_through_a_fastapi_dependency_names_the_dependency(
    engine: sa.Engine, make_guard: MakeGuard
) -> None:
    """The common layout: a ``yield`` dependency opens the session, another dependency runs
    the first query, the endpoint holds on. The site is the dependency's line."""
    alerts: list[Alert] = []
    guard = make_guard(engine, hold_timeout=HOLD, on_alert=alerts.append)
    lines: dict[str, int] = {}

    def get_session() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    def current_hero(session: Annotated[Session, Depends(get_session)]) -> Hero | None:
        lines["dependency"] = here() + 1
        return session.exec(select(Hero)).first()

    app = FastAPI()
    app.add_middleware(PoolGuardMiddleware, guard=guard)

    @app.get("/me")
    def me(hero: Annotated[Hero | None, Depends(current_hero)]) -> dict[str, Any]:
        leak_sites(alerts)  # the connection stays checked out while the endpoint runs
        return {"name": hero.name if hero else None}

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.get("/me")

    response = asyncio.run(call())
    assert response.status_code == 200, response.text
    assert response.json() == {"name": "Deadpond"}
    assert leak_sites(alerts) == [site(lines["dependency"], "current_hero")]


def test_async_checkout_names_the_awaiting_coroutine(
    sqlite_file_url: str, make_guard: MakeGuard
) -> None:
    """SQLAlchemy's asyncio layer checks out inside a greenlet whose own stack starts in
    ``greenlet_spawn``: the site is found on the parent greenlet's stack."""
    alerts: list[Alert] = []
    lines: dict[str, int] = {}

    async def scenario() -> None:
        engine = create_async_engine(sqlite_file_url.replace("sqlite:", "sqlite+aiosqlite:"))
        make_guard(engine, hold_timeout=HOLD, on_alert=alerts.append)
        try:
            async with AsyncSession(engine) as session:
                lines["query"] = here() + 1
                await session.exec(select(sa.literal(1)))  # type: ignore[call-overload]
                while not any(a.kind == "leak" for a in alerts):
                    await asyncio.sleep(0.02)
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert leak_sites(alerts) == [site(lines["query"], "scenario")]


def test_without_application_frames_the_nearest_library_frame_is_named(
    engine: sa.Engine, make_guard: MakeGuard, tmp_path: Any
) -> None:
    """An application installed into site-packages has no frame outside the library
    locations: the report then names the layer that asked for the connection (here a fake
    ORM in a site-packages directory), never SQLAlchemy's or poolguard's own frames."""
    alerts: list[Alert] = []
    make_guard(engine, hold_timeout=HOLD, on_alert=alerts.append)
    fake = os.path.join(str(tmp_path), "site-packages", "fakeorm", "session.py")
    source = textwrap.dedent(
        """\
        def run(engine, hold):
            with engine.connect() as c:
                c.exec_driver_sql("SELECT 1")
                hold()
        """
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, fake, "exec"), namespace)
    # A thread's stack is threading's (the standard library) and the fake library's only.
    t = threading.Thread(target=namespace["run"], args=(engine, lambda: leak_sites(alerts)))
    t.start()
    t.join(10)
    assert leak_sites(alerts) == [f"{fake}:2 in run"]


def test_the_decision_is_cached_per_file(
    engine: sa.Engine, make_guard: MakeGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_guard(engine)
    calls: list[str] = []
    real_tier = origin._tier

    def counting_tier(filename: str) -> int:
        calls.append(filename)
        return real_tier(filename)

    monkeypatch.setattr(origin, "_tier", counting_tier)
    origin._tier_cache.clear()
    for _ in range(3):
        with engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
    # The first checkout looks at each frame's file once; the next ones only at the cache.
    assert calls, "the first checkout classifies its frames"
    first = len(calls)
    with engine.connect() as c:
        c.exec_driver_sql("SELECT 1")
    assert len(calls) == first
