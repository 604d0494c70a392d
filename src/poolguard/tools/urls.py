"""Showing database URLs and driver errors without their credentials.

The command-line tools (``check``, ``demo``) print where they connect and why they could not,
into terminals and CI logs that many people read. A URL carries a user name, a password and,
in its query string, more secrets (``password=``, ``sslkey=``); a driver's error message can
echo the DSN. So one module decides what of a URL may be shown (:func:`display_url`:
``driver://host:port/database``, nothing else) and scrubs driver messages
(:func:`sanitize`), and every tool uses it instead of its own variant.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = ["DEFAULT_PORTS", "UrlError", "display_url", "parse_url", "sanitize"]

#: Default ports, so the display always has the ``host:port`` it promises.
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


class UrlError(ValueError):
    """A URL that cannot be parsed. The message never contains any part of the URL: a
    malformed URL is often a password with an unescaped ``@``."""


def parse_url(url: str) -> URL:
    """SQLAlchemy's URL for ``url``, or :class:`UrlError` with a message that echoes nothing.

    Refuses an ``@`` left in the host, which the parser produces from a password with an
    unescaped ``@`` (and would then show part of the password as the host).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
        if "@" in (u.host or ""):
            raise ValueError("unescaped '@'")
        return u
    except (ArgumentError, ValueError):
        raise UrlError(
            "is not a valid SQLAlchemy URL (dialect+driver://user:password"
            "@host:port/database; escape special characters in the password with %XX)"
        ) from None


def display_url(url: str | URL) -> str:
    """``driver://host:port/database``: what may be shown of a URL (no user, no password,
    no query string). SQLite shows its file: ``sqlite:///path`` or ``:memory:``."""
    u = parse_url(url) if isinstance(url, str) else url
    backend = u.get_backend_name()
    if backend == "sqlite":
        return f"{u.drivername}:///{u.database or ':memory:'}"
    port = u.port or DEFAULT_PORTS.get(backend)
    host = u.host or "localhost"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{u.drivername}://{host}{f':{port}' if port else ''}/{u.database or ''}"


_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_USER_PASS_AT = re.compile(r"[^\s:/@'\"(),]+:[^\s@/'\"]+@")
_KEY_VALUE = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|user|username)([\"']?\s*[=:]\s*)"
    # MySQL's "(using password: YES)" says whether one was sent, not what it was.
    r"(?!(?:YES|NO)\))"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;&)}]+)"
)


def sanitize(message: str, url: str | URL | None = None) -> str:
    """Scrub anything credential-like from a driver's error message and keep one line.

    Drivers echo the DSN in some failures (``password=...`` from libpq, ``user:pass@host``
    from URL-shaped messages, ``'user'@'host'`` from MySQL). Patterns catch the shapes; the
    literal password (raw and percent-encoded) and quoted user name from ``url`` are removed
    too, whatever the shape around them.
    """
    text = " ".join(message.split())  # one line, whatever the driver sent
    u: URL | None = None
    if isinstance(url, str):
        if url in text:
            text = text.replace(url, "<database url>")
        try:
            u = parse_url(url)
        except UrlError:
            u = None
    elif url is not None:
        u = url
    if u is not None:
        if u.password:
            secret = str(u.password)
            for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
                text = text.replace(form, "***")
        if u.username:
            name = re.escape(str(u.username))
            text = re.sub(rf"([\"'`]){name}\1", r"\1***\1", text)
            text = re.sub(rf"(?i)(\bfor user\s+){name}\b", r"\1***", text)
    text = _USERINFO.sub("", text)
    text = _USER_PASS_AT.sub("***@", text)
    text = _KEY_VALUE.sub(r"\1\2***", text)
    return text
