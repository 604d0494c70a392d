"""``poolguard demo``: replay the outage poolguard was born from, without and with it.

A query shipped in a deploy took seconds; its endpoint kept being called, every connection
of the pool ended up waiting on it, and the healthy endpoints, whose queries take a
millisecond, stood in line behind it for SQLAlchemy's 30 s pool timeout: the site was down
for two and a half hours although only one query was wrong. The demo runs that story twice
on the same little web application, for ``--duration`` seconds each, under the same
open-loop load:

1. WITHOUT poolguard: SQLAlchemy's defaults (a pool of 5 + 10, a 30 s pool timeout, no
   statement timeout);
2. WITH poolguard: ``PoolGuard(engine)`` with its defaults and ``PoolGuardMiddleware``.

and prints the two side by side. No server is needed: by default the database is an SQLite
file (WAL mode) in a temporary directory that is removed afterwards.
``--database-url postgresql+psycopg://...`` (or ``mariadb+pymysql://...``) runs the same on
a real server, where nothing is created: the healthy queries are constant SELECTs and the
rogue is ``pg_sleep()`` (PostgreSQL) or 20 ms ``SLEEP()`` steps over MariaDB's sequence
engine. Credentials are never printed, only ``driver://host:port/db``.

How the pieces were chosen, and why:

- **A real Starlette application with ``def`` endpoints**, wrapped by the real middleware.
  Starlette runs ``def`` endpoints on anyio's worker threads (40 by default, the limit FastAPI
  users get too), which is where the outage happens: threads pile up waiting for the pool.
- **Driven in-process, through ASGI, by a small client of its own** (:mod:`.client`), not
  through uvicorn and httpx: the demo must run on the core installation (``pip install poolguard``
  brings SQLAlchemy and Starlette, not uvicorn or httpx), a socket adds nothing to a story
  about the connection pool, and in-process there is no port to find or to leak. The client
  behaves like an HTTP server would towards the application: it sends the request body, then
  reports ``http.disconnect`` when its user gives up, and never cancels the application
  itself (servers do not), so abandoned ``def`` handlers keep their thread and connection
  exactly as they would behind uvicorn. Starlette still dispatches ``def`` endpoints to the
  thread pool on this path; the demo records the thread that served them to prove it.
- **Open-loop load**: requests are sent on a fixed schedule whatever happens to earlier
  ones, and each latency is measured from the request's *intended* send time, so a stalled
  server cannot slow the load down and hide its own stall (coordinated omission).
  Clients give up after :data:`.scenario.PATIENCE` seconds, longer than poolguard's 5 s
  default statement timeout so that its 504s are seen as such.
- **Rates**: :data:`.scenario.ROGUE_RATE` rogue requests a second are enough to fill the 15
  connections in six seconds when nothing stops the rogue query, and few enough that
  poolguard's default 5 s statement timeout caps the rogue at about 13 connections before
  the quarantine trips. Healthy traffic is :data:`.scenario.HEALTHY_RATE` requests a second.
- **The rogue query on SQLite** is a recursive CTE walking a long series that pauses every
  few thousand rows in a small SQL function (as a server-side query waits on disk or on
  locks). Its duration is therefore set by the wall clock, not by how loaded the machine is,
  and it keeps the demo's own CPU free for the web application: the demo measures pool
  exhaustion, not a busy laptop. SQLite releases the GIL while it steps, and poolguard's
  progress handler interrupts it between two chunks.
- The rogue query ends on its own :data:`.scenario.ROGUE_SECONDS` after it started, or when
  the phase is over and every client has had its answer or given up, whichever comes first,
  so that every thread, connection and engine is gone before the next phase (and before exit).

The package, one concept per module:

- :mod:`.scenario`: the load (rates, patience, durations) and its open-loop schedule;
- :mod:`.workload`: the database and its three queries, per dialect (SQLite by default);
- :mod:`.app`: the little Starlette shop with its rogue endpoint;
- :mod:`.client`: the in-process ASGI client that sends one request and measures it;
- :mod:`.results`: what a phase measured, and its percentiles;
- :mod:`.phase`: running one phase (WITHOUT or WITH poolguard) and sampling the pool;
- :mod:`.progress`: the live progress line;
- :mod:`.report`: the side-by-side table and the JSON report;
- :mod:`.command`: ``poolguard demo``'s arguments and ``main``.

Only the core dependencies are imported (SQLAlchemy, Starlette, poolguard itself): the demo
runs on ``pip install poolguard``.
"""

from __future__ import annotations

from poolguard.tools.demo.command import main

__all__ = ["main"]
