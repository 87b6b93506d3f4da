"""Per-client rate limiting: a token bucket per source address, and one log row per second.

A client past ``[server] rate_limit`` queries a second gets REFUSED (EDE 18, no text: a
small answer, nothing to amplify) and its refused queries are *counted*, not logged one
by one: a flood of 100,000 unique names a second becomes one row per client per second
(``verdict`` NULL, ``rcode`` REFUSED, ``note`` 'rate-limited: N queries').

Both tables are bounded, so spoofed source addresses cannot grow them: at ``max_clients``
buckets, buckets that have refilled completely (they hold no information) are dropped, at
most once a second; if every bucket is still active, addresses not yet known share one
overflow bucket until room appears. Clients already known keep their own buckets, so a
spoofing flood cannot starve them.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_CLIENTS = 65_536
PRUNE_INTERVAL = 1.0

Row = tuple


class RateLimiter:
    """Token buckets keyed by client address; ``allow(ip, now)`` takes one token or says no."""

    __slots__ = ("rate", "burst", "max_clients", "_buckets", "_shared", "_next_prune")

    def __init__(self, rate: float, burst: float | None = None, max_clients: int = MAX_CLIENTS) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)  # one second's worth
        self.max_clients = max_clients
        self._buckets: dict[str, list[float]] = {}
        self._shared = [self.burst, 0.0]
        self._next_prune = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str, now: float) -> bool:
        b = self._buckets.get(ip)
        if b is None:
            if len(self._buckets) >= self.max_clients:
                self._prune(now)
            if len(self._buckets) < self.max_clients:
                b = self._buckets[ip] = [self.burst, now]
            else:
                b = self._shared
        tokens = b[0] + (now - b[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        b[1] = now
        if tokens >= 1.0:
            b[0] = tokens - 1.0
            return True
        b[0] = tokens
        return False

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL
        refill = self.burst / self.rate  # idle this long = full again = nothing to remember
        self._buckets = {ip: b for ip, b in self._buckets.items() if now - b[1] < refill}


class RefusedCounter:
    """Counts rate-limited queries per client and second; emits one log record for each."""

    __slots__ = ("submit", "max_clients", "_counts", "total")

    def __init__(self, submit: Callable[[Row], None] | None, max_clients: int = MAX_CLIENTS) -> None:
        self.submit = submit
        self.max_clients = max_clients
        self.total = 0  # refused since start (for /metrics)
        self._counts: dict[str, list] = {}  # ip -> [second, count, transport]

    def count(self, ip: str, transport: str, wall: float, mode: str) -> None:
        self.total += 1
        second = int(wall)
        c = self._counts.get(ip)
        if c is not None:
            if c[0] == second:
                c[1] += 1
                return
            self._emit(ip, c, mode)
        elif len(self._counts) >= self.max_clients:
            self.flush(mode)  # bounded: rows come out early rather than the table growing
        self._counts[ip] = [second, 1, transport]

    def flush(self, mode: str, before: float | None = None) -> None:
        """Emit the counts of seconds before ``before`` (all of them if None)."""
        cutoff = None if before is None else int(before)
        done = [ip for ip, c in self._counts.items() if cutoff is None or c[0] < cutoff]
        for ip in done:
            self._emit(ip, self._counts.pop(ip), mode)

    def _emit(self, ip: str, c: list, mode: str) -> None:
        if self.submit is not None:
            # LOG_FIELDS order: ts, client, transport, qname, qtype, verdict, mode, rule, rcode,
            # answers, cached, latency_ms, note.
            self.submit((float(c[0]), ip, c[2], None, None, None, mode, None, 5, None, False, 0.0,
                         f"rate-limited: {c[1]} queries"))
