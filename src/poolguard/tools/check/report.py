"""Rendering a ``poolguard check`` verdict: text for people, JSON for deploy pipelines.

``database`` is always the display form of the URL (:func:`poolguard.tools.urls.display_url`),
never the URL itself.
"""

from __future__ import annotations

import json

from poolguard.tools.check.arithmetic import Assessment
from poolguard.tools.check.facts import Fleet, ServerFacts

__all__ = ["render_json", "render_text"]


def _seconds_text(value: float) -> str:
    if value == 0:
        return "0 (disabled)"
    return f"{value:g}s"


def render_text(database: str, facts: ServerFacts, fleet: Fleet, verdict: Assessment) -> str:
    """The human report: the server's numbers, the fleet's arithmetic, the verdict, advice."""
    rows: list[tuple[str, str]] = [("max_connections", str(facts.max_connections))]
    if facts.reserved:
        parts = " + ".join(f"{v} {k}" for k, v in facts.reserved.items())
        rows.append(("reserved", f"{sum(facts.reserved.values())} ({parts})"))
    rows.append(("usable by applications", str(facts.usable)))
    current = str(facts.current_connections)
    if facts.connection_states:
        current += " (" + ", ".join(f"{k} {v}" for k, v in facts.connection_states.items()) + ")"
    rows.append(("open now (besides this check)", current))
    rows += [(name, _seconds_text(v)) for name, v in facts.timeouts.items()]
    width = max(len(k) for k, _ in rows)
    out = [f"poolguard check: {database} ({facts.version})", "", "server"]
    out += [f"  {k.ljust(width)}  {v}" for k, v in rows]

    pool = f"pool_size {fleet.pool_size} + max_overflow {fleet.max_overflow}"
    worst = "unbounded" if verdict.worst_case is None else str(verdict.worst_case)
    if fleet.cap is not None:
        how = (
            f"  fleet {fleet.name!r} (live, from Redis): {fleet.workers} members sharing a cap "
            f"of {fleet.cap}, ({pool}) each, + {fleet.other_clients} other clients = {worst}"
        )
    else:
        how = (
            f"  ({pool}) x {fleet.workers} workers x {fleet.replicas} replicas "
            f"+ {fleet.other_clients} other clients = {worst}"
        )
    out += ["", "fleet worst case", how, ""]
    if verdict.status == "OK":
        out.append(
            f"OK: at most {worst} of {verdict.usable} usable connections "
            f"({verdict.headroom} to spare)"
        )
    elif verdict.headroom is None:
        out.append(f"AT RISK: the fleet's pools are unbounded; the server accepts {verdict.usable}")
    else:
        out.append(
            f"AT RISK: the fleet can open {worst} connections, {-verdict.headroom} more than "
            f"the {verdict.usable} the server accepts"
        )
    if verdict.recommendations:
        out += ["", "recommendations"]
        out += [f"  - {r}" for r in verdict.recommendations]
    return "\n".join(out) + "\n"


def render_json(database: str, facts: ServerFacts, fleet: Fleet, verdict: Assessment) -> str:
    """The machine report (for deploy pipelines that gate on the status)."""
    doc = {
        "status": verdict.status,
        "database": database,
        "server": {
            "backend": facts.backend,
            "version": facts.version,
            "max_connections": facts.max_connections,
            "reserved": dict(facts.reserved),
            "usable": facts.usable,
            "current_connections": facts.current_connections,
            "connection_states": dict(facts.connection_states),
            "timeouts": dict(facts.timeouts),
        },
        "fleet": {
            "pool_size": fleet.pool_size,
            "max_overflow": fleet.max_overflow,
            "workers": fleet.workers,
            "replicas": fleet.replicas,
            "other_clients": fleet.other_clients,
            "cap": fleet.cap,
            "name": fleet.name,
        },
        "worst_case": verdict.worst_case,
        "usable": verdict.usable,
        "headroom": verdict.headroom,
        "fits_per_process": verdict.fits_per_process,
        "recommendations": list(verdict.recommendations),
    }
    return json.dumps(doc, indent=2) + "\n"
