"""Shared fixtures: real servers only.

PostgreSQL and MariaDB are the ones this machine starts; override their URLs with
POOLGUARD_TEST_PG / POOLGUARD_TEST_MARIADB. Under CI=true an unreachable server fails the
test instead of skipping it, so a broken CI machine cannot pass by skipping everything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

PG_URL = os.environ.get("POOLGUARD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("POOLGUARD_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")

_HOW_TO_START = {
    "postgresql": "start it with: pg_ctlcluster --skip-systemctl-redirect "
    "$(ls /etc/postgresql) main start (or set POOLGUARD_TEST_PG)",
    "mariadb": "start it with: start-stop-daemon --start --oknodo --background "
    "--exec /usr/sbin/mariadbd (or set POOLGUARD_TEST_MARIADB)",
}
_reachable: dict[str, str | None] = {}


def require_server(kind: str, url: str) -> str:
    """Return ``url`` if its server answers; fail under CI, skip elsewhere."""
    if kind not in _reachable:
        eng = sa.create_engine(url, poolclass=sa.NullPool, connect_args=_connect_args(url))
        try:
            with eng.connect() as c:
                c.execute(sa.text("SELECT 1"))
            _reachable[kind] = None
        except Exception as e:  # any failure to reach it counts as "not there"
            _reachable[kind] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        finally:
            eng.dispose()
    problem = _reachable[kind]
    if problem is not None:
        msg = f"{kind} at {sa.make_url(url).render_as_string()} unreachable ({problem}); {_HOW_TO_START[kind]}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return url


def _connect_args(url: str) -> dict[str, object]:
    if url.startswith("postgresql"):
        return {"connect_timeout": 3}
    if url.startswith("mysql"):
        return {"connect_timeout": 3}
    return {}


@pytest.fixture
def pg_url() -> str:
    return require_server("postgresql", PG_URL)


@pytest.fixture
def mariadb_url() -> str:
    return require_server("mariadb", MARIADB_URL)


@pytest.fixture
def pg_async_url(pg_url: str) -> str:
    return pg_url.replace("+psycopg", "+asyncpg")


@pytest.fixture
def mariadb_async_url(mariadb_url: str) -> str:
    return mariadb_url.replace("+pymysql", "+aiomysql")


@pytest.fixture
def sqlite_file_url(tmp_path: os.PathLike[str]) -> Iterator[str]:
    yield f"sqlite:///{os.fspath(tmp_path)}/poolguard-test.db"
