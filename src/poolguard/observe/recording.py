"""Whether OpenTelemetry records anything: decided once per tracer and meter, so that the
hot paths skip their telemetry calls while nothing can record.

A no-op tracer or meter never records; one from the global providers (the API's proxies)
records once a global provider is set, which the API keeps in module state under the names
below (a dict read for the hot paths); anything else records now.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeter
from opentelemetry.metrics import _internal as _metrics_state
from opentelemetry.trace import NoOpTracer, ProxyTracer

__all__ = [
    "METER_PROVIDER",
    "NEVER",
    "NOW",
    "TRACER_PROVIDER",
    "WATCH",
    "meter_state",
    "tracer_state",
]

# Whether a tracer or meter records: never (a no-op one), once a global provider is set (the
# API's proxies, for which the API keeps the global in module state), or now.
NEVER, WATCH, NOW = 0, 1, 2
#: The names under which the API's modules keep the global providers (None until set).
TRACER_PROVIDER = "_TRACER_PROVIDER"
METER_PROVIDER = "_METER_PROVIDER"
#: An API without them: every proxy counts as recording, as before this check existed.
_CANWATCH = hasattr(trace, TRACER_PROVIDER) and hasattr(_metrics_state, METER_PROVIDER)


def tracer_state(tracer: object) -> int:
    if isinstance(tracer, NoOpTracer):
        return NEVER
    if isinstance(tracer, ProxyTracer) and _CANWATCH and trace._TRACER_PROVIDER is None:
        return WATCH
    return NOW


def meter_state(meter: object) -> int:
    if isinstance(meter, NoOpMeter):
        return NEVER
    if (
        type(meter).__name__ == "_ProxyMeter"
        and _CANWATCH
        and _metrics_state._METER_PROVIDER is None
    ):
        return WATCH
    return NOW
