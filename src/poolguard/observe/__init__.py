"""What poolguard shows: OpenTelemetry metrics and spans, per-statement statistics, alerts,
and the literal-free statement descriptions (fingerprints) all of them use."""
