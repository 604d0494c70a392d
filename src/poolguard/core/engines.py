"""What the guard reads from the engine it is given: the sync engine behind an AsyncEngine,
the pool's capacity and a name for the pool that carries no credentials."""

from __future__ import annotations

import importlib.util
import sys

from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool

__all__ = ["default_pool_name", "pool_capacity", "sync_engine_of"]

#: Capacity assumed for pools that do not bound themselves (NullPool, StaticPool...).
_UNBOUNDED_POOL_CAPACITY = 10


def sync_engine_of(engine: object) -> Engine:
    """The Engine behind ``engine``. An AsyncEngine can only exist once SQLAlchemy's asyncio
    extension was imported, so it is looked up in ``sys.modules`` rather than imported."""
    if isinstance(engine, Engine):
        return engine
    ext = sys.modules.get("sqlalchemy.ext.asyncio")
    if ext is not None and isinstance(engine, ext.AsyncEngine):
        if importlib.util.find_spec("greenlet") is None:
            raise ImportError(
                "guarding an AsyncEngine needs greenlet: pip install 'poolguard[asyncio]' "
                "(or 'sqlalchemy[asyncio]')"
            )
        sync: Engine = engine.sync_engine
        return sync
    raise TypeError(
        f"engine must be a sqlalchemy Engine or AsyncEngine, got {type(engine).__name__}"
    )


def pool_capacity(pool: Pool) -> int:
    if isinstance(pool, QueuePool):
        overflow = pool._max_overflow
        if overflow < 0:
            return max(pool.size(), _UNBOUNDED_POOL_CAPACITY)
        return pool.size() + overflow
    return _UNBOUNDED_POOL_CAPACITY


def default_pool_name(engine: Engine) -> str:
    url = engine.url
    host = url.host or ""
    port = f":{url.port}" if url.port else ""
    db = url.database or ""
    return f"{host}{port}/{db}" if host else f"{url.get_backend_name()}:{db or 'memory'}"
