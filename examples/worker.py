"""A background worker (no web server) that runs each job on a poolguard budget.

Workers share the database (and often the pool) with the web app, and one bad job can hold
connections as surely as one bad endpoint. Here every job runs inside
``with guard.budget(deadline=..., max_queries=...)`` and each refusal is handled the way a
worker should, per job, without stopping the loop:

- ``BudgetExceeded``: the job does more than it should (an N+1 loop, a runaway retry): fail
  it for a human to look at, retrying would do the same again;
- ``QueryTimeout``: the statement was stopped by the database; retry the job later, a few
  times at most;
- ``QueryQuarantined``: that statement has timed out again and again and is refused without
  touching the database; put the job back for when the quarantine is probed
  (``err.retry_after``).

At the end the worker prints ``guard.stats()``: pool, gate, quarantine and per-statement
numbers, all JSON-serialisable and free of literals. There is no web server here, so
``main()`` runs the worker loop instead of uvicorn.

Run it::

    python examples/worker.py                 # SQLite file in the temp directory
    DATABASE_URL=postgresql+psycopg://user@host/db python examples/worker.py
    python examples/worker.py --self-test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Connection,
    Double,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    text,
)

from poolguard import BudgetExceeded, PoolGuard, QueryQuarantined, QueryTimeout

NAME = "worker"
DEFAULT_SQLITE = os.path.join(tempfile.gettempdir(), "poolguard-example-worker.db")
#: MySQL/MariaDB: a long SLEEP() is not reliably stopped by max_statement_time (MDEV-18024);
#: a join that never ends is, between two rows.
MYSQL_SLOW = (
    "SELECT COUNT(*) FROM information_schema.columns a, information_schema.columns b, "
    "information_schema.columns c"
)
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE}"
#: Attempts before a job that keeps timing out is given up on.
MAX_ATTEMPTS = 3

engine: Engine = create_engine(DATABASE_URL)
guard = PoolGuard(engine, statement_timeout=2.0)


@dataclass
class Job:
    id: int
    kind: str
    attempts: int


metadata = MetaData()
jobs = Table(
    "poolguard_example_jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(20), nullable=False),
    Column("state", String(20), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("not_before", Double, nullable=False),
    Column("note", String(200)),
)
invoices = Table(
    "poolguard_example_invoices",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("customer", Integer, nullable=False),
    Column("amount", Float, nullable=False),
)


def setup_database(bind: Engine) -> None:
    """(Re)create the job queue and the data the jobs work on."""
    with bind.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
        conn.execute(
            invoices.insert(),
            [{"id": i, "customer": i % 30, "amount": i * 2.5} for i in range(1, 301)],
        )


def enqueue(kinds: list[str]) -> None:
    with engine.begin() as conn:
        conn.execute(
            jobs.insert(),
            [{"kind": k, "state": "queued", "attempts": 0, "not_before": 0.0} for k in kinds],
        )


# -- the jobs ------------------------------------------------------------------------------------
def total_invoices(conn: Connection) -> None:
    """A well-behaved job: two statements."""
    conn.execute(text("SELECT sum(amount) FROM poolguard_example_invoices")).scalar()
    conn.execute(text("SELECT count(DISTINCT customer) FROM poolguard_example_invoices")).scalar()


def customer_digest(conn: Connection) -> None:
    """An N+1 loop: one statement per customer; 30 customers blow the 20-statement budget."""
    customers = conn.execute(
        text("SELECT DISTINCT customer FROM poolguard_example_invoices ORDER BY customer")
    ).scalars()
    for c in list(customers):
        conn.execute(
            text("SELECT sum(amount) FROM poolguard_example_invoices WHERE customer = :c"),
            {"c": c},
        ).scalar()


def rebuild_index(conn: Connection) -> None:
    """A statement that runs far longer than its budget allows."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_sleep(30)"))
    elif conn.dialect.name in ("mysql", "mariadb"):
        conn.execute(text(MYSQL_SLOW))
    else:
        conn.execute(
            text(
                "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c "
                "WHERE n < 1000000000) SELECT count(*) FROM c"
            )
        )


HANDLERS: dict[str, Callable[[Connection], None]] = {
    "invoice-total": total_invoices,
    "digest": customer_digest,
    "reindex": rebuild_index,
}


# -- the worker ----------------------------------------------------------------------------------
def claim() -> Job | None:
    """Take the next due job (one worker: a plain transaction is enough)."""
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "SELECT id, kind, attempts FROM poolguard_example_jobs WHERE state = 'queued' "
                "AND not_before <= :now ORDER BY id LIMIT 1"
            ),
            {"now": time.time()},
        ).first()
        if row is None:
            return None
        conn.execute(
            text("UPDATE poolguard_example_jobs SET state = 'running' WHERE id = :id"),
            {"id": row.id},
        )
        return Job(row.id, row.kind, row.attempts)


def finish(job: Job, state: str, note: str, delay: float = 0.0) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE poolguard_example_jobs SET state = :state, note = :note, "
                "attempts = attempts + 1, not_before = :nb WHERE id = :id"
            ),
            {"state": state, "note": note, "nb": time.time() + delay, "id": job.id},
        )


def run_job(job: Job) -> str:
    """Run one job on its budget; returns what happened to it. Never raises poolguard errors."""
    try:
        # 2 s for the whole job, 20 statements, 0.5 s per statement.
        with (
            guard.budget(deadline=2.0, max_queries=20, statement_timeout=0.5),
            engine.begin() as conn,
        ):
            HANDLERS[job.kind](conn)
    except BudgetExceeded as err:
        finish(job, "failed", f"over budget: {err.limit}")
        return "failed: over budget"
    except QueryQuarantined as err:
        # Refused without touching the database: come back when it will be probed.
        finish(job, "queued", "statement quarantined", delay=err.retry_after or 30.0)
        return "deferred: quarantined"
    except QueryTimeout:
        if job.attempts + 1 >= MAX_ATTEMPTS:
            finish(job, "failed", "timed out too often")
            return "failed: timed out"
        finish(job, "queued", "timed out", delay=0.0)
        return "retry: timed out"
    finish(job, "done", "")
    return "done"


def work(stop_after: float) -> Counter[str]:
    """Process due jobs until none is left (or ``stop_after`` seconds have passed)."""
    outcomes: Counter[str] = Counter()
    until = time.monotonic() + stop_after
    while time.monotonic() < until:
        job = claim()
        if job is None:
            break
        outcome = run_job(job)
        outcomes[outcome] += 1
        print(f"job {job.id:>3} {job.kind:<14} {outcome}")
    return outcomes


# -- self-test and main --------------------------------------------------------------------------
def self_test() -> int:
    """Run a known batch and check what happened to each kind of job."""
    created = DATABASE_URL.startswith("sqlite") and not os.path.exists(DEFAULT_SQLITE)
    try:
        setup_database(engine)
        enqueue(["invoice-total"] * 3 + ["digest"] + ["reindex"] * 2 + ["invoice-total"])
        outcomes = work(stop_after=30.0)
        stats = guard.stats()
        expected: Counter[str] = Counter(
            {
                "done": 4,
                "failed: over budget": 1,
                # reindex #1 times out, is retried, times out again; reindex #2 times out:
                # three time-outs quarantine the statement, so its retry is deferred.
                "retry: timed out": 2,
                "failed: timed out": 1,
                "deferred: quarantined": 1,
            }
        )
        problems = []
        if outcomes != expected:
            problems.append(f"outcomes {dict(outcomes)} != expected {dict(expected)}")
        if len(stats["quarantine"]) != 1:
            problems.append(f"expected one quarantined statement, got {stats['quarantine']}")
        if guard.checked_out:
            problems.append(f"{guard.checked_out} connection(s) left checked out")
        json.dumps(stats)  # JSON-serialisable, as promised
    finally:
        guard.close()
        engine.dispose()
        if created and os.path.exists(DEFAULT_SQLITE):
            os.remove(DEFAULT_SQLITE)
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    if problems:
        print(f"self-test FAILED: {NAME}")
        return 1
    print(f"self-test passed: {NAME} ({sum(outcomes.values())} jobs on {engine.dialect.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-test", action="store_true", help="run a known batch and check it")
    parser.add_argument("--jobs", type=int, default=20, help="jobs to enqueue (default 20)")
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test()
    setup_database(engine)
    kinds = list(HANDLERS)
    enqueue([kinds[i % len(kinds)] for i in range(args.jobs)])
    try:
        outcomes = work(stop_after=60.0)
        print(json.dumps(dict(outcomes), indent=2))
        print(json.dumps(guard.stats(), indent=2))
    finally:
        guard.close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
