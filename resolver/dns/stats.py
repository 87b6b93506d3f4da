"""Plain counters the query path keeps for /metrics (read by ``resolver.observe.metrics``)."""

from __future__ import annotations

import bisect


class UpstreamStats:
    """Plain counters of upstream exchanges, read by the metrics collector.

    Owned by the Resolver (not by Upstream, which a reload replaces) so the figures keep
    counting across reloads. Only cache misses come here, next to a network round trip.
    """

    bounds = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self) -> None:
        self.durations: dict[str, list] = {}  # server -> [bucket counts..., +Inf count, sum]
        self.errors: dict[tuple[str, str], int] = {}  # (server, kind) -> count

    def observe(self, server: str, seconds: float) -> None:
        row = self.durations.get(server)
        if row is None:
            row = self.durations[server] = [0] * (len(self.bounds) + 1) + [0.0]
        row[bisect.bisect_left(self.bounds, seconds)] += 1
        row[-1] += seconds

    def error(self, server: str, kind: str) -> None:
        key = (server, kind)
        self.errors[key] = self.errors.get(key, 0) + 1

    def snapshot(self) -> dict[str, tuple[list[int], float]]:
        """server -> (per-bucket counts with +Inf last, sum of seconds)."""
        return {s: (row[:-1], row[-1]) for s, row in list(self.durations.items())}
