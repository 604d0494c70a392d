"""Fleet mode: one connection budget and one quarantine for every replica of an app.

``from poolguard.fleet import RedisFleet`` works on a core install; building one needs
redis-py (``pip install 'poolguard[redis]'``) and says so when it is missing.
"""

from poolguard.fleet.protocol import Fleet, FleetMember
from poolguard.fleet.redis_fleet import RedisFleet, read_fleet

__all__ = ["Fleet", "FleetMember", "RedisFleet", "read_fleet"]
