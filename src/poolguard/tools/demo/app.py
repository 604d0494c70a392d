"""The demo's web application: a little shop with two healthy ``def`` endpoints and the one
shipped with the rogue query, on a real Starlette application."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from poolguard.tools.demo.workload import Workload

__all__ = ["Gauges", "build_app"]


class Gauges:
    """What the application sees of its own pool: threads waiting for a connection, and
    which threads served the ``def`` endpoints (to show they ran on the thread pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = 0
        self.threads: set[str] = set()

    @contextlib.contextmanager
    def waiting_for_connection(self) -> Iterator[None]:
        with self._lock:
            self.waiting += 1
            self.threads.add(threading.current_thread().name)
        try:
            yield
        finally:
            with self._lock:
                self.waiting -= 1


def build_app(
    engine: Engine, workload: Workload, gauges: Gauges, rogue_until: Callable[[], float]
) -> Starlette:
    """The shop: two healthy ``def`` endpoints and the one shipped with the rogue query."""

    def connect() -> sa.Connection:
        with gauges.waiting_for_connection():
            return engine.connect()

    def item(request: Request) -> JSONResponse:
        item_id = int(request.path_params["item_id"])
        with connect() as conn:
            row = conn.execute(workload.item_sql, {"id": item_id}).first()
        return JSONResponse({"item": None if row is None else list(row)})

    def orders(request: Request) -> JSONResponse:
        customer = int(request.path_params["customer_id"])
        with connect() as conn:
            rows = conn.execute(workload.orders_sql, {"id": customer}).all()
        return JSONResponse({"orders": [list(r) for r in rows]})

    def recommendations(request: Request) -> JSONResponse:
        with connect() as conn:
            score = conn.execute(workload.rogue_sql, workload.rogue_params(rogue_until())).scalar()
        return JSONResponse({"score": score})

    return Starlette(
        routes=[
            Route("/items/{item_id:int}", item),
            Route("/customers/{customer_id:int}/orders", orders),
            Route("/recommendations", recommendations),
        ]
    )
