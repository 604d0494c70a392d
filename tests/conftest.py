"""Shared fixtures: real servers only.

PostgreSQL and MariaDB are the ones this machine starts; override their URLs with
POOLGUARD_TEST_PG / POOLGUARD_TEST_MARIADB. Under CI set to a true value (1, true, yes, on)
an unreachable server fails the test instead of skipping it, so a broken CI machine cannot
pass by skipping everything.

Every test is checked for leaks after its teardown (``_no_leak_after_each_test``): every
guard built during it, and every guard still installed, has no checked-out connection and
no held or queued gate slot; every middleware's in-flight count is back to zero; and a test
on PostgreSQL or MariaDB leaves no server session behind (poolguard's own blame and cancel
sessions included) beyond the idle connections that live pools keep.
"""

from __future__ import annotations

import os
import threading
import time
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


def ci() -> bool:
    """True when CI is set to any true value: a missing server or tool then fails."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


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
        where = sa.make_url(url).render_as_string()
        msg = f"{kind} at {where} unreachable ({problem}); {_HOW_TO_START[kind]}"
        if ci():
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


# -- a throwaway PostgreSQL cluster, for server settings of its own -------------------------
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402


@dataclass
class Cluster:
    """A private PostgreSQL: small max_connections, pg_stat_statements, restartable."""

    datadir: str
    port: int
    url: str
    log: str

    def _ctl(self, *args: str) -> None:
        _as_postgres(["pg_ctl", "-D", self.datadir, "-w", "-t", "30", *args])

    def restart(self) -> None:
        # -l: the server's output goes to the log, not to our pipe (which would never close).
        self._ctl("restart", "-m", "immediate", "-l", self.log)

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")


def _as_postgres(cmd: list[str]) -> None:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        msg = "initdb/pg_ctl not found: install PostgreSQL's server binaries"
        if ci():
            pytest.fail(msg)
        pytest.skip(msg)
    base = tempfile.mkdtemp(prefix="poolguard-pg-")
    os.chmod(base, 0o777)
    datadir = os.path.join(base, "data")
    port = _free_port()
    _as_postgres(["initdb", "-D", datadir, "-A", "trust", "-U", "postgres", "--no-sync"])
    with open(os.path.join(datadir, "postgresql.conf"), "a") as f:
        f.write(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{base}'\n"
            "max_connections = 30\nshared_preload_libraries = 'pg_stat_statements'\n"
            "pg_stat_statements.track_utility = on\nfsync = off\n"
        )
    log = os.path.join(base, "log")
    _as_postgres(["pg_ctl", "-D", datadir, "-l", log, "-w", "-t", "30", "start"])
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    eng = sa.create_engine(url, poolclass=sa.NullPool)
    with eng.begin() as c:
        c.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
    eng.dispose()
    cluster = Cluster(datadir, port, url, log)
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


# -- guards that must leave nothing behind ----------------------------------------------------
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402


def assert_no_leak(guard: Any) -> None:
    """After a test: no checked-out connection in the pool, no held or queued gate slot."""
    pool = guard.sync_engine.pool
    snap = guard.gate.snapshot()
    assert snap.held == 0, f"gate slots still held: {snap}"
    assert snap.waiting == 0, f"gate waiters left: {snap}"
    assert guard.checked_out == 0, "guard still counts a checkout"
    if hasattr(pool, "checkedout"):
        assert pool.checkedout() == 0, f"pool has checked-out connections: {pool.status()}"


@pytest.fixture
def make_guard() -> Iterator[Callable[..., Any]]:
    """Build guards (and their engines); at teardown assert no leak, then close them."""
    from poolguard import PoolGuard

    made: list[Any] = []

    def make(engine: Any, **kw: Any) -> Any:
        g = PoolGuard(engine, **kw)
        made.append(g)
        return g

    yield make
    try:
        for g in made:
            assert_no_leak(g)
    finally:
        for g in made:
            g.close()
            if g.engine is not g.sync_engine:
                # An AsyncEngine's connections close through the event loop: async tests
                # `await engine.dispose()` themselves; here only drop the references.
                g.sync_engine.dispose(close=False)
            else:
                g.sync_engine.dispose()


@pytest.fixture
def hot_row() -> Iterator[Callable[[sa.Engine, str], None]]:
    """Makes a table with one row (id 1, n 0) that lock tests contend for; drops it after."""
    made: list[tuple[sa.Engine, str]] = []

    def make(engine: sa.Engine, table: str) -> None:
        innodb = " engine=innodb" if engine.dialect.name in ("mysql", "mariadb") else ""
        with engine.begin() as c:
            c.execute(sa.text(f"drop table if exists {table}"))
            c.execute(sa.text(f"create table {table} (id int primary key, n int){innodb}"))
            c.execute(sa.text(f"insert into {table} values (1, 0)"))
        made.append((engine, table))

    yield make
    for engine, table in made:
        with engine.begin() as c:
            c.execute(sa.text(f"drop table {table}"))


@pytest.fixture
def queued_writers() -> Callable[..., threading.Thread]:
    """Starts writers of a hot row in the background (see ``start``)."""

    def start(
        engine: sa.Engine, table: str, n: int, gap: float, errors: list[BaseException]
    ) -> threading.Thread:
        """Writers of the locked row, started in the background ``gap`` apart (the first after
        ``gap``) so that some still wait whenever an earlier one's lock wait ends: the server can
        only name the blocker of a session that is waiting. Join the returned thread, then all
        writers are done."""

        def victim() -> None:
            try:
                with engine.begin() as c:
                    c.execute(sa.text(f"update {table} set n = n + 100 where id = 1"))
            except BaseException as e:
                errors.append(e)

        def queue() -> None:
            threads = []
            for _ in range(n):
                time.sleep(gap)
                t = threading.Thread(target=victim)
                t.start()
                threads.append(t)
            for t in threads:
                t.join(10)

        starter = threading.Thread(target=queue)
        starter.start()
        return starter

    return start


# -- the leak check every test gets ------------------------------------------------------------
import functools  # noqa: E402
import gc  # noqa: E402
import weakref  # noqa: E402

#: Guards built during the running test (recorded by a wrapper around PoolGuard.__init__).
_made: list[Any] = []
#: Guards and counters already reported as leaking: reported once, not by every later test.
_reported: weakref.WeakSet[Any] = weakref.WeakSet()
_reported_in_flight: weakref.WeakSet[Any] = weakref.WeakSet()


@pytest.fixture(scope="session", autouse=True)
def _record_guards() -> Iterator[None]:
    """Records every PoolGuard built, however it is built (directly, by make_guard, by a
    fixture of a test module, by an example app), without touching poolguard's source."""
    from poolguard import PoolGuard

    original = PoolGuard.__init__

    @functools.wraps(original)
    def recording(self: Any, *args: Any, **kw: Any) -> None:
        original(self, *args, **kw)
        _made.append(self)

    PoolGuard.__init__ = recording  # type: ignore[method-assign]
    try:
        yield
    finally:
        PoolGuard.__init__ = original  # type: ignore[method-assign]


def leaks() -> list[str]:
    """What guards and middlewares still hold right now (empty when nothing leaked)."""
    from poolguard.guard import active_guards
    from poolguard.integrations.asgi.inflight import _in_flight

    found: list[str] = []
    seen: set[int] = set()
    for g in [*_made, *active_guards()]:
        if id(g) in seen or g in _reported:
            continue
        seen.add(id(g))
        problems = []
        if g.checked_out:
            problems.append(f"checked_out={g.checked_out}")
        gate = g.gate
        if gate.held or gate.waiting:
            problems.append(f"gate held={gate.held} waiting={gate.waiting}")
        pool = g.sync_engine.pool
        if isinstance(pool, sa.QueuePool) and pool.checkedout():
            problems.append(f"{type(pool).__name__} {pool.status()}")
        if problems:
            _reported.add(g)
            found.append(f"guard {g.pool_name}: " + ", ".join(problems))
    for g, counter in list(_in_flight.items()):
        if counter.count and g not in _reported_in_flight:
            _reported_in_flight.add(g)
            found.append(f"middleware on guard {g.pool_name}: {counter.count} requests in flight")
    return found


_SESSIONS_SQL = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    "mariadb": "SELECT count(*) FROM information_schema.processlist "
    "WHERE db = database() AND id <> connection_id()",
}


class _ServerSessions:
    """Counts the client sessions on the test database, on a connection of its own."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.sql = sa.text(_SESSIONS_SQL[kind])
        self.engine = sa.create_engine(url, poolclass=sa.NullPool)

    def count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(self.sql).scalar_one())

    def settle(self, baseline: int, allowed: int) -> int:
        """The session count once it is back at ``baseline + allowed`` (sessions end
        asynchronously after their socket closes), or what it still is after 5 s."""
        end = time.monotonic() + 5.0
        n = self.count()
        while n > baseline + allowed and time.monotonic() < end:
            time.sleep(0.05)
            gc.collect()
            n = self.count()
        return n


_server_sessions: dict[str, _ServerSessions] = {}


def _pooled(guards: list[Any]) -> int:
    """Idle connections that live pools legitimately keep open."""
    n = 0
    for g in guards:
        pool = g.sync_engine.pool
        if isinstance(pool, sa.QueuePool):
            n += pool.checkedin()
    return n


@pytest.fixture(autouse=True)
def _no_leak_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test and all its fixtures are torn down: nothing held, nothing in flight,
    no server session left on PostgreSQL or MariaDB (see the module docstring)."""
    sessions = None
    for kind, fixture in (("postgresql", "pg_url"), ("mariadb", "mariadb_url")):
        if fixture in request.fixturenames:
            url = request.getfixturevalue(fixture)
            sessions = _server_sessions.get(url)
            if sessions is None:
                sessions = _server_sessions[url] = _ServerSessions(kind, url)
            baseline = sessions.count()
            break
    _made.clear()
    yield
    try:
        found = leaks()
        if sessions is not None:
            from poolguard.guard import active_guards

            gc.collect()  # engines a test dropped close their connections
            live = list({id(g): g for g in [*_made, *active_guards()]}.values())
            n = sessions.settle(baseline, _pooled(live))
            if n > baseline + _pooled(live):
                found.append(
                    f"{sessions.kind}: {n} client sessions on the test database after the "
                    f"test, {baseline} before and {_pooled(live)} pooled by live engines"
                )
        assert not found, "leaked: " + "; ".join(found)
    finally:
        _made.clear()
