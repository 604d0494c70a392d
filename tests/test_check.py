"""``poolguard check``: the arithmetic (pure), then against the real PostgreSQL and MariaDB,
and the promise that credentials never reach the output."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from poolguard.tools.check import (
    APPLICATION_NAME,
    CheckError,
    Fleet,
    ServerFacts,
    assess,
    gather,
    safe_url,
    sanitize,
)
from poolguard.tools.cli import main

SECRET = "s3cr3t"


def pg_facts(**overrides: Any) -> ServerFacts:
    values: dict[str, Any] = {
        "backend": "postgresql",
        "version": "PostgreSQL 16.0",
        "max_connections": 100,
        "reserved": {"superuser_reserved_connections": 3, "reserved_connections": 2},
        "current_connections": 7,
        "connection_states": {"active": 2, "idle": 5},
        "timeouts": {
            "statement_timeout": 30.0,
            "idle_in_transaction_session_timeout": 60.0,
            "lock_timeout": 0.0,
        },
    }
    values.update(overrides)
    return ServerFacts(**values)


def run_check(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str, str]:
    code = main(["check", "--database-url", url, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- pure arithmetic


def test_ok_with_headroom() -> None:
    fleet = Fleet(pool_size=2, max_overflow=3, workers=4, replicas=2, other_clients=10)
    verdict = assess(pg_facts(), fleet)
    assert verdict.usable == 95  # 100 - 3 superuser - 2 reserved
    assert verdict.worst_case == 5 * 8 + 10
    assert verdict.status == "OK"
    assert verdict.headroom == 45
    assert not any("pool_size=" in r for r in verdict.recommendations)


def test_at_risk_recommends_a_pool_that_fits_and_a_pooler() -> None:
    fleet = Fleet(pool_size=5, max_overflow=10, workers=4, replicas=3, other_clients=11)
    verdict = assess(pg_facts(), fleet)
    assert verdict.worst_case == 15 * 12 + 11 == 191
    assert verdict.status == "AT RISK"
    assert verdict.headroom == 95 - 191
    assert verdict.fits_per_process == (95 - 11) // 12 == 7
    # The application's own split (1/3 steady, 2/3 burst) is kept.
    assert any("pool_size=2, max_overflow=5" in r for r in verdict.recommendations)
    assert any("PgBouncer" in r for r in verdict.recommendations)
    # The recommended pools do fit.
    fitted = Fleet(pool_size=2, max_overflow=5, workers=4, replicas=3, other_clients=11)
    assert assess(pg_facts(), fitted).status == "OK"


def test_exactly_full_is_ok_one_more_is_at_risk() -> None:
    facts = pg_facts(max_connections=20, reserved={"superuser_reserved_connections": 0})
    assert assess(facts, Fleet(5, 5, 1, 2)).status == "OK"
    assert assess(facts, Fleet(5, 5, 1, 2, other_clients=1)).status == "AT RISK"


def test_unbounded_pools_are_at_risk() -> None:
    verdict = assess(pg_facts(), Fleet(pool_size=5, max_overflow=-1, workers=1, replicas=1))
    assert verdict.status == "AT RISK"
    assert verdict.worst_case is None
    assert verdict.headroom is None
    assert any("unbounded" in r for r in verdict.recommendations)


def test_when_not_one_connection_per_process_fits() -> None:
    verdict = assess(pg_facts(), Fleet(1, 0, workers=50, replicas=3))
    assert verdict.fits_per_process == 0
    assert any("not even one connection per process" in r for r in verdict.recommendations)
    assert any("PgBouncer" in r for r in verdict.recommendations)


def test_missing_server_timeouts_are_recommended() -> None:
    facts = pg_facts(
        timeouts={
            "statement_timeout": 0.0,
            "idle_in_transaction_session_timeout": 0.0,
            "lock_timeout": 0.0,
        }
    )
    recs = assess(facts, Fleet(1, 0, 1, 1)).recommendations
    assert [r.split(" ")[0] for r in recs] == [
        "statement_timeout",
        "idle_in_transaction_session_timeout",
    ]
    assert assess(pg_facts(), Fleet(1, 0, 1, 1)).recommendations == ()


def test_mysql_advice_names_its_own_settings() -> None:
    facts = ServerFacts(
        backend="mysql",
        version="MySQL 8.4",
        max_connections=151,
        reserved={},
        current_connections=1,
        connection_states={},
        timeouts={"max_execution_time": 0.0, "wait_timeout": 600.0},
    )
    verdict = assess(facts, Fleet(5, 10, 4, 3))
    text = " ".join(verdict.recommendations)
    assert verdict.usable == 151
    assert "max_execution_time is 0" in text
    assert "pool_recycle=540" in text
    assert "ProxySQL" in text
    assert "PgBouncer" not in text


def test_fleet_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="workers"):
        Fleet(5, 10, workers=0, replicas=1)
    with pytest.raises(ValueError, match="max_overflow"):
        Fleet(5, -2, workers=1, replicas=1)


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql+psycopg://app:{SECRET}@db.internal:6432/prod",
            "postgresql+psycopg://db.internal:6432/prod",
        ),
        (
            f"postgresql://app:{SECRET}@db/prod?sslmode=require&password={SECRET}",
            "postgresql://db:5432/prod",
        ),
        (f"mysql+pymysql://root:{SECRET}@127.0.0.1/test", "mysql+pymysql://127.0.0.1:3306/test"),
        (f"postgresql://app:{SECRET}@[::1]:5432/x", "postgresql://[::1]:5432/x"),
    ],
)
def test_safe_url_shows_only_driver_host_port_database(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_a_malformed_url_is_never_echoed() -> None:
    # An unescaped '@' in the password: the parser would show part of it as the host.
    with pytest.raises(CheckError) as info:
        safe_url("postgresql://app:s3@cr3t@db/prod")
    assert "cr3t" not in str(info.value)
    assert "s3" not in str(info.value).replace("SQLAlchemy", "")


@pytest.mark.parametrize(
    "message",
    [
        f"could not connect: host=db user=app password={SECRET} dbname=prod",
        f"could not connect: host=db user=app password='{SECRET} x' dbname=prod",
        f'connect failed: {{"user": "app", "password": "{SECRET}"}}',
        f"invalid dsn postgresql://app:{SECRET}@db:5432/prod",
        f"failed for app:{SECRET}@db",
    ],
)
def test_sanitize_removes_credential_shapes_without_knowing_the_url(message: str) -> None:
    cleaned = sanitize(message + "\n second line")
    assert SECRET not in cleaned
    assert "\n" not in cleaned
    assert cleaned.startswith(message[:10])


@pytest.mark.parametrize(
    ("message", "url"),
    [
        (f"odd driver text containing {SECRET} on its own", f"postgresql://app:{SECRET}@db/p"),
        ("encoded: s3%21cr3t", "postgresql://app:s3%21cr3t@db/prod"),
        ("decoded: s3!cr3t", "postgresql://app:s3%21cr3t@db/prod"),
        ("plus-encoded: s3+cr3t", "postgresql://app:s3%20cr3t@db/prod"),
        ("the url postgresql://app:pw@db/prod itself", "postgresql://app:pw@db/prod"),
    ],
)
def test_sanitize_removes_the_literal_password_in_any_shape(message: str, url: str) -> None:
    password = str(sa.make_url(url).password)
    cleaned = sanitize(message, url)
    for form in (password, password.replace("!", "%21"), password.replace(" ", "+")):
        assert form not in cleaned


def test_sanitize_keeps_what_is_not_a_secret() -> None:
    url = f"mysql+pymysql://root:{SECRET}@db/test"
    text = "(1045, \"Access denied for user 'root'@'10.0.0.1' (using password: YES)\")"
    assert sanitize(text, url) == (
        "(1045, \"Access denied for user '***'@'10.0.0.1' (using password: YES)\")"
    )


# --------------------------------------------------------------------------- real servers


@pytest.fixture
def pg_check_url(pg_url: str) -> Iterator[str]:
    """The PostgreSQL URL with a (fake) password: trust authentication accepts it."""
    u = sa.make_url(pg_url).set(password=SECRET)
    yield u.render_as_string(hide_password=False)
    _assert_no_check_session_left(pg_url)


def _assert_no_check_session_left(pg_url: str) -> None:
    engine = sa.create_engine(pg_url, poolclass=sa.NullPool)
    try:
        deadline = time.monotonic() + 2.0
        while True:  # a backend exits a moment after its client hangs up
            with engine.connect() as c:
                left = c.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                    {"n": APPLICATION_NAME},
                ).scalar()
            if left == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert left == 0, "the check left its connection open"
    finally:
        engine.dispose()


def _server_values(url: str, sql: str) -> list[Any]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text(sql)).one())
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_postgresql_ok_and_at_risk(
    pg_url: str, pg_check_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    max_conn, superuser = (
        int(v)
        for v in _server_values(
            pg_url,
            "SELECT current_setting('max_connections'), "
            "current_setting('superuser_reserved_connections')",
        )
    )
    usable = max_conn - superuser  # PostgreSQL 15 here: no reserved_connections
    # Exactly full is OK ...
    per = usable // 2
    fleet = [
        "--pool-size",
        "1",
        "--max-overflow",
        str(per - 1),
        "--workers",
        "1",
        "--replicas",
        "2",
    ]
    code, out, err = run_check(
        capsys, pg_check_url, *fleet, "--other-clients", str(usable - 2 * per), "--json"
    )
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["status"] == "OK"
    assert doc["server"]["backend"] == "postgresql"
    assert doc["server"]["max_connections"] == max_conn
    assert doc["usable"] == usable
    assert doc["headroom"] == 0
    assert set(doc["server"]["timeouts"]) >= {
        "statement_timeout",
        "idle_in_transaction_session_timeout",
        "lock_timeout",
    }
    assert doc["database"] == safe_url(pg_url)
    # ... one more connection is AT RISK.
    code, out, err = run_check(
        capsys, pg_check_url, *fleet, "--other-clients", str(usable - 2 * per + 1)
    )
    assert (code, err) == (1, "")
    assert f"AT RISK: the fleet can open {usable + 1} connections, 1 more than the {usable}" in out
    assert "PgBouncer" in out
    assert SECRET not in out


@pytest.mark.postgresql
def test_postgresql_reports_what_the_server_has(pg_url: str, pg_check_url: str) -> None:
    facts = gather(pg_check_url)
    (statement_timeout_ms,) = _server_values(
        pg_url, "SELECT setting::int FROM pg_settings WHERE name = 'statement_timeout'"
    )
    # The check sets its own statement_timeout for safety; it must report the server's.
    assert facts.timeouts["statement_timeout"] == statement_timeout_ms / 1000
    assert facts.current_connections == sum(facts.connection_states.values())
    assert facts.version.startswith("PostgreSQL ")
    assert "superuser_reserved_connections" in facts.reserved


@pytest.mark.postgresql
def test_postgresql_async_url_works_as_is(pg_async_url: str, pg_url: str) -> None:
    facts = gather(pg_async_url)
    assert facts.backend == "postgresql"
    _assert_no_check_session_left(pg_url)


@pytest.mark.mariadb
def test_mariadb_ok_and_at_risk(mariadb_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    (max_conn,) = (int(v) for v in _server_values(mariadb_url, "SELECT @@global.max_connections"))
    code, out, err = run_check(
        capsys,
        mariadb_url,
        "--pool-size",
        "2",
        "--max-overflow",
        "3",
        "--workers",
        "2",
        "--replicas",
        "2",
        "--json",
    )
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["status"] == "OK"
    assert doc["server"]["backend"] == "mariadb"
    assert doc["usable"] == max_conn
    assert doc["worst_case"] == 20
    assert "max_statement_time" in doc["server"]["timeouts"]
    assert "max_execution_time" not in doc["server"]["timeouts"]

    code, out, err = run_check(
        capsys,
        mariadb_url,
        "--pool-size",
        "5",
        "--max-overflow",
        "10",
        "--workers",
        "4",
        "--replicas",
        "3",
        "--other-clients",
        str(max_conn),
    )
    assert (code, err) == (1, "")
    assert "AT RISK" in out
    assert "wait_timeout" in out


@pytest.mark.postgresql
def test_password_never_shown_on_connection_failure_postgresql(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    u = sa.make_url(pg_url).set(password=SECRET, port=1)
    url = u.render_as_string(hide_password=False)
    for driver in ("postgresql+psycopg", "postgresql+psycopg2", "postgresql+asyncpg"):
        code, out, err = run_check(
            capsys,
            url.replace(u.drivername, driver, 1),
            "--workers",
            "1",
            "--replicas",
            "1",
            "--connect-timeout",
            "3",
        )
        assert code == 2
        assert out == ""
        assert err.startswith(f"poolguard check: cannot connect to {driver}://127.0.0.1:1/")
        assert err.count("\n") == 1
        assert SECRET not in err
        assert f"{u.username}:" not in err


@pytest.mark.mariadb
def test_password_never_shown_on_connection_failure_mariadb(
    mariadb_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    u = sa.make_url(mariadb_url).set(password=SECRET)
    for url in (
        u.set(port=1).render_as_string(hide_password=False),  # nobody listens
        u.render_as_string(hide_password=False),  # root has no password: access denied
    ):
        code, out, err = run_check(capsys, url, "--workers", "1", "--replicas", "1")
        assert code == 2
        assert out == ""
        assert err.startswith("poolguard check: cannot connect to mysql+pymysql://127.0.0.1:")
        assert SECRET not in err
        assert err.count("\n") == 1


def test_input_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POOLGUARD_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    cases = [
        (["check", "--workers", "1", "--replicas", "1"], "give --database-url"),
        (
            ["check", "--database-url", "sqlite://", "--workers", "1", "--replicas", "1"],
            "not 'sqlite'",
        ),
        (
            [
                "check",
                "--database-url",
                f"postgresql://a:{SECRET}@h/d",
                "--workers",
                "0",
                "--replicas",
                "1",
            ],
            "--workers",
        ),
        (
            [
                "check",
                "--database-url",
                f"nope://a:{SECRET}@h/d",
                "--workers",
                "1",
                "--replicas",
                "1",
            ],
            "not 'nope'",
        ),
        (
            [
                "check",
                "--database-url",
                f"mysql+nosuchdriver://a:{SECRET}@h/d",
                "--workers",
                "1",
                "--replicas",
                "1",
            ],
            "unknown database driver in mysql+nosuchdriver://h:3306/d",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert message in captured.err
        assert captured.err.count("\n") == 1
        assert SECRET not in captured.err


@pytest.mark.postgresql
def test_url_from_the_environment(
    pg_check_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLGUARD_DATABASE_URL", pg_check_url)
    assert (
        main(
            [
                "check",
                "--workers",
                "1",
                "--replicas",
                "1",
                "--pool-size",
                "1",
                "--max-overflow",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(f"poolguard check: {safe_url(pg_check_url)} (PostgreSQL ")
    assert SECRET not in out


@pytest.fixture
def silent_endpoint() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel completes the handshake from the
    listen backlog) and never sends a byte: a black-holed server behind a proxy."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize(
    "driver", ["mysql+pymysql", "postgresql+psycopg", "postgresql+asyncpg", "mysql+aiomysql"]
)
def test_connect_timeout_holds_on_a_silent_endpoint(
    silent_endpoint: int, capsys: pytest.CaptureFixture[str], driver: str
) -> None:
    # 0.1: PyMySQL's connect_timeout covers only the TCP connect, then it read the server's
    # greeting without a timeout and `poolguard check` hung until killed.
    import threading

    url = f"{driver}://app:{SECRET}@127.0.0.1:{silent_endpoint}/db"
    codes: list[int] = []
    argv = ["check", "--database-url", url, "--workers", "1", "--replicas", "1"]
    worker = threading.Thread(
        target=lambda: codes.append(main([*argv, "--connect-timeout", "1"])), daemon=True
    )
    worker.start()
    worker.join(60)  # a bound on a hang, not a timing assertion: it ends in seconds
    assert not worker.is_alive(), "poolguard check hung on a silent endpoint"
    assert codes == [2]
    err = capsys.readouterr().err
    assert err.startswith(f"poolguard check: cannot connect to {driver}://127.0.0.1:")
    assert err.count("\n") == 1
    assert SECRET not in err
