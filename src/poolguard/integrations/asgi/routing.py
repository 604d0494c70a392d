"""Which route template will handle a request, found before the router runs.

The middleware partitions the pool and applies rules per route template
(``/reports/{id}``, never the raw path, so partitions stay bounded). It must know the
template before the handler runs, so it asks the application's routes exactly as Starlette's
router will: the first route whose ``matches()`` says FULL handles the request, and a Mount
that matches handles it even if nothing inside it does (it answers 404/405 then). Matching
the same scope with the same objects is what makes a rule impossible to dodge with path
tricks: whatever path reaches a handler reaches it through this match.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from starlette.routing import Match, WebSocketRoute
from starlette.types import Scope

__all__ = ["MAX_DEPTH", "Expansions", "collect_templates", "find_route"]

#: Nesting of Mounts and included routers followed before giving up (the request then uses
#: the default rule, as an unmatched one would).
MAX_DEPTH = 16

#: Routes inside FastAPI's included routers, by id of the including route: (that route, the
#: routes version, the routes). Rebuilding them would cost ~1 us a route on every request.
Expansions = dict[int, tuple[Any, int, list[Any]]]


def find_route(
    routes: Iterable[Any], scope: Scope, prefix: str, depth: int, cache: Expansions
) -> str | None:
    """The template of the route that will handle ``scope``; None when none will."""
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is not Match.FULL:
            continue
        inside = _inside(route, cache)
        if inside is None:
            return prefix + _template(route)
        if depth >= MAX_DEPTH:
            return None
        children, step = inside
        return find_route(children, {**scope, **child_scope}, prefix + step, depth + 1, cache)
    return None


def collect_templates(
    routes: Iterable[Any],
    prefix: str,
    depth: int,
    out: dict[str, set[str] | None],
    cache: Expansions,
) -> None:
    """Every HTTP template reachable from ``routes`` with its methods (None: any method)."""
    for route in routes:
        if isinstance(getattr(route, "original_route", route), WebSocketRoute):
            continue
        inside = _inside(route, cache)
        if inside is not None:
            if depth < MAX_DEPTH:
                collect_templates(inside[0], prefix + inside[1], depth + 1, out, cache)
            continue
        template = prefix + _template(route)
        methods = getattr(route, "methods", None)
        if template in out and out[template] is None:
            continue
        if not methods:
            out[template] = None
        else:
            out[template] = (out.get(template) or set()) | {str(m).upper() for m in methods}


def _template(route: Any) -> str:
    path_format = getattr(route, "path_format", None)
    if isinstance(path_format, str):
        return path_format
    return f"<{type(route).__name__}>"


def _inside(route: Any, cache: Expansions) -> tuple[list[Any], str] | None:
    """The routes a container route dispatches to, and the path it adds to the template.

    Mount and Host expose ``.routes`` (empty for a mounted plain ASGI app, which is then a
    leaf with its ``/prefix/{path}`` template). FastAPI's included routers have no path
    format of their own; ``fastapi.routing.iter_route_contexts`` lists the routes inside
    them, with the include prefix already applied.
    """
    children = getattr(route, "routes", None)
    if isinstance(children, list) and children:
        path = getattr(route, "path", "")
        return children, path if isinstance(path, str) else ""
    if getattr(route, "path_format", None) is None:
        contexts = _route_contexts(route, cache)
        if contexts:
            return contexts, ""
    return None


def _route_contexts(route: Any, cache: Expansions) -> list[Any]:
    if "fastapi" not in sys.modules:  # no FastAPI imported: no FastAPI router can be here
        return []
    # FastAPI caches what an included router contains under a version that changes whenever
    # a route is added anywhere below it. Keyed on the same version, this view of the routes
    # is exactly as fresh as the router's own: never a route the router would not use.
    version_of = getattr(getattr(route, "original_router", None), "_get_routes_version", None)
    version = version_of() if callable(version_of) else None
    if isinstance(version, int):
        hit = cache.get(id(route))
        if hit is not None and hit[0] is route and hit[1] == version:
            return hit[2]
    try:
        iter_contexts: Callable[[list[Any]], Iterator[Any]] = importlib.import_module(
            "fastapi.routing"
        ).iter_route_contexts
    except (ImportError, AttributeError):  # older FastAPI flattens included routers
        return []
    contexts = list(iter_contexts([route]))
    if len(contexts) == 1 and getattr(contexts[0], "original_route", None) is route:
        return []
    # A RouteContext forwards every attribute to the route it wraps; matching that route
    # directly halves the cost. Without the attribute, the wrapper serves as well.
    routes = [getattr(c, "_effective_route", c) for c in contexts]
    if isinstance(version, int):
        cache[id(route)] = (route, version, routes)
    return routes
