"""Fleet mode benchmarks: the per-checkout cost, and the outage replay at fleet scale."""
