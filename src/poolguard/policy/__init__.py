"""Pure decisions, no I/O and an injected clock: the gate, shedding (CoDel), the quarantine's
circuit breakers, lock-holder blame and the alert detectors. Each is testable without a
database and shareable across processes behind the same interface (see poolguard.fleet)."""
