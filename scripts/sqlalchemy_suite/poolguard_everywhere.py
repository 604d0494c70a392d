"""pytest plugin: install a PoolGuard on every engine SQLAlchemy's own test suite creates.

Load it with ``-p poolguard_everywhere`` (this directory on ``PYTHONPATH``). The mode comes from
the environment, so the bare and the guarded run load exactly the same code:

* ``POOLGUARD_SUITE=guard`` (default): every real ``Engine`` returned by ``create_engine`` and
  every ``AsyncEngine`` returned by ``create_async_engine`` gets ``PoolGuard(engine)`` with the
  defaults, right after creation, as an application would do it.
* ``POOLGUARD_SUITE=bare``: the same wrappers, nothing installed (a control run).

How it reaches every engine: ``create_engine`` is wrapped in ``sqlalchemy.engine.create`` and in
every already-imported module that holds a reference to it (``sqlalchemy``, ``sqlalchemy.engine``,
``sqlalchemy.ext.asyncio.engine``...); test modules imported later bind the wrapper. The
``create_engine`` call made inside ``create_async_engine`` is not guarded on its own (the
AsyncEngine is, once: a second guard on one engine raises RuntimeError). Mock engines
(``create_mock_engine``) are not ``Engine`` instances and are skipped.

Guards are closed when SQLAlchemy's testing reaper drops the engine (end of test/class) and at
the end of the session, so thousands of watchdog threads do not pile up.

``POOLGUARD_SUITE_LOG=path`` appends one line per guard that could not be installed (the
exception), which tells construction failures from failures inside a test.
"""

from __future__ import annotations

import contextvars
import functools
import os
import sys
import traceback
from typing import Any

MODE = os.environ.get("POOLGUARD_SUITE", "guard")
if MODE not in ("guard", "bare"):
    raise RuntimeError(f"POOLGUARD_SUITE must be 'guard' or 'bare', got {MODE!r}")

_inside_async = contextvars.ContextVar("poolguard_suite_inside_async", default=False)
_guards: dict[int, Any] = {}  # id(sync engine) -> guard (closed by the reaper or at the end)
_originals: dict[str, Any] = {}
installed = 0
failed = 0


def _log(msg: str) -> None:
    path = os.environ.get("POOLGUARD_SUITE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(msg.rstrip("\n") + "\n")


def _install(engine: Any) -> None:
    global installed, failed
    from poolguard import PoolGuard

    sync = getattr(engine, "sync_engine", engine)
    try:
        guard = PoolGuard(engine)
    except BaseException as exc:
        failed += 1
        _log(
            f"INSTALL-FAILED {os.environ.get('PYTEST_CURRENT_TEST', '?')} "
            f"url={sync.url!r} {type(exc).__name__}: {exc}"
        )
        raise
    installed += 1
    _guards[id(sync)] = guard


def _wrap_sync(orig: Any) -> Any:
    @functools.wraps(orig)
    def create_engine(*args: Any, **kw: Any) -> Any:
        engine = orig(*args, **kw)
        from sqlalchemy.engine import Engine

        if MODE == "guard" and not _inside_async.get() and isinstance(engine, Engine):
            _install(engine)
        return engine

    create_engine.__poolguard_suite__ = True  # type: ignore[attr-defined]
    return create_engine


def _wrap_async(orig: Any) -> Any:
    @functools.wraps(orig)
    def create_async_engine(*args: Any, **kw: Any) -> Any:
        token = _inside_async.set(True)
        try:
            engine = orig(*args, **kw)
        finally:
            _inside_async.reset(token)
        if MODE == "guard" and hasattr(engine, "sync_engine"):
            _install(engine)
        return engine

    create_async_engine.__poolguard_suite__ = True  # type: ignore[attr-defined]
    return create_async_engine


def _rebind(orig: Any, wrapper: Any) -> None:
    """Point every loaded module's reference to ``orig`` at ``wrapper``."""
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if not d:
            continue
        for name, value in list(d.items()):
            if value is orig:
                setattr(mod, name, wrapper)


def patch() -> None:
    import sqlalchemy.engine.create as create_mod

    if "create_engine" not in _originals:
        _originals["create_engine"] = create_mod.create_engine
    orig = _originals["create_engine"]
    wrapper = _wrap_sync(orig)
    _rebind(orig, wrapper)
    try:
        import sqlalchemy.ext.asyncio.engine as async_mod
    except ImportError:  # no greenlet: sync only
        return
    if "create_async_engine" not in _originals:
        _originals["create_async_engine"] = async_mod.create_async_engine
    aorig = _originals["create_async_engine"]
    _rebind(aorig, _wrap_async(aorig))
    # create_async_engine calls this module-level name for its sync engine
    async_mod._create_engine = wrapper


def _close_guard_of(engine: Any) -> None:
    sync = getattr(engine, "sync_engine", engine)
    guard = _guards.pop(id(sync), None)
    if guard is not None:
        guard.close()


def _patch_reaper() -> None:
    from sqlalchemy.testing import engines

    killer = engines.ConnectionKiller
    if getattr(killer._drop_testing_engines, "__poolguard_suite__", False):
        return
    orig = killer._drop_testing_engines

    @functools.wraps(orig)
    def _drop_testing_engines(self: Any, scope: str) -> None:
        dropped = list(self.testing_engines[scope])
        try:
            orig(self, scope)
        finally:
            for e in dropped:
                try:
                    _close_guard_of(e)
                except Exception:
                    _log("CLOSE-FAILED " + traceback.format_exc().replace("\n", " | "))

    _drop_testing_engines.__poolguard_suite__ = True  # type: ignore[attr-defined]
    killer._drop_testing_engines = _drop_testing_engines


patch()


def pytest_configure(config: Any) -> None:
    patch()  # again, for modules imported by other plugins since


def pytest_sessionstart(session: Any) -> None:
    patch()
    try:
        _patch_reaper()
    except ImportError:
        pass


def pytest_collection_finish(session: Any) -> None:
    patch()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    for guard in list(_guards.values()):
        try:
            guard.close()
        except Exception:
            pass
    _guards.clear()


def pytest_report_header(config: Any) -> str:
    import sqlalchemy

    return (
        f"poolguard_everywhere: mode={MODE} sqlalchemy={sqlalchemy.__version__} "
        f"({os.path.dirname(sqlalchemy.__file__)})"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"poolguard_everywhere: mode={MODE} guards installed={installed} install failures={failed}"
    )
