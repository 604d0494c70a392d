"""The outage replay: the postmortem's rogue-query outages, replayed against each mode.

``python -m benchmarks.outage_replay.run --help``; see README.md beside this file.
"""
