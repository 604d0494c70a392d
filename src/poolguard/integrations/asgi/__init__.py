"""The ASGI middleware and the parts only it uses (routing, in-flight counting, disconnects)."""

from poolguard.integrations.asgi.middleware import PoolGuardMiddleware, RouteRule

__all__ = ["PoolGuardMiddleware", "RouteRule"]
