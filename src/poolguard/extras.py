"""Which package, and which of poolguard's extras, brings an optional module.

A core install (``pip install poolguard``) has SQLAlchemy, Starlette and opentelemetry-api
only. Whatever needs more (a database driver, greenlet for async engines, redis for fleet
mode) says so in one line that names the package and the extra to install, never "not
available in this installation". The table here is the one place that knows the extras of
pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["OPTIONAL", "describe_import_error", "driver_problem", "install_hint"]

#: Top-level module -> (the package that provides it, the poolguard extra that pulls it in,
#: or None when poolguard has no extra for it).
OPTIONAL: dict[str, tuple[str, str | None]] = {
    "greenlet": ("greenlet", "asyncio"),
    "psycopg": ("psycopg[binary]", "postgresql"),
    "psycopg2": ("psycopg2-binary", "psycopg2"),
    "asyncpg": ("asyncpg", "asyncpg"),
    "pymysql": ("PyMySQL", "mysql"),
    "aiomysql": ("aiomysql", "aiomysql"),
    "aiosqlite": ("aiosqlite", "aiosqlite"),
    "redis": ("redis", "redis"),
    "MySQLdb": ("mysqlclient", None),
    "mysql": ("mysql-connector-python", None),
    "asyncmy": ("asyncmy", None),
    "pg8000": ("pg8000", None),
}

#: The async driver extras pull greenlet too (``sqlalchemy[asyncio]``).
_BRINGS_GREENLET = frozenset({"asyncio", "asyncpg", "aiomysql", "aiosqlite"})


def install_hint(*modules: str) -> str:
    """``pip install 'poolguard[asyncpg]'``-style advice for the missing top-level modules."""
    extras: list[str] = []
    packages: list[str] = []
    for module in modules:
        package, extra = OPTIONAL.get(module, (module, None))
        if extra is not None:
            if extra not in extras:
                extras.append(extra)
        elif package not in packages:
            packages.append(package)
    if "asyncio" in extras and any(e in _BRINGS_GREENLET for e in extras if e != "asyncio"):
        extras.remove("asyncio")
    words = [f"'poolguard[{','.join(extras)}]'"] if extras else []
    words += [f"'{p}'" if "[" in p else p for p in packages]
    return "pip install " + " ".join(words)


def _names(modules: list[str]) -> str:
    return modules[0] if len(modules) == 1 else ", ".join(modules[:-1]) + " and " + modules[-1]


def describe_import_error(err: ImportError) -> str:
    """One line naming what is missing and how to install it.

    SQLAlchemy's own errors for a missing greenlet carry no module name; they are recognised
    by their text.
    """
    name = (err.name or "").split(".")[0]
    if not name and "greenlet" in str(err):
        name = "greenlet"
    if name in OPTIONAL:
        return f"{name} is not installed: {install_hint(name)}"
    if name.startswith("poolguard"):
        return (
            f"{err.name} cannot be imported: this poolguard installation is incomplete "
            "(reinstall it: pip install --force-reinstall poolguard)"
        )
    if name:
        return f"{name} is not installed: pip install {name}"
    first = str(err).strip().splitlines()
    return f"ImportError: {first[0]}" if first else "ImportError"


def driver_problem(url: Any) -> str | None:
    """What keeps the driver of ``url`` (a URL or its text) from loading, as one line, or None.

    None too for a URL or a dialect SQLAlchemy does not know: the command reports those
    itself. Looks the driver up without connecting, and names every missing module at once
    (``postgresql+asyncpg`` on a core install needs asyncpg and greenlet: one extra brings
    both).
    """
    from sqlalchemy import exc
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
        dialect = u.get_dialect()
    except ImportError as err:
        return describe_import_error(err)
    except (exc.ArgumentError, exc.NoSuchModuleError, ValueError):
        return None
    except Exception:  # a third-party dialect that fails to load: the command says so
        return None
    missing: list[str] = []
    detail = ""
    try:
        dialect.import_dbapi()
    except ImportError as err:
        name = (err.name or "").split(".")[0]
        if name:
            missing.append(name)
        else:  # e.g. psycopg without a libpq it can load
            detail = describe_import_error(err)
    if getattr(dialect, "is_async", False) and importlib.util.find_spec("greenlet") is None:
        missing.append("greenlet")
    if not missing:
        return f"the {u.drivername} driver cannot be loaded ({detail})" if detail else None
    which = "which is" if len(missing) == 1 else "which are"
    return (
        f"the {u.drivername} driver needs {_names(missing)}, {which} not installed: "
        f"{install_hint(*missing)}"
    )
