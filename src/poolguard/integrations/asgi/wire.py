"""The wire: the deadline header read in, refusals written out as RFC 9457 problems.

Everything here touches bytes a client sends or receives, so each function is small, bounded
and literal-free: a deadline header is a plain decimal or ignored, a problem document never
holds SQL, parameters or a traceback, and a failure to describe a refusal still answers with
its status.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from starlette.types import Message, Send

from poolguard.core.budget import BudgetScope
from poolguard.errors import PoolGuardError
from poolguard.integrations.asgi.routing import MAX_DEPTH

__all__ = [
    "guard_error",
    "header_deadline",
    "send_problem",
    "server_timing_value",
    "with_server_timing",
]

log = logging.getLogger("poolguard")

# Seconds as a plain decimal: no sign, exponent, "inf", "nan", hex or digit separators (all
# of which float() accepts), bounded length.
_DEADLINE_VALUE = re.compile(rb"[ \t]*([0-9]{1,9}(?:\.[0-9]{1,9})?)[ \t]*")


def header_deadline(headers: Any, name: bytes) -> float | None:
    """The caller's remaining time from its deadline header; None when absent or unusable.

    A repeated header is ignored rather than guessed at (which copy is the caller's?).
    """
    try:
        found: bytes | None = None
        for key, value in headers or ():
            if key.lower() == name:
                if found is not None:
                    return None
                found = value
        if found is None:
            return None
        match = _DEADLINE_VALUE.fullmatch(found)
    except (TypeError, ValueError, AttributeError):  # a malformed scope: ignore the header
        return None
    if match is None:
        return None
    return float(match.group(1))


def guard_error(exc: BaseException) -> PoolGuardError | None:
    """The poolguard refusal behind ``exc``, also inside single-exception groups."""
    for _ in range(MAX_DEPTH):
        if isinstance(exc, PoolGuardError):
            return exc
        inner = getattr(exc, "exceptions", None)  # (Base)ExceptionGroup, also on 3.10
        if not (isinstance(inner, tuple) and len(inner) == 1):
            return None
        exc = inner[0]
    return None


def _retry_after_value(seconds: float) -> bytes:
    if not math.isfinite(seconds) or seconds < 1:
        return b"1"
    return str(math.ceil(seconds)).encode("ascii")


def server_timing_value(budget: BudgetScope) -> bytes:
    return (
        f"db;dur={budget.db_time * 1000:.2f}, db-wait;dur={budget.pool_wait * 1000:.2f}, "
        f'db-queries;desc="{budget.queries}"'
    ).encode("ascii")


def with_server_timing(message: Message, budget: BudgetScope) -> Message:
    # A new message: the app may reuse its own dict and its header list.
    headers = [*message.get("headers", ()), (b"server-timing", server_timing_value(budget))]
    return {**message, "headers": headers}


def _problem_document(err: PoolGuardError) -> dict[str, Any]:
    """``err.problem()``, or its literal-free essentials if building it fails.

    A refusal must reach the client as its 503/504 whatever happens to its description:
    a 500 would hide the very status that tells the client to back off.
    """
    try:
        return err.problem()
    except Exception:
        log.warning("%s.problem() failed; answering with a minimal document", type(err).__name__)
        return {
            "type": f"https://poolguard.dev/problems/{err.kind}",
            "title": err.title,
            "status": err.http_status,
        }


async def send_problem(
    send: Send, err: PoolGuardError, retry_after: float | None, budget: BudgetScope | None = None
) -> None:
    """Answer with ``err``'s RFC 9457 document: no SQL, parameters or traceback in it."""
    body = json.dumps(_problem_document(err), separators=(",", ":")).encode("utf-8")
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", _retry_after_value(retry_after)))
    if budget is not None:
        headers.append((b"server-timing", server_timing_value(budget)))
    await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
