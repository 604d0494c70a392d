"""Does ``poolguard diff`` fail CI on noise? Does it still catch a real change?

    python benchmarks/bench_diff_noise.py [--pairs 20] [--backend sqlite|postgresql|both]

A generated test suite of about 200 fast statements (lookups, an N+1 listing, inserts,
updates, a join, and a 5 ms statement that runs in six tests) is run for real under
``pytest --poolguard-report``, twice per pair, and each pair is diffed with the default
thresholds: every failing pair is a false alarm, since both runs are identical. Then the
suite is run with a change, twice: an added N+1 (one listing runs its per-row query twice
as often) and the 5 ms statement turned into a 20 ms one (``pg_sleep``; on SQLite a
registered ``sleep()`` function). Both must fail.

The printed table also shows, per pair, the largest per-execution slowdown seen between
identical runs (the noise the duration rule has to stay above) and what the diff of the
previous release (total time x1.5 over a 5 ms floor, per test and summed, no evidence
needed) would have said.

PostgreSQL is taken from ``POOLGUARD_TEST_PG`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SUITE = """
import os
import time

import pytest
import sqlalchemy as sa

URL = os.environ.get("NOISE_URL", "sqlite://")
NPLUS1 = os.environ.get("NOISE_NPLUS1") == "1"
SLOW = float(os.environ.get("NOISE_SLOW", "0.005"))


@pytest.fixture(scope="session")
def engine():
    kw = {}
    if URL.startswith("sqlite"):
        kw = {"poolclass": sa.StaticPool, "connect_args": {"check_same_thread": False}}
    e = sa.create_engine(URL, **kw)
    if URL.startswith("sqlite"):
        @sa.event.listens_for(e, "connect")
        def _fns(dbapi_conn, record):
            dbapi_conn.create_function("pg_sleep", 1, lambda s: time.sleep(s) or 1)
    with e.begin() as c:
        c.exec_driver_sql("DROP TABLE IF EXISTS noise_addresses")
        c.exec_driver_sql("DROP TABLE IF EXISTS noise_users")
        c.exec_driver_sql("CREATE TABLE noise_users (id INTEGER PRIMARY KEY, name TEXT)")
        c.exec_driver_sql(
            "CREATE TABLE noise_addresses (user_id INT, email TEXT)"
        )
        c.execute(sa.text("INSERT INTO noise_users (id, name) VALUES (:i, :n)"),
                  [{"i": i, "n": f"u{i}"} for i in range(1, 41)])
    yield e
    with e.begin() as c:
        c.exec_driver_sql("DROP TABLE noise_addresses")
        c.exec_driver_sql("DROP TABLE noise_users")
    e.dispose()


@pytest.mark.parametrize("uid", range(1, 21))
def test_profile(engine, uid):
    with engine.begin() as c:
        c.execute(sa.text("SELECT id, name FROM noise_users WHERE id = :i"), {"i": uid})
        loops = 10 if (NPLUS1 and uid == 7) else 5
        for k in range(loops):
            c.execute(sa.text(
                "SELECT email FROM noise_addresses WHERE user_id = :u AND email <> :k"),
                {"u": uid, "k": str(k)})
        c.execute(sa.text("INSERT INTO noise_addresses (user_id, email) VALUES (:u, :e)"),
                  {"u": uid, "e": "x@example.org"})


@pytest.mark.parametrize("uid", range(21, 31))
def test_update(engine, uid):
    with engine.begin() as c:
        for _ in range(3):
            c.execute(sa.text(
                "SELECT u.name, count(a.email) FROM noise_users u LEFT JOIN noise_addresses a "
                "ON a.user_id = u.id WHERE u.id = :i GROUP BY u.name"), {"i": uid})
        c.execute(sa.text("UPDATE noise_users SET name = :n WHERE id = :i"), {"n": "v", "i": uid})
        c.execute(sa.text("UPDATE noise_users SET name = :n WHERE id = :i"), {"n": "w", "i": uid})


@pytest.mark.parametrize("k", range(6))
def test_report(engine, k):
    with engine.connect() as c:
        c.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLOW})
"""


def run_suite(workdir: Path, report: Path, env: dict[str, str]) -> None:
    """One real pytest run of the generated suite, writing ``report``."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",
        "-p",
        "no:randomly",
        f"--poolguard-report={report}",
        str(workdir / "test_noise_suite.py"),
    ]
    proc = subprocess.run(
        cmd, cwd=workdir, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"suite failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def make_suite(workdir: Path) -> None:
    (workdir / "test_noise_suite.py").write_text(SUITE, encoding="utf-8")
    (workdir / "pytest.ini").write_text("[pytest]\naddopts = -p no:asyncio\n", encoding="utf-8")


def diff_exit(base: Path, new: Path, *extra: str) -> tuple[int, list[str]]:
    """Exit status of ``poolguard diff`` and the kinds of its regressions."""
    proc = subprocess.run(
        [sys.executable, "-m", "poolguard", "diff", "--json", *extra, str(base), str(new)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 2:
        raise RuntimeError(proc.stderr)
    doc = json.loads(proc.stdout)
    return proc.returncode, [f"{f['kind']}:{f['summary']}" for f in doc["regressions"]]


def worst_noise(base: Path, new: Path) -> float:
    """The largest growth of a per-test mean execution time between two runs, in ms."""
    a = json.loads(base.read_text())["tests"]
    b = json.loads(new.read_text())["tests"]
    worst = 0.0
    for nodeid, t in a.items():
        for fid, f in t["fingerprints"].items():
            g = b.get(nodeid, {}).get("fingerprints", {}).get(fid)
            if g and f["count"] and g["count"]:
                worst = max(worst, g["total_time"] / g["count"] - f["total_time"] / f["count"])
    return worst * 1000


def old_rule_fails(base: Path, new: Path) -> bool:
    """What the 0.1 duration rule would have said: total time x1.5 over a 5 ms floor, per
    test and for each fingerprint summed over all tests, with no evidence needed."""
    a = json.loads(base.read_text())["tests"]
    b = json.loads(new.read_text())["tests"]

    def slower(old: float, now: float) -> bool:
        return now >= 0.005 and now > old and now / max(old, 0.005) > 1.5

    sums: dict[str, list[float]] = {}
    for nodeid, t in a.items():
        for fid, f in t["fingerprints"].items():
            g = b.get(nodeid, {}).get("fingerprints", {}).get(fid)
            if g is None:
                continue
            if slower(f["total_time"], g["total_time"]):
                return True
            pair = sums.setdefault(fid, [0.0, 0.0])
            pair[0] += f["total_time"]
            pair[1] += g["total_time"]
    return any(slower(old, now) for old, now in sums.values())


def backend_env(backend: str) -> dict[str, str]:
    if backend == "sqlite":
        return {"NOISE_URL": "sqlite://"}
    url = os.environ.get(
        "POOLGUARD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    return {"NOISE_URL": url}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_suite(work)
        for backend in backends:
            env = backend_env(backend)
            failures = old_failures = 0
            noise: list[float] = []
            for i in range(args.pairs):
                a, b = work / f"{backend}-{i}-a.json", work / f"{backend}-{i}-b.json"
                run_suite(work, a, env)
                run_suite(work, b, env)
                code, kinds = diff_exit(a, b)
                failures += code != 0
                old_failures += old_rule_fails(a, b)
                noise.append(worst_noise(a, b))
                print(f"{backend} pair {i:2}: exit {code} {kinds} worst +{noise[-1]:.1f} ms")
            base = work / f"{backend}-0-a.json"
            n1 = work / f"{backend}-nplus1.json"
            slow = work / f"{backend}-slow.json"
            run_suite(work, n1, {**env, "NOISE_NPLUS1": "1"})
            run_suite(work, slow, {**env, "NOISE_SLOW": "0.020"})
            n1_code, n1_kinds = diff_exit(base, n1)
            slow_code, slow_kinds = diff_exit(base, slow)
            stmts = sum(t["statements"] for t in json.loads(base.read_text())["tests"].values())
            print(
                f"{backend}: {stmts} statements per run; identical pairs failing: "
                f"{failures}/{args.pairs} (0.1 rule: {old_failures}/{args.pairs}); "
                f"worst per-execution noise {max(noise):.1f} ms; "
                f"N+1 -> exit {n1_code} {n1_kinds}; 5->20 ms -> exit {slow_code} {slow_kinds}"
            )
            ok = ok and failures == 0 and n1_code == 1 and slow_code == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
