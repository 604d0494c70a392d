"""Compatibility: the middleware's 0.1 import path (``from poolguard.middleware import
RouteRule``). The implementation lives in :mod:`poolguard.integrations.asgi`."""

from poolguard.integrations.asgi.middleware import PoolGuardMiddleware, RouteRule

__all__ = ["PoolGuardMiddleware", "RouteRule"]
