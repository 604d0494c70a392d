"""Builds one guard's parts from its settings: which enforcer, gate, quarantine, telemetry
and helpers an engine gets. Kept out of the facade so that it holds only the public API."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import Engine

from poolguard.config import GuardConfig
from poolguard.core.engines import default_pool_name
from poolguard.core.outcome import Outcomes
from poolguard.core.own_sessions import OwnSessions
from poolguard.core.parts import Parts
from poolguard.dialects import enforcer_for
from poolguard.observe.alerts import Alerter
from poolguard.observe.fingerprint import Fingerprint, fingerprinter_for
from poolguard.observe.telemetry import (
    PoolState,
    Telemetry,
    db_system_name,
    instrumented_by_opentelemetry,
)
from poolguard.policy.gate import Gate
from poolguard.policy.quarantine import Quarantine

__all__ = ["build_parts", "fingerprint_id"]


def build_parts(
    engine: Engine,
    config: GuardConfig,
    capacity: int,
    pool_state: Callable[[], PoolState | None],
) -> Parts:
    t, q, tc = config.timeouts, config.quarantine, config.telemetry
    enforcer = enforcer_for(
        engine.dialect,
        pg_mode=t.pg_timeout_mode,
        lock_timeout=t.lock_timeout,
        lock_timeout_explicit=t.lock_timeout_explicit,
        idle_in_transaction_timeout=t.idle_in_transaction_timeout,
    )
    name = tc.pool_name or default_pool_name(engine)
    fingerprint = fingerprinter_for(engine.dialect.name)
    parts = Parts(
        config=config,
        engine=engine,
        pool_name=name,
        gate=Gate(
            capacity,
            reserve=config.gate.reserve_for(capacity),
            max_share=config.gate.partition_share,
        ),
        enforcer=enforcer,
        quarantine=Quarantine(
            threshold=q.threshold,
            window=q.window,
            cooldown=q.cooldown,
            max_cooldown=q.max_cooldown,
            allow=[fingerprint_id(item, fingerprint) for item in q.allow],
        ),
        telemetry=Telemetry(
            pool_name=name,
            db_system=db_system_name(engine.dialect),
            pool_state=pool_state,
            meter_provider=tc.meter_provider,
            tracer_provider=tc.tracer_provider,
            trace_statements=tc.trace_statements,
            slow_statement_threshold=tc.slow_statement_threshold,
            # opentelemetry-instrumentation-sqlalchemy already traces statements: never twice.
            statement_spans=not instrumented_by_opentelemetry(engine),
            operation_metrics=tc.operation_metrics,
            exception_events=tc.exception_events,
        ),
        alerts=Alerter(config.alerts.on_alert, debounce=config.alerts.debounce),
        fingerprint=fingerprint,
        # A storm is more new connections in 10 s than twice the pool could ever need.
        storm_threshold=max(10, 2 * capacity),
    )
    enforcer.verify_ids = parts.track_pids
    if parts.track_pids:
        parts.own_sessions = OwnSessions(parts)
        parts.blame = parts.own_sessions if parts.blame_lock_holders else None
    parts.outcomes = Outcomes(parts)
    return parts


def fingerprint_id(item: str, fingerprint: Callable[[str], Fingerprint]) -> str:
    """A fingerprint id given as itself (16 hex digits) or as the statement's SQL, read by
    the engine's dialect rules (as the statement path reads it)."""
    if len(item) == 16 and all(c in "0123456789abcdef" for c in item):
        return item
    return fingerprint(item).id
