"""Fleet mode: one connection budget and one quarantine for every replica of an app."""

from poolguard.fleet.protocol import Fleet, FleetMember

__all__ = ["Fleet", "FleetMember"]
